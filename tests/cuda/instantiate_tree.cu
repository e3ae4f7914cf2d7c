// Every token-tree launcher instantiated for every dtype combination the torch side dispatches,
// compiled without torch (tests/test_cuda_headers.py).
#include "disagg/tree.cuh"

namespace dt = disagg::cuda::tree;
using disagg::bf16_t;
using disagg::f16_t;

template <typename T, typename Q>
void inst_sample() {
  (void)&dt::tree_verify_sample<T, Q>;
}

template <typename T>
void inst_one() {
  (void)&dt::tree_verify_greedy<T>;
  inst_sample<T, float>();
  inst_sample<T, bf16_t>();
  inst_sample<T, f16_t>();
}

void instantiate_all() {
  (void)&dt::tree_build;
  inst_one<float>();
  inst_one<bf16_t>();
  inst_one<f16_t>();
}
