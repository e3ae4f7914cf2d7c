"""CUDA routing ops against the CPU ops and the references: same cases as the CPU tests, on a GPU.

ids, slots, counts, layouts and permutes must equal the CPU op exactly; weights and combines
agree to float rounding (the softmax sum runs in a different order on the GPU).
"""
import pytest
import torch

import disagg  # noqa: F401
from disagg import ops
from disagg import reference as ref
from routing_cases import FLOATS, assert_route_equal, route_cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"


def poison_cache(nbytes=64 << 20):
    """Fill memory the caching allocator will hand out next with 0xff bytes (NaN in every float
    type, -1 as int32), so that outputs the op allocates start poisoned."""
    torch.full((nbytes // 4,), -1, dtype=torch.int32, device=DEV)


def route_both(logits, k, **kw):
    """The CUDA op, the CPU op and the reference on the same logits."""
    cpu_kw = {key: (v.cpu() if torch.is_tensor(v) else v) for key, v in kw.items()}
    cuda_kw = {key: (v.to(DEV) if torch.is_tensor(v) else v) for key, v in kw.items()}
    x = logits.cpu()
    return ops.route(x.to(DEV), k, **cuda_kw), ops.route(x, k, **cpu_kw), x, cpu_kw


@pytest.mark.parametrize("T,E,k,dtype", route_cases())
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_dropless_matches_cpu(T, E, k, dtype, scoring):
    g = torch.Generator().manual_seed(T * 1000 + E * 10 + k)
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype)
    out, cpu, x, kw = route_both(logits, k, scoring=scoring)
    assert_route_equal(out, cpu)
    if T * E <= 128 * 1024:
        assert_route_equal(out, ref.route(x, k, **kw))


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("overflow", ["drop", "reroute"])
@pytest.mark.parametrize("T,E,k,cf", [(64, 8, 2, 1.0), (257, 60, 6, 1.25), (1024, 64, 8, 0.5),
                                      (33, 3, 2, 0.7), (300, 256, 8, 2.0), (4096, 256, 8, 1.0),
                                      (2000, 1024, 8, 1.2), (600, 128, 40, 0.9),
                                      (16384, 256, 8, 1.0)])
def test_route_capacity_matches_cpu(T, E, k, cf, policy, overflow):
    g = torch.Generator().manual_seed(T + E + k)
    logits = torch.randn(T, E, generator=g) + torch.linspace(2, 0, E)
    out, cpu, x, kw = route_both(logits, k, capacity_factor=cf, drop_policy=policy,
                                 overflow=overflow)
    assert_route_equal(out, cpu)
    if T * k <= 8192:
        assert_route_equal(out, ref.route(x, k, **kw))
    C = ops.route_capacity(cf, T, k, E)
    ids, counts = out.ids.cpu(), out.counts.cpu()
    assert int(counts.max()) <= C
    kept = ids >= 0
    assert torch.equal(torch.bincount(ids[kept].long(), minlength=E).int(), counts)


@pytest.mark.parametrize("options", [
    dict(num_groups=8, topk_groups=3, group_score="max"),
    dict(num_groups=8, topk_groups=4, group_score="sum_top2", scoring="sigmoid"),
    dict(renormalize=False, routed_scaling_factor=2.5),
    dict(routed_scaling_factor=-1.5, capacity_factor=1.0, drop_policy="probs"),
    dict(num_groups=4, topk_groups=2, capacity_factor=1.0, overflow="reroute"),
    dict(num_groups=8, topk_groups=2, capacity_factor=0.8, drop_policy="probs", overflow="reroute",
         scoring="sigmoid"),
])
def test_route_options_match_cpu(options):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(500, 64, generator=g)
    bias = torch.randn(64, generator=g) * 0.1
    for b in (None, bias):
        kw = dict(options, bias=b) if b is not None else dict(options)
        out, cpu, x, ckw = route_both(logits, 6, **kw)
        assert_route_equal(out, cpu)
        assert_route_equal(out, ref.route(x, 6, **ckw))


def test_exactroute_cases():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 4, device=DEV)
    out = ops.route(logits, 1, capacity_factor=1.0, overflow="drop")
    assert out.ids.view(-1).tolist() == [0, -1, -1, -1]
    out = ops.route(logits, 1, capacity_factor=1.0, overflow="reroute")
    assert out.ids.view(-1).tolist() == [0, 1, 2, 3]
    assert out.slots.view(-1).tolist() == [0, 0, 0, 0]
    logits = torch.tensor([[1.0, 0.0, -5.0], [5.0, 0.0, 3.0], [0.0, 9.0, 0.0]], device=DEV)
    out = ops.route(logits, 1, capacity_factor=1.0, drop_policy="probs", overflow="reroute",
                    renormalize=False)
    assert out.ids.view(-1).tolist() == [2, 0, 1]
    z = torch.zeros(5, 16, dtype=torch.bfloat16, device=DEV)
    assert ops.route(z, 4).ids.tolist() == [[0, 1, 2, 3]] * 5


