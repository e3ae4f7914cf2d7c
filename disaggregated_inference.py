"""disagg demonstration: run ``python disaggregated_inference.py`` from the repository root.

Prints measured figures for what the library does today:
  0. Disaggregated vs colocated serving: real server processes (rank 0 HTTP + router, a prefill
     and a decode worker, vs two colocated replicas: equal process count), driven by the serving
     benchmark on a prefill-heavy mixed workload; TTFT/TPOT/goodput table. Then the chapter's
     API: ``DisaggregatedInferenceSystem(InferenceConfig(...)).process_request(prompt)``.
  1. MoE routing and load balance: capacity factors, drop/reroute policies, and aux-loss-free
     bias balancing on skewed router logits, all routed by ``torch.ops.disagg.route``.
  2. Expert-parallel dispatch/combine (``EPDispatcher``) checked against the dense MoE layer.
  3. Speculative decoding on the packaged model: plain vs n-gram vs draft-model drafting.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from types import SimpleNamespace

import torch

import disagg
from disagg import (DisaggregatedInferenceSystem, EPDispatcher, InferenceConfig, MoERouter,
                    ops)

__all__ = ["InferenceConfig", "DisaggregatedInferenceSystem", "MoERouter", "main"]


def _serving_model(tmp: str) -> str:
    """The packaged default model, or (in an install without it) a small random Mixtral."""
    from disagg.model import resolve_model_path

    try:
        return resolve_model_path("default")
    except FileNotFoundError:
        from disagg.model.tiny import make_checkpoint

        path = os.path.join(tmp, "mixtral")
        print("  (no packaged default model in this install: serving a random Mixtral, "
              "hidden 256, 4 layers, 8 experts top-2)")
        make_checkpoint("mixtral", path, seed=0, hidden_size=256, num_hidden_layers=4,
                        max_position_embeddings=2048)
        return path


def _bench_args(url: str, rates, n: int, slo_ttft_ms: float, slo_tpot_ms: float):
    import json
    import urllib.request

    with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
        max_len = json.load(r)["data"][0]["max_model_len"]
    # long prompts as long as the context allows (the default model has 512 positions)
    long_len = min(1024, max_len - 40)
    return SimpleNamespace(url=url, model=None, api_key=None, endpoint="completions",
                           dataset="random", random_input_len=48, random_output_len=24,
                           random_range_ratio=0.25, prefill_heavy_fraction=0.35,
                           long_input_len=long_len, num_prompts=n, request_rate=rates[0],
                           burstiness=1.0, sweep=",".join(map(str, rates)),
                           slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, attainment=0.9,
                           seed=0, timeout=300.0, output=None, plot=None)


def demo_serving(rates, n: int, slo_ttft_ms: float, slo_tpot_ms: float, plot: str = None) -> None:
    from disagg.bench import serve as sb

    print("\n== Disaggregated vs colocated serving (3 processes each: HTTP/router + 2 workers) ==")
    print(f"  workload: {n} requests per rate, 35% with long prompts (up to 1024 tokens, capped by the context), the rest ~48; "
          f"18-30 output tokens; workers pinned one per core; SLOs TTFT <= {slo_ttft_ms:g} ms, "
          f"TPOT <= {slo_tpot_ms:g} ms")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = _serving_model(tmp)
        for mode in ("disaggregated", "colocated"):
            cfg = InferenceConfig(num_gpus=2, model=model, mode=mode,
                                  extra_args=["--max-num-batched-tokens", "256", "--pin-cpus"])
            t0 = time.perf_counter()
            with DisaggregatedInferenceSystem(cfg) as system:
                system.setup_prefill_workers()
                system.setup_decode_workers()
                print(f"  [{mode}] server up in {time.perf_counter() - t0:.1f} s; sweeping "
                      f"{rates} req/s", flush=True)
                results[mode] = sb.run_bench(_bench_args(system.url, rates, n, slo_ttft_ms,
                                                         slo_tpot_ms))
                if mode == "disaggregated":
                    r = system.process_request("The quick brown fox jumps over the lazy dog. "
                                               * 4, max_tokens=16)
                    print(f"  chapter API: process_request -> {len(r['token_ids'])} tokens, "
                          f"TTFT {r['ttft_s'] * 1e3:.0f} ms, total {r['e2e_s'] * 1e3:.0f} ms "
                          f"({r['prefill_workers']} prefill + {r['decode_workers']} decode "
                          f"worker)")
    hdr = (f"{'mode':>14} {'rate':>5} | {'TTFT p50':>9} {'TTFT p90':>9} {'TPOT p50':>9} "
           f"{'TPOT p90':>9} | {'SLO ok':>6} {'goodput':>8}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for mode, res in results.items():
        for run in res["runs"]:
            print(f"{mode:>14} {run['request_rate']:>5g} | {run['ttft_ms']['p50']:>7.0f}ms "
                  f"{run['ttft_ms']['p90']:>7.0f}ms {run['tpot_ms']['p50']:>7.1f}ms "
                  f"{run['tpot_ms']['p90']:>7.1f}ms | {run['slo_attainment']:>6.0%} "
                  f"{run['goodput_rps']:>6.2f}/s")
    d, c = results["disaggregated"]["goodput_rate"], results["colocated"]["goodput_rate"]
    print(f"  goodput rate (highest swept rate with >= 90% of requests within both SLOs): "
          f"disaggregated {d:g} req/s, colocated {c:g} req/s"
          + (f" ({d / c:.1f}x)" if c else ""))
    if plot:
        sb.plot(list(results.items()), plot)
        print(f"  plot: {plot}")


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


def demo_speculative(tokens: int) -> None:
    """Plain decoding vs n-gram and draft-model speculation on the packaged model (greedy)."""
    from disagg import LLM, SamplingParams, SpeculativeDecoder

    prompt = ("import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n"
              "    parser.add_argument('--verbose')\n    args = parser.parse_args(argv)\n")
    print(f"\n== Speculative decoding: {tokens} greedy tokens, batch 1, packaged model ==")
    llm = LLM("default")
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate([prompt], params)  # warm-up
    t0 = time.perf_counter()
    plain = llm.generate([prompt], params)[0].outputs[0].token_ids
    t_plain = time.perf_counter() - t0
    print(f"  {'method':<22} {'tok/s':>8} {'speedup':>8} {'accept len':>11} {'same tokens':>12}")
    print(f"  {'plain':<22} {len(plain) / t_plain:>8.1f} {1.0:>7.2f}x {'-':>11} {'-':>12}")
    for method, tree in (("ngram", "chain:4"), ("draft", "static:2,2")):
        dec = SpeculativeDecoder(method=method, tree=tree)
        dec.speculative_decode(prompt, target_tokens=8, ignore_eos=True)  # warm-up
        t0 = time.perf_counter()
        out = dec.speculative_decode(prompt, target_tokens=tokens, ignore_eos=True)
        dt = time.perf_counter() - t0
        m = dec.metrics()
        print(f"  {method + ' ' + tree:<22} {len(out) / dt:>8.1f} {t_plain / dt * len(out) / len(plain):>7.2f}x "
              f"{m.get('acceptance_length', float('nan')):>11.2f} {str(out == plain):>12}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--rates", default="16,32,64,96",
                   help="request rates swept by the serving demo")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per rate")
    p.add_argument("--slo-ttft-ms", type=float, default=200.0)
    p.add_argument("--slo-tpot-ms", type=float, default=2.0)
    p.add_argument("--plot", default=None, help="write the SLO attainment plot here (PNG)")
    p.add_argument("--skip-serving", action="store_true")
    args = p.parse_args(argv)
    print(f"disagg {disagg.__version__} on torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_serving:
        demo_serving([float(x) for x in args.rates.split(",")], args.num_prompts,
                     args.slo_ttft_ms, args.slo_tpot_ms, args.plot)
    demo_routing(args.tokens, args.experts, args.top_k)
    demo_expert_parallel(256, 8, 2, 128)
    demo_speculative(48)
    print("\nParallel layouts (TP/PP/EP/DP/CP over torchrun, token-identical to one process): "
          "python bench/bench_parallel.py (see docs/parallel.md)")


if __name__ == "__main__":
    main()
