#!/usr/bin/env bash
# Creates (or reuses) .venv, installs the CPU torch and the test/runtime dependencies, and
# builds + installs disagg into it against that torch. Safe to run repeatedly: the CMake build
# directory is kept, so a rebuild only compiles what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.disagg-deps-v3
if [ ! -f "$stamp" ]; then
  echo "[setup] installing torch 2.13.0 (CPU) and dependencies"
  pip install -q "torch==2.13.0" numpy scikit-build-core cmake ninja pytest expecttest \
      "transformers>=4.45" safetensors tokenizers aiohttp openai matplotlib jinja2
  # NIXL (UCX inside the wheel) for the nixl KV transport; CPU-only hosts included
  pip install -q "torch==2.13.0" nixl-cu13
  touch "$stamp"
fi
echo "[setup] building disagg"
pip install -q --no-build-isolation --no-deps .
python -c "import disagg, torch; print('[setup] disagg', disagg.__version__, 'on torch', torch.__version__)"
