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
    from .spec.config import add_spec_args

    add_spec_args(ap)

    par = ap.add_argument_group("parallel (launch with torchrun; see docs/parallel.md)")
    for n, h in (("tp", "tensor"), ("pp", "pipeline"), ("ep", "expert"), ("dp", "data"),
                 ("cp", "context")):
        par.add_argument(f"--{n}", type=int, default=1, help=f"{h}-parallel size")
    par.add_argument("--ep-tp-experts", action="store_true",
                     help="with --ep and --tp: split every expert over TP and lay EP over "
                          "replicas (default: EP spans the TP ranks, experts whole)")
    par.add_argument("--pp-schedule", choices=("auto", "steps", "micro"), default="auto",
                     help="with --pp: 'steps' keeps several steps in flight (request groups), "
                          "'micro' splits each step into micro-batches; 'auto': steps where "
                          "the layout allows")
    par.add_argument("--steps-in-flight", type=int, default=None,
                     help="request groups for --pp-schedule steps (default: --pp)")
    par.add_argument("--dist-timeout", type=float, default=60.0,
                     help="seconds before a stuck collective ends the job")
    par.add_argument("--report", action="store_true", help="print the layout report (rank 0)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import os

    if max(args.tp, args.pp, args.ep, args.dp, args.cp) > 1 or \
            int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .parallel.launch import main_parallel

        return main_parallel(args)
    from . import LLM, SamplingParams
    from .spec.config import spec_config_from_args

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
                  enable_chunked_prefill=not args.no_chunked_prefill, block_size=args.block_size,
                  speculative=spec_config_from_args(args))
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
