"""Command-line batch generation: prompts from a JSON file, results to a JSON file.

``python -m disagg.generate --model default --prompts prompts.json --output out.json
--max-tokens 32 --temperature 0``. The prompts file holds a string, a list of strings, or a list
of ``{"prompt_token_ids": [...]}``; the output is a list of ``{"prompt_token_ids", "token_ids",
"text"}`` (plus ``"finish_reason"``, and ``"error"`` for a rejected prompt).
"""
from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m disagg.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="model folder or 'default'")
    ap.add_argument("--prompts", required=True, help="JSON file with the prompts")
    ap.add_argument("--output", required=True, help="where to write the JSON results")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--no-chunked-prefill", action="store_true")
    ap.add_argument("--block-size", type=int, default=16)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from . import LLM, SamplingParams

    with open(args.prompts) as f:
        prompts = json.load(f)
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, max_tokens=args.max_tokens, stop=args.stop,
                            ignore_eos=args.ignore_eos)
    try:
        llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  enable_chunked_prefill=not args.no_chunked_prefill, block_size=args.block_size)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: cannot load {args.model!r}: {e}", file=sys.stderr)
        return 2
    results = []
    for out in llm.generate(prompts, params):
        r = {"prompt_token_ids": out.prompt_token_ids, "token_ids": out.outputs[0].token_ids,
             "text": out.outputs[0].text, "finish_reason": out.outputs[0].finish_reason}
        if out.error:
            r["error"] = out.error
        results.append(r)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    failed = sum(1 for r in results if "error" in r)
    print(f"wrote {len(results)} results to {args.output}" + (f" ({failed} rejected)" if failed else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
