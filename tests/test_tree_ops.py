"""Token-tree ops against their references: tree_build, tree_verify_greedy, tree_verify_sample;
opcheck, torch.compile and bad inputs."""
import pytest
import torch

import disagg  # noqa: F401
from disagg import ops
from disagg import reference as ref


# ---- random trees --------------------------------------------------------------------------


def random_parents(kind: str, n: int, g: torch.Generator) -> list:
    """A parent list of n nodes of the given shape (parent index < child index)."""
    par = [-1]
    for i in range(1, n):
        if kind == "chain":
            p = i - 1
        elif kind == "star":
            p = 0
        elif kind == "deep":  # mostly extends the newest node: long paths with a few branches
            p = i - 1 if torch.rand(1, generator=g).item() < 0.85 else int(torch.randint(0, i, (1,), generator=g))
        elif kind == "wide":  # parents among the first few nodes: shallow, bushy
            p = int(torch.randint(0, min(i, 4), (1,), generator=g))
        else:  # uniform random recursive tree
            p = int(torch.randint(0, i, (1,), generator=g))
        par.append(p)
    return par


def random_batch(B, N, kinds, g, full=False, pad_value=-7):
    """parents [B, N] (padding filled with junk the ops must ignore) and num_nodes [B]."""
    parents = torch.full((B, N), pad_value, dtype=torch.int64)
    num = torch.empty(B, dtype=torch.int64)
    for b in range(B):
        n = N if (full or b == 0) else int(torch.randint(1, N + 1, (1,), generator=g))
        parents[b, :n] = torch.tensor(random_parents(kinds[b % len(kinds)], n, g))
        num[b] = n
    return parents, num


def biased_logits(parents, num, tokens, V, g, dtype=torch.float32, agree=0.75):
    """Logits whose argmax at a node is one of its children's tokens with probability `agree`,
    so that greedy walks go deep; ties and bf16 rounding are exercised too."""
    B, N = parents.shape
    logits = torch.randn(B, N, V, generator=g)
    for b in range(B):
        n = int(num[b])
        kids = [[] for _ in range(n)]
        for i in range(1, n):
            kids[int(parents[b, i])].append(i)
        for i in range(n):
            if kids[i] and torch.rand(1, generator=g).item() < agree:
                c = kids[i][int(torch.randint(0, len(kids[i]), (1,), generator=g))]
                logits[b, i, tokens[b, c]] = 6.0
    return logits.to(dtype)


SHAPES = ["chain", "star", "deep", "wide", "random"]


# ---- tree_build ----------------------------------------------------------------------------


@pytest.mark.parametrize("B,N", [(1, 1), (5, 7), (8, 33), (16, 64), (3, 200), (2, 1024)])
def test_tree_build_matches_reference(B, N):
    g = torch.Generator().manual_seed(B * 1000 + N)
    parents, num = random_batch(B, N, SHAPES, g)
    for idx_dtype in (torch.int32, torch.int64):
        got = ops.tree_build(parents.to(idx_dtype), num.to(idx_dtype))
        want = ref.tree_build(parents, num)
        for name, a, b in zip(got._fields, got, want):
            assert a.dtype == torch.int32, name
            assert torch.equal(a, b), name


def test_tree_build_mask_is_ancestor_relation():
    g = torch.Generator().manual_seed(3)
    B, N = 4, 100
    parents, num = random_batch(B, N, ["deep", "random", "wide", "chain"], g)
    out = ops.tree_build(parents, num, max_depth=N - 1)
    dense = ops.unpack_tree_mask(out.mask, N)
    for b in range(B):
        n = int(num[b])
        for i in range(N):
            anc = set()
            if i < n:
                j = i
                while j >= 0:
                    anc.add(j)
                    j = int(parents[b, j])
            assert dense[b, i].nonzero().flatten().tolist() == sorted(anc)
            assert int(out.depth[b, i]) == (len(anc) - 1 if i < n else -1)


