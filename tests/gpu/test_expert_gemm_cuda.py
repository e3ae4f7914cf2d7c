"""expert_gemm on CUDA (CUTLASS grouped GEMM for bf16: the Hopper kernel on compute capability 9.x
and the SM80 kernel, both selected through DISAGG_GROUPED_GEMM; per-expert matmuls otherwise)
against a float32 torch matmul per expert and the CPU op; CUDA-graph capture; clamped bad
offsets; the model's MoE layer on the GPU against its CPU path."""
import pytest
import torch

import disagg  # noqa: F401
from disagg import ops
from disagg import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"


@pytest.fixture(params=["default", "sm80"])
def gemm_path(request, monkeypatch):
    """The default kernel (the Hopper one on a 9.x device) and the SM80 one; the op reads the
    variable at every call."""
    if request.param == "sm80":
        monkeypatch.setenv("DISAGG_GROUPED_GEMM", "sm80")
    else:
        monkeypatch.delenv("DISAGG_GROUPED_GEMM", raising=False)
    return request.param


def make(E, M, N, K, dtype, seed=0, empty=(1,)):
    g = torch.Generator().manual_seed(seed)
    w_counts = torch.rand(E, generator=g) ** 2
    for e in empty:
        w_counts[e % E] = 0
    counts = (w_counts / w_counts.sum() * M).floor().long()
    counts[int(w_counts.argmax())] += M - 5 - int(counts.sum())  # 5 rows past the segments
    off = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(E, N, K, generator=g) / K ** 0.5).to(dtype)
    return x, w, off


def per_expert_matmul(x, w, off):
    """The plain alternative in float32: one torch.matmul per expert."""
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
    o = off.tolist()
    for e in range(w.shape[0]):
        out[o[e]:o[e + 1]] = x[o[e]:o[e + 1]].float() @ w[e].float().t()
    return out


CASES = [(8, 512, 256, 128), (64, 4096, 512, 1024), (3, 37, 64, 40), (128, 2048, 1408, 2048),
         (1, 100, 8, 8)]


@pytest.mark.parametrize("E,M,N,K", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matches_per_expert_matmul(E, M, N, K, dtype, gemm_path):
    if gemm_path == "sm80" and dtype != torch.bfloat16:
        pytest.skip("the kernel choice only matters for bf16")
    x, w, off = make(E, M, N, K, dtype, seed=E + M)
    torch.full((64 << 18,), -1, dtype=torch.int32, device=DEV)  # poison the allocator's cache
    got = ops.expert_gemm(x.to(DEV), w.to(DEV), off.to(DEV))
    want = per_expert_matmul(x.to(DEV), w.to(DEV), off.to(DEV))
    tol = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    assert bool((got[int(off[-1]):] == 0).all())
    if M * N * K <= 1 << 24:
        torch.testing.assert_close(got.cpu(), ops.expert_gemm(x, w, off), atol=tol, rtol=tol)


def test_graph_capture_bf16(gemm_path):
    x, w, off = (t.to(DEV) for t in make(16, 1024, 256, 256, torch.bfloat16))
    ops.expert_gemm(x, w, off)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.expert_gemm(x, w, off)
    for seed in range(2):
        x2, w2, off2 = make(16, 1024, 256, 256, torch.bfloat16, seed=seed + 1)
        x.copy_(x2.to(DEV)); w.copy_(w2.to(DEV)); off.copy_(off2.to(DEV))  # noqa: E702
        graph.replay()
        torch.testing.assert_close(out.float(), per_expert_matmul(x, w, off), atol=2e-2, rtol=2e-2)


def test_bad_offsets_are_clamped_bf16(gemm_path):
    """The CUTLASS path does not read offsets on the host: out-of-range ones are clamped, nothing
    outside x or the output is touched, and the valid segments are right."""
    x, w, off = make(4, 256, 64, 64, torch.bfloat16)
    bad = torch.tensor([0, 100, 90, 10 ** 6, -5], dtype=torch.int32)
    got = ops.expert_gemm(x.to(DEV), w.to(DEV), bad.to(DEV)).cpu()
    torch.testing.assert_close(got[:100].float(), (x[:100].float() @ w[0].float().t()),
                               atol=2e-2, rtol=2e-2)
    torch.cuda.synchronize()


def test_opcheck_cuda():
    x, w, off = (t.to(DEV) for t in make(8, 300, 64, 64, torch.bfloat16))
    torch.library.opcheck(torch.ops.disagg.expert_gemm.default, (x, w, off))


def test_reference_on_cuda():
    x, w, off = (t.to(DEV) for t in make(5, 200, 32, 48, torch.float32))
    torch.testing.assert_close(ops.expert_gemm(x, w, off), ref.expert_gemm(x, w, off),
                               atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_moe_layer_gpu_path_matches_cpu(dtype):
    """model.MoE on CUDA tensors (grouped GEMM path) equals its CPU path."""
    from disagg.model.model import MoE

    g = torch.Generator().manual_seed(7)
    E, H, inter, T = 8, 128, 256, 96
    gate = torch.randn(E, H, generator=g).to(dtype)
    gate_up = (torch.randn(E, 2 * inter, H, generator=g) / H ** 0.5).to(dtype)
    down = (torch.randn(E, H, inter, generator=g) / inter ** 0.5).to(dtype)
    x = torch.randn(T, H, generator=g).to(dtype)
    cpu = MoE(gate, gate_up, down, 2, True, torch.nn.functional.silu)
    gpu = MoE(gate.to(DEV), gate_up.to(DEV), down.to(DEV), 2, True, torch.nn.functional.silu)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    got, want = gpu(x.to(DEV)).cpu(), cpu(x)
    # bf16 router logits round differently on the two devices: compare the tokens routed alike
    ids_gpu = ops.route(torch.nn.functional.linear(x.to(DEV), gate.to(DEV)), 2).ids.cpu()
    ids_cpu = ops.route(torch.nn.functional.linear(x, gate), 2).ids
    same = (ids_gpu == ids_cpu).all(1)
    assert int(same.sum()) >= T * 3 // 4
    torch.testing.assert_close(got[same], want[same], atol=tol, rtol=tol)
