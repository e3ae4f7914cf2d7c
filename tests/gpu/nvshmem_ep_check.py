"""EPDispatcher over NVSHMEM against the torch.distributed transport, one process per PE.

    torchrun --standalone --nproc-per-node <N> tests/gpu/nvshmem_ep_check.py

Each rank uses GPU ``LOCAL_RANK % device_count`` (so N PEs may share one GPU where NVSHMEM allows
it, which tests/gpu/test_nvshmem_cuda.py tries with N = 2), dispatches its own random tokens with
both transports (NVSHMEM on the GPU, gloo on the CPU) and requires identical dispatched rows,
per-expert counts and combined outputs; then the FP8 dispatch within its rounding. Prints
``NVSHMEM_EP_OK <rank>`` on success.
"""
import os

import torch
import torch.distributed as dist

from disagg import ops
from disagg.moe import EPDispatcher, TorchDistributedTransport
from disagg.moe.nvshmem import NvshmemTransport


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    T, E, k, H = 256, 4 * world, 2, 512
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    r = ops.route(torch.randn(T, E, generator=g), k)
    ref = EPDispatcher(E, transport=TorchDistributedTransport())
    rx, rpe, rh = ref.dispatch(x, r.ids, r.weights)
    nv = NvshmemTransport(max_tokens=T, hidden=H, top_k=k, dtype=torch.bfloat16)
    disp = EPDispatcher(E, transport=nv)
    gx, gpe, gh = disp.dispatch(x.cuda(), r.ids.cuda(), r.weights.cuda())
    assert torch.equal(gx.cpu(), rx), f"rank {rank}: dispatched rows differ"
    assert torch.equal(gpe.cpu(), rpe), f"rank {rank}: per-expert counts differ"
    y = rx * 2
    assert torch.equal(disp.combine(y.cuda(), gh).cpu(), ref.combine(y, rh)), \
        f"rank {rank}: combined outputs differ"
    fp8 = EPDispatcher(E, transport=NvshmemTransport(max_tokens=T, hidden=H, top_k=k,
                                                     dtype=torch.bfloat16, fp8_dispatch=True))
    qx, _, _ = fp8.dispatch(x.cuda(), r.ids.cuda(), r.weights.cuda())
    err = (qx.float().cpu() - rx.float()).abs().max()
    assert float(err) <= float(rx.float().abs().max()) / 16, f"rank {rank}: FP8 error {err}"
    torch.cuda.synchronize()
    print("NVSHMEM_EP_OK", rank, flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
