"""Serving benchmark: drive an OpenAI-compatible server with timed arrivals and report latency
and goodput under SLOs.

``disagg-bench serve --url http://127.0.0.1:8000 --dataset random --request-rate 4
--num-prompts 64 --slo-ttft-ms 500 --slo-tpot-ms 50 [--sweep 1,2,4,8] [--plot out.png]``
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Optional


def add_arguments(p) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--dataset", default="random",
                   help="'random' or a JSON file: a list of strings or of "
                        "{'prompt': str, 'max_tokens': int}")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=32)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly in [len*(1-r), len*(1+r)]")
    p.add_argument("--prefill-heavy-fraction", type=float, default=0.0,
                   help="fraction of requests whose prompt is --long-input-len tokens")
    p.add_argument("--long-input-len", type=int, default=1024)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the inter-arrival times (1 = Poisson)")
    p.add_argument("--sweep", default=None,
                   help="comma-separated rates: run each and report the goodput rate")
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--attainment", type=float, default=0.9,
                   help="SLO attainment that defines the goodput rate in a sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--output", default=None, help="write the JSON result here")
    p.add_argument("--plot", default=None, help="PNG of SLO attainment against rate (sweeps)")


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    itl: list = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_len: int = 0
    error: Optional[str] = None

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def make_requests(args) -> list:
    """(prompt, max_tokens) pairs. Random prompts are ASCII letters: one token per byte on a
    byte-level tokenizer, roughly one per 4 on BPE tokenizers."""
    rng = random.Random(args.seed)
    if args.dataset != "random":
        with open(args.dataset) as f:
            data = json.load(f)
        if not isinstance(data, list) or not data:
            raise SystemExit(f"{args.dataset}: expected a non-empty JSON list")
        out = []
        for d in data:
            if isinstance(d, str):
                out.append((d, args.random_output_len))
            elif isinstance(d, dict) and isinstance(d.get("prompt"), str):
                out.append((d["prompt"], int(d.get("max_tokens", args.random_output_len))))
            else:
                raise SystemExit(f"{args.dataset}: entries must be strings or {{'prompt': ...}}")
        return [out[i % len(out)] for i in range(args.num_prompts)]

    def draw(n):
        r = args.random_range_ratio
        return max(1, rng.randint(int(n * (1 - r)), int(n * (1 + r))))
    reqs = []
    for _ in range(args.num_prompts):
        n = args.long_input_len if rng.random() < args.prefill_heavy_fraction \
            else draw(args.random_input_len)
        prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))
        reqs.append((prompt, draw(args.random_output_len)))
    return reqs


async def _one(session, args, model, prompt, max_tokens) -> Result:
    import aiohttp

    res = Result(prompt_len=len(prompt))
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    # include_usage: the last event says how many tokens were generated, so TPOT stays right
    # when the server sends several tokens in one event (text deltas do not say how many)
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    t0 = time.perf_counter()
    last = t0
    counted = None
    try:
        async with session.post(args.url.rstrip("/") + path, json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=args.timeout)) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return res
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message"))
                    return res
                usage = chunk.get("usage") or {}
                if usage.get("completion_tokens") is not None:
                    counted = int(usage["completion_tokens"])
                ch = (chunk.get("choices") or [{}])[0]
                piece = ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content")
                if not piece and "token_ids" not in ch:
                    continue
                now = time.perf_counter()
                # one event may carry several tokens (token_ids when the server sends them)
                n = len(ch.get("token_ids") or []) or 1
                if res.output_tokens == 0:
                    res.ttft = now - t0
                else:
                    res.itl += [(now - last) / n] * n
                last = now
                res.output_tokens += n
        res.e2e = time.perf_counter() - t0
        if counted is not None and counted > res.output_tokens > 0:
            # events that carried several tokens as one text delta: ITL keeps the gaps between
            # events, TPOT divides by the tokens the server says it generated
            res.output_tokens = counted
        res.ok = res.output_tokens > 0
        if not res.ok:
            res.error = "no tokens"
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _run_rate(args, model, reqs, rate) -> tuple:
    import aiohttp

    rng = random.Random(args.seed + 1)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        tasks = []
        t0 = time.perf_counter()
        for prompt, mt in reqs:
            tasks.append(asyncio.create_task(_one(session, args, model, prompt, mt)))
            if rate != float("inf"):
                # gamma inter-arrivals with mean 1/rate; shape 1 is a Poisson process
                await asyncio.sleep(rng.gammavariate(args.burstiness, 1.0 / (rate * args.burstiness)))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def _pct(xs, q):
    if not xs:
        return 0.0
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results, duration, args, rate) -> dict:
    ok = [r for r in results if r.ok]
    out = {"request_rate": rate, "num_prompts": len(results), "completed": len(ok),
           "failed": len(results) - len(ok), "duration_s": duration,
           "request_throughput": len(ok) / duration if duration else 0.0,
           "output_throughput": sum(r.output_tokens for r in ok) / duration if duration else 0.0,
           "errors": sorted({r.error for r in results if r.error})[:5]}
    for name, xs in (("ttft_ms", [r.ttft * 1e3 for r in ok]),
                     ("tpot_ms", [r.tpot * 1e3 for r in ok if r.output_tokens > 1]),
                     ("itl_ms", [x * 1e3 for r in ok for x in r.itl]),
                     ("e2e_ms", [r.e2e * 1e3 for r in ok])):
        out[name] = {"mean": sum(xs) / len(xs) if xs else 0.0, "p50": _pct(xs, 50),
                     "p90": _pct(xs, 90), "p99": _pct(xs, 99)}

    def meets(r):
        return (r.ok and (args.slo_ttft_ms is None or r.ttft * 1e3 <= args.slo_ttft_ms)
                and (args.slo_tpot_ms is None or r.tpot * 1e3 <= args.slo_tpot_ms))
    good = sum(1 for r in results if meets(r))
    out["slo_attainment"] = good / len(results) if results else 0.0
    out["goodput_rps"] = good / duration if duration else 0.0
    return out


def _model(args) -> str:
    if args.model:
        return args.model
    import urllib.request

    req = urllib.request.Request(args.url.rstrip("/") + "/v1/models")
    if args.api_key:
        req.add_header("Authorization", f"Bearer {args.api_key}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["data"][0]["id"]


def run_bench(args) -> dict:
    model = _model(args)
    reqs = make_requests(args)
    rates = ([float(x) for x in args.sweep.split(",")] if args.sweep else [args.request_rate])
    runs = []
    for rate in rates:
        results, dur = asyncio.run(_run_rate(args, model, reqs, rate))
        s = summarize(results, dur, args, rate)
        runs.append(s)
        print(f"[serve-bench] rate {rate:g} req/s: {s['completed']}/{s['num_prompts']} ok, "
              f"TTFT p50 {s['ttft_ms']['p50']:.0f} ms, TPOT p50 {s['tpot_ms']['p50']:.1f} ms, "
              f"SLO attainment {s['slo_attainment']:.0%}, goodput {s['goodput_rps']:.2f} req/s",
              flush=True)
    passing = [r["request_rate"] for r in runs if r["slo_attainment"] >= args.attainment]
    out = {"url": args.url, "model": model, "slo_ttft_ms": args.slo_ttft_ms,
           "slo_tpot_ms": args.slo_tpot_ms, "attainment_target": args.attainment, "runs": runs,
           # the highest swept rate at which enough requests met every SLO
           "goodput_rate": max(passing) if passing else 0.0}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)
    if args.plot:
        plot([("server", out)], args.plot)
    return out


def plot(series, path: str) -> None:
    """SLO attainment against request rate, one line per (label, result)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, res in series:
        xs = [r["request_rate"] for r in res["runs"]]
        ax.plot(xs, [100 * r["slo_attainment"] for r in res["runs"]], marker="o", label=label)
    ax.axhline(100 * series[0][1]["attainment_target"], color="grey", ls="--", lw=0.8)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 105)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="disagg-bench serve", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    out = run_bench(args)
    print(json.dumps(out))
    return 0
