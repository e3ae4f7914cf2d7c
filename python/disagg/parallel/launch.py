"""Joining a torchrun job and the ``disagg.generate`` entry for parallel layouts."""
from __future__ import annotations

import datetime
import json
import os
import sys

import torch.distributed as dist


def init_distributed(timeout_s: float = 60.0, backend: str = None) -> None:
    """Join the job torchrun started (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT`` in the
    environment). ``timeout_s`` bounds every collective: gloo raises when a peer does not
    answer in time, so no rank waits forever on a dead one."""
    if dist.is_initialized():
        return
    # The reference runtime keeps its tensors on the CPU, which NCCL cannot move: gloo until
    # the model runs on GPUs.
    backend = backend or "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def main_parallel(args) -> int:
    """``disagg.generate`` under a parallel layout: every rank runs, rank 0 writes."""
    from ..engine import SamplingParams
    from .engine import ParallelEngine
    from .layout import ParallelLayout

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_distributed(args.dist_timeout)
    rank = dist.get_rank()
    try:
        layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, dp=args.dp, cp=args.cp,
                                ep_over_tp=not args.ep_tp_experts)
        with open(args.prompts) as f:
            prompts = json.load(f)
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, max_tokens=args.max_tokens,
                                stop=args.stop, ignore_eos=args.ignore_eos)
        eng = ParallelEngine(args.model, layout, dtype=args.dtype, timeout_s=args.dist_timeout,
                             pipeline=args.pp_schedule, steps_in_flight=args.steps_in_flight,
                             max_num_seqs=args.max_num_seqs,
                             max_num_batched_tokens=args.max_num_batched_tokens,
                             enable_chunked_prefill=not args.no_chunked_prefill,
                             block_size=args.block_size)
        results = eng.generate(prompts, params)
        if args.report and rank == 0:
            print(eng.report(), file=sys.stderr)
        if rank == 0:
            with open(args.output, "w") as f:
                json.dump(results, f, indent=1)
            print(f"wrote {len(results)} results to {args.output} ({layout.describe()})",
                  file=sys.stderr)
        eng.comm.stop_watchdog()
        dist.barrier()
        dist.destroy_process_group()
        return 0
    except Exception as e:
        print(f"[disagg.parallel] rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        # A clean exit would wait on peers in the process-group teardown; leave now.
        os._exit(1)
