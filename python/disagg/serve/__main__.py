"""``torchrun --nproc-per-node N -m disagg.serve --model M --prefill P --decode D ...``

Rank 0 is the HTTP frontend and router; ranks ``1..P`` are the prefill pool and
``P+1..P+D`` the decode pool (``N = 1 + P + D``). With ``--mode colocated`` the same ``P + D``
worker ranks are data-parallel replicas doing both phases with chunked prefill.

Without torchrun (no ``RANK`` in the environment) the command launches its own worker
processes. Under torchrun a rank that dies makes torchrun stop every rank (its policy); the
self-launched form keeps serving and reports the failure on ``/health`` instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m disagg.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="model folder or 'default'")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--prefill", type=int, default=1, help="prefill worker ranks")
    p.add_argument("--decode", type=int, default=1, help="decode worker ranks")
    p.add_argument("--mode", choices=("disaggregated", "colocated"), default="disaggregated")
    p.add_argument("--kv-transport", choices=("torch", "nixl"), default="torch")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("DISAGG_API_KEY"))
    p.add_argument("--dtype", default="auto")
    p.add_argument("--block-size", type=int, default=16, help="KV block size (prefill/colocated)")
    p.add_argument("--decode-block-size", type=int, default=None,
                   help="KV block size of the decode pool (default: --block-size)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests waiting for their first token before new ones get 429")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--kv-timeout", type=float, default=30.0, help="seconds per KV transfer")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--threads-per-worker", type=int, default=1,
                   help="torch intra-op threads per rank (1 = one core per process)")
    p.add_argument("--log-level", default="WARNING")
    from .spec_options import add_args as add_spec_args
    add_spec_args(p)
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _roles(args, world: int) -> dict:
    if world != 1 + args.prefill + args.decode:
        raise SystemExit(f"disagg.serve: world size {world} != 1 + prefill ({args.prefill}) + "
                         f"decode ({args.decode})")
    if args.prefill < 1 or args.decode < 1:
        raise SystemExit("disagg.serve: --prefill and --decode must be >= 1")
    if args.mode == "colocated":
        return {r: "both" for r in range(1, world)}
    return {r: ("prefill" if r <= args.prefill else "decode") for r in range(1, world)}


def _self_launch(args, argv) -> list:
    """Start ranks 1..N-1 as child processes; this process becomes rank 0."""
    world = 1 + args.prefill + args.decode
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(world), RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(world))
    os.environ.update({k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK",
                                           "LOCAL_RANK", "LOCAL_WORLD_SIZE")})
    procs = []
    for r in range(1, world):
        e = dict(env, RANK=str(r), LOCAL_RANK=str(r))
        procs.append(subprocess.Popen([sys.executable, "-m", "disagg.serve", *argv], env=e))
    return procs


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from .spec_options import check_args
    check_args(args)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s [rank " + os.environ.get("RANK", "0")
                        + "] %(name)s: %(message)s")
    children = []
    if "RANK" not in os.environ:
        children = _self_launch(args, argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    roles = _roles(args, world)
    if args.kv_transport == "nixl" and args.mode == "disaggregated":
        raise SystemExit("disagg.serve: the nixl KV transport is not implemented in this "
                         "version; use --kv-transport torch")

    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, args.threads_per_worker))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.startup_timeout))
    # KV bytes get their own group, so they never queue behind other traffic
    kv_group = dist.new_group(list(range(1, world)), backend="gloo")
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = torch.zeros(1, dtype=torch.int64)
    if rank == 0:
        ctrl = socket.create_server((host, 0))
        port[0] = ctrl.getsockname()[1]
    dist.broadcast(port, 0)  # the only collective after start-up
    if rank == 0:
        return _run_frontend(args, roles, ctrl, children)
    return _run_worker(args, rank, roles[rank], host, int(port[0]), kv_group)


def _run_frontend(args, roles, ctrl, children) -> int:
    import asyncio

    from ..engine.tokenizer import load_tokenizer
    from ..model import resolve_model_path
    from .server import serve_frontend

    path = resolve_model_path(args.model)
    args.model_path = path
    name = args.served_model_name or ("default" if args.model == "default"
                                      else os.path.basename(os.path.normpath(path)))
    try:
        asyncio.run(serve_frontend(args, roles, load_tokenizer(path), name, ctrl))
    finally:
        deadline = time.monotonic() + 10
        for p in children:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=5)
    # gloo's teardown can wait on ranks that already exited; nothing is left to flush
    sys.stdout.flush()
    os._exit(0)


def _run_worker(args, rank, role, host, port, kv_group) -> int:
    from ..engine import Engine
    from ..kv.connector import make_connector
    from .protocol import LineConn
    from .spec_options import engine_speculative
    from .worker import Worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 tells workers when to stop
    bs = args.decode_block_size if (role == "decode" and args.decode_block_size) else args.block_size
    engine = Engine(args.model, dtype=args.dtype, block_size=bs, num_blocks=args.num_blocks,
                    max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens,
                    enable_chunked_prefill=True,
                    speculative=engine_speculative(args, role))
    connector = None
    if args.mode == "disaggregated":
        connector = make_connector(args.kv_transport, kv_group, args.kv_timeout)
    sock = socket.create_connection((host, port), timeout=args.startup_timeout)
    sock.settimeout(None)
    conn = LineConn(sock)
    conn.send({"op": "hello", "rank": rank, "role": role, "max_model_len": engine.max_model_len,
               "block_size": bs, "num_blocks": engine.kv.num_blocks})
    try:
        Worker(rank, role, engine, conn, connector, kv_timeout_s=args.kv_timeout).run()
    finally:
        conn.close()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
