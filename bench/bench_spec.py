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

# Wall-clock time by default. ``--clock cpu`` uses the process's CPU time instead: on a
# machine shared with other jobs it leaves out the time this process waits to be scheduled
# (with --threads 1 every op runs on the calling thread, so CPU time is the work done).
clock = time.perf_counter

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
    t0 = clock()
    outs = {o.request_id: o for o in engine.run()}
    dt = clock() - t0
    return dt, [outs[i].outputs[0].token_ids for i in ids]


def decode_time(engine, prompts, tokens, repeat):
    """Median decode seconds and the tokens of the last run."""
    times, toks = [], None
    for _ in range(repeat):
        t_pre, _ = run(engine, prompts, 1)
        t_all, toks = run(engine, prompts, tokens)
        times.append(t_all - t_pre)
    return statistics.median(times), toks


def forward_cost(model, tokens, ctx, n, batch, repeat):
    """Median seconds of one forward of ``model`` over ``batch`` sequences with ``ctx`` cached
    tokens each and ``n`` new ones: ``n == 1`` as plain decode rows, ``n > 1`` as a token
    chain (a tree; the cost depends on the node count, not the shape) through the tree
    attention, all rows' logits wanted, as verification needs."""
    from disagg.kv import PagedKVCache
    from disagg.model.attention import AttentionMetadata, TreeMask
    from disagg.spec.drafters import chain_bits

    cfg, bs = model.config, 16
    kv = PagedKVCache(cfg.num_hidden_layers, batch * (-(-(ctx + n) // bs) + 1), bs,
                      cfg.num_key_value_heads, cfg.head_dim, dtype=model.dtype)

    def step(seqs, start, count, rows):
        ids, pos, slots, metas = [], [], [], []
        for b in range(batch):
            blocks = kv.block_ids(b)
            ids += tokens[start:start + count]
            pos += range(start, start + count)
            slots += [blocks[p // bs] * bs + p % bs for p in range(start, start + count)]
            metas.append(seqs(blocks))
        meta = AttentionMetadata.build(metas, bs, torch.tensor(slots), cfg.sliding_window)
        return model.forward(torch.tensor(ids), torch.tensor(pos), meta, kv.caches,
                             torch.tensor(rows))

    for b in range(batch):
        kv.allocate(b, ctx)
    step(lambda bl: (ctx, ctx, bl), 0, ctx, [ctx - 1])  # prefill the context
    for b in range(batch):
        kv.append(b, n)
    bits = chain_bits(n)
    seqs = (lambda bl: (1, ctx + 1, bl)) if n == 1 else \
        (lambda bl: (n, ctx + n, bl, TreeMask(ctx, bits)))
    rows = list(range(batch * n))
    times = []
    for _ in range(repeat):
        t0 = clock()
        step(seqs, ctx, n, rows)
        times.append(clock() - t0)
    return statistics.median(times)


def verify_cost(target, draft, tok_path, sizes, batches, repeat, out_json):
    """The cost of verifying a tree of N nodes relative to a plain decode step, per batch
    size, for the target and the draft model, at the context of the first prompt plus 32
    generated tokens."""
    from disagg import SamplingParams
    from disagg.engine import Engine

    eng = Engine(target, tok_path, block_size=16)
    eng.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    out = eng.run()[0]
    tokens = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
    ctx = len(out.prompt_token_ids) + 32
    for B in batches:
        base = {m: forward_cost(mdl, tokens, ctx, 1, B, repeat)
                for m, mdl in (("target", target), ("draft", draft))}
        for n in sizes:
            row = {"op": "verify_cost", "batch": B, "nodes": n, "context": ctx}
            for m, mdl in (("target", target), ("draft", draft)):
                s = base[m] if n == 1 else forward_cost(mdl, tokens, ctx, n, B, repeat)
                row[f"{m}_ms"] = s * 1e3
                row[f"{m}_x_decode"] = s / base[m]
            if out_json:
                print(json.dumps(row), flush=True)
            else:
                print(f"B={B:<3} nodes {n:3d}  target {row['target_ms']:7.2f} ms "
                      f"({row['target_x_decode']:4.2f}x decode)  draft {row['draft_ms']:6.2f} ms "
                      f"({row['draft_x_decode']:4.2f}x)", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--draft", default="default-draft")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--trees", nargs="+", default=["chain:4", "static:2,2,1,1",
                                                   "dynamic:12,5,3"],
                    help="draft-model trees; TREE@P sets SpecConfig.min_prob=P, TREE~N "
                         "SpecConfig.backoff=N (both: TREE@P~N)")
    ap.add_argument("--ngram-trees", nargs="*", default=["chain:4", "static:2,1,1,1"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--json", action="store_true", help="one JSON object per case")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall-clock time, or process CPU time (a loaded, shared machine)")
    ap.add_argument("--verify-cost", type=int, nargs="*", default=None, metavar="N",
                    help="instead: time one forward over trees of N nodes (default 1 2 3 4 5 "
                         "7 9 13 17) against a plain decode step, target and draft")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    from disagg.engine import Engine
    from disagg.model import CausalLM, resolve_model_path
    from disagg.spec import SpecConfig, SpecMetrics

    print(f"# {cpu_name()}, torch threads {torch.get_num_threads()}, {args.clock} clock, "
          f"load average {os.getloadavg()[0]:.1f}, target {args.model}, draft {args.draft}", file=sys.stderr if args.json else sys.stdout, flush=True)
    target = CausalLM.from_pretrained(resolve_model_path(args.model), dtype=args.dtype)
    draft = CausalLM.from_pretrained(resolve_model_path(args.draft), dtype=args.dtype)
    tok_path = resolve_model_path(args.model)
    if args.verify_cost is not None:
        verify_cost(target, draft, tok_path, args.verify_cost or [1, 2, 3, 4, 5, 7, 9, 13, 17],
                    args.batch, max(5, 5 * args.repeat), args.json)
        return 0
    device = f"{cpu_name()}, {torch.get_num_threads()} threads, {args.clock} clock"
    cases = [("off", None)] + [("ngram", t) for t in args.ngram_trees] + \
            [("draft", t) for t in args.trees]
    rows = []
    for B in args.batch:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(B)]
        engines = []
        for method, tree in cases:
            rest, _, bo = (tree or "").partition("~")
            shape, _, mp = rest.partition("@")
            spec = None if method == "off" else SpecConfig(
                method, tree=shape, draft_model=draft if method == "draft" else None,
                min_prob=float(mp or 0), backoff=int(bo or 0))
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
                   "verify_steps": m["verify_steps"],
                   "nodes_per_tree": m["draft_nodes"] / max(1, m["verify_steps"]),
                   "draft_s": m["draft_s"], "verify_s": m["verify_s"]}
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"B={B:<3} {method:6} {str(tree):18} decode {s * 1e3:8.1f} ms  "
                      f"{row['tokens_per_s']:8.1f} tok/s  speedup {row['speedup']:5.2f}x  "
                      f"accept_len {m['acceptance_length']:4.2f}  "
                      f"nodes/tree {row['nodes_per_tree']:5.2f}  rate by depth "
                      f"{row['acceptance_rate_by_depth']}  identical {row['identical']}",
                      flush=True)
    if not all(r["identical"] for r in rows):
        print("MISMATCH: a speculative run differs from plain greedy decoding", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