def test_nan_and_inf_rows():
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[nan, 1.0, 2.0, 0.0], [-inf, -inf, -inf, -inf], [1.0, inf, 0.0, inf],
                           [nan, nan, nan, nan]])
    for dtype in FLOATS:
        for scoring in ("softmax", "sigmoid"):
            out, cpu, _, _ = route_both(logits.to(dtype), 2, scoring=scoring)
            assert_route_equal(out, cpu)


def test_noncontiguous_rows_and_empty():
    base = torch.randn(40, 128, device=DEV)
    x = base[:, :64]
    assert_route_equal(ops.route(x, 4), ops.route(x.cpu(), 4))
    empty = ops.route(torch.empty(0, 8, device=DEV), 2, capacity_factor=1.0)
    assert empty.ids.shape == (0, 2) and empty.counts.cpu().tolist() == [0] * 8


def test_route_in_cuda_graph():
    """route (with capacity and reroute) captures in a graph and replays on new inputs."""
    T, E, k = 1024, 64, 4
    static = torch.randn(T, E, device=DEV)
    kw = dict(capacity_factor=1.0, drop_policy="probs", overflow="reroute")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            ops.route(static, k, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = ops.route(static, k, **kw)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        fresh = torch.randn(T, E, generator=g) + torch.linspace(1, 0, E)
        static.copy_(fresh.to(DEV))
        graph.replay()
        torch.cuda.synchronize()
        assert_route_equal(outs, ops.route(fresh, k, **kw))


# ---- layout / permute / combine --------------------------------------------------------------


@pytest.mark.parametrize("T,E,k,R", [(1, 1, 1, 1), (37, 8, 2, 2), (500, 60, 6, 4), (129, 3, 2, 3),
                                     (2048, 256, 8, 8), (3000, 1024, 8, 16)])
def test_layout_matches_cpu(T, E, k, R):
    g = torch.Generator().manual_seed(T)
    r = ops.route(torch.randn(T, E, generator=g), k, capacity_factor=1.0)
    for ids in (r.ids, r.ids.long()):
        out = ops.moe_layout(ids.to(DEV), E, ep_size=R)
        exp = ops.moe_layout(ids, E, ep_size=R)
        for a, b in zip(out, exp):
            assert torch.equal(a.cpu(), b)
    C = ops.route_capacity(1.0, T, k, E)
    out = ops.moe_layout(r.ids.to(DEV), E, ep_size=R, capacity=C, slots=r.slots.to(DEV))
    exp = ref.moe_layout(r.ids, E, ep_size=R, capacity=C, slots=r.slots)
    for a, b in zip(out, exp):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("T,E,k,H", [(1, 4, 1, 8), (77, 8, 2, 64), (300, 60, 6, 96),
                                     (64, 16, 4, 1024), (33, 8, 2, 7), (512, 64, 8, 4096)])
def test_permute_combine_match_cpu(T, E, k, H, dtype):
    g = torch.Generator().manual_seed(H + T)
    x = torch.randn(T, H, generator=g).to(dtype)
    r = ops.route(torch.randn(T, E, generator=g), k, capacity_factor=1.1)
    for capacity in (0, ops.route_capacity(1.1, T, k, E)):
        lay = ops.moe_layout(r.ids, E, capacity=capacity, slots=r.slots)
        poison_cache()  # an element the kernel leaves unwritten shows up as NaN
        y_dev = ops.moe_permute(x.to(DEV), lay.src.to(DEV), k)
        y = ops.moe_permute(x, lay.src, k)
        assert torch.equal(y_dev.cpu(), y)
        into = torch.full_like(y_dev, float("nan"))
        ops.moe_permute_into(x.to(DEV), lay.src.to(DEV), k, into)
        assert torch.equal(into.cpu(), y)
        y = y * 1.5 + 0.25
        for od in (None, torch.float32):
            poison_cache()
            out = ops.moe_combine(y.to(DEV), lay.dest.to(DEV), r.weights.to(DEV), out_dtype=od)
            cpu = ops.moe_combine(y, lay.dest, r.weights, out_dtype=od)
            # same products and sums in the same order: equal, not merely close
            assert torch.equal(out.cpu(), cpu)
            torch.testing.assert_close(out.cpu(), ref.moe_combine(y, lay.dest, r.weights, od),
                                       **(dict(rtol=1e-5, atol=1e-5) if out.dtype == torch.float32
                                          else {}))
            buf = torch.full(out.shape, float("nan"), dtype=out.dtype, device=DEV)
            ops.moe_combine_into(y.to(DEV), lay.dest.to(DEV), r.weights.to(DEV), buf)
            assert torch.equal(buf.cpu(), cpu)


def test_permute_unaligned_rows():
    """A row stride that breaks 16-byte alignment takes the scalar path and stays correct."""
    base = torch.randn(50, 67, device=DEV, dtype=torch.bfloat16)
    x = base[:, 1:65]  # H=64 but rows start at odd element offsets
    src = torch.randint(-1, 50, (80,), dtype=torch.int32, device=DEV)
    assert torch.equal(ops.moe_permute(x, src, 1).cpu(), ref.moe_permute(x.cpu(), src.cpu(), 1))


def test_out_of_range_indices_are_dropped_not_read():
    """On CUDA, range errors in indices cannot raise without a host sync: they act as -1."""
    x = torch.randn(4, 8, device=DEV)
    src = torch.tensor([0, 8, -5, 3], dtype=torch.int32, device=DEV)
    y = ops.moe_permute(x, src, 2).cpu()
    assert torch.equal(y[1], torch.zeros(8)) and torch.equal(y[2], torch.zeros(8))
    dest = torch.tensor([0, 99], dtype=torch.int32, device=DEV)
    out = ops.moe_combine(x, dest, torch.ones(1, 2, device=DEV)).cpu()
    assert torch.equal(out[0], x[0].cpu())
    lay = ops.moe_layout(torch.tensor([[0, 9], [-3, 1]], device=DEV), 8)
    assert lay.dest.cpu().tolist() == [0, -1, -1, 1]


# ---- opcheck ---------------------------------------------------------------------------------


def _sample_calls():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(33, 16, generator=g).to(DEV)
    r = ops.route(logits, 2, capacity_factor=1.0)
    lay = ops.moe_layout(r.ids, 16, ep_size=2)
    x = torch.randn(33, 24, generator=g).to(DEV)
    y = ops.moe_permute(x, lay.src, 2)
    return [
        (torch.ops.disagg.route.default, (logits, 2, "softmax", None, 4, 2, "sum_top2", True, 1.0,
                                          1.0, "probs", "reroute")),
        (torch.ops.disagg.route.default, (logits.bfloat16(), 3, "sigmoid",
                                          torch.randn(16, device=DEV), 1, 1, "max", False, 2.0,
                                          1.0, "position", "reroute")),
        (torch.ops.disagg.moe_layout.default, (r.ids, 16, 2, 0, None)),
        (torch.ops.disagg.moe_layout.default, (r.ids, 16, 1, 5, r.slots)),
        (torch.ops.disagg.moe_permute.default, (x, lay.src, 2)),
        (torch.ops.disagg.moe_combine.default, (y, lay.dest, r.weights, None)),
        (torch.ops.disagg.moe_combine.default, (y.half(), lay.dest, r.weights, torch.float32)),
        (torch.ops.disagg.moe_combine_into.default,
         (y, lay.dest, r.weights, torch.empty(33, 24, device=DEV))),
    ]


@pytest.mark.parametrize("i", range(8))
def test_opcheck_cuda(i):
    op, args = _sample_calls()[i]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("call,match", [
    (lambda: ops.route(torch.randn(4, device=DEV), 1), "logits must be 2-D"),
    (lambda: ops.route(torch.randn(4, 8, device=DEV), 9), "top_k must be in"),
    (lambda: ops.route(torch.randn(4, 8, device=DEV), 2, bias=torch.randn(8)), "bias must be on"),
    (lambda: ops.moe_permute(torch.randn(4, 8, device=DEV), torch.tensor([0, 1], device=DEV), 2),
     "src must be Int"),
    (lambda: ops.moe_combine(torch.randn(4, 8, device=DEV),
                             torch.tensor([0], dtype=torch.int32, device=DEV),
                             torch.ones(1, 2, device=DEV)), "dest must have"),
    (lambda: ops.moe_combine_into(torch.randn(4, 8, device=DEV),
                                  torch.tensor([0, 1], dtype=torch.int32, device=DEV),
                                  torch.ones(1, 2, device=DEV), torch.empty(1, 8)), "out must be on"),
    (lambda: ops.moe_combine_into(torch.randn(4, 8, device=DEV),
                                  torch.tensor([0, 1], dtype=torch.int32, device=DEV),
                                  torch.ones(1, 2, device=DEV), torch.empty(2, 8, device=DEV)),
     "out must be \\[T=1"),
])
def test_bad_input_names_argument_cuda(call, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        call()
