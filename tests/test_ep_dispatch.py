"""EPDispatcher over torch.distributed (gloo) matches the single-process MoE layer."""
import pytest
import torch

from dist_utils import run_ranks


def _moe_inputs(T, E, k, H, seed):
    """Tokens from ``seed``; expert weights shared by every rank."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    g = torch.Generator().manual_seed(12345)
    w1 = torch.randn(E, H, 2 * H, generator=g) * 0.2
    w2 = torch.randn(E, 2 * H, H, generator=g) * 0.2
    return x, logits, w1, w2


def _ffn(x, w1, w2):
    return torch.relu(x @ w1) @ w2


def _single_process(x, logits, w1, w2, k, cf):
    from disagg import ops

    E = logits.shape[1]
    r = ops.route(logits, k, capacity_factor=cf)
    lay = ops.moe_layout(r.ids, E)
    y = ops.moe_permute(x, lay.src, k)
    off = lay.expert_offsets.tolist()
    for e in range(E):
        y[off[e]:off[e + 1]] = _ffn(y[off[e]:off[e + 1]], w1[e], w2[e])
    return ops.moe_combine(y, lay.dest, r.weights)


def _worker(rank, world, cases):
    for T, E, k, H, cf in cases:
        _check_case(rank, world, T, E, k, H, cf)


def _check_case(rank, world, T, E, k, H, cf):
    from disagg import EPDispatcher, ops

    # each rank has its own tokens; everyone can compute everyone's reference
    x, logits, w1, w2 = _moe_inputs(T, E, k, H, seed=100 + rank)
    disp = EPDispatcher(E)
    assert disp.world_size == world
    r = ops.route(logits, k, capacity_factor=cf)
    recv, per_expert, handle = disp.dispatch(x, r.ids, r.weights)
    assert recv.shape[0] == int(per_expert.sum())
    # experts live where EP puts them: apply this rank's experts to its rows
    y = torch.empty_like(recv)
    start = 0
    for i, e in enumerate(disp.local_experts):
        n = int(per_expert[i])
        y[start:start + n] = _ffn(recv[start:start + n], w1[e], w2[e])
        start += n
    out = disp.combine(y, handle)
    torch.testing.assert_close(out, _single_process(x, logits, w1, w2, k, cf), rtol=1e-5, atol=1e-5)
    # identity experts: the input comes back scaled by the (kept) weights
    recv, per_expert, handle = disp.dispatch(x, r.ids, r.weights)
    out = disp.combine(recv, handle)
    torch.testing.assert_close(out, x * r.weights.sum(1, keepdim=True), rtol=1e-5, atol=1e-5)
    assert disp.transport.bytes_sent > 0


@pytest.mark.parametrize("world,cases", [
    (2, [(37, 8, 2, 16, 0.0)]),
    (4, [(37, 8, 2, 16, 1.0), (29, 10, 3, 16, 0.0)]),  # 10 experts: uneven split over 4 ranks
])
def test_ep_dispatch_matches_single_process(world, cases):
    run_ranks(world, _worker, cases)


def test_ep_dispatch_local_single_process():
    from disagg import EPDispatcher, ops

    x, logits, w1, w2 = _moe_inputs(40, 6, 2, 8, seed=1)
    disp = EPDispatcher(6, transport="local")
    r = ops.route(logits, 2)
    recv, per_expert, handle = disp.dispatch(x, r.ids, r.weights)
    y = torch.cat([_ffn(seg, w1[e], w2[e])
                   for e, seg in enumerate(torch.split(recv, per_expert.tolist()))])
    torch.testing.assert_close(disp.combine(y, handle), _single_process(x, logits, w1, w2, 2, 0.0))


def test_ep_dispatch_bad_input():
    from disagg import EPDispatcher

    disp = EPDispatcher(4, transport="local")
    with pytest.raises(ValueError, match="x must be"):
        disp.dispatch(torch.randn(3, 4), torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1))
    with pytest.raises(ValueError, match="weights must have"):
        disp.dispatch(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 2))
    with pytest.raises(ValueError, match="transport must be"):
        EPDispatcher(4, transport="carrier-pigeon")
