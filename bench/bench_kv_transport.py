"""KV transfer rate of the two connectors between two processes on this machine: ``torch``
(gloo isend/irecv) and ``nixl`` (NIXL WRITE over UCX), measured in the same run, interleaved
rep by rep so that both see the same machine load.

    python bench/bench_kv_transport.py --sizes-mb 32,256 --reps 5
    python bench/bench_kv_transport.py --sizes-mb 32 --ucx-tls tcp   # force UCX onto TCP

A rep starts when both ranks leave a barrier and ends when the receiver holds the bytes (its
connector returned them); every received buffer is compared with the sent one after timing.
Reported: median seconds and GB/s (1e9 bytes/s) per size and transport, and nixl / torch.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _payload(nbytes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8)


def _wait(conn, timeout: float = 300.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = conn.poll()
        if got:
            return got[0]
        time.sleep(0.0001)
    raise TimeoutError("transfer did not finish")


def _rank(rank: int, port: int, args, outdir: str) -> None:
    if args.ucx_tls:
        os.environ["UCX_TLS"] = args.ucx_tls
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import datetime

    import torch.distributed as dist

    from disagg.kv.connector import TorchKVConnector
    from disagg.kv.nixl import NixlKVConnector

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=600))
    conns = {"torch": TorchKVConnector(dist.new_group([0, 1], backend="gloo"), timeout_s=300),
             "nixl": NixlKVConnector(dist.distributed_c10d._get_default_store(), rank,
                                     timeout_s=300, poll_s=0.0001)}
    rows = []
    tag = 0
    for mb in args.sizes_mb:
        nbytes = int(mb * (1 << 20))
        buf = _payload(nbytes, int(mb * 1000))
        times = {k: [] for k in conns}
        bad = {k: 0 for k in conns}
        for rep in range(args.warmup + args.reps):
            for name, conn in conns.items():
                tag += 1
                dist.barrier()
                t0 = time.perf_counter()
                if rank == 0:
                    conn.send("b", buf, 1, tag)
                    r = _wait(conn)
                    assert r.ok, r.error
                else:
                    conn.recv("b", nbytes, 0, tag)
                    r = _wait(conn)
                    dt = time.perf_counter() - t0
                    assert r.ok, r.error
                    if rep >= args.warmup:
                        times[name].append(dt)
                    bad[name] += int(not torch.equal(r.buffer, buf))
                    del r
        if rank == 1:
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"size_mb": mb, "nbytes": nbytes, "reps": args.reps,
                         **{f"{k}_s": med[k] for k in conns},
                         **{f"{k}_gbps": nbytes / med[k] / 1e9 for k in conns},
                         **{f"{k}_all_s": times[k] for k in conns},
                         "nixl_over_torch": med["torch"] / med["nixl"],
                         "mismatches": bad})
    dist.barrier()
    for c in conns.values():
        c.close()
    if rank == 1:
        with open(os.path.join(outdir, "rows.json"), "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", default="32,256", help="comma-separated MiB per transfer")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ucx-tls", default=os.environ.get("UCX_TLS", ""),
                   help="UCX transports for nixl (default: UCX's choice; here cma for the "
                        "write, tcp for control)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    args.sizes_mb = [float(s) for s in args.sizes_mb.split(",")]
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_rank, args=(_free_port(), args, d), nprocs=2, start_method="spawn")
        rows = json.load(open(os.path.join(d, "rows.json")))
    load1 = os.getloadavg()
    tls = args.ucx_tls or "default"
    print(f"KV transport, 2 processes on {os.cpu_count()} CPUs, UCX_TLS={tls}, "
          f"load average {load0[0]:.2f} -> {load1[0]:.2f}, median of {args.reps} reps")
    print(f"{'size':>8} | {'torch ms':>9} {'GB/s':>6} | {'nixl ms':>9} {'GB/s':>6} | nixl/torch")
    for r in rows:
        print(f"{r['size_mb']:>6g}MB | {r['torch_s'] * 1e3:9.1f} {r['torch_gbps']:6.2f} | "
              f"{r['nixl_s'] * 1e3:9.1f} {r['nixl_gbps']:6.2f} | {r['nixl_over_torch']:.2f}x"
              + ("" if not any(r["mismatches"].values()) else f"  MISMATCH {r['mismatches']}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ucx_tls": tls, "load_avg": [load0, load1], "rows": rows}, f, indent=1)
    return 1 if any(any(r["mismatches"].values()) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
