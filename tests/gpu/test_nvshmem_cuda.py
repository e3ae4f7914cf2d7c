"""The NVSHMEM EP transport on one GPU: one PE (loopback) must give what the torch.distributed
transport gives (gloo, same group of one), byte for byte; FP8 dispatch within its rounding; slot
overflow raises. Two PEs on one GPU run in a subprocess pair when NVSHMEM allows it."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import disagg  # noqa: F401
from disagg import ops
from disagg.moe import EPDispatcher, LocalTransport, TorchDistributedTransport
from disagg.moe import nvshmem

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not nvshmem.nvshmem_built(), reason="disagg built without DISAGG_NVSHMEM"),
]

DEV = "cuda"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def group():
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1)
    yield dist.group.WORLD
    if created:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def transport(group):
    t = nvshmem.NvshmemTransport(max_tokens=512, hidden=1024, top_k=8, group=group)
    yield t
    t.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8])
@pytest.mark.parametrize("rows", [0, 1, 37, 4096])
def test_loopback_all_to_all_is_identity(transport, dtype, rows):
    x = (torch.randn(rows, 96) * 100).to(dtype).to(DEV)
    out = transport.all_to_all(x, [rows], [rows])
    torch.cuda.synchronize()
    assert out.dtype == dtype and torch.equal(out, x)


def test_exchange_counts(transport):
    c = torch.randint(0, 100, (1, 5))
    assert torch.equal(transport.exchange_counts(c), c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatcher_matches_torch_transport(group, transport, dtype):
    """EPDispatcher over NVSHMEM (CUDA tensors) == over torch.distributed (gloo, CPU tensors)."""
    g = torch.Generator().manual_seed(3)
    T, E, k, H = 300, 16, 4, 256
    x = torch.randn(T, H, generator=g).to(dtype)
    r = ops.route(torch.randn(T, E, generator=g), k)
    ref = EPDispatcher(E, group=group, transport=TorchDistributedTransport(group))
    rx, rpe, rh = ref.dispatch(x, r.ids, r.weights)
    disp = EPDispatcher(E, group=group, transport=transport)
    gx, gpe, gh = disp.dispatch(x.to(DEV), r.ids.to(DEV), r.weights.to(DEV))
    assert torch.equal(gx.cpu(), rx) and torch.equal(gpe.cpu(), rpe)
    y = rx * 1.5
    assert torch.equal(disp.combine(y.to(DEV), gh).cpu(), ref.combine(y, rh))
    local = EPDispatcher(E, transport=LocalTransport())
    lx, _, _ = local.dispatch(x.to(DEV), r.ids.to(DEV), r.weights.to(DEV))
    assert torch.equal(lx, gx)


def test_dispatcher_by_name(group):
    disp = EPDispatcher(8, group=group, transport="nvshmem",
                        transport_options=dict(max_tokens=64, hidden=32, top_k=2))
    x = torch.randn(64, 32, device=DEV)
    r = ops.route(torch.randn(64, 8, device=DEV), 2)
    recv, _, h = disp.dispatch(x, r.ids, r.weights)
    out = disp.combine(recv, h)
    torch.testing.assert_close(out, x * r.weights.sum(1, keepdim=True))
    disp.transport.close()


def test_fp8_dispatch_within_rounding(group):
    t = nvshmem.NvshmemTransport(max_tokens=256, hidden=512, top_k=2, group=group,
                                 dtype=torch.bfloat16, fp8_dispatch=True)
    x = torch.randn(200, 512, device=DEV, dtype=torch.bfloat16)
    got = t.all_to_all_dispatch(x, [200], [200])
    q, s = nvshmem.quantize_fp8(x)
    assert torch.equal(got, nvshmem.dequantize_fp8(q, s, 512, torch.bfloat16))
    assert float((got.float() - x.float()).abs().max()) <= float(x.float().abs().max()) / 16
    t.close()


def test_slot_overflow_raises(transport):
    x = torch.zeros(512 * 8 + 1, 1024, device=DEV)
    with pytest.raises(ValueError, match="max_tokens"):
        transport.all_to_all(x, [x.shape[0]], [x.shape[0]])


def test_two_pes_on_one_gpu():
    """tests/gpu/nvshmem_ep_check.py with two PEs on GPU 0 (the multi-GPU check with N = 2)."""
    script = Path(__file__).with_name("nvshmem_ep_check.py")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script)]
    # its own process group, so a hang is ended with every process torchrun started
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.skip("two NVSHMEM PEs on one GPU did not finish in 60 s (unsupported here)")
    if proc.returncode != 0 and "NVSHMEM initialization failed" in out:
        pytest.skip("NVSHMEM does not run two PEs on one GPU here: " + out[-400:])
    assert proc.returncode == 0, out[-3000:]
    assert out.count("NVSHMEM_EP_OK") == 2
