"""CUDA model-layer ops against the CPU ops on fresh random inputs: rms_norm, add_rms_norm,
linear, moe_experts (with dropped assignments and bf16 weights under float32 tokens),
paged_decode_attention_rope (output and the K/V it writes), paged_tree_attention (windows,
query subsets, two mask words); opcheck on CUDA and the same errors as on the CPU."""
import sys
from pathlib import Path

import pytest
import torch

import disagg  # noqa: F401
from disagg import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_tree_attention import sample_inputs  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"
TOL = {torch.float32: dict(atol=3e-5, rtol=3e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=3e-3, rtol=3e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H", [(1, 64), (7, 4096), (33, 5000), (5, 17)])
def test_norms_match_cpu(dtype, N, H):
    g = gen(N * H)
    x = torch.randn(N, H, generator=g).to(dtype)
    res = torch.randn(N, H, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    got = ops.rms_norm(x.to(DEV), w.to(DEV), 1e-6).cpu()
    torch.testing.assert_close(got, ops.rms_norm(x, w, 1e-6), **TOL[dtype])
    r_dev = res.to(DEV)
    got = ops.add_rms_norm(r_dev, x.to(DEV), w.to(DEV), 1e-5).cpu()
    r_cpu = res.clone()
    want = ops.add_rms_norm(r_cpu, x, w, 1e-5)
    torch.testing.assert_close(r_dev.cpu(), r_cpu, **TOL[dtype])  # the residual, updated
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.library.opcheck(torch.ops.disagg.rms_norm.default, (x.to(DEV), w.to(DEV), 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_cpu(dtype, bias):
    g = gen(3)
    x = torch.randn(2, 9, 256, generator=g).to(dtype)
    w = (torch.randn(384, 256, generator=g) * 0.05).to(dtype)
    b = torch.randn(384, generator=g).to(dtype) if bias else None
    got = ops.linear(x.to(DEV), w.to(DEV), None if b is None else b.to(DEV)).cpu()
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else TOL[dtype]  # TF32 off or on
    torch.testing.assert_close(got, ops.linear(x, w, b), **tol)


def test_linear_bf16_weight_with_float32_x():
    g = gen(4)
    x = torch.randn(7, 256, generator=g)
    w = (torch.randn(384, 256, generator=g) * 0.05).bfloat16()
    got = ops.linear(x.to(DEV), w.to(DEV)).cpu()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ops.linear(x, w), atol=1e-3, rtol=1e-3)


def _experts(T, E, H, I, k, dtype, wdtype, seed):
    g = gen(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if T > 1:
        ids[1, 0] = -1  # a dropped assignment
    w = torch.rand(T, k, generator=g)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * 0.1).to(wdtype)
    w2 = (torch.randn(E, H, I, generator=g) * 0.1).to(wdtype)
    return x, ids, w, w13, w2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,H,I,k", [(1, 8, 64, 32, 2), (70, 8, 256, 512, 2),
                                       (300, 64, 128, 64, 6)])
def test_moe_experts_matches_cpu(dtype, T, E, H, I, k):
    args = _experts(T, E, H, I, k, dtype, dtype, seed=T + E)
    got = ops.moe_experts(*[a.to(DEV) for a in args]).cpu()
    want = ops.moe_experts(*args)
    # intermediates are rounded to x's dtype between the GEMMs on CUDA
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.library.opcheck(torch.ops.disagg.moe_experts.default, tuple(a.to(DEV) for a in args))


def test_moe_experts_bf16_weights_with_float32_tokens():
    args = _experts(40, 8, 64, 48, 2, torch.float32, torch.bfloat16, seed=5)
    got = ops.moe_experts(*[a.to(DEV) for a in args]).cpu()
    torch.testing.assert_close(got, ops.moe_experts(*args), atol=1e-4, rtol=1e-4)


def _rope_inputs(B, Hq, Hkv, D, bs, dtype, seed):
    g = gen(seed)
    lens = torch.randint(1, 60, (B,), generator=g)
    max_blocks = -(-60 // bs) + 1
    nb = B * max_blocks + 2
    cache = torch.randn(nb, 2, bs, Hkv, D, generator=g).to(dtype)
    table = torch.randperm(nb, generator=g)[:B * max_blocks].view(B, max_blocks)
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, generator=g).to(dtype)
    ang = torch.rand(B, D // 2, generator=g) * 6.0
    cos = torch.cat([ang.cos(), ang.cos()], 1).to(dtype)
    sin = torch.cat([ang.sin(), ang.sin()], 1).to(dtype)
    return qkv, cos, sin, cache, table, lens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,D,bs", [(1, 8, 8, 64, 16), (9, 32, 8, 128, 16),
                                           (4, 12, 4, 36, 4)])
@pytest.mark.parametrize("window", [0, 7])
def test_paged_decode_attention_rope_matches_cpu(dtype, B, Hq, Hkv, D, bs, window):
    qkv, cos, sin, cache, table, lens = _rope_inputs(B, Hq, Hkv, D, bs, dtype, seed=B * D)
    c_dev = cache.to(DEV)
    got = ops.paged_decode_attention_rope(qkv.to(DEV), cos.to(DEV), sin.to(DEV), c_dev,
                                          table.to(DEV), lens.to(DEV), Hq, D ** -0.5, window)
    c_cpu = cache.clone()
    want = ops.paged_decode_attention_rope(qkv, cos, sin, c_cpu, table, lens, Hq, D ** -0.5,
                                           window)
    torch.testing.assert_close(got.cpu(), want, **TOL[dtype])
    # the K/V written: RoPE'd K and copied V at position ctx_lens - 1, bit for bit
    assert torch.equal(c_dev.cpu(), c_cpu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 3, 50])
@pytest.mark.parametrize("subset", [False, True])
def test_paged_tree_attention_matches_cpu(dtype, window, subset):
    args, _ = sample_inputs(dtype, D=64, bs=8, max_ctx=120, seed=window + 3 * subset,
                            subset=subset)
    got = ops.paged_tree_attention(*[a.to(DEV) for a in args], 0.125, window).cpu()
    torch.testing.assert_close(got, ops.paged_tree_attention(*args, 0.125, window), **TOL[dtype])
    torch.library.opcheck(torch.ops.disagg.paged_tree_attention.default,
                          (*[a.to(DEV) for a in args], 0.125, window))


def test_bad_input_same_errors_as_cpu():
    args, _ = sample_inputs(seed=1)
    bad = list(args)
    bad[4] = bad[4].clone()
    bad[4][0] = 1000  # tree_lens past the mask words
    for dev in ("cpu", DEV):
        with pytest.raises(ValueError, match="tree_lens must be in"):
            ops.paged_tree_attention(*[a.to(dev) for a in bad], 0.1, 0)
    x = torch.randn(3, 8)
    for dev in ("cpu", DEV):
        with pytest.raises(ValueError, match="weight must have H=8"):
            ops.rms_norm(x.to(dev), torch.ones(7, device=dev), 1e-6)

