#!/usr/bin/env bash
# Compiles csrc/cuda/cutlass/*.cu against the CUTLASS headers of the nvidia-cutlass wheel
# (installed into .venv-cuda when missing), so the grouped GEMM cannot rot unseen. Runs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-cuda/bin/python}
[ -x "$PY" ] || PY=python3
inc=$("$PY" -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))' 2>/dev/null) || {
  "$PY" -m pip install -q nvidia-cutlass
  inc=$("$PY" -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))')
}
ARCH=${DISAGG_CUTLASS_ARCH:-90a}  # grouped_gemm_sm90.cu needs 90a
out=${TMPDIR:-/tmp}/disagg-cutlass-check
mkdir -p "$out"
start=$(date +%s)
for f in csrc/cuda/cutlass/*.cu; do
  nvcc -std=c++17 -O3 -arch=sm_$ARCH --expt-relaxed-constexpr -I"$inc" -Xcompiler -fPIC \
    -c "$f" -o "$out/$(basename "$f" .cu).o"
done
echo "[cutlass-check] compiled csrc/cuda/cutlass for sm_$ARCH in $(( $(date +%s) - start ))s"
