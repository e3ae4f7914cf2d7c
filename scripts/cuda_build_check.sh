#!/usr/bin/env bash
# Builds the full CUDA variant of the extension against the CUDA torch (torch==2.14.1, CUDA 13.0)
# in .venv-cuda, creating that venv if needed, and checks that it imports. No GPU is needed: this
# proves that every csrc/cuda/*.cu compiles and links against torch's CUDA headers. Too slow for
# every CI run on a small machine (see docs/cuda.md); run it before each device run and after
# changing CUDA code.
#
#   bash scripts/cuda_build_check.sh            # archs: DISAGG_CUDA_ARCHS, default 80;90a;100
#   DISAGG_CUDA_ARCHS=90a bash scripts/cuda_build_check.sh   # faster while iterating
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-cuda/bin/python ]; then
  echo "[cuda-build] creating .venv-cuda (torch 2.14.1 with CUDA 13.0, ~5.5 GB)"
  "$PY" -m venv .venv-cuda
fi
if [ ! -f .venv-cuda/.disagg-deps-v2 ]; then
  # the NVSHMEM and CUTLASS wheels make DISAGG_NVSHMEM / DISAGG_CUTLASS (AUTO) build those parts
  .venv-cuda/bin/pip install -q "torch==2.14.1" numpy scikit-build-core cmake ninja pytest \
    nvidia-nvshmem-cu13 nvidia-cutlass
  touch .venv-cuda/.disagg-deps-v2
fi
command -v nvcc >/dev/null || { echo "[cuda-build] nvcc not found on PATH" >&2; exit 2; }
start=$(date +%s)
# Every KV, tree and layer launcher for every dtype, without torch (minutes of nvcc: not in the CPU
# suite, which compiles the headers and the routing launchers).
echo "[cuda-build] instantiating the KV, tree and layer kernels (no torch)"
tmp=$(mktemp -d)
nvcc -std=c++17 -Iinclude -arch=sm_90a -c tests/cuda/instantiate_kv.cu tests/cuda/instantiate_tree.cu \
  tests/cuda/instantiate_layers.cu \
  -odir "$tmp"
rm -rf "$tmp"
# A build directory of its own: the CPU build (scripts/setup.sh) keeps build/<wheel tag>.
DISAGG_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  .venv-cuda/bin/pip install -q --no-build-isolation --no-deps \
  --config-settings=build-dir=build/cuda .
elapsed=$(( $(date +%s) - start ))
# Import from outside the source tree so the installed package (with _C) is the one loaded.
(cd /tmp && "$OLDPWD/.venv-cuda/bin/python" -c '
import torch, disagg, disagg._loader as l, disagg._build_info as b
from disagg.moe.nvshmem import nvshmem_built
assert l.cuda_built(), "extension was built without the CUDA kernels"
assert b.WITH_CUTLASS, "extension was built without the CUTLASS grouped GEMM"
assert nvshmem_built(), "libdisagg_nvshmem.so was not installed"
assert hasattr(torch.ops.disagg, "expert_gemm")
print("[cuda-build] import ok: torch", torch.__version__, "cuda", torch.version.cuda,
      "(CUTLASS grouped GEMM, NVSHMEM transport library)")
')
echo "[cuda-build] built in ${elapsed}s (archs: ${DISAGG_CUDA_ARCHS:-default})"
