"""moe_experts, rms_norm, add_rms_norm, linear: reference equality, opcheck, compile, bad input."""
import pytest
import torch

import disagg  # noqa: F401
from disagg import ops, reference

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def expert_inputs(dtype=torch.float32, T=9, H=48, inter=40, E=5, k=2, idx=torch.int64, seed=0,
                  dropped=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if dropped:
        ids[torch.rand(T, k, generator=g) < 0.2] = -1
    w = torch.rand(T, k, generator=g)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, inter, generator=g) / inter ** 0.5).to(dtype)
    return x, ids.to(idx), w, w13, w2


# Shapes cover tails of the 16-lane vectors (H, I not multiples of 16), odd I, single tokens,
# many tokens per expert (several 4-token tiles), and the model's decode sizes.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [dict(T=9, H=48, inter=40), dict(T=1, H=37, inter=23, k=3),
                                   dict(T=16, H=128, inter=256, E=8),
                                   dict(T=40, H=64, inter=33, E=3)])
def test_moe_experts_matches_reference(dtype, shape):
    x, ids, w, w13, w2 = expert_inputs(dtype, **shape)
    out = ops.moe_experts(x, ids, w, w13, w2)
    ref = reference.moe_experts(x, ids, w, w13, w2)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(H=128, inter=256), dict(H=37, inter=70),
                                   dict(H=130, inter=33)])
def test_moe_experts_many_tokens_equal_few(wdtype, shape):
    # Experts with many tokens go through packed weight panels, a few tokens through
    # dot-product tiles: the two compute every output with the same operations, so a token's
    # result does not depend on how many tokens share its experts.
    x, ids, w, w13, w2 = expert_inputs(T=150, E=4, k=2, seed=3, **shape)
    w13, w2 = w13.to(wdtype), w2.to(wdtype)
    out = ops.moe_experts(x, ids, w, w13, w2)
    for t in (0, 1, 77, 149):
        assert torch.equal(ops.moe_experts(x[t:t + 1], ids[t:t + 1], w[t:t + 1], w13, w2),
                           out[t:t + 1])
    torch.testing.assert_close(out, reference.moe_experts(x, ids, w, w13, w2), atol=1e-4,
                               rtol=1e-4)


def test_moe_experts_matches_the_layout_path():
    # The same result as route -> moe_layout -> moe_permute -> matmuls -> moe_combine.
    import torch.nn.functional as F

    x, _, _, w13, w2 = expert_inputs(T=12, E=6, dropped=False)
    r = ops.route(torch.randn(12, 6, generator=torch.Generator().manual_seed(3)), 2)
    lay = ops.moe_layout(r.ids, 6)
    xp = ops.moe_permute(x, lay.src, 2)
    y = torch.zeros_like(xp)
    off = lay.expert_offsets.tolist()
    for e in range(6):
        h = xp[off[e]:off[e + 1]] @ w13[e].t()
        y[off[e]:off[e + 1]] = (F.silu(h[:, :40]) * h[:, 40:]) @ w2[e].t()
    want = ops.moe_combine(y, lay.dest, r.weights)
    torch.testing.assert_close(ops.moe_experts(x, r.ids, r.weights, w13, w2), want,
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("T", [1, 5, 16, 70])
def test_moe_experts_bf16_weights_with_float32_tokens(T):
    """bf16 weights widen exactly: the same bits as with float32 copies of them."""
    g = torch.Generator().manual_seed(T)
    E, H, I, k = 6, 48, 40, 2
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[0, 1] = -1
    w = torch.rand(T, k, generator=g)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * 0.2).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) * 0.2).bfloat16()
    out = ops.moe_experts(x, ids, w, w13, w2)
    assert out.dtype == torch.float32
    assert torch.equal(out, ops.moe_experts(x, ids, w, w13.float(), w2.float()))
    torch.testing.assert_close(out, reference.moe_experts(x, ids, w, w13, w2),
                               atol=1e-4, rtol=1e-4)
    torch.library.opcheck(torch.ops.disagg.moe_experts.default, (x, ids, w, w13, w2))
    with pytest.raises(ValueError, match="w2 must be BFloat16"):
        ops.moe_experts(x, ids, w, w13, w2.float())
    with pytest.raises(ValueError, match="w13 must be"):
        ops.moe_experts(x.bfloat16(), ids, w, w13.float(), w2)


