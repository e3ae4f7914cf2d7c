"""Routing ops (route, moe_layout, moe_permute, moe_combine) against their references."""
import math

import pytest
import torch

import disagg
from disagg import ops
from disagg import reference as ref

from routing_cases import FLOATS, assert_route_equal, route_cases


@pytest.mark.parametrize("T,E,k,dtype", route_cases())
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_dropless_matches_reference(T, E, k, dtype, scoring):
    g = torch.Generator().manual_seed(T * 1000 + E * 10 + k)
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype)
    assert_route_equal(ops.route(logits, k, scoring=scoring), ref.route(logits, k, scoring=scoring))


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("overflow", ["drop", "reroute"])
@pytest.mark.parametrize("T,E,k,cf", [(64, 8, 2, 1.0), (257, 60, 6, 1.25), (1024, 64, 8, 0.5),
                                      (33, 3, 2, 0.7), (300, 256, 8, 2.0)])
def test_route_capacity_matches_reference(T, E, k, cf, policy, overflow):
    g = torch.Generator().manual_seed(T + E + k)
    # skewed logits so that some experts overflow
    logits = torch.randn(T, E, generator=g) + torch.linspace(2, 0, E)
    kw = dict(capacity_factor=cf, drop_policy=policy, overflow=overflow)
    out = ops.route(logits, k, **kw)
    assert_route_equal(out, ref.route(logits, k, **kw))
    C = ops.route_capacity(cf, T, k, E)
    assert int(out.counts.max()) <= C
    # every kept assignment has a distinct slot < C inside its expert
    kept = out.ids >= 0
    pairs = set(zip(out.ids[kept].tolist(), out.slots[kept].tolist()))
    assert len(pairs) == int(kept.sum())
    assert torch.equal(torch.bincount(out.ids[kept].long(), minlength=E).int(), out.counts)


@pytest.mark.parametrize("options", [
    dict(num_groups=8, topk_groups=3, group_score="max"),
    dict(num_groups=8, topk_groups=4, group_score="sum_top2", scoring="sigmoid"),
    dict(renormalize=False, routed_scaling_factor=2.5),
    dict(num_groups=4, topk_groups=2, capacity_factor=1.0, overflow="reroute"),
])
def test_route_options_match_reference(options):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(500, 64, generator=g)
    bias = torch.randn(64, generator=g) * 0.1
    for b in (None, bias):
        assert_route_equal(ops.route(logits, 6, bias=b, **options),
                           ref.route(logits, 6, bias=b, **options))


def test_capacity_formula():
    assert ops.route_capacity(1.2, 100, 2, 8) == 30  # not 31 from 30.000000000000004
    assert ops.route_capacity(1.0, 4096, 8, 64) == 512
    assert ops.route_capacity(0.0, 10, 2, 4) == 0
    assert ops.route_capacity(-1.0, 10, 2, 4) == 0
    assert ops.route_capacity(0.01, 1, 1, 1024) == 1


def test_position_policy_exact():
    # Every token prefers expert 0, then 1, then 2. Capacity = ceil(1.0 * 4 * 1 / 4) = 1.
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 4)
    out = ops.route(logits, 1, capacity_factor=1.0, drop_policy="position", overflow="drop")
    assert out.ids.view(-1).tolist() == [0, -1, -1, -1]
    assert out.slots.view(-1).tolist() == [0, -1, -1, -1]
    assert out.weights.view(-1)[1:].tolist() == [0.0, 0.0, 0.0]
    out = ops.route(logits, 1, capacity_factor=1.0, overflow="reroute")
    assert out.ids.view(-1).tolist() == [0, 1, 2, 3]  # each walks down its ranking
    assert out.slots.view(-1).tolist() == [0, 0, 0, 0]
    s = torch.softmax(logits[0], 0)
    # a rerouted weight keeps the original normaliser (here the score of the first choice)
    torch.testing.assert_close(out.weights.view(-1), s / s[0], rtol=1e-6, atol=1e-7)


