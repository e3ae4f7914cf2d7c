"""Goodput of disaggregated vs colocated serving at equal process count.

For each worker count W (``--workers 2,4``) it starts the real server twice, each time with
``1 + W`` processes (rank 0 = HTTP/router) and one OMP thread per process, each worker pinned
to a core of its own while there are cores enough (``--pin-cpus``):

* disaggregated: ``--prefill P --decode W - P`` one-rank units (``--prefill`` sets P; default
  ``W - max(1, W // 4)``: a prefill-heavy workload wants most processes on prefill);
* colocated: ``W`` data-parallel replicas doing both phases with chunked prefill;

and sweeps request rates with the serving benchmark (streaming client, Poisson arrivals), on a
prefill-heavy mix (``--prefill-heavy-fraction`` of the prompts are ``--long-input-len`` tokens)
under a TTFT and a tight TPOT SLO. The goodput rate is the highest swept rate at which at least
90% of the requests meet both SLOs.

    python bench/bench_goodput.py --workers 2,4 --sweep 0.25,0.5,1,2 \\
        --slo-ttft-ms 1000 --slo-tpot-ms 15 --output goodput.json --plot goodput.png

Timings on a machine shared with other jobs are not the figures: the script prints the load
average before and after each run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load() -> str:
    return "%.2f %.2f %.2f" % os.getloadavg()


def start_server(model: str, mode: str, prefill: int, decode: int, extra: list,
                 timeout: float = 300.0):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "disagg.serve", "--model", model, "--mode", mode,
           "--prefill", str(prefill), "--decode", str(decode), "--port", str(port),
           "--threads-per-worker", "1", "--pin-cpus", *extra]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    stop_server(proc)
    raise TimeoutError("server did not become healthy")


def stop_server(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def bench_args(url: str, a) -> SimpleNamespace:
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
        max_len = json.load(r)["data"][0]["max_model_len"]
    long_len = min(a.long_input_len, max_len - a.random_output_len * 2 - 8)
    return SimpleNamespace(url=url, model=None, api_key=None, endpoint="completions",
                           dataset="random", random_input_len=a.random_input_len,
                           random_output_len=a.random_output_len, random_range_ratio=0.25,
                           prefill_heavy_fraction=a.prefill_heavy_fraction,
                           long_input_len=long_len, num_prompts=a.num_prompts,
                           request_rate=float(a.sweep.split(",")[0]), burstiness=1.0,
                           sweep=a.sweep, slo_ttft_ms=a.slo_ttft_ms, slo_tpot_ms=a.slo_tpot_ms,
                           attainment=a.attainment, seed=a.seed, timeout=300.0, output=None,
                           plot=None)


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--workers", default="2,4", help="worker processes per server (comma list)")
    p.add_argument("--prefill", type=int, default=None,
                   help="prefill workers of the disaggregated server (default W - max(1, W//4))")
    p.add_argument("--sweep", default="0.25,0.5,1,2")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--random-input-len", type=int, default=48)
    p.add_argument("--random-output-len", type=int, default=24)
    p.add_argument("--prefill-heavy-fraction", type=float, default=0.35)
    p.add_argument("--long-input-len", type=int, default=1024)
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=15.0)
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--modes", default="disaggregated,colocated")
    p.add_argument("--server-args", default="", help="extra server arguments (one string)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    p.add_argument("--plot", default=None)
    a = p.parse_args(argv)
    from disagg.bench import serve as sb

    extra = ["--max-num-batched-tokens", str(a.max_num_batched_tokens)] + a.server_args.split()
    report = {"args": vars(a), "runs": []}
    series = []
    for W in [int(x) for x in a.workers.split(",")]:
        P = a.prefill if a.prefill is not None else W - max(1, W // 4)
        for mode in a.modes.split(","):
            pre, dec = (P, W - P) if mode == "disaggregated" else (W - 1, 1)
            label = (f"disaggregated {pre}P+{dec}D" if mode == "disaggregated"
                     else f"colocated {W} replicas")
            load0 = _load()
            proc, url = start_server(a.model, mode, pre, dec, extra)
            try:
                args = bench_args(url, a)
                # warm-up: first-use costs (allocations, lazy imports) stay out of the figures
                warm = SimpleNamespace(**dict(vars(args), num_prompts=4, sweep=None,
                                              request_rate=float("inf")))
                sb.run_bench(warm)
                print(f"== W={W} {label} (load {load0})", flush=True)
                res = sb.run_bench(args)
                res["kv_hidden_s"] = _metric(url, "disagg_kv_transfer_hidden_seconds_total")
                res["kv_exposed_s"] = _metric(url, "disagg_kv_transfer_exposed_seconds_total")
            finally:
                stop_server(proc)
            res.update(workers=W, mode=mode, label=label, load_before=load0, load_after=_load())
            report["runs"].append(res)
            series.append((f"W={W} {label}", res))
    hdr = (f"{'server':>28} {'rate':>5} | {'TTFT p50':>9} {'TTFT p90':>9} {'TPOT p50':>9} "
           f"{'TPOT p90':>9} | {'SLO ok':>6} {'goodput':>8}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for res in report["runs"]:
        for run in res["runs"]:
            print(f"{'W=%d %s' % (res['workers'], res['label']):>28} {run['request_rate']:>5g} | "
                  f"{run['ttft_ms']['p50']:>7.0f}ms {run['ttft_ms']['p90']:>7.0f}ms "
                  f"{run['tpot_ms']['p50']:>7.1f}ms {run['tpot_ms']['p90']:>7.1f}ms | "
                  f"{run['slo_attainment']:>6.0%} {run['goodput_rps']:>6.2f}/s")
    print()
    for W in sorted({r["workers"] for r in report["runs"]}):
        g = {r["mode"]: r["goodput_rate"] for r in report["runs"] if r["workers"] == W}
        d, c = g.get("disaggregated", 0.0), g.get("colocated", 0.0)
        ratio = f"{d / c:.1f}x" if c else ("inf" if d else "n/a")
        print(f"W={W}: goodput rate (>= {a.attainment:.0%} within both SLOs) disaggregated "
              f"{d:g} req/s, colocated {c:g} req/s -> {ratio}")
    print(f"load average now: {_load()}")
    if a.output:
        with open(a.output, "w") as f:
            json.dump(report, f, indent=1)
    if a.plot:
        sb.plot(series, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
