"""``torchrun --nproc-per-node N -m disagg.serve --model M --prefill P --decode D ...``

Rank 0 is the HTTP frontend and router; then come the ``P`` prefill units and the ``D``
decode units, each unit being the ranks of its pool's parallel layout (``--prefill-tp`` x
``--prefill-ep / --prefill-tp`` ranks, likewise for decode): ``N = 1 + P * size_p + D *
size_d``, which is ``1 + P + D`` with the default one-rank units. With ``--mode colocated``
``P + D`` one-rank workers are data-parallel replicas doing both phases with chunked prefill.

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
    p.add_argument("--prefill", type=int, default=1, help="prefill units (instances)")
    p.add_argument("--decode", type=int, default=1, help="decode units (instances)")
    p.add_argument("--prefill-tp", type=int, default=1, help="TP ranks per prefill unit")
    p.add_argument("--prefill-ep", type=int, default=1,
                   help="EP degree of a prefill unit (1, or a multiple of --prefill-tp)")
    p.add_argument("--decode-tp", type=int, default=1, help="TP ranks per decode unit")
    p.add_argument("--decode-ep", type=int, default=1,
                   help="EP degree of a decode unit (1, or a multiple of --decode-tp)")
    p.add_argument("--pool-timeout", type=float, default=60.0,
                   help="seconds a collective inside a unit may take before the unit fails")
    p.add_argument("--kv-layers-per-send", type=int, default=0,
                   help="send the KV every N layers as the prefill computes them (0: all "
                        "layers in one part, after the last layer)")
    p.add_argument("--kv-retries", type=int, default=0,
                   help="on a failed KV transfer, recompute on the decode instance this many "
                        "times (0: the request fails)")
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
    p.add_argument("--pin-cpus", action="store_true",
                   help="pin worker rank r to the --threads-per-worker CPUs starting at "
                        "(r - 1) x threads, wrapping over the CPUs this process may use "
                        "(rank 0, the HTTP front end, stays unpinned)")
    p.add_argument("--log-level", default="WARNING")
    from .spec_options import add_args as add_spec_args
    add_spec_args(p)
    return p


def _pin_worker(rank: int, threads: int) -> None:
    """Worker rank r takes `threads` CPUs starting at (r - 1) * threads, wrapping over the CPUs
    this process may run on, so that workers do not migrate or share a core while there are
    cores enough."""
    if not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    n = max(1, threads)
    mine = {cpus[((rank - 1) * n + i) % len(cpus)] for i in range(n)}
    os.sched_setaffinity(0, mine)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _units(args) -> list:
    from .pool import plan_units

    try:
        return plan_units(args.mode, args.prefill, args.decode, args.prefill_tp,
                          args.prefill_ep, args.decode_tp, args.decode_ep)
    except ValueError as e:
        raise SystemExit(f"disagg.serve: {e}")


def _self_launch(args, argv) -> list:
    """Start ranks 1..N-1 as child processes; this process becomes rank 0."""
    from .pool import world_size

    world = world_size(_units(args))
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
    if getattr(args, "speculative", "off") != "off" and any(
            u.size > 1 and u.role != "prefill" for u in _units(args)):
        raise SystemExit("disagg.serve: --speculative needs one-rank decode/colocated units "
                         "(no --decode-tp/--decode-ep > 1 with speculation in this version)")
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s [rank " + os.environ.get("RANK", "0")
                        + "] %(name)s: %(message)s")
    children = []
    if "RANK" not in os.environ:
        children = _self_launch(args, argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    units = _units(args)
    from .pool import world_size
    if world != world_size(units):
        raise SystemExit(f"disagg.serve: world size {world} != {world_size(units)} (1 + the "
                         f"ranks of {args.prefill} prefill and {args.decode} decode units)")
    if args.kv_retries < 0 or args.kv_layers_per_send < 0:
        raise SystemExit("disagg.serve: --kv-retries and --kv-layers-per-send must be >= 0")
    if args.kv_transport == "nixl" and args.mode == "disaggregated":
        from ..kv.nixl import nixl_available

        if not nixl_available():
            raise SystemExit("disagg.serve: --kv-transport nixl needs NIXL "
                             "(pip install nixl-cu13); or use --kv-transport torch")

    import datetime

    import torch
    import torch.distributed as dist

    if args.pin_cpus and rank > 0:
        _pin_worker(rank, args.threads_per_worker)
    torch.set_num_threads(max(1, args.threads_per_worker))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.startup_timeout))
    # KV bytes get their own group, so they never queue behind other traffic
    kv_group = dist.new_group(list(range(1, world)), backend="gloo")
    from .pool import build_unit_groups
    unit_group, rank_groups = build_unit_groups(units, rank, args.pool_timeout)
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = torch.zeros(1, dtype=torch.int64)
    if rank == 0:
        ctrl = socket.create_server((host, 0))
        port[0] = ctrl.getsockname()[1]
    dist.broadcast(port, 0)  # the only collective after start-up
    if rank == 0:
        return _run_frontend(args, units, ctrl, children)
    unit = next(u for u in units if rank in u.ranks)
    return _run_worker(args, rank, unit, host, int(port[0]), kv_group, unit_group, rank_groups)


def _run_frontend(args, units, ctrl, children) -> int:
    import asyncio

    from ..engine.tokenizer import load_tokenizer
    from ..model import resolve_model_path
    from .server import serve_frontend

    path = resolve_model_path(args.model)
    args.model_path = path
    name = args.served_model_name or ("default" if args.model == "default"
                                      else os.path.basename(os.path.normpath(path)))
    try:
        asyncio.run(serve_frontend(args, units, load_tokenizer(path), name, ctrl))
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


def _make_engine(args, unit, rank_groups, bs):
    """This rank's engine: the plain one for a one-rank unit, else its share of the model
    under the unit's layout (TP/EP collectives over the unit's groups)."""
    from ..engine import Engine
    from .spec_options import engine_speculative

    kw = dict(block_size=bs, num_blocks=args.num_blocks, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_chunked_prefill=True, speculative=engine_speculative(args, unit.role))
    if unit.size == 1:
        return Engine(args.model, dtype=args.dtype, **kw)
    import math

    import torch

    from ..model import resolve_model_path
    from ..parallel.comm import Comm
    from ..parallel.model import ParallelCausalLM

    path = resolve_model_path(args.model)
    comm = Comm(args.pool_timeout)
    comm.start_watchdog()
    torch.manual_seed(0x5EED)  # the same draws on every rank of the unit
    model = ParallelCausalLM.from_pretrained(path, rank_groups.layout, rank_groups, comm,
                                             args.dtype)
    if kw["num_blocks"] is None:  # from the whole model: equal on every rank of the unit
        cfg = model.global_config
        max_len = min(args.max_model_len or cfg.max_position_embeddings,
                      cfg.max_position_embeddings)
        per_block = (2 * bs * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
                     * cfg.num_hidden_layers)
        kw["num_blocks"] = max(1, min(args.max_num_seqs * math.ceil(max_len / bs),
                                      (1 << 30) // per_block))
    tok = path if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    return Engine(model, tok, **kw)


def _run_worker(args, rank, unit, host, port, kv_group, unit_group=None, rank_groups=None) -> int:
    from ..kv.connector import make_connector
    from .pool import PoolWorker
    from .protocol import LineConn

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 tells workers when to stop
    role = unit.role
    bs = (args.decode_block_size if (role == "decode" and args.decode_block_size)
          else args.block_size)
    engine = _make_engine(args, unit, rank_groups, bs)
    connector = None
    if args.mode == "disaggregated":
        import torch.distributed as dist

        # nixl: agent metadata and per-transfer state go through the job's store
        connector = make_connector(args.kv_transport, kv_group, args.kv_timeout,
                                   store=dist.distributed_c10d._get_default_store(), rank=rank)
    sock = socket.create_connection((host, port), timeout=args.startup_timeout)
    sock.settimeout(None)
    conn = LineConn(sock)
    conn.send({"op": "hello", "rank": rank, "role": role, "max_model_len": engine.max_model_len,
               "block_size": bs, "num_blocks": engine.kv.num_blocks, "unit": unit.uid})
    try:
        PoolWorker(rank, unit, engine, conn, connector, unit_group, args).run()
    finally:
        conn.close()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
