"""CUDA paged_decode_attention against the CPU op and the reference on fresh random inputs: GQA
ratios, head sizes on and off the 16-byte path, block sizes, long contexts (split-K), sliding
windows, scattered pages; opcheck, torch.compile, a CUDA-graph capture, bad-input behaviour."""
import pytest
import torch

import disagg  # noqa: F401
from disagg import ops
from disagg import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"
# float32 accumulation on both sides in different orders; the output's rounding dominates
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def poison_cache(nbytes=64 << 20):
    """Fill memory the caching allocator hands out next with 0xff bytes (NaN in every float
    type), so an output element the kernel forgets to write shows."""
    torch.full((nbytes // 4,), -1, dtype=torch.int32, device=DEV)


def make_inputs(B, Hq, Hkv, D, bs, max_len, dtype, idx=torch.int32, seed=0, min_len=1):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (B,), generator=g)
    lens[0] = max_len  # the longest sequence fills its table
    max_blocks = -(-max_len // bs) + 1
    nb = B * max_blocks + 3
    cache = torch.randn(nb, 2, bs, Hkv, D, generator=g).to(dtype)
    table = torch.randperm(nb, generator=g)[:B * max_blocks].view(B, max_blocks)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    return q, cache, table.to(idx), lens.to(idx)


def run_both(q, cache, table, lens, scale, window):
    poison_cache()
    got = ops.paged_decode_attention(q.to(DEV), cache.to(DEV), table.to(DEV), lens.to(DEV), scale,
                                     window)
    want = ops.paged_decode_attention(q, cache, table, lens, scale, window)
    return got.cpu(), want


CASES = [
    # B, Hq, Hkv, D, block_size, max_len
    (1, 8, 8, 128, 16, 1),        # one key
    (3, 32, 8, 128, 16, 200),     # GQA 4, one split
    (4, 64, 8, 128, 16, 3000),    # GQA 8, split-K
    (2, 64, 4, 64, 32, 1500),     # GQA 16: two head groups per KV head
    (5, 12, 1, 64, 1, 300),       # MQA, block size 1
    (2, 40, 8, 96, 8, 700),       # GQA 5, D not a power of two
    (3, 8, 2, 36, 4, 100),        # D % 8 != 0: element loads for 16-bit types
    (2, 4, 2, 256, 64, 5000),     # large head, big pages
    (64, 32, 8, 128, 16, 600),    # batch
]


@pytest.mark.parametrize("B,Hq,Hkv,D,bs,max_len", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_cpu(B, Hq, Hkv, D, bs, max_len, dtype):
    q, cache, table, lens = make_inputs(B, Hq, Hkv, D, bs, max_len, dtype, seed=B + D + max_len)
    got, want = run_both(q, cache, table, lens, D ** -0.5, 0)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("window", [1, 7, 256, 1000, 10 ** 6])
@pytest.mark.parametrize("idx", [torch.int32, torch.int64])
def test_sliding_window_matches_cpu_and_reference(window, idx):
    q, cache, table, lens = make_inputs(3, 16, 4, 64, 16, 1200, torch.bfloat16, idx=idx, seed=window)
    got, want = run_both(q, cache, table, lens, 0.125, window)
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16])
    torch.testing.assert_close(got, ref.paged_decode_attention(q, cache, table, lens, 0.125, window),
                               **TOL[torch.bfloat16])


def test_unaligned_cache_uses_element_loads():
    """A cache view that starts 2 bytes past a 16-byte boundary still gives the right result."""
    q, cache, table, lens = make_inputs(2, 8, 2, 64, 16, 400, torch.bfloat16, seed=5)
    flat = torch.empty(cache.numel() + 1, dtype=cache.dtype, device=DEV)
    shifted = flat[1:].view(cache.shape)
    shifted.copy_(cache.to(DEV))
    got = ops.paged_decode_attention(q.to(DEV), shifted, table.to(DEV), lens.to(DEV), 0.125)
    want = ops.paged_decode_attention(q, cache, table, lens, 0.125)
    torch.testing.assert_close(got.cpu(), want, **TOL[torch.bfloat16])


def test_non_contiguous_q():
    q, cache, table, lens = make_inputs(3, 8, 2, 64, 16, 300, torch.float32, seed=9)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    got = ops.paged_decode_attention(qt.to(DEV), cache.to(DEV), table.to(DEV), lens.to(DEV), 0.1)
    torch.testing.assert_close(got.cpu(), ops.paged_decode_attention(q, cache, table, lens, 0.1),
                               **TOL[torch.float32])


def test_bad_lengths_and_blocks_give_nan_rows_only():
    """The GPU cannot raise without a host sync: a bad ctx_len or block id makes that sequence's
    rows NaN; the other sequences are exact."""
    q, cache, table, lens = make_inputs(4, 8, 2, 64, 16, 600, torch.float32, seed=3, min_len=40)
    want = ops.paged_decode_attention(q, cache, table, lens, 0.1)
    bad_lens, bad_table = lens.clone(), table.clone()
    bad_lens[1] = 0
    bad_lens[2] = table.shape[1] * 16 + 1
    bad_table[3, 1] = cache.shape[0]  # a used block of sequence 3
    got = ops.paged_decode_attention(q.to(DEV), cache.to(DEV), bad_table.to(DEV),
                                     bad_lens.to(DEV), 0.1).cpu()
    assert got[1:].isnan().all()
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])


def test_shape_errors_raise_like_cpu():
    q, cache, table, lens = make_inputs(2, 8, 2, 32, 4, 30, torch.float32)
    q, cache, table, lens = q.to(DEV), cache.to(DEV), table.to(DEV), lens.to(DEV)
    f = ops.paged_decode_attention
    with pytest.raises(ValueError, match="multiple"):
        f(q[:, :3], cache, table, lens, 1.0)
    with pytest.raises(ValueError, match="kv_cache"):
        f(q, cache.half(), table, lens, 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        f(q, cache, table.cpu(), lens, 1.0)
    with pytest.raises(ValueError, match="ctx_lens"):
        f(q, cache, table, lens.long(), 1.0)


def test_opcheck_and_compile_cuda():
    q, cache, table, lens = (t.to(DEV) for t in make_inputs(2, 8, 2, 64, 16, 700, torch.bfloat16))
    torch.library.opcheck(torch.ops.disagg.paged_decode_attention.default,
                          (q, cache, table, lens, 0.125, 0))
    f = torch.compile(lambda *a: ops.paged_decode_attention(*a, 0.125), fullgraph=True)
    torch.testing.assert_close(f(q, cache, table, lens),
                               ops.paged_decode_attention(q, cache, table, lens, 0.125))


def test_cuda_graph_capture_and_replay():
    """A decode step captured once replays with new lengths, tables and queries in place."""
    q, cache, table, lens = (t.to(DEV) for t in make_inputs(3, 16, 4, 128, 16, 900, torch.bfloat16))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.paged_decode_attention(q, cache, table, lens, 0.088)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.paged_decode_attention(q, cache, table, lens, 0.088)
    for seed in range(3):
        q2, _, t2, l2 = make_inputs(3, 16, 4, 128, 16, 900, torch.bfloat16, seed=seed + 10)
        q.copy_(q2.to(DEV))
        table.copy_(t2.to(DEV))
        lens.copy_(l2.to(DEV))
        graph.replay()
        want = ops.paged_decode_attention(q2, cache.cpu(), t2, l2, 0.088)
        torch.testing.assert_close(out.cpu(), want, **TOL[torch.bfloat16])
