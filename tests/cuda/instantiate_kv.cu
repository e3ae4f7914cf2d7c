// Every KV launcher instantiated for every dtype combination the torch side dispatches, compiled
// without torch (tests/test_cuda_headers.py; the full CUDA build is too slow for every CI run).
#include "disagg/kv.cuh"

namespace dk = disagg::cuda::kv;
using disagg::bf16_t;
using disagg::f16_t;

template <typename T>
void inst_one() {
  (void)&dk::pack<T>;
  (void)&dk::compact<T>;
  (void)&dk::unpack<uint8_t, T>;
  (void)&dk::unpack<float, T>;
  (void)&dk::unpack<bf16_t, T>;
  (void)&dk::unpack<f16_t, T>;
}

void instantiate_all() {
  inst_one<float>();
  inst_one<bf16_t>();
  inst_one<f16_t>();
}
