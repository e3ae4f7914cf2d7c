"""paged_tree_attention: reference equality over dtypes, windows and tree shapes, agreement
with the dense masked SDPA it replaces, opcheck, compile, bad input."""
import pytest
import torch
import torch.nn.functional as F

import disagg  # noqa: F401
from disagg import ops, reference

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def random_parents(n, g):
    return [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]


def sample_inputs(dtype=torch.float32, B=4, Hq=8, Hkv=2, D=32, bs=4, idx=torch.int32, seed=0,
                  max_ctx=40, max_nodes=40, subset=False):
    """Random trees (one of them past 32 nodes: two mask words), scattered pages; with
    ``subset`` each sequence queries only its last few tree nodes (as the draft model does)."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, max_ctx, (B,), generator=g)
    nodes = torch.randint(1, max_nodes, (B,), generator=g)
    nodes[0] = max_nodes  # > 32 nodes when max_nodes > 32
    N = int(nodes.max())
    parents = torch.full((B, N), -1, dtype=torch.long)
    for b in range(B):
        parents[b, :int(nodes[b])] = torch.tensor(random_parents(int(nodes[b]), g))
    t = ops.tree_build(parents, nodes.to(torch.int32))
    rows, offs = [], [0]
    for b in range(B):
        n = int(nodes[b])
        first = int(torch.randint(0, n, (1,), generator=g)) if subset else 0
        rows.append(t.mask[b, first:n])
        offs.append(offs[-1] + n - first)
    mask = torch.cat(rows)
    max_blocks = int(((ctx + nodes).max() + bs - 1) // bs) + 1
    nb = B * max_blocks + 3
    cache = torch.randn(nb, 2, bs, Hkv, D, generator=g).to(dtype)
    tables = torch.randperm(nb, generator=g)[:B * max_blocks].view(B, max_blocks)
    q = torch.randn(offs[-1], Hq, D, generator=g).to(dtype)
    return (q, cache, tables.to(idx), ctx.to(idx), nodes.to(idx),
            torch.tensor(offs).to(idx), mask), (parents, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("idx", [torch.int32, torch.int64])
@pytest.mark.parametrize("window", [0, 3, 20])
def test_matches_reference(dtype, idx, window):
    args, _ = sample_inputs(dtype, idx=idx, seed=window * 7 + len(str(dtype)))
    out = ops.paged_tree_attention(*args, 32 ** -0.5, window)
    ref = reference.paged_tree_attention(*args, 32 ** -0.5, window)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("window", [0, 5])
def test_query_subsets_long_context_and_mha(window):
    """Some sequences query only their last nodes; a context over many key tiles; Hq == Hkv;
    a sequence without queries."""
    args, _ = sample_inputs(Hq=4, Hkv=4, D=16, bs=16, max_ctx=300, max_nodes=70, subset=True,
                            seed=7)
    out = ops.paged_tree_attention(*args, 0.3, window)
    torch.testing.assert_close(out, reference.paged_tree_attention(*args, 0.3, window),
                               atol=1e-5, rtol=1e-5)
    q, cache, bt, ctx, tl, offs, mask = args
    offs2 = torch.cat([offs[:1], offs])  # an extra first sequence with no queries
    args2 = (q, cache, torch.cat([bt[:1], bt]), torch.cat([ctx[:1], ctx]),
             torch.cat([tl[:1], tl]), offs2, mask)
    torch.testing.assert_close(ops.paged_tree_attention(*args2, 0.3, window), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_sizes(dtype):
    """head_dim and query counts off the kernel's 4-query / 16-key blocks, GQA group 2."""
    args, _ = sample_inputs(dtype, B=5, Hq=6, Hkv=3, D=20, bs=3, max_ctx=70, max_nodes=11,
                            subset=True, seed=11)
    torch.testing.assert_close(ops.paged_tree_attention(*args, 0.21, 6),
                               reference.paged_tree_attention(*args, 0.21, 6), **TOL[dtype])


