"""disagg demonstration: run ``python disaggregated_inference.py`` from the repository root.

Prints measured figures for what the library does today:
  1. MoE routing and load balance: capacity factors, drop/reroute policies, and aux-loss-free
     bias balancing on skewed router logits, all routed by ``torch.ops.disagg.route``.
  2. Expert-parallel dispatch/combine (``EPDispatcher``) checked against the dense MoE layer.
"""
from __future__ import annotations

import argparse
import time

import torch

import disagg
from disagg import EPDispatcher, MoERouter, ops


def _skewed_logits(T: int, E: int, seed: int, skew: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    popularity = torch.linspace(skew, -skew, E)  # a few hot experts, as real routers show
    return torch.randn(T, E, generator=g) + popularity


def demo_routing(T: int, E: int, k: int) -> None:
    print(f"\n== MoE routing and load balance: {T} tokens, {E} experts, top-{k} (skewed logits) ==")
    logits = _skewed_logits(T, E, seed=0)
    header = f"{'capacity':>8} {'policy':>9} {'overflow':>8} | {'C':>5} {'min':>5} {'max':>5} " \
             f"{'std':>7} {'imbal.':>6} {'dropped':>8} {'rerouted':>8} {'aux':>6} {'time':>8}"
    print(header)
    print("-" * len(header))
    for cf, policy, overflow in [(0.0, "position", "drop"), (1.0, "position", "drop"),
                                 (1.0, "probs", "drop"), (1.0, "position", "reroute"),
                                 (1.25, "probs", "reroute")]:
        router = MoERouter(num_experts=E, top_k=k, capacity_factor=cf, drop_policy=policy,
                           overflow=overflow)
        router.route(logits=logits)
        m = router.get_load_balance_metrics()
        t0 = time.perf_counter()  # the fused op alone (the metrics above add their own work)
        ops.route(logits, k, capacity_factor=cf, drop_policy=policy, overflow=overflow)
        dt = time.perf_counter() - t0
        print(f"{cf:>8.2f} {policy:>9} {overflow:>8} | {m['capacity'] or '-':>5} {m['min_load']:>5} "
              f"{m['max_load']:>5} {m['std_load']:>7.1f} {m['imbalance']:>6.2f} {m['dropped']:>8} "
              f"{m['rerouted']:>8} {m['aux_loss']:>6.3f} {dt * 1e3:>6.1f}ms")

    print("\nAux-loss-free balancing (sigmoid scores, selection bias updated after each of 100 "
          "batches, DeepSeek-V3 style):")
    plain = MoERouter(num_experts=E, top_k=k, capacity_factor=0, scoring="sigmoid")
    balanced = MoERouter(num_experts=E, top_k=k, capacity_factor=0, scoring="sigmoid",
                         bias_update_rate=0.003)
    for step in range(100):
        batch = _skewed_logits(256, E, seed=100 + step)
        plain.route(logits=batch)
        balanced.route(logits=batch)
    plain.reset_metrics(), balanced.reset_metrics()
    test = _skewed_logits(T, E, seed=999)
    plain.route(logits=test), balanced.route(logits=test)
    for name, r in (("no bias", plain), ("with bias", balanced)):
        m = r.get_load_balance_metrics()
        print(f"  {name:>10}: max/mean load {m['imbalance']:.2f}, std {m['std_load']:.1f}")


def demo_expert_parallel(T: int, E: int, k: int, H: int) -> None:
    print(f"\n== Expert-parallel dispatch/combine (one rank, local transport): T={T} H={H} ==")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g)
    experts = [torch.randn(H, H, generator=g) / H ** 0.5 for _ in range(E)]
    r = ops.route(_skewed_logits(T, E, seed=2), k)
    disp = EPDispatcher(E, transport="local")
    t0 = time.perf_counter()
    recv, per_expert, handle = disp.dispatch(x, r.ids, r.weights)
    outs = [seg @ experts[e] for e, seg in enumerate(torch.split(recv, per_expert.tolist()))]
    y = disp.combine(torch.cat(outs), handle)
    dt = time.perf_counter() - t0
    dense = sum(r.weights[:, j:j + 1] * torch.stack([x[t] @ experts[int(r.ids[t, j])]
                                                     for t in range(T)]) for j in range(k))
    err = (y - dense).abs().max().item()
    print(f"  tokens per expert: {per_expert.tolist()}")
    print(f"  dispatch+experts+combine {dt * 1e3:.1f} ms, max |error| vs dense loop {err:.2e}")
    print("  (multi-rank EP over torch.distributed: see tests/test_ep_dispatch.py)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    args = p.parse_args(argv)
    print(f"disagg {disagg.__version__} on torch {torch.__version__}, {torch.get_num_threads()} threads")
    demo_routing(args.tokens, args.experts, args.top_k)
    demo_expert_parallel(256, 8, 2, 128)


if __name__ == "__main__":
    main()