def test_probs_policy_exact():
    # Two tokens want expert 0 with capacity 1: the one with the higher weight keeps it,
    # the other is rerouted to its next-best expert with room.
    logits = torch.tensor([[1.0, 0.0, -5.0], [5.0, 0.0, 3.0], [0.0, 9.0, 0.0]])  # p: .73, .88
    out = ops.route(logits, 1, capacity_factor=1.0, drop_policy="probs", overflow="reroute",
                    renormalize=False)
    assert out.ids.view(-1).tolist() == [2, 0, 1]
    p0 = torch.softmax(logits[0], 0)
    assert out.weights[0, 0].item() == pytest.approx(p0[2].item(), rel=1e-6)
    pos = ops.route(logits, 1, capacity_factor=1.0, drop_policy="position", overflow="reroute",
                    renormalize=False)
    assert pos.ids.view(-1).tolist() == [0, 2, 1]  # token order: token 0 keeps expert 0


def test_reroute_drops_when_no_room():
    logits = torch.randn(10, 2)
    out = ops.route(logits, 2, capacity_factor=0.5, overflow="reroute")  # C = 5, 20 assignments
    assert int((out.ids >= 0).sum()) == 10
    assert out.counts.tolist() == [5, 5]


def test_ties_go_to_lower_index():
    logits = torch.zeros(5, 16, dtype=torch.bfloat16)
    out = ops.route(logits, 4)
    assert out.ids.tolist() == [[0, 1, 2, 3]] * 5
    torch.testing.assert_close(out.weights, torch.full((5, 4), 0.25))
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert ops.route(logits, 2).ids.tolist() == [[1, 2]]


def test_logits_rank_past_exp_underflow():
    # exp(-200) and exp(-300) both underflow to 0 in float32; the logits still order them
    logits = torch.tensor([[-300.0, -200.0, 0.0]])
    for scoring in ("softmax", "sigmoid"):
        out = ops.route(logits, 2, scoring=scoring)
        assert out.ids.tolist() == [[2, 1]]
        assert_route_equal(out, ref.route(logits, 2, scoring=scoring))


def test_nan_and_inf_rows():
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([
        [nan, 1.0, 2.0, 0.0],        # NaN counts as -inf
        [-inf, -inf, -inf, -inf],    # no mass: all-zero scores, lowest indices, weight 0
        [1.0, inf, 0.0, inf],        # +inf entries share the mass
        [nan, nan, nan, nan],
    ])
    for dtype in FLOATS:
        x = logits.to(dtype)
        out = ops.route(x, 2)
        assert_route_equal(out, ref.route(x, 2))
        assert out.ids.tolist() == [[2, 1], [0, 1], [1, 3], [0, 1]]
        assert out.weights[1].tolist() == [0.0, 0.0] and out.weights[3].tolist() == [0.0, 0.0]
        assert out.weights[2].tolist() == [0.5, 0.5]
        assert not torch.isnan(out.weights).any()
    sig = ops.route(logits, 2, scoring="sigmoid")
    assert_route_equal(sig, ref.route(logits, 2, scoring="sigmoid"))


@pytest.mark.parametrize("E", [1, 5, 16, 17, 33, 64, 100, 128, 129, 255, 256, 257])
def test_route_ties_and_specials_every_width(E):
    """Rows drawn from a few values (+-0, +-inf, NaN, repeats) at every block width of the
    vectorized top-k (16 experts per block, up to 256) and just past it: ids equal the
    reference exactly (ties to the lower index, NaN as -inf, -0 tied with +0)."""
    g = torch.Generator().manual_seed(E)
    inf, nan = float("inf"), float("nan")
    choices = torch.tensor([-inf, -1.0, -0.0, 0.0, 0.5, 1.0, 1.0, 2.0, inf, nan])
    pick = torch.randint(0, len(choices), (96, E), generator=g)
    # a third of the rows without inf/NaN, so most rows keep finite weights
    pick[::3] = torch.randint(1, 8, (32, E), generator=g)
    for dtype in FLOATS:
        x = choices[pick].to(dtype)
        for k in sorted({1, min(E, 2), min(E, 8), min(E, 16)}):
            assert_route_equal(ops.route(x, k), ref.route(x, k))
        kc = min(E, 8)
        assert_route_equal(ops.route(x, kc, capacity_factor=1.0),
                           ref.route(x, kc, capacity_factor=1.0))