def test_moe_experts_all_dropped_and_int32():
    x, ids, w, w13, w2 = expert_inputs(idx=torch.int32)
    out = ops.moe_experts(x, ids, w, w13, w2)
    torch.testing.assert_close(out, reference.moe_experts(x, ids, w, w13, w2), **TOL[x.dtype])
    none = torch.full_like(ids, -1)
    assert torch.equal(ops.moe_experts(x, none, w, w13, w2), torch.zeros_like(x))
    assert ops.moe_experts(x[:0], ids[:0], w[:0], w13, w2).shape == (0, x.shape[1])


def test_moe_experts_threads_agree():
    x, ids, w, w13, w2 = expert_inputs(T=64, H=256, inter=512, E=8, dropped=False)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.moe_experts(x, ids, w, w13, w2)
        torch.set_num_threads(2)
        two = ops.moe_experts(x, ids, w, w13, w2)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)  # each token sums its experts in k order, however split


def test_moe_experts_long_inputs_run_in_token_chunks():
    # A wide expert (I = 700k) makes the kernel split 8 tokens into chunks of 2 to bound its
    # scratch; the result is the same as in one piece.
    x, ids, w, w13, w2 = expert_inputs(T=8, H=2, inter=700_000, E=2, k=2, dropped=False)
    torch.testing.assert_close(ops.moe_experts(x, ids, w, w13, w2),
                               reference.moe_experts(x, ids, w, w13, w2), atol=1e-4, rtol=1e-4)


def test_moe_experts_opcheck_and_compile():
    x, ids, w, w13, w2 = expert_inputs(T=3)
    torch.library.opcheck(torch.ops.disagg.moe_experts.default, (x, ids, w, w13, w2))
    f = torch.compile(ops.moe_experts, fullgraph=True)
    torch.testing.assert_close(f(x, ids, w, w13, w2), ops.moe_experts(x, ids, w, w13, w2))


