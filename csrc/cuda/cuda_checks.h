// The CUDA ops' launch check, shared by csrc/cuda/*.cu: a launcher's cudaError_t becomes the
// library's error naming the op.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace disagg {

inline void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "disagg.", op, ": CUDA error: ", cudaGetErrorString(err));
}

}  // namespace disagg