def test_bias_changes_choice_not_weight():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    out = ops.route(logits, 2, bias=bias, renormalize=False)
    assert out.ids.tolist() == [[3, 0]]
    s = torch.softmax(logits[0], 0)
    torch.testing.assert_close(out.weights[0], torch.stack([s[3], s[0]]))


def test_noncontiguous_logits_rows():
    base = torch.randn(40, 128)
    x = base[:, :64]  # row stride 128, unit expert stride
    assert_route_equal(ops.route(x, 4), ref.route(x.contiguous(), 4))


# ---- layout / permute / combine --------------------------------------------------------------


@pytest.mark.parametrize("T,E,k,R", [(1, 1, 1, 1), (37, 8, 2, 2), (500, 60, 6, 4), (129, 3, 2, 3),
                                     (2048, 256, 8, 8)])
def test_layout_matches_reference(T, E, k, R):
    g = torch.Generator().manual_seed(T)
    r = ops.route(torch.randn(T, E, generator=g), k, capacity_factor=1.0)
    for ids in (r.ids, r.ids.long()):
        out = ops.moe_layout(ids, E, ep_size=R)
        exp = ref.moe_layout(ids, E, ep_size=R)
        for a, b in zip(out, exp):
            assert torch.equal(a, b)
    C = ops.route_capacity(1.0, T, k, E)
    out = ops.moe_layout(r.ids, E, ep_size=R, capacity=C, slots=r.slots)
    exp = ref.moe_layout(r.ids, E, ep_size=R, capacity=C, slots=r.slots)
    for a, b in zip(out, exp):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("T,E,k,H", [(1, 4, 1, 8), (77, 8, 2, 64), (300, 60, 6, 96), (64, 16, 4, 1024)])
def test_permute_combine_match_reference(T, E, k, H, dtype):
    g = torch.Generator().manual_seed(H + T)
    x = torch.randn(T, H, generator=g).to(dtype)
    r = ops.route(torch.randn(T, E, generator=g), k, capacity_factor=1.1)
    for capacity in (0, ops.route_capacity(1.1, T, k, E)):
        lay = ops.moe_layout(r.ids, E, capacity=capacity, slots=r.slots)
        y = ops.moe_permute(x, lay.src, k)
        assert torch.equal(y, ref.moe_permute(x, lay.src, k))
        out = torch.full_like(y, float("nan"))  # poisoned: every element must be written
        assert torch.equal(ops.moe_permute_into(x, lay.src, k, out), y)
        y = y * 1.5 + 0.25  # "experts"
        for od in (None, torch.float32):
            out = ops.moe_combine(y, lay.dest, r.weights, out_dtype=od)
            exp = ref.moe_combine(y, lay.dest, r.weights, out_dtype=od)
            tol = dict(rtol=1e-5, atol=1e-5) if out.dtype == torch.float32 else {}
            torch.testing.assert_close(out, exp, **tol)
            # caller-owned output, poisoned: every element written, same bits as moe_combine
            buf = torch.full((T, H), float("nan"), dtype=od or dtype)
            assert ops.moe_combine_into(y, lay.dest, r.weights, buf) is buf
            assert torch.equal(buf, out)
            want = ref.moe_combine_into(y, lay.dest, r.weights, torch.empty_like(buf))
            torch.testing.assert_close(buf, want, **tol)


_SIMD_CHILD = """
import sys, torch, disagg
from disagg import ops
out = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for T, E, k, H in [(97, 8, 2, 1024), (40, 60, 6, 77), (33, 16, 4, 4096)]:
        g = torch.Generator().manual_seed(T * H)
        x = torch.randn(T, H, generator=g) * 3
        x[::5] *= 1e-38  # sums under 2^-126: float denormals (bf16 keeps them too)
        x[1] = 0.0
        x[2, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        x[3, :2] = torch.tensor([3.0e38, -3.0e38])  # weighted sums near the top of the range
        x = x.to(dtype)
        r = ops.route(torch.randn(T, E, generator=g), k, capacity_factor=1.0)
        lay = ops.moe_layout(r.ids, E)
        y = ops.moe_permute(x, lay.src, k)
        for od in (None, torch.float32):
            out.append(ops.moe_combine(y, lay.dest, r.weights, out_dtype=od))
torch.save(out, sys.argv[1])
"""


