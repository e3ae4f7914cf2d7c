// Every paged decode attention launcher instantiated for every dtype the torch side dispatches,
// compiled without torch (tests/test_cuda_headers.py).
#include "disagg/attention.cuh"

namespace da = disagg::cuda::attention;

void instantiate_all() {
  (void)&da::paged_decode_attention<float>;
  (void)&da::paged_decode_attention<disagg::bf16_t>;
  (void)&da::paged_decode_attention<disagg::f16_t>;
}
