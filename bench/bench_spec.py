"""Speculative decoding benchmark: decode speedup over plain decoding, per drafter and tree.

    python bench/bench_spec.py [--model default --draft default-draft] [--batch 1 8]
        [--tokens 96] [--trees chain:4 static:2,2,1,1 dynamic:12,5,3] [--json]

For each batch size, the same greedy requests run with speculation off, with n-gram lookup and
with the draft model (each tree shape); every speculative run is checked token-identical to
the plain one before its time counts. Decode time is the time of a whole run minus the time of
the same run stopped after its first token (prefill), median of ``--repeat`` runs; the speedup
is plain decode time over speculative decode time, measured in the same process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from disagg.bench.common import cpu_name

PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "def factorial(n):\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Speculative decoding drafts several tokens with a small model and verifies them with the "
    "large model in one forward pass. Speculative decoding",
    "for i in range(10):\n    print(i)\nfor j in range(10):\n",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "import torch\nimport torch.nn as nn\n\nclass MLP(nn.Module):\n    def __init__(self",
    "Question: What is the capital of France?\nAnswer: The capital of France is Paris.\n"
    "Question: What is the capital of Italy?\nAnswer:",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
]




def run(engine, prompts, max_tokens):
    from disagg import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(p, sp) for p in prompts]
    t0 = time.perf_counter()
    outs = {o.request_id: o for o in engine.run()}
    dt = time.perf_counter() - t0
    return dt, [outs[i].outputs[0].token_ids for i in ids]


def decode_time(engine, prompts, tokens, repeat):
    """Median decode seconds and the tokens of the last run."""
    times, toks = [], None
    for _ in range(repeat):
        t_pre, _ = run(engine, prompts, 1)
        t_all, toks = run(engine, prompts, tokens)
        times.append(t_all - t_pre)
    return statistics.median(times), toks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--draft", default="default-draft")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--trees", nargs="+", default=["chain:4", "static:2,2,1,1",
                                                   "dynamic:12,5,3"])
    ap.add_argument("--ngram-trees", nargs="*", default=["chain:4", "static:2,1,1,1"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--json", action="store_true", help="one JSON object per case")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from disagg.engine import Engine
    from disagg.model import CausalLM, resolve_model_path
    from disagg.spec import SpecConfig, SpecMetrics

    print(f"# {cpu_name()}, torch threads {torch.get_num_threads()}, target {args.model}, "
          f"draft {args.draft}", file=sys.stderr if args.json else sys.stdout, flush=True)
    target = CausalLM.from_pretrained(resolve_model_path(args.model), dtype=args.dtype)
    draft = CausalLM.from_pretrained(resolve_model_path(args.draft), dtype=args.dtype)
    tok_path = resolve_model_path(args.model)
    device = f"{cpu_name()}, {torch.get_num_threads()} threads"
    cases = [("off", None)] + [("ngram", t) for t in args.ngram_trees] + \
            [("draft", t) for t in args.trees]
    rows = []
    for B in args.batch:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(B)]
        engines = []
        for method, tree in cases:
            spec = None if method == "off" else SpecConfig(
                method, tree=tree, draft_model=draft if method == "draft" else None)
            eng = Engine(target, tok_path, block_size=16, max_num_seqs=max(8, B),
                         speculative=spec)
            run(eng, prompts[:1], 4)  # warm up
            eng.spec.metrics = SpecMetrics()
            engines.append(eng)
        # Round robin over the cases, so that load from other processes on a shared machine
        # hits every case alike; medians per case.
        times = [[] for _ in cases]
        toks = [None] * len(cases)
        for _ in range(args.repeat):
            for i, eng in enumerate(engines):
                s, toks[i] = decode_time(eng, prompts, args.tokens, 1)
                times[i].append(s)
        base_s = statistics.median(times[0])
        for i, (method, tree) in enumerate(cases):
            s = statistics.median(times[i])
            m = engines[i].spec_metrics()
            row = {"op": "speculative_decode", "device": device, "method": method,
                   "tree": tree, "shape": {"batch": B, "new_tokens": args.tokens},
                   "dtype": args.dtype, "median_s": s,
                   "tokens_per_s": B * (args.tokens - 1) / s,
                   "baseline": "plain decoding", "baseline_median_s": base_s,
                   "speedup": base_s / s, "identical": toks[i] == toks[0],
                   "acceptance_length": m["acceptance_length"],
                   "acceptance_rate_by_depth": [round(x, 3) for x in
                                                m["acceptance_rate_by_depth"]],
                   "draft_s": m["draft_s"], "verify_s": m["verify_s"]}
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"B={B:<3} {method:6} {str(tree):18} decode {s * 1e3:8.1f} ms  "
                      f"{row['tokens_per_s']:8.1f} tok/s  speedup {row['speedup']:5.2f}x  "
                      f"accept_len {m['acceptance_length']:4.2f}  "
                      f"identical {row['identical']}", flush=True)
    if not all(r["identical"] for r in rows):
        print("MISMATCH: a speculative run differs from plain greedy decoding", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