def test_combine_simd_paths_give_the_same_bits(tmp_path):
    """The AVX-512 (with and without its bf16 conversion), AVX2 and portable combine kernels
    agree bit for bit (the environment picks the path at load time, so each runs in its own
    process); large shapes cover the non-temporal stores and prefetch, odd H the masked tails;
    tiny rows give denormal sums (which the bf16 conversion instruction would flush), NaN, inf
    and huge values the special cases."""
    import os
    import subprocess
    import sys

    script = tmp_path / "combine.py"
    script.write_text(_SIMD_CHILD)
    results = []
    for i, env in enumerate([{}, {"DISAGG_NO_AVX512BF16": "1"}, {"DISAGG_NO_AVX512": "1"},
                             {"DISAGG_NO_SIMD": "1"}]):
        path = tmp_path / f"out{i}.pt"
        subprocess.run([sys.executable, str(script), str(path)], check=True, timeout=300,
                       env={**os.environ, **env})
        results.append(torch.load(path))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            view = torch.int32 if a.dtype == torch.float32 else torch.int16
            assert torch.equal(a.view(view), b.view(view))


def test_combine_large_output_streams():
    """An output of more than 4 MiB takes the non-temporal store path; a second call into the
    same (now warm) buffer gives the same result."""
    T, E, k, H = 600, 16, 2, 4096  # 600 x 4096 fp32 = 9.4 MiB
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, H, generator=g)
    r = ops.route(torch.randn(T, E, generator=g), k)
    lay = ops.moe_layout(r.ids, E)
    y = ops.moe_permute(x, lay.src, k)
    out = ops.moe_combine(y, lay.dest, r.weights)
    torch.testing.assert_close(out, ref.moe_combine(y, lay.dest, r.weights), rtol=1e-5, atol=1e-5)
    buf = torch.full_like(out, float("nan"))
    assert torch.equal(ops.moe_combine_into(y, lay.dest, r.weights, buf), out)


@pytest.mark.parametrize("dtype,H", [(torch.float32, 4096), (torch.bfloat16, 2048)])
def test_permute_large_output_streams(dtype, H):
    """A permute output of more than 4 MiB takes the non-temporal row copy (AVX-512), padded
    capacity slots (src -1) included: same rows as the reference, every element written."""
    T, E, k = 600, 16, 2
    g = torch.Generator().manual_seed(H)
    x = torch.randn(T, H, generator=g).to(dtype)
    r = ops.route(torch.randn(T, E, generator=g), k, capacity_factor=1.5)
    lay = ops.moe_layout(r.ids, E, capacity=ops.route_capacity(1.5, T, k, E), slots=r.slots)
    assert (lay.src < 0).any() and lay.src.numel() * H * x.element_size() > 4 << 20
    want = ref.moe_permute(x, lay.src, k)
    assert torch.equal(ops.moe_permute(x, lay.src, k), want)
    out = torch.full_like(want, float("nan"))
    assert torch.equal(ops.moe_permute_into(x, lay.src, k, out), want)


def test_dispatch_identity_roundtrip_scales_by_weights():
    T, E, k, H = 50, 8, 2, 32
    x = torch.randn(T, H)
    r = ops.route(torch.randn(T, E), k)
    lay = ops.moe_layout(r.ids, E)
    out = ops.moe_combine(ops.moe_permute(x, lay.src, k), lay.dest, r.weights)
    torch.testing.assert_close(out, x * r.weights.sum(1, keepdim=True))


def test_moe_layer_matches_dense_loop():
    """route -> layout -> permute -> per-expert FFN -> combine == the obvious per-token loop."""
    T, E, k, H = 40, 6, 2, 16
    g = torch.Generator().manual_seed(3)
    x, gate = torch.randn(T, H, generator=g), torch.randn(H, E, generator=g)
    w = torch.randn(E, H, H, generator=g) * 0.1
    r = ops.route(x @ gate, k)
    lay = ops.moe_layout(r.ids, E)
    y = ops.moe_permute(x, lay.src, k)
    off = lay.expert_offsets.tolist()
    for e in range(E):
        y[off[e]:off[e + 1]] = torch.tanh(y[off[e]:off[e + 1]] @ w[e])
    out = ops.moe_combine(y, lay.dest, r.weights)
    exp = torch.zeros(T, H)
    for t in range(T):
        for j in range(k):
            e = int(r.ids[t, j])
            exp[t] += r.weights[t, j] * torch.tanh(x[t] @ w[e])
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)