def test_tree_build_max_depth():
    parents = torch.tensor([[-1, 0, 1, 2, 0]])
    out = ops.tree_build(parents, max_depth=3)
    assert out.leaf_paths.shape == (1, 5, 4)
    assert out.leaf_paths[0, :2].tolist() == [[0, 1, 2, 3], [0, 4, -1, -1]]
    assert int(out.num_leaves[0]) == 2
    with pytest.raises(ValueError, match="max_depth"):
        ops.tree_build(parents, max_depth=2)


# ---- tree_verify_greedy --------------------------------------------------------------------


def python_walk(logits, tokens, parents, num):
    """The plainest greedy walk: lists, argmax of the float row (first maximum wins)."""
    out = []
    for b in range(parents.shape[0]):
        n = int(num[b])
        kids = {i: [] for i in range(n)}
        for c in range(1, n):
            kids[int(parents[b, c])].append(c)
        path, cur = [0], 0
        while True:
            row = logits[b, cur].float()
            want = int(torch.argmax(row)) if logits.dim() == 3 else int(logits[b, cur])
            hit = [c for c in kids[cur] if int(tokens[b, c]) == want]
            if not hit:
                out.append((path, want))
                break
            path.append(hit[0])
            cur = hit[0]
    return out


def check_verify(res, walks, N):
    for b, (path, bonus) in enumerate(walks):
        assert int(res.accept_len[b]) == len(path)
        assert res.accepted[b].tolist() == path + [-1] * (N - len(path))
        assert int(res.bonus[b]) == bonus


@pytest.mark.parametrize("B,N,V,dtype", [
    (64, 64, 1000, torch.float32),
    (16, 16, 32000, torch.bfloat16),
    (8, 128, 4096, torch.float16),
    (4, 1024, 256, torch.float32),
    (2, 64, 128 * 1024, torch.float32),
])
def test_greedy_matches_python_walk(B, N, V, dtype):
    g = torch.Generator().manual_seed(B + N + V)
    parents, num = random_batch(B, N, SHAPES, g)
    tokens = torch.randint(0, V, (B, N), generator=g)
    # repeated sibling tokens: the lowest index must win
    tokens[:, 2::3] = tokens[:, 1::3][:, : tokens[:, 2::3].shape[1]]
    logits = biased_logits(parents, num, tokens, V, g, dtype)
    res = ops.tree_verify_greedy(logits, tokens.to(torch.int32), parents, num)
    walks = python_walk(logits, tokens, parents, num)
    check_verify(res, walks, N)
    assert max(len(p) for p, _ in walks) > 2  # the trees were actually descended
    check_verify(ops.tree_verify_greedy(logits.float().argmax(-1), tokens, parents, num), walks, N)


def test_greedy_strided_logits_and_ties():
    g = torch.Generator().manual_seed(11)
    B, N, V = 6, 20, 300
    parents, num = random_batch(B, N, SHAPES, g)
    tokens = torch.randint(0, V, (B, N), generator=g)
    big = biased_logits(parents, num, tokens, V + 7, g)
    logits = big[:, :, 3:V + 3]  # rows contiguous, batch/node strides of the larger buffer
    logits[0, 0, :] = 1.0  # an all-equal row: the lowest id wins
    check_verify(ops.tree_verify_greedy(logits, tokens, parents, num),
                 python_walk(logits, tokens, parents, num), N)
    assert int(ops.tree_verify_greedy(logits, tokens, parents, num).bonus[0]) in (0, *tokens[0].tolist())


def test_greedy_nan_and_inf():
    parents = torch.tensor([[-1, 0, 0]])
    tokens = torch.tensor([[0, 5, 2]])
    x = torch.zeros(1, 3, 8)
    x[0, 0, 1] = float("nan")
    x[0, 0, 2] = 3.0
    x[0, 2, :] = float("nan")  # all-NaN row: token 0
    res = ops.tree_verify_greedy(x, tokens, parents)
    assert res.accepted[0].tolist() == [0, 2, -1] and int(res.bonus[0]) == 0
    x[0, 0, 5] = float("inf")
    assert ops.tree_verify_greedy(x, tokens, parents).accepted[0].tolist() == [0, 1, -1]
    # temperature sampling: +inf logits share the mass, NaN gets none
    out = ops.tree_verify_sample(x, tokens, parents, temperature=1.0, seed=1)
    assert out.accepted[0].tolist() == [0, 1, -1]


