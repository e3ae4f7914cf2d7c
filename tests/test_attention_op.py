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