# ---- opcheck / compile -----------------------------------------------------------------------


def _sample_calls():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(33, 16, generator=g)
    r = ops.route(logits, 2, capacity_factor=1.0)
    lay = ops.moe_layout(r.ids, 16, ep_size=2)
    x = torch.randn(33, 24, generator=g)
    y = ops.moe_permute(x, lay.src, 2)
    return [
        (torch.ops.disagg.route.default, (logits, 2, "softmax", None, 4, 2, "sum_top2", True, 1.0,
                                          1.0, "probs", "reroute")),
        (torch.ops.disagg.route.default, (logits.bfloat16(), 3, "sigmoid", torch.randn(16), 1, 1,
                                          "max", False, 2.0, 0.0, "position", "drop")),
        (torch.ops.disagg.moe_layout.default, (r.ids, 16, 2, 0, None)),
        (torch.ops.disagg.moe_layout.default, (r.ids, 16, 1, 5, r.slots)),
        (torch.ops.disagg.moe_permute.default, (x, lay.src, 2)),
        (torch.ops.disagg.moe_permute_into.default, (x, lay.src, 2, torch.empty(66, 24))),
        (torch.ops.disagg.moe_combine.default, (y, lay.dest, r.weights, None)),
        (torch.ops.disagg.moe_combine.default, (y.half(), lay.dest, r.weights, torch.float32)),
        (torch.ops.disagg.moe_combine_into.default, (y, lay.dest, r.weights, torch.empty(33, 24))),
        (torch.ops.disagg.moe_combine_into.default,
         (y.bfloat16(), lay.dest, r.weights, torch.empty(33, 24))),
    ]


@pytest.mark.parametrize("i", range(10))
def test_opcheck(i):
    op, args = _sample_calls()[i]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    E, k = 8, 2

    def moe(x, gate):
        r = ops.route(x @ gate, k, capacity_factor=1.5)
        lay = ops.moe_layout(r.ids, E, capacity=6, slots=r.slots)
        y = ops.moe_permute(x, lay.src, k) * 2.0
        return ops.moe_combine(y, lay.dest, r.weights)

    x, gate = torch.randn(16, 32), torch.randn(32, E)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, gate), moe(x, gate))