# ---- tree_verify_sample --------------------------------------------------------------------


def sample_case(B, N, V, g, dtype=torch.float32, draft=False):
    parents, num = random_batch(B, N, SHAPES, g)
    tokens = torch.randint(0, V, (B, N), generator=g)
    logits = biased_logits(parents, num, tokens, V, g, torch.float32, agree=0.9) * 0.7
    q = None
    if draft:
        q = torch.softmax(torch.randn(B, N, V, generator=g) * 2, -1)
        q[:, :, 1] = 0.0  # draft with a zero-probability token
        q = q / q.sum(-1, keepdim=True)
    return parents, num, tokens, logits.to(dtype), q


@pytest.mark.parametrize("draft", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sample_matches_reference(draft, dtype):
    g = torch.Generator().manual_seed(7 + draft)
    B, N, V = 24, 24, 300
    parents, num, tokens, logits, q = sample_case(B, N, V, g, dtype, draft)
    kw = dict(
        temperature=torch.rand(B, generator=g) * 1.5 + 0.1,
        top_k=torch.randint(0, 50, (B,), generator=g) * (torch.arange(B) % 3 == 0),
        top_p=torch.where(torch.arange(B) % 2 == 0, torch.rand(B, generator=g) * 0.7 + 0.3, torch.ones(B)),
        seed=torch.randint(0, 2**62, (B,), generator=g),
        offset=torch.randint(0, 2**40, (B,), generator=g),
        draft_probs=q.to(dtype) if q is not None else None,
    )
    got = ops.tree_verify_sample(logits, tokens, parents, num, **kw)
    want = ref.tree_verify_sample(logits, tokens, parents, num, **kw)
    for name, a, b in zip(got._fields, got, want):
        assert torch.equal(a, b), name
    assert int(got.accept_len.max()) > 2


def test_sample_deterministic_and_offset():
    g = torch.Generator().manual_seed(5)
    parents, num, tokens, logits, _ = sample_case(32, 16, 500, g)
    a = ops.tree_verify_sample(logits, tokens, parents, num, seed=123, offset=7)
    b = ops.tree_verify_sample(logits, tokens, parents, num, seed=123, offset=7)
    c = ops.tree_verify_sample(logits, tokens, parents, num, seed=123, offset=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.bonus, c.bonus)


@pytest.mark.parametrize("draft", [False, True])
def test_temperature_zero_is_greedy(draft):
    g = torch.Generator().manual_seed(9)
    B, N, V = 32, 40, 2000
    parents, num, tokens, logits, q = sample_case(B, N, V, g, draft=draft)
    greedy = ops.tree_verify_greedy(logits, tokens, parents, num)
    for t in (0.0, 1e-4):  # exactly greedy, and the limit of sampling
        out = ops.tree_verify_sample(logits, tokens, parents, num, temperature=t, top_k=5,
                                     top_p=0.5, seed=torch.arange(B), draft_probs=q if t == 0 else None)
        for name, a, b in zip(out._fields, out, greedy):
            assert torch.equal(a, b), (t, name)


def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32-10
    assert ref.philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert ref.philox4x32_10((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == (
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert ref.philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
                             (0xA4093822, 0x299F31D0)) == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


# ---- opcheck, compile ----------------------------------------------------------------------


def _small_inputs():
    g = torch.Generator().manual_seed(1)
    parents, num = random_batch(4, 9, SHAPES, g)
    tokens = torch.randint(0, 17, (4, 9), generator=g)
    logits = biased_logits(parents, num, tokens, 17, g)
    per = dict(temperature=torch.full((4,), 0.8), top_k=torch.tensor([0, 3, 0, 5]),
               top_p=torch.tensor([1.0, 0.9, 0.5, 1.0]), seed=torch.arange(4), offset=torch.zeros(4, dtype=torch.int64))
    return parents, num, tokens, logits, per


def test_opcheck():
    parents, num, tokens, logits, per = _small_inputs()
    q = torch.softmax(torch.randn(logits.shape), -1)
    torch.library.opcheck(torch.ops.disagg.tree_build.default, (parents, num, -1))
    torch.library.opcheck(torch.ops.disagg.tree_build.default, (parents.int(), num, 8))
    torch.library.opcheck(torch.ops.disagg.tree_verify_greedy.default, (logits, tokens, parents, num))
    torch.library.opcheck(torch.ops.disagg.tree_verify_greedy.default,
                          (logits.argmax(-1), tokens, parents, num))
    args = (logits, tokens, parents, num, per["temperature"], per["top_k"], per["top_p"], per["seed"],
            per["offset"])
    torch.library.opcheck(torch.ops.disagg.tree_verify_sample.default, args)
    torch.library.opcheck(torch.ops.disagg.tree_verify_sample.default, args + (q,))


def test_torch_compile_fullgraph():
    parents, num, tokens, logits, per = _small_inputs()

    def step(logits, tokens, parents, num, t, k, p, s, o):
        built = ops.tree_build(parents, num)
        g = ops.tree_verify_greedy(logits, tokens, parents, num)
        r = ops.tree_verify_sample(logits, tokens, parents, num, temperature=t, top_k=k, top_p=p,
                                   seed=s, offset=o)
        return built.depth, built.mask, built.leaf_paths, g.accepted, g.bonus, r.accepted, r.bonus

    args = (logits, tokens, parents, num, per["temperature"], per["top_k"], per["top_p"], per["seed"],
            per["offset"])
    compiled = torch.compile(step, fullgraph=True)
    for a, b in zip(compiled(*args), step(*args)):
        assert torch.equal(a, b)


# ---- bad inputs ----------------------------------------------------------------------------


def test_bad_trees():
    ok = torch.tensor([[-1, 0, 1, 0]])
    cases = [
        (torch.tensor([[-1, 0, 3, 0]]), None, "forward reference"),  # forward reference
        (torch.tensor([[-1, 2, 1, 0]]), None, r"parents\[0, 1\]"),  # cycle 1 <-> 2
        (torch.tensor([[-1, 0, 1, 1]]), None, None),  # fine
        (torch.tensor([[-1, 0, -5, 0]]), None, r"parents\[0, 2\] = -5"),  # out of range
        (torch.tensor([[-1, 0, 99, 0]]), None, r"parents\[0, 2\] = 99"),
        (torch.tensor([[0, 0, 1, 0]]), None, r"parents\[0, 0\].*root"),  # no root
        (ok, torch.tensor([0]), r"num_nodes\[0\] = 0"),
        (ok, torch.tensor([5]), r"num_nodes\[0\] = 5"),
        (torch.tensor([[-1, 0, 9, 2**40]]), torch.tensor([2]), None),  # padding is ignored
    ]
    tokens = torch.zeros(1, 4, dtype=torch.int64)
    logits = torch.randn(1, 4, 5)
    for parents, num, msg in cases:
        calls = [lambda: ops.tree_build(parents, num), lambda: ops.tree_verify_greedy(logits, tokens, parents, num),
                 lambda: ops.tree_verify_sample(logits, tokens, parents, num)]
        for call in calls:
            if msg is None:
                call()
            else:
                with pytest.raises(ValueError, match=msg):
                    call()


def test_bad_arguments():
    parents, num, tokens, logits, per = _small_inputs()
    with pytest.raises(ValueError, match="parents must be 2-D"):
        ops.tree_build(parents[0], num)
    with pytest.raises(ValueError, match="parents must be int32 or int64"):
        ops.tree_build(parents.float(), num)
    with pytest.raises(ValueError, match="num_nodes must have B=4"):
        ops.tree_build(parents, num[:2])
    with pytest.raises(ValueError, match="logits must be float32"):
        ops.tree_verify_greedy(logits.double(), tokens, parents, num)
    with pytest.raises(ValueError, match="logits must be"):
        ops.tree_verify_greedy(logits[:, :5], tokens, parents, num)
    with pytest.raises(ValueError, match="tokens must have the shape"):
        ops.tree_verify_greedy(logits, tokens[:, :3], parents, num)
    bad_tok = tokens.clone()
    bad_tok[1, 1] = 17
    with pytest.raises(ValueError, match=r"tokens\[1, 1\] = 17 must be in \[0, V=17\)"):
        ops.tree_verify_greedy(logits, bad_tok, parents, num)
    with pytest.raises(ValueError, match=r"temperature\[2\] = -1"):
        ops.tree_verify_sample(logits, tokens, parents, num, temperature=torch.tensor([1.0, 1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match=r"top_p\[0\] = 0 must be in \(0, 1\]"):
        ops.tree_verify_sample(logits, tokens, parents, num, top_p=0.0)
    with pytest.raises(ValueError, match=r"top_p\[0\] = 1.5"):
        ops.tree_verify_sample(logits, tokens, parents, num, top_p=1.5)
    with pytest.raises(ValueError, match=r"top_k\[0\] = -1"):
        ops.tree_verify_sample(logits, tokens, parents, num, top_k=-1)
    with pytest.raises(ValueError, match="seed must be int32 or int64"):
        ops.tree_verify_sample(logits, tokens, parents, num, seed=torch.zeros(4))
    with pytest.raises(ValueError, match="temperature must have B=4"):
        ops.tree_verify_sample(logits, tokens, parents, num, temperature=torch.ones(3))
    with pytest.raises(ValueError, match="draft_probs must have the vocabulary"):
        ops.tree_verify_sample(logits, tokens, parents, num, draft_probs=logits[..., :5])


@pytest.mark.parametrize("top_k,top_p", [(4, 1.0), (0, 0.6), (4, 0.7), (1, 1.0), (0, 0.05), (20, 0.999)])
def test_filtered_support_with_ties(top_k, top_p):
    """Leaf-only trees: the bonus is a plain sample of the filtered target. Its support must be
    exactly the reference's (ties resolved to the lower id in both top-k and top-p)."""
    B, V = 3000, 10
    row = torch.tensor([3.0, 3.0, 2.0, 2.0, 2.0, 1.0, 0.0, 0.0, -1.0, float("-inf")])
    logits = row.expand(B, 1, V).contiguous()
    parents = torch.full((B, 1), -1)
    tokens = torch.zeros(B, 1, dtype=torch.int64)
    out = ops.tree_verify_sample(logits, tokens, parents, top_k=top_k, top_p=top_p,
                                 seed=torch.arange(B), offset=3)
    want = ref.tree_target_probs(row, 1.0, top_k, top_p)
    assert set(out.bonus.tolist()) == set(torch.nonzero(want).flatten().tolist())
    freq = torch.bincount(out.bonus.long(), minlength=V).double() / B
    assert torch.allclose(freq, want.double(), atol=0.04)


def test_bench_smoke(monkeypatch):
    """The benchmark family runs end to end (with --check) on a tiny case; timing is replaced by
    one call each (timings belong to the benchmark, not to tests)."""
    import argparse

    from disagg.bench import tree as bench_tree

    monkeypatch.setattr(bench_tree, "median_time", lambda fn, device, min_run_time=0.0: (fn(), 1e-3)[1])

    p = argparse.ArgumentParser()
    bench_tree.add_arguments(p)
    args = p.parse_args(["--batch", "4", "--nodes", "16", "--vocab", "300"])
    args.device, args.check, args.json, args.min_run_time = torch.device("cpu"), True, True, 0.001
    rows = bench_tree.run(args)
    assert [r["op"] for r in rows][0] == "tree_verify_greedy" and len(rows) == 4
    assert all(r["speedup"] > 0 and r["median_s"] > 0 for r in rows)
