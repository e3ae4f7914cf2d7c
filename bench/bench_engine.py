"""Engine throughput against HF transformers ``generate`` on the same checkpoint, same run.

Measures offline throughput (output tokens/s for a batch of prompts) and single-stream decode
tokens/s, after checking that the greedy tokens agree. Models: a tiny random Mixtral (hidden
128, 8 experts, top-2, 2 layers, head_dim 32) made on the fly, the packaged default model when
present, or any HF folder given with --model.

    python bench/bench_engine.py [--model PATH|default|tiny-mixtral ...] [--batch 16]
        [--prompt-len 64] [--new-tokens 32] [--threads N] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from disagg.bench.common import cpu_name




CLOCK = time.perf_counter


def median_times(fns, repeats: int) -> list:
    """Median time of each function, run interleaved (a, b, a, b, ...) so that load
    changes on a shared machine hit all of them alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = CLOCK()
            fn()
            times[i].append(CLOCK() - t)
    return [statistics.median(t) for t in times]


def bench_model(name: str, path: str, args) -> list:
    import transformers as tf

    from disagg import LLM, SamplingParams

    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, dtype="float32", max_num_seqs=max(64, args.batch),
              max_num_batched_tokens=max(2048, args.prompt_len))
    vocab = llm.engine.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, vocab, (args.batch, args.prompt_len), generator=g)
    sp = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    ones = torch.ones_like(prompts)

    def ours(batch):
        return llm.generate([{"prompt_token_ids": p} for p in prompts[:batch].tolist()], sp)

    def theirs(batch, n=args.new_tokens):
        with torch.no_grad():
            return hf.generate(prompts[:batch], attention_mask=ones[:batch], max_new_tokens=n,
                               eos_token_id=None, do_sample=False, pad_token_id=0)

    # Check before timing: the same greedy tokens as HF run one prompt at a time (HF's own
    # batched generate can differ from its single-prompt output at near-ties).
    got = [o.outputs[0].token_ids for o in ours(args.batch)]
    match = 0
    for i in range(min(args.batch, args.check)):
        with torch.no_grad():
            want = hf.generate(prompts[i:i + 1], attention_mask=ones[i:i + 1],
                               max_new_tokens=args.new_tokens, eos_token_id=None,
                               do_sample=False, pad_token_id=0)[0, args.prompt_len:].tolist()
        match += got[i] == want
    results = []
    for batch in sorted({1, args.batch}):
        n_tok = batch * args.new_tokens
        t_ours, t_hf = median_times([lambda: ours(batch), lambda: theirs(batch)], args.repeats)
        results.append({"model": name, "case": "offline" if batch > 1 else "single-stream",
                        "batch": batch, "prompt_len": args.prompt_len,
                        "new_tokens": args.new_tokens, "disagg_tok_s": n_tok / t_ours,
                        "hf_tok_s": n_tok / t_hf, "speedup": t_hf / t_ours})
    # Single-stream decode alone: the time per token after the first one.
    stamps = []
    llm.engine.add_request(prompts[0].tolist(), SamplingParams(
        temperature=0, max_tokens=args.decode_tokens, ignore_eos=True),
        callback=lambda out: stamps.append(CLOCK()))
    llm.engine.run()
    ours_decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    t_prefill, t_full = median_times([lambda: theirs(1, 1), lambda: theirs(1, args.decode_tokens)],
                                     args.repeats)
    hf_decode = (args.decode_tokens - 1) / max(t_full - t_prefill, 1e-9)
    results.append({"model": name, "case": "decode-only", "batch": 1,
                    "prompt_len": args.prompt_len, "new_tokens": args.decode_tokens,
                    "disagg_tok_s": ours_decode, "hf_tok_s": hf_decode,
                    "speedup": ours_decode / hf_decode})
    for r in results:
        r.update(greedy_match=f"{match}/{min(args.batch, args.check)}", threads=torch.get_num_threads(),
                 clock="process" if CLOCK is time.process_time else "wall",
                 cpu=cpu_name())
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append",
                    help="tiny-mixtral, default, or an HF folder (repeatable)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--check", type=int, default=16, help="prompts checked against HF first")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="'process' times this process's CPU time: with --threads 1 on a "
                         "machine shared with other jobs it is what an idle core would take")
    args = ap.parse_args(argv)
    global CLOCK
    if args.clock == "process":
        if (args.threads or torch.get_num_threads()) != 1:
            ap.error("--clock process needs --threads 1")
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.model or ["tiny-mixtral", "default"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            if m == "tiny-mixtral":
                from disagg.model.tiny import make_checkpoint

                path = os.path.join(tmp, "tiny-mixtral")
                make_checkpoint("mixtral", path, seed=0)
            else:
                from disagg.model import resolve_model_path

                try:
                    path = resolve_model_path(m)
                except FileNotFoundError as e:
                    print(f"skipping {m}: {e}", file=sys.stderr)
                    continue
            rows += bench_model(m, path, args)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        clock = "process CPU time" if CLOCK is time.process_time else "wall time"
        print(f"CPU: {cpu_name()}, torch threads: {torch.get_num_threads()}, clock: {clock}")
        print(f"{'model':<14}{'case':<15}{'batch':>6}{'disagg tok/s':>14}{'HF tok/s':>11}"
              f"{'speedup':>9}  greedy match")
        for r in rows:
            print(f"{r['model']:<14}{r['case']:<15}{r['batch']:>6}{r['disagg_tok_s']:>14.1f}"
                  f"{r['hf_tok_s']:>11.1f}{r['speedup']:>8.2f}x  {r['greedy_match']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
