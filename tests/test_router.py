"""MoERouter: the chapter's API with capacity and measured load metrics."""
import math

import pytest
import torch

from disagg import MoERouter, ops


def test_route_tokens_enforces_capacity_and_covers_tokens():
    router = MoERouter(num_experts=8, top_k=2, capacity_factor=1.2)
    assignments = router.route_tokens(list(range(100)))
    C = ops.route_capacity(1.2, 100, 2, 8)
    assert router.last_capacity == C == 30
    assert set(assignments) == set(range(8))
    assert all(len(v) <= C for v in assignments.values())
    m = router.get_load_balance_metrics()
    kept = sum(len(v) for v in assignments.values())
    assert kept + m["dropped"] == 200
    assert m["expert_loads"] == [len(assignments[e]) for e in range(8)]
    assert m["max_load"] == max(m["expert_loads"]) and m["min_load"] == min(m["expert_loads"])
    assert m["imbalance"] == pytest.approx(m["max_load"] / m["mean_load"])
    # a token never goes twice to the same expert
    for v in assignments.values():
        assert len(v) == len(set(v))


def test_metrics_match_definitions():
    torch.manual_seed(0)
    logits = torch.randn(256, 4) + torch.tensor([1.5, 0.0, 0.0, -1.0])
    router = MoERouter(num_experts=4, top_k=1, capacity_factor=1.0, overflow="reroute")
    router.route_tokens(logits=logits)
    m = router.get_load_balance_metrics()
    p = torch.softmax(logits, -1)
    choice = p.argmax(-1)
    f = torch.bincount(choice, minlength=4).double() / 256
    assert m["expert_demand"] == torch.bincount(choice, minlength=4).tolist()
    assert m["aux_loss"] == pytest.approx(float(4 * (f * p.double().mean(0)).sum()), rel=1e-6)
    assert m["z_loss"] == pytest.approx(float((torch.logsumexp(logits, -1) ** 2).mean()), rel=1e-5)
    assert m["rerouted"] > 0 and m["dropped"] == 0  # capacity 64 x 4 = 256 = every token
    assert m["max_load"] == 64


def test_hidden_states_and_token_ids_paths_agree():
    router = MoERouter(num_experts=6, top_k=2, capacity_factor=0, hidden_size=16, vocab_size=50)
    h = torch.randn(10, 16)
    a = router.route_tokens(h)
    b = router.route_tokens(hidden_states=h)
    assert a == b
    out = router.route(logits=h @ router.gate)
    assert sorted(t for v in a.values() for t in v) == sorted(list(range(10)) * 2)
    assert out.counts.tolist() == [len(a[e]) for e in range(6)]


def test_bias_update_balances_load():
    torch.manual_seed(1)
    skew = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
    balanced = MoERouter(num_experts=8, top_k=2, capacity_factor=0, bias_update_rate=0.04)
    plain = MoERouter(num_experts=8, top_k=2, capacity_factor=0)
    for _ in range(25):
        x = torch.randn(128, 8) * 0.5 + skew
        balanced.route_tokens(logits=x)
        plain.route_tokens(logits=x)
    balanced.reset_metrics(), plain.reset_metrics()
    x = torch.randn(1024, 8) * 0.5 + skew
    balanced.route_tokens(logits=x), plain.route_tokens(logits=x)
    assert balanced.get_load_balance_metrics()["imbalance"] < plain.get_load_balance_metrics()["imbalance"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=0), "num_experts"),
    (dict(num_experts=4, top_k=5), "top_k"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoERouter(**kwargs)


def test_bad_route_input():
    router = MoERouter(num_experts=4, top_k=1, vocab_size=10)
    with pytest.raises(ValueError, match="vocab_size"):
        router.route_tokens([3, 11])
    with pytest.raises(ValueError, match="exactly one"):
        router.route_tokens([1], logits=torch.randn(1, 4))
    with pytest.raises(ValueError, match="logits must be"):
        router.route_tokens(logits=torch.randn(3, 5))
    assert router.get_load_balance_metrics()["tokens"] == 0  # failed calls change nothing
