"""The NVSHMEM EP transport refuses clearly where it cannot run (no CUDA device, a build without
NVSHMEM, no torch.distributed); its loopback behaviour on a GPU is tested in tests/gpu."""
import pytest
import torch
import torch.distributed as dist

from disagg.moe import EPDispatcher
from disagg.moe import nvshmem


def test_fp8_rows_round_trip_within_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 300, generator=g) * torch.logspace(-3, 3, 7).unsqueeze(1)
    q, scale = nvshmem.quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (7, 384) and scale.shape == (7, 3)
    back = nvshmem.dequantize_fp8(q, scale, 300, torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 of each group's maximum
    group_max = torch.nn.functional.pad(x.abs(), (0, 84)).view(7, 3, 128).amax(-1)
    bound = (group_max / 16).repeat_interleave(128, 1)[:, :300]
    assert bool(((back - x).abs() <= bound + 1e-12).all())


def test_refuses_without_device_or_build():
    if torch.cuda.is_available() and nvshmem.nvshmem_built():
        return  # a GPU machine with the library: tests/gpu/test_nvshmem_cuda.py covers it
    want = "CUDA device" if not torch.cuda.is_available() else "without the NVSHMEM transport"
    with pytest.raises(RuntimeError, match=want):
        nvshmem.NvshmemTransport(max_tokens=8, hidden=16)
    with pytest.raises(ValueError, match="max_tokens"):
        EPDispatcher(8, transport="nvshmem")
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match=want):
            EPDispatcher(8, transport="nvshmem", transport_options=dict(max_tokens=8, hidden=16))