def test_matches_dense_masked_sdpa():
    """The engine's former path: gather the pages, unpack the mask, SDPA with it."""
    (q, cache, bt, ctx, tl, offs, mask), (parents, t) = sample_inputs(B=3, max_nodes=12,
                                                                     Hq=4, Hkv=2, seed=3)
    assert torch.equal(ops.tree_mask_rows(t.mask, tl), mask)  # tree_build's rows, flat
    out = ops.paged_tree_attention(q, cache, bt, ctx, tl, offs, mask, 0.2)
    bs, D = cache.shape[2], cache.shape[-1]
    for b in range(3):
        c, n, q0 = int(ctx[b]), int(tl[b]), int(offs[b])
        L = c + n
        blocks = bt[b, :(L + bs - 1) // bs].long()
        k = cache[blocks, 0].reshape(-1, 2, D)[:L].transpose(0, 1)[None]
        v = cache[blocks, 1].reshape(-1, 2, D)[:L].transpose(0, 1)[None]
        m = torch.ones(n, L, dtype=torch.bool)
        m[:, c:] = ops.unpack_tree_mask(t.mask, n)[b, :n]
        o = F.scaled_dot_product_attention(q[q0:q0 + n].transpose(0, 1)[None], k, v,
                                           attn_mask=m, scale=0.2, enable_gqa=True)
        torch.testing.assert_close(out[q0:q0 + n], o[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_chain_equals_causal_attention():
    """A chain is a causal chunk: the draft model's catch-up chunks run as chains."""
    g = torch.Generator().manual_seed(5)
    c, n, bs, Hkv, D = 9, 6, 4, 2, 8
    cache = torch.randn(8, 2, bs, Hkv, D, generator=g)
    bt = torch.randperm(8, generator=g)[:5].view(1, 5)
    q = torch.randn(n, 4, D, generator=g)
    bits = torch.tensor([(1 << (i + 1)) - 1 for i in range(n)], dtype=torch.int32)[:, None]
    for window in (0, 4):
        out = ops.paged_tree_attention(q, cache, bt, torch.tensor([c]), torch.tensor([n]),
                                       torch.tensor([0, n]), bits, 0.4, window)
        L = c + n
        k = cache[bt[0].long(), 0].reshape(-1, Hkv, D)[:L].transpose(0, 1)[None]
        v = cache[bt[0].long(), 1].reshape(-1, Hkv, D)[:L].transpose(0, 1)[None]
        qp, kp = torch.arange(c, L), torch.arange(L)
        m = kp[None] <= qp[:, None]
        if window:
            m &= kp[None] > qp[:, None] - window
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=m,
                                           scale=0.4, enable_gqa=True)
        torch.testing.assert_close(out, o[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_opcheck_and_compile():
    args, _ = sample_inputs(B=2, max_nodes=8)
    torch.library.opcheck(torch.ops.disagg.paged_tree_attention.default, (*args, 0.17, 0))
    torch.library.opcheck(torch.ops.disagg.paged_tree_attention.default, (*args, 0.17, 4))
    f = torch.compile(lambda *a: ops.paged_tree_attention(*a, 0.17), fullgraph=True)
    torch.testing.assert_close(f(*args), ops.paged_tree_attention(*args, 0.17))


def test_bad_input():
    args, _ = sample_inputs(B=2, max_nodes=8)
    q, cache, bt, ctx, tl, offs, mask = args
    f = ops.paged_tree_attention

    def bad(match, **kw):
        a = dict(q=q, kv_cache=cache, block_tables=bt, ctx_lens=ctx, tree_lens=tl,
                 q_offsets=offs, tree_mask=mask)
        a.update(kw)
        with pytest.raises(ValueError, match=match):
            f(*a.values(), 1.0)

    bad("ctx_lens", ctx_lens=torch.tensor([-1, 3], dtype=torch.int32))
    bad("block table", ctx_lens=torch.tensor([10 ** 6, 3], dtype=torch.int32))
    b2 = bt.clone()
    b2[0, 0] = cache.shape[0]
    bad("num_blocks", block_tables=b2)
    bad("tree_lens", tree_lens=torch.tensor([40, 3], dtype=torch.int32))
    bad("q_offsets", q_offsets=torch.tensor([0, 1, 2], dtype=torch.int32))
    bad("q_offsets", q_offsets=torch.tensor([0, int(offs[2]) + 1, int(offs[2])], dtype=torch.int32))
    m2 = mask.clone()
    m2[0, 0] = 0
    bad("at least one bit", tree_mask=m2)
    m3 = mask.clone()
    m3[0, 0] |= 1 << int(tl[0])
    bad("tree_lens", tree_mask=m3)
    bad("tree_mask", tree_mask=mask.long())
    bad("tree_mask", tree_mask=mask[1:])
    bad("multiple", q=q[:, :3])
    bad("kv_cache", kv_cache=cache.double())
    bad("block_tables", block_tables=bt.float())
    bad("ctx_lens", ctx_lens=ctx.long())
    bad("q_offsets", q_offsets=offs[:-1])
