"""expert_gemm (the MoE FFN's expert-grouped matmul): reference equality, opcheck, compile, bad
input. The CUDA kernel (CUTLASS) is compared with this CPU op in tests/gpu."""
import pytest
import torch

import disagg  # noqa: F401
from disagg import ops, reference

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def sample_inputs(E=6, M=50, N=24, K=40, dtype=torch.float32, idx=torch.int32, seed=0, tail=3):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 2 * (M - tail) // E + 1, (E,), generator=g)
    counts[E // 2] = 0  # an expert without tokens
    while counts.sum() > M - tail:
        counts[counts.argmax()] -= 1
    off = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(E, N, K, generator=g) / K ** 0.5).to(dtype)
    return x, w, off.to(idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("idx", [torch.int32, torch.int64])
def test_matches_reference(dtype, idx):
    x, w, off = sample_inputs(dtype=dtype, idx=idx, seed=3)
    out = ops.expert_gemm(x, w, off)
    torch.testing.assert_close(out, reference.expert_gemm(x, w, off), **TOL[dtype])
    assert bool((out[int(off[-1]):] == 0).all())


def test_matches_moe_layout_and_permute():
    """The op on moe_permute's rows equals a per-token loop over the routed experts."""
    g = torch.Generator().manual_seed(1)
    T, E, k, H, N = 20, 5, 2, 16, 8
    x = torch.randn(T, H, generator=g)
    w = torch.randn(E, N, H, generator=g)
    r = ops.route(torch.randn(T, E, generator=g), k)
    lay = ops.moe_layout(r.ids, E)
    y = ops.expert_gemm(ops.moe_permute(x, lay.src, k), w, lay.expert_offsets)
    for t in range(T):
        for j in range(k):
            e, row = int(r.ids[t, j]), int(lay.dest[t * k + j])
            torch.testing.assert_close(y[row], w[e] @ x[t], atol=1e-4, rtol=1e-4)


def test_opcheck_and_compile():
    x, w, off = sample_inputs(seed=5)
    torch.library.opcheck(torch.ops.disagg.expert_gemm.default, (x, w, off))
    f = torch.compile(ops.expert_gemm, fullgraph=True)
    torch.testing.assert_close(f(x, w, off), ops.expert_gemm(x, w, off))


def test_bad_input():
    x, w, off = sample_inputs()
    f = ops.expert_gemm
    with pytest.raises(ValueError, match="expert_offsets"):
        f(x, w, off[:-1])
    with pytest.raises(ValueError, match="expert_offsets"):
        f(x, w, torch.tensor([0, 5, 3, 9, 9, 9, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="expert_offsets"):
        f(x, w, torch.tensor([0, 5, 6, 9, 9, 9, 51], dtype=torch.int32))
    with pytest.raises(ValueError, match="expert_offsets"):
        f(x, w, off.float())
    with pytest.raises(ValueError, match="K"):
        f(x[:, :-1], w, off)
    with pytest.raises(ValueError, match="w"):
        f(x, w.double(), off)
    with pytest.raises(ValueError, match="x"):
        f(x.int(), w, off)
