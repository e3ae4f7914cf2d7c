"""paged_decode_attention: reference equality, opcheck, compile, bad input."""
import pytest
import torch

import disagg  # noqa: F401
from disagg import ops, reference

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def sample_inputs(dtype=torch.float32, B=5, Hq=8, Hkv=2, D=32, bs=4, idx=torch.int32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 40, (B,), generator=g)
    max_blocks = int((lens.max() + bs - 1) // bs) + 1
    nb = B * max_blocks + 3
    cache = torch.randn(nb, 2, bs, Hkv, D, generator=g).to(dtype)
    perm = torch.randperm(nb, generator=g)[:B * max_blocks].view(B, max_blocks)  # scattered pages
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    return q, cache, perm.to(idx), lens.to(idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("idx", [torch.int32, torch.int64])
@pytest.mark.parametrize("window", [0, 7])
def test_matches_reference(dtype, idx, window):
    q, cache, bt, lens = sample_inputs(dtype, idx=idx)
    out = ops.paged_decode_attention(q, cache, bt, lens, 32 ** -0.5, window)
    ref = reference.paged_decode_attention(q, cache, bt, lens, 32 ** -0.5, window)
    torch.testing.assert_close(out, ref, **TOL[dtype])


# Head sizes 16/32/64/128 take register-resident kernels (G <= 8 query heads per KV head),
# others and larger groups the general one; odd context lengths leave 1-3 keys after the
# 4-key score tiles and an odd key after the 2-key value pairs.
@pytest.mark.parametrize("D,Hq,Hkv", [(16, 8, 1), (32, 4, 2), (64, 6, 2), (128, 2, 2),
                                      (48, 4, 2), (32, 16, 1)])
def test_head_sizes_match_reference(D, Hq, Hkv):
    for dtype in (torch.float32, torch.bfloat16):
        q, cache, bt, lens = sample_inputs(dtype, B=6, Hq=Hq, Hkv=Hkv, D=D, seed=D + Hq)
        out = ops.paged_decode_attention(q, cache, bt, lens, D ** -0.5)
        ref = reference.paged_decode_attention(q, cache, bt, lens, D ** -0.5)
        torch.testing.assert_close(out, ref, **TOL[dtype])


def test_matches_sdpa_path():
    from disagg.model.attention import AttentionMetadata, decode_attention_sdpa

    q, cache, bt, lens = sample_inputs(Hq=4, Hkv=4, bs=8)
    seqs = [(1, int(n), bt[i]) for i, n in enumerate(lens)]
    meta = AttentionMetadata.build(seqs, 8, torch.zeros(len(seqs), dtype=torch.long))
    torch.testing.assert_close(ops.paged_decode_attention(q, cache, bt, lens, 0.2),
                               decode_attention_sdpa(q, cache, meta, 0.2), atol=1e-5, rtol=1e-5)


def test_opcheck_and_compile():
    q, cache, bt, lens = sample_inputs(B=2)
    torch.library.opcheck(torch.ops.disagg.paged_decode_attention.default,
                          (q, cache, bt, lens, 0.17, 0))
    f = torch.compile(lambda *a: ops.paged_decode_attention(*a, 0.17), fullgraph=True)
    torch.testing.assert_close(f(q, cache, bt, lens), ops.paged_decode_attention(q, cache, bt, lens, 0.17))


def test_bad_input():
    q, cache, bt, lens = sample_inputs(B=2)
    f = ops.paged_decode_attention
    with pytest.raises(ValueError, match="ctx_lens"):
        f(q, cache, bt, torch.tensor([0, 3], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="ctx_lens"):
        f(q, cache, bt, torch.tensor([10 ** 6, 3], dtype=torch.int32), 1.0)
    bad = bt.clone()
    bad[0, 0] = cache.shape[0]
    with pytest.raises(ValueError, match="num_blocks"):
        f(q, cache, bad, lens, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        f(q[:, :3], cache, bt, lens, 1.0)
    with pytest.raises(ValueError, match="kv_cache"):
        f(q, cache.double(), bt, lens, 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        f(q, cache, bt.float(), lens, 1.0)
    with pytest.raises(ValueError, match="ctx_lens"):
        f(q, cache, bt, lens.long(), 1.0)


def rope_inputs(dtype=torch.float32, B=5, Hq=8, Hkv=2, D=32, bs=4, idx=torch.int64, seed=1):
    q, cache, bt, lens = sample_inputs(dtype, B, Hq, Hkv, D, bs, idx, seed)
    g = torch.Generator().manual_seed(seed + 100)
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, generator=g).to(dtype)
    ang = torch.rand(B, D // 2, generator=g) * 6.0
    cos = torch.cat((ang.cos(), ang.cos()), -1).to(dtype)
    sin = torch.cat((ang.sin(), ang.sin()), -1).to(dtype)
    return qkv, cos, sin, cache, bt, lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [0, 5])
def test_rope_variant_matches_reference(dtype, window):
    qkv, cos, sin, cache, bt, lens = rope_inputs(dtype)
    c1, c2 = cache.clone(), cache.clone()
    out = ops.paged_decode_attention_rope(qkv, cos, sin, c1, bt, lens, 8, 32 ** -0.5, window)
    ref = reference.paged_decode_attention_rope(qkv, cos, sin, c2, bt, lens, 8, 32 ** -0.5,
                                                window)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(c1, c2, **TOL[dtype])  # the appended K (rotated) and V
    assert (c1 != cache).any()


def test_rope_variant_equals_the_unfused_model_path():
    # RoPE as the model applies it, K/V written through write_kv, then the plain op.
    from disagg.model.rope import RotaryEmbedding, apply_rope

    qkv, _, _, cache, bt, lens = rope_inputs(Hq=4, Hkv=2)
    rope = RotaryEmbedding(32, 10000.0, 512)
    pos = (lens - 1).long()
    cos, sin = rope.cos_sin(pos, torch.float32)
    hcos, hsin = rope.cos_sin_hf(pos, torch.float32, int(pos.max()))
    c1, c2 = cache.clone(), cache.clone()
    got = ops.paged_decode_attention_rope(qkv, hcos, hsin, c1, bt, lens, 4, 0.2)
    x = qkv.view(5, 8, 32)
    qk = apply_rope(x[:, :6], cos, sin)
    for b in range(5):
        p = int(lens[b]) - 1
        c2[int(bt[b, p // 4]), 0, p % 4] = qk[b, 4:]
        c2[int(bt[b, p // 4]), 1, p % 4] = x[b, 6:]
    want = ops.paged_decode_attention(qk[:, :4].contiguous(), c2, bt, lens, 0.2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c1, c2, atol=1e-6, rtol=1e-6)


def test_rope_variant_opcheck_and_compile():
    qkv, cos, sin, cache, bt, lens = rope_inputs(B=2)
    torch.library.opcheck(torch.ops.disagg.paged_decode_attention_rope.default,
                          (qkv, cos, sin, cache.clone(), bt, lens, 8, 0.17, 0))
    f = torch.compile(lambda *a: ops.paged_decode_attention_rope(*a, 8, 0.17), fullgraph=True)
    c1, c2 = cache.clone(), cache.clone()
    torch.testing.assert_close(f(qkv, cos, sin, c1, bt, lens),
                               ops.paged_decode_attention_rope(qkv, cos, sin, c2, bt, lens, 8,
                                                               0.17))
    assert torch.equal(c1, c2)


def test_rope_variant_bad_input():
    qkv, cos, sin, cache, bt, lens = rope_inputs(B=2)
    f = ops.paged_decode_attention_rope
    with pytest.raises(ValueError, match="ctx_lens"):
        f(qkv, cos, sin, cache, bt, torch.tensor([0, 3]), 8, 1.0)
    bad = bt.clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="num_blocks"):
        f(qkv, cos, sin, cache, bad, lens, 8, 1.0)
    with pytest.raises(ValueError, match="qkv must have"):
        f(qkv[:, :-32].contiguous(), cos, sin, cache, bt, lens, 8, 1.0)
    with pytest.raises(ValueError, match="num_heads"):
        f(qkv, cos, sin, cache, bt, lens, 7, 1.0)
    with pytest.raises(ValueError, match="cos must be"):
        f(qkv, cos[:, :16].contiguous(), sin, cache, bt, lens, 8, 1.0)
    with pytest.raises(ValueError, match="sin must be"):
        f(qkv, cos, sin.double(), cache, bt, lens, 8, 1.0)
    with pytest.raises(ValueError, match="qkv must be contiguous"):
        f(qkv.t().contiguous().t(), cos, sin, cache, bt, lens, 8, 1.0)
    with pytest.raises(ValueError, match="kv_cache"):
        f(qkv, cos, sin, cache.bfloat16(), bt, lens, 8, 1.0)
