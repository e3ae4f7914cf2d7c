"""CUDA token-tree ops against the CPU ops and the references on fresh random inputs; a CUDA-graph
capture of tree_verify_sample. Sampling must give the CPU op's tokens for the same seed/offset."""
import sys
from pathlib import Path

import pytest
import torch

import disagg  # noqa: F401
from disagg import ops
from disagg import reference as ref

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_tree_ops import SHAPES, biased_logits, random_batch, sample_case  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def poison_cache(nbytes=64 << 20):
    torch.full((nbytes // 4,), -1, dtype=torch.int32, device=DEV)


def on(x):
    return x.to(DEV) if torch.is_tensor(x) else x


def assert_same(got, want, what=""):
    for name, a, b in zip(want._fields, got, want):
        assert torch.equal(a.cpu(), b), f"{what} {name}:\n{a}\n{b}"


@pytest.mark.parametrize("B,N", [(1, 1), (5, 7), (8, 33), (16, 64), (3, 200), (2, 1024)])
def test_tree_build_matches_cpu(B, N):
    g = torch.Generator().manual_seed(B * 100 + N)
    parents, num = random_batch(B, N, SHAPES, g)
    for max_depth in (-1, N - 1):
        want = ops.tree_build(parents, num, max_depth=max_depth)
        poison_cache()
        got = ops.tree_build(on(parents).int(), on(num), max_depth=max_depth)
        assert_same(got, want, "tree_build")
    assert_same(ops.tree_build(parents[:2], num[:2]), ref.tree_build(parents[:2], num[:2]), "ref")


def test_tree_build_invalid_request_is_flagged():
    parents = torch.tensor([[-1, 0, 1], [-1, 2, 0], [-1, 0, 0]])
    num = torch.tensor([3, 3, 4])  # request 1: forward reference; request 2: num_nodes > N
    out = ops.tree_build(on(parents), on(num))
    assert out.num_leaves.cpu().tolist()[1:] == [-1, -1]
    assert out.num_leaves[0].item() == 1
    assert bool((out.depth[1:] == -1).all()) and bool((out.mask[1:] == 0).all())


@pytest.mark.parametrize("B,N,V,dtype", [(1, 1, 10, torch.float32), (8, 16, 1000, torch.float32),
                                         (16, 64, 32000, torch.bfloat16), (4, 200, 513, torch.float16),
                                         (2, 33, 7, torch.float32)])
def test_greedy_matches_cpu(B, N, V, dtype):
    g = torch.Generator().manual_seed(V + N)
    parents, num = random_batch(B, N, SHAPES, g)
    tokens = torch.randint(0, V, (B, N), generator=g)
    logits = biased_logits(parents, num, tokens, V, g, dtype)
    logits[0, 0, :3] = float("nan")  # NaN counts as -inf
    want = ops.tree_verify_greedy(logits, tokens, parents, num)
    assert_same(want, ref.tree_verify_greedy(logits, tokens, parents, num), "cpu vs ref")
    poison_cache()
    got = ops.tree_verify_greedy(on(logits), on(tokens), on(parents), on(num))
    assert_same(got, want, "greedy")
    ids = logits.float().argmax(-1)
    assert_same(ops.tree_verify_greedy(on(ids), on(tokens), on(parents), on(num)),
                ops.tree_verify_greedy(ids, tokens, parents, num), "ids")
    # strided logits (a slice of a wider batch) are used in place
    wide = torch.cat([logits, logits], 1)[:, :N]
    assert_same(ops.tree_verify_greedy(on(wide), on(tokens), on(parents), on(num)), want, "strided")


def _sample_kw(B, g, dtype, q):
    return dict(
        temperature=torch.rand(B, generator=g) * 1.5 + 0.1,
        top_k=torch.randint(0, 50, (B,), generator=g) * (torch.arange(B) % 3 == 0),
        top_p=torch.where(torch.arange(B) % 2 == 0, torch.rand(B, generator=g) * 0.7 + 0.3,
                          torch.ones(B)),
        seed=torch.randint(0, 2**62, (B,), generator=g),
        offset=torch.randint(0, 2**40, (B,), generator=g),
        draft_probs=q.to(dtype) if q is not None else None,
    )


@pytest.mark.parametrize("V", [300, 32000])
@pytest.mark.parametrize("draft", [False, True])
@pytest.mark.parametrize("dtype", FLOATS)
def test_sample_matches_cpu(draft, dtype, V):
    g = torch.Generator().manual_seed(7 + draft + V)
    B, N = 24, 24
    parents, num, tokens, logits, q = sample_case(B, N, V, g, dtype, draft)
    kw = _sample_kw(B, g, dtype, q)
    kw["temperature"][5] = 0.0  # one greedy request in the batch
    want = ops.tree_verify_sample(logits, tokens, parents, num, **kw)
    if V <= 300:
        assert_same(want, ref.tree_verify_sample(logits, tokens, parents, num, **kw), "cpu vs ref")
    poison_cache()
    got = ops.tree_verify_sample(on(logits), on(tokens), on(parents), on(num),
                                 **{k: on(v) for k, v in kw.items()})
    assert_same(got, want, "sample")


@pytest.mark.parametrize("top_k,top_p", [(4, 1.0), (0, 0.6), (4, 0.7), (1, 1.0), (0, 0.05),
                                         (20, 0.999)])
def test_sample_filters_with_ties_match_cpu(top_k, top_p):
    g = torch.Generator().manual_seed(top_k * 10 + int(top_p * 100))
    B, N, V = 16, 12, 64
    parents, num, tokens, logits, _ = sample_case(B, N, V, g)
    logits = (logits * 2).round() / 2  # many exact ties
    kw = dict(temperature=0.8, top_k=top_k, top_p=top_p, seed=torch.arange(B), offset=3)
    want = ops.tree_verify_sample(logits, tokens, parents, num, **kw)
    got = ops.tree_verify_sample(on(logits), on(tokens), on(parents), on(num),
                                 **{k: on(v) for k, v in kw.items()})
    assert_same(got, want, "filtered")


def test_sample_invalid_request_is_flagged():
    g = torch.Generator().manual_seed(3)
    parents, num = random_batch(4, 8, SHAPES, g, full=True)
    tokens = torch.randint(0, 50, (4, 8), generator=g)
    logits = torch.randn(4, 8, 50, generator=g)
    tokens[2, 1] = 50  # out of range
    out = ops.tree_verify_sample(on(logits), on(tokens), on(parents), on(num),
                                 top_p=on(torch.tensor([1.0, 0.0, 1.0, 1.0])))
    assert out.accept_len.cpu().tolist()[1:3] == [0, 0]
    assert out.bonus.cpu().tolist()[1:3] == [-1, -1]
    assert int(out.accept_len[0]) >= 1 and int(out.accept_len[3]) >= 1


def test_sample_cuda_graph_capture():
    g = torch.Generator().manual_seed(11)
    B, N, V = 8, 16, 4000
    parents, num, tokens, logits, q = sample_case(B, N, V, g, draft=True)
    args = [on(x) for x in (logits, tokens, parents, num)]
    temp, tk, tp = on(torch.full((B,), 0.9)), on(torch.full((B,), 40)), on(torch.full((B,), 0.9))
    seed, offset = on(torch.arange(B)), on(torch.zeros(B, dtype=torch.int64))
    qd = on(q)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph (allocator, lazy init)
        ops.tree_verify_sample(*args, temperature=temp, top_k=tk, top_p=tp, seed=seed,
                               offset=offset, draft_probs=qd)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.tree_verify_sample(*args, temperature=temp, top_k=tk, top_p=tp, seed=seed,
                                     offset=offset, draft_probs=qd)
    for off in (5, 6):
        offset.fill_(off)  # read on the device at replay: fresh randomness without re-capture
        graph.replay()
        torch.cuda.synchronize()
        want = ops.tree_verify_sample(logits, tokens, parents, num, temperature=0.9, top_k=40,
                                      top_p=0.9, seed=torch.arange(B), offset=off, draft_probs=q)
        assert_same(out, want, f"graph offset={off}")


def test_opcheck_cuda():
    g = torch.Generator().manual_seed(1)
    parents, num, tokens, logits, q = sample_case(3, 6, 20, g, draft=True)
    p, n, t, x, qq = (on(v) for v in (parents, num, tokens, logits, q))
    torch.library.opcheck(torch.ops.disagg.tree_build.default, (p, n, -1))
    torch.library.opcheck(torch.ops.disagg.tree_verify_greedy.default, (x, t, p, n))
    B = 3
    per = (on(torch.full((B,), 0.7)), on(torch.full((B,), 5)), on(torch.full((B,), 0.9)),
           on(torch.arange(B)), on(torch.zeros(B, dtype=torch.int64)))
    torch.library.opcheck(torch.ops.disagg.tree_verify_sample.default, (x, t, p, n, *per, qq))
    torch.library.opcheck(torch.ops.disagg.tree_verify_sample.default, (x, t, p, n, *per, None))
