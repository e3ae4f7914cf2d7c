// Every model-layer launcher (RMSNorm, RoPE + cache write, tree attention) instantiated for
// every dtype and index type the torch side dispatches, compiled without torch
// (tests/test_cuda_headers.py).
#include "disagg/layers.cuh"
#include "disagg/tree_attention.cuh"

namespace dl = disagg::cuda::layers;
namespace dt = disagg::cuda::tree_attention;

template <typename T>
void instantiate_dtype() {
  (void)&dl::add_rms_norm<T>;
  (void)&dl::rope_write<T, int32_t>;
  (void)&dl::rope_write<T, int64_t>;
  (void)&dt::paged_tree_attention<T, int32_t>;
  (void)&dt::paged_tree_attention<T, int64_t>;
}

void instantiate_all() {
  instantiate_dtype<float>();
  instantiate_dtype<disagg::bf16_t>();
  instantiate_dtype<disagg::f16_t>();
}