@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32),
                                          (torch.float32, torch.bfloat16),
                                          (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("shape", [dict(T=1, H=37, inter=23, k=3), dict(T=16, H=128, inter=256, E=8),
                                   dict(T=2, H=130, inter=70), dict(T=90, H=64, inter=33, E=3)])
def test_moe_experts_packed_equals_moe_experts(dtype, wdtype, shape):
    x, ids, w, w13, w2 = expert_inputs(dtype, **shape)
    w13, w2 = w13.to(wdtype), w2.to(wdtype)
    w13p, w2p = ops.pack_moe_weights(w13, w2)
    H, inter = x.shape[1], w2.shape[2]
    assert w13p.dtype == wdtype and w13p.shape == (w13.shape[0], 2, -(-inter // 64), 16,
                                                   -(-H // 16), 4, 16)
    u13, u2 = ops.unpack_moe_weights(w13p, w2p, H, inter)
    assert torch.equal(u13, w13) and torch.equal(u2, w2)
    out = ops.moe_experts_packed(x, ids, w, w13p, w2p, inter)
    assert torch.equal(out, ops.moe_experts(x, ids, w, w13, w2))
    torch.testing.assert_close(out, reference.moe_experts_packed(x, ids, w, w13p, w2p, inter),
                               **TOL[dtype])


def test_moe_experts_packed_opcheck_compile_bad_input():
    x, ids, w, w13, w2 = expert_inputs(T=5)
    w13p, w2p = ops.pack_moe_weights(w13, w2)
    I = w2.shape[2]
    torch.library.opcheck(torch.ops.disagg.moe_experts_packed.default, (x, ids, w, w13p, w2p, I))
    f = torch.compile(ops.moe_experts_packed, fullgraph=True)
    torch.testing.assert_close(f(x, ids, w, w13p, w2p, I),
                               ops.moe_experts_packed(x, ids, w, w13p, w2p, I))
    g = ops.moe_experts_packed
    with pytest.raises(ValueError, match="w13p must be pack_moe_weights"):
        g(x, ids, w, w13p, w2p, I + 64)
    with pytest.raises(ValueError, match="w2p must be pack_moe_weights"):
        g(x, ids, w, w13p, w2p[:, :, :, :1].contiguous(), I)
    with pytest.raises(ValueError, match="inter must be >= 1"):
        g(x, ids, w, w13p, w2p, 0)
    with pytest.raises(ValueError, match="w13p must be"):
        g(x.bfloat16(), ids, w, w13p, w2p, I)
    with pytest.raises(ValueError, match=r"ids must be in \[-1, E=5\)"):
        g(x, torch.full_like(ids, 7), w, w13p, w2p, I)
    with pytest.raises(ValueError, match="pack_moe_weights: w13 must be"):
        ops.pack_moe_weights(w13[:, :-1], w2)


def test_moe_experts_bad_input():
    x, ids, w, w13, w2 = expert_inputs(T=4)
    f = ops.moe_experts
    bad = ids.clone()
    bad[1, 0] = 5
    with pytest.raises(ValueError, match=r"ids must be in \[-1, E=5\)"):
        f(x, bad, w, w13, w2)
    bad[1, 0] = -2
    with pytest.raises(ValueError, match="ids must be in"):
        f(x, bad, w, w13, w2)
    with pytest.raises(ValueError, match="ids must be int32 or int64"):
        f(x, ids.float(), w, w13, w2)
    with pytest.raises(ValueError, match="weights must be"):
        f(x, ids, w[:, :1], w13, w2)
    with pytest.raises(ValueError, match="w13 must be"):
        f(x, ids, w, w13[:, :, :-1].contiguous(), w2)
    with pytest.raises(ValueError, match="w13 must have 2I"):
        f(x, ids, w, w13[:, :-2].contiguous(), w2)
    with pytest.raises(ValueError, match="w2 must be"):
        f(x, ids, w, w13, w2[:4])
    with pytest.raises(ValueError, match="w13 must be torch.bfloat16|w13 must be BFloat16"):
        f(x.bfloat16(), ids, w, w13, w2.bfloat16())
    with pytest.raises(ValueError, match="w13 must be contiguous"):
        f(x, ids, w, w13.transpose(1, 2).contiguous().transpose(1, 2), w2)
    with pytest.raises(ValueError, match="x must be 2-D"):
        f(x[0], ids, w, w13, w2)
    with pytest.raises(ValueError, match="x must be float32"):
        f(x.double(), ids, w, w13, w2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", [128, 37, 1])
def test_norms_match_reference(dtype, H):
    g = torch.Generator().manual_seed(H)
    x = torch.randn(6, H, generator=g).to(dtype)
    d = torch.randn(6, H, generator=g).to(dtype)
    w = (torch.rand(H, generator=g) + 0.5).to(dtype)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6),
                               **TOL[dtype])
    r1, r2 = x.clone(), x.clone()
    out = ops.add_rms_norm(r1, d, w, 1e-5)
    want = reference.add_rms_norm(r2, d, w, 1e-5)
    assert torch.equal(r1, r2)  # the residual add is exact (one rounding, as torch's add)
    torch.testing.assert_close(out, want, **TOL[dtype])


def test_rms_norm_matches_transformers_bitwise_in_fp32_shapes():
    # 3-D input (per-head q/k norms) and a non-contiguous view.
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(5, 3 * 64, generator=g)
    q = qkv[:, :128].reshape(5, 4, 32)
    w = torch.rand(32, generator=g) + 0.5
    torch.testing.assert_close(ops.rms_norm(q, w, 1e-6), reference.rms_norm(q, w, 1e-6),
                               atol=1e-6, rtol=1e-6)


def test_norms_opcheck_and_compile():
    x, d, w = torch.randn(3, 40), torch.randn(3, 40), torch.rand(40) + 0.5
    torch.library.opcheck(torch.ops.disagg.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.disagg.add_rms_norm.default, (x.clone(), d, w, 1e-6))
    f = torch.compile(ops.rms_norm, fullgraph=True)
    torch.testing.assert_close(f(x, w, 1e-6), ops.rms_norm(x, w, 1e-6))

    def g(r, d, w):
        return ops.add_rms_norm(r, d, w, 1e-6)

    r1, r2 = x.clone(), x.clone()
    torch.testing.assert_close(torch.compile(g, fullgraph=True)(r1, d, w), g(r2, d, w))
    assert torch.equal(r1, r2)


def test_norms_bad_input():
    x, w = torch.randn(3, 8), torch.rand(8)
    with pytest.raises(ValueError, match="weight must have H=8"):
        ops.rms_norm(x, w[:4], 1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        ops.rms_norm(x, w.double(), 1e-6)
    with pytest.raises(ValueError, match="eps"):
        ops.rms_norm(x, w, -1.0)
    with pytest.raises(ValueError, match="x must be float32"):
        ops.rms_norm(x.long(), w.long(), 1e-6)
    with pytest.raises(ValueError, match="x must have residual's shape"):
        ops.add_rms_norm(x.clone(), x[:2], w, 1e-6)
    with pytest.raises(ValueError, match="residual must be contiguous"):
        ops.add_rms_norm(x.t().contiguous().t(), x, w, 1e-6)
    with pytest.raises(ValueError, match="x must be"):
        ops.add_rms_norm(x.clone(), x.bfloat16(), w, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 128, 256), (1, 37, 5), (70, 33, 130), (3, 2, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_reference(dtype, shape, with_bias):
    N, K, M = shape
    g = torch.Generator().manual_seed(N * K + M)
    x = torch.randn(N, K, generator=g).to(dtype)
    w = (torch.randn(M, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(M, generator=g).to(dtype) if with_bias else None
    out = ops.linear(x, w, b)
    torch.testing.assert_close(out, reference.linear(x, w, b), **TOL[dtype])
    # a token's output does not depend on the rest of the batch
    assert torch.equal(ops.linear(x[-1:], w, b), out[-1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 256, 96), (40, 37, 70), (25, 130, 33)])
def test_linear_many_tokens_equal_few(dtype, shape):
    # From 24 tokens on the weight goes through packed panels; the outputs are the few-token
    # path's bit for bit.
    N, K, M = shape
    g = torch.Generator().manual_seed(K + M)
    x = torch.randn(N, K, generator=g).to(dtype)
    w = (torch.randn(M, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(M, generator=g).to(dtype)
    for bias in (None, b):
        out = ops.linear(x, w, bias)
        for t in (0, N // 2, N - 1):
            assert torch.equal(ops.linear(x[t:t + 1], w, bias), out[t:t + 1])
        torch.testing.assert_close(out, reference.linear(x, w, bias), **TOL[dtype])


@pytest.mark.parametrize("N", [1, 5, 40, 300])
def test_linear_bf16_weight_with_float32_x(N):
    # A bf16 checkpoint's projections run in float32 stay bf16: the op widens each weight as
    # it reads it, so the result equals the float32 copy's bit for bit (few rows through the
    # dot tile, many through packed panels).
    g = torch.Generator().manual_seed(N)
    x = torch.randn(N, 130, generator=g)
    w = (torch.randn(96, 130, generator=g) / 130 ** 0.5).bfloat16()
    b = torch.randn(96, generator=g)
    for bias in (None, b):
        out = ops.linear(x, w, bias)
        assert out.dtype == torch.float32
        assert torch.equal(out, ops.linear(x, w.float(), bias))
    torch.library.opcheck(torch.ops.disagg.linear.default, (x, w, b))
    with pytest.raises(ValueError, match="weight must be"):
        ops.linear(x, w.half(), None)
    with pytest.raises(ValueError, match="bias must be"):
        ops.linear(x, w, b.bfloat16())


def test_linear_shapes_threads_opcheck_compile():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 64, generator=g), torch.randn(96, 64, generator=g)
    assert ops.linear(x, w).shape == (2, 5, 96)
    torch.testing.assert_close(ops.linear(x, w), x @ w.t(), atol=1e-5, rtol=1e-5)
    big = torch.randn(300, 256, generator=g)
    wb = torch.randn(512, 256, generator=g)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.linear(big, wb)
        torch.set_num_threads(2)
        two = ops.linear(big, wb)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)
    torch.library.opcheck(torch.ops.disagg.linear.default, (x[0], w, torch.randn(96)))
    torch.library.opcheck(torch.ops.disagg.linear.default, (x[0], w, None))
    f = torch.compile(ops.linear, fullgraph=True)
    torch.testing.assert_close(f(x, w, None), ops.linear(x, w))


def test_linear_bad_input():
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight must be \[M, K=8\]"):
        ops.linear(x, w[:, :6].contiguous())
    with pytest.raises(ValueError, match="weight must be contiguous"):
        ops.linear(x, torch.randn(8, 4).t())
    with pytest.raises(ValueError, match="bias must have M=4"):
        ops.linear(x, w, torch.randn(3))
    with pytest.raises(ValueError, match="weight must be"):
        ops.linear(x, w.double())
    with pytest.raises(ValueError, match="x must be float32"):
        ops.linear(x.long(), w.long())
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.linear(x, w[0])


_PORTABLE_CHECK = """
import torch, disagg
from disagg import ops, reference
g = torch.Generator().manual_seed(0)
for dt, tol in [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)]:
    x = torch.randn(9, 37, generator=g).to(dt)
    ids = torch.randint(-1, 5, (9, 2), generator=g)
    w = torch.rand(9, 2, generator=g)
    w13 = (torch.randn(5, 46, 37, generator=g) / 6).to(dt)
    w2 = (torch.randn(5, 37, 23, generator=g) / 5).to(dt)
    torch.testing.assert_close(ops.moe_experts(x, ids, w, w13, w2),
                               reference.moe_experts(x, ids, w, w13, w2), atol=tol, rtol=tol)
    # packed weights without AVX-512: unpacked and run the same way
    assert torch.equal(ops.moe_experts_packed(x, ids, w, *ops.pack_moe_weights(w13, w2), 23),
                       ops.moe_experts(x, ids, w, w13, w2))
    wl, b = (torch.randn(19, 37, generator=g) / 6).to(dt), torch.randn(19, generator=g).to(dt)
    torch.testing.assert_close(ops.linear(x, wl, b), reference.linear(x, wl, b), atol=tol, rtol=tol)
    nw = (torch.rand(37, generator=g) + 0.5).to(dt)
    torch.testing.assert_close(ops.rms_norm(x, nw, 1e-6), reference.rms_norm(x, nw, 1e-6),
                               atol=tol, rtol=tol)
    r1, r2 = x.clone(), x.clone()
    torch.testing.assert_close(ops.add_rms_norm(r1, x, nw, 1e-6),
                               reference.add_rms_norm(r2, x, nw, 1e-6), atol=tol, rtol=tol)
    cache = torch.randn(12, 2, 4, 2, 32, generator=g).to(dt)
    bt = torch.randperm(12, generator=g)[:9].view(3, 3)
    lens = torch.tensor([1, 7, 12])
    q = torch.randn(3, 4, 32, generator=g).to(dt)
    torch.testing.assert_close(ops.paged_decode_attention(q, cache, bt, lens, 0.2),
                               reference.paged_decode_attention(q, cache, bt, lens, 0.2),
                               atol=tol, rtol=tol)
print("portable ok")
"""


def test_portable_kernels_without_avx512():
    # The paths a CPU without AVX-512 takes, selected by DISAGG_NO_AVX512 in a fresh process.
    import os
    import subprocess
    import sys

    env = dict(os.environ, DISAGG_NO_AVX512="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _PORTABLE_CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "portable ok" in res.stdout, res.stdout + res.stderr
