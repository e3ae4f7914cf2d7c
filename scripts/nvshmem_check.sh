#!/usr/bin/env bash
# Compiles csrc/cuda/nvshmem/*.cu with relocatable device code against the NVSHMEM headers of
# nvidia-nvshmem-cu13 and device-links them with libnvshmem_device.a into a shared library, so
# the NVSHMEM transport cannot rot unseen. Needs nvcc and the wheel (installed into .venv-cuda
# when missing); runs nothing on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-cuda/bin/python}
[ -x "$PY" ] || PY=python3
root=$("$PY" -c 'import nvidia.nvshmem as n; print(list(n.__path__)[0])' 2>/dev/null) || {
  "$PY" -m pip install -q nvidia-nvshmem-cu13
  root=$("$PY" -c 'import nvidia.nvshmem; print(list(nvidia.nvshmem.__path__)[0])')
}
ARCH=${DISAGG_NVSHMEM_ARCH:-90a}
out=${TMPDIR:-/tmp}/disagg-nvshmem-check
mkdir -p "$out"
start=$(date +%s)
objs=()
for f in csrc/cuda/nvshmem/*.cu; do
  o="$out/$(basename "$f" .cu).o"
  nvcc -std=c++17 -rdc=true -Xcompiler -fPIC -arch=sm_$ARCH -I"$root/include" -c "$f" -o "$o"
  objs+=("$o")
done
# Device link with NVSHMEM's device library; host symbols resolve against libnvshmem_host.
nvcc -shared -rdc=true -arch=sm_$ARCH -Xcompiler -fPIC "${objs[@]}" -L"$root/lib" \
  -lnvshmem_device -l:libnvshmem_host.so.3 -o "$out/libdisagg_nvshmem_check.so"
# every entry point of the C ABI that python/disagg/moe/nvshmem.py loads is exported
for sym in uid_bytes get_uid init my_pe n_pes create destroy finalize error_string all_to_all; do
  nm -D --defined-only "$out/libdisagg_nvshmem_check.so" | grep -q " T disagg_nvshmem_$sym$" ||
    { echo "[nvshmem-check] missing symbol disagg_nvshmem_$sym" >&2; exit 1; }
done
echo "[nvshmem-check] compiled and linked ${#objs[@]} file(s) for sm_$ARCH in $(( $(date +%s) - start ))s"