def test_torch_compile_fullgraph_into_buffers():
    E, k = 8, 2

    def moe(x, gate, ybuf, out):
        r = ops.route(x @ gate, k)
        lay = ops.moe_layout(r.ids, E)
        ops.moe_permute_into(x, lay.src, k, ybuf)
        ops.moe_combine_into(ybuf * 2.0, lay.dest, r.weights, out)
        return out + 1.0

    x, gate = torch.randn(16, 32), torch.randn(32, E)
    bufs = lambda: (torch.empty(16 * k, 32), torch.empty(16, 32))  # noqa: E731
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, gate, *bufs()), moe(x, gate, *bufs()))


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("call,match", [
    (lambda: ops.route(torch.randn(4), 1), "logits must be 2-D"),
    (lambda: ops.route(torch.randn(4, 8).double(), 1), "logits must be float32"),
    (lambda: ops.route(torch.randn(4, 8), 9), "top_k must be in"),
    (lambda: ops.route(torch.randn(4, 8), 0), "top_k must be in"),
    (lambda: ops.route(torch.randn(4, 0), 1), "at least one expert"),
    (lambda: ops.route(torch.randn(4, 8), 2, scoring="relu"), "scoring must be one of"),
    (lambda: ops.route(torch.randn(4, 8), 2, drop_policy="random"), "drop_policy"),
    (lambda: ops.route(torch.randn(4, 8), 2, overflow="spill"), "overflow"),
    (lambda: ops.route(torch.randn(4, 8), 2, bias=torch.randn(7)), "bias must have E=8"),
    (lambda: ops.route(torch.randn(4, 8), 2, bias=torch.randn(8).half()), "bias must be"),
    (lambda: ops.route(torch.randn(4, 8), 2, num_groups=3), "num_groups"),
    (lambda: ops.route(torch.randn(4, 8), 2, num_groups=4, topk_groups=5), "topk_groups"),
    (lambda: ops.route(torch.randn(4, 8), 5, num_groups=4, topk_groups=2), "exceeds the experts"),
    (lambda: ops.route(torch.randn(4, 8), 2, capacity_factor=float("nan")), "capacity_factor"),
    (lambda: ops.route(torch.randn(8, 4)[:, ::2], 1), "unit stride"),
    (lambda: ops.moe_layout(torch.tensor([[0, 9]]), 8), "ids must be in"),
    (lambda: ops.moe_layout(torch.tensor([[0, -2]]), 8), "ids must be in"),
    (lambda: ops.moe_layout(torch.tensor([[0.0]]), 8), "ids must be int32 or int64"),
    (lambda: ops.moe_layout(torch.tensor([[0, 1]]), 8, capacity=2), "slots are required"),
    (lambda: ops.moe_layout(torch.tensor([[0, 1]]), 8, capacity=2, slots=torch.tensor([[0, 2]])),
     "slots in"),
    (lambda: ops.moe_layout(torch.tensor([[0], [0]]), 8, capacity=2, slots=torch.tensor([[1], [1]])),
     "no slot used twice"),
    (lambda: ops.moe_layout(torch.tensor([[0, 1]]), 8, ep_size=9), "ep_size"),
    (lambda: ops.moe_permute(torch.randn(4, 8), torch.tensor([0, 8], dtype=torch.int32), 2),
     "src entries"),
    (lambda: ops.moe_permute(torch.randn(4, 8), torch.tensor([0, 1]), 2), "src must be Int"),
    (lambda: ops.moe_permute_into(torch.randn(4, 8), torch.tensor([0, 1], dtype=torch.int32), 2,
                                  torch.empty(3, 8)), "out must be"),
    (lambda: ops.moe_permute_into(torch.randn(4, 8), torch.tensor([0, 1], dtype=torch.int32), 2,
                                  torch.empty(2, 8).half()), "out must have"),
    (lambda: ops.moe_combine(torch.randn(4, 8), torch.tensor([0, 4], dtype=torch.int32),
                             torch.ones(1, 2)), "dest entries"),
    (lambda: ops.moe_combine(torch.randn(4, 8), torch.tensor([0], dtype=torch.int32),
                             torch.ones(1, 2)), "dest must have"),
    (lambda: ops.moe_combine(torch.randn(4, 8), torch.tensor([0, 1], dtype=torch.int32),
                             torch.ones(1, 2).half()), "weights must be"),
    (lambda: ops.moe_combine_into(torch.randn(4, 8), torch.tensor([0, 1], dtype=torch.int32),
                                  torch.ones(1, 2), torch.empty(2, 8)), "out must be \\[T=1"),
    (lambda: ops.moe_combine_into(torch.randn(4, 8).half(), torch.tensor([0, 1], dtype=torch.int32),
                                  torch.ones(1, 2), torch.empty(1, 8).bfloat16()),
     "out must be float32 or y's dtype"),
    (lambda: ops.moe_combine_into(torch.randn(4, 8), torch.tensor([0, 1], dtype=torch.int32),
                                  torch.ones(2, 1), torch.empty(8, 2).t()), "out must be contiguous"),
    (lambda: ops.moe_combine_into(torch.randn(4, 8), torch.tensor([0, 9], dtype=torch.int32),
                                  torch.ones(1, 2), torch.empty(1, 8)), "dest entries"),
    (lambda: ops.moe_combine_into(torch.randn(4, 8), torch.tensor([0], dtype=torch.int32),
                                  torch.ones(1, 2), torch.empty(1, 8)), "dest must have"),
    (lambda: (lambda y: ops.moe_combine_into(y, torch.tensor([0, 1], dtype=torch.int32),
                                             torch.ones(1, 2), y[:1]))(torch.randn(4, 8)),
     "out must not overlap y"),
])
def test_bad_input_names_argument(call, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        call()
