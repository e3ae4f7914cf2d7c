"""Launch a function on N gloo ranks from a test (torch.multiprocessing, one process per rank)."""
import os
import socket
import tempfile
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, errdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    import datetime

    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    except BaseException:
        with open(os.path.join(errdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args, timeout: float = 120.0) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; re-raise the first rank failure."""
    with tempfile.TemporaryDirectory() as errdir:
        ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args, errdir), nprocs=world,
                                 join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=timeout):
                pass
        except mp.ProcessRaisedException as e:
            msgs = [open(os.path.join(errdir, f)).read() for f in sorted(os.listdir(errdir))]
            raise AssertionError("\n".join(msgs) or str(e)) from None
