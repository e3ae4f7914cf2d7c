// Argument checks shared by the torch-facing op implementations. Every failure names the
// argument, so a bad call reads "disagg.route: logits must be 2-D [T, E], got [3]".
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

#include "disagg/common.h"

namespace disagg {

#define DISAGG_CHECK(cond, op, ...) TORCH_CHECK((cond), "disagg.", op, ": ", __VA_ARGS__)
#define DISAGG_CHECK_VALUE(cond, op, ...) TORCH_CHECK_VALUE((cond), "disagg.", op, ": ", __VA_ARGS__)

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* shape) {
  DISAGG_CHECK_VALUE(t.dim() == dim, op, name, " must be ", dim, "-D ", shape, ", got shape ",
                     t.sizes());
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  DISAGG_CHECK_VALUE(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, op, name,
                     " must be float32, bfloat16 or float16, got ", s);
}

inline void check_index(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  DISAGG_CHECK_VALUE(s == at::kInt || s == at::kLong, op, name, " must be int32 or int64, got ", s);
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* name) {
  DISAGG_CHECK_VALUE(t.scalar_type() == want, op, name, " must be ", want, ", got ", t.scalar_type());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  DISAGG_CHECK_VALUE(t.is_contiguous(), op, name, " must be contiguous");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_b) {
  DISAGG_CHECK_VALUE(a.device() == b.device(), op, name_b, " must be on ", a.device(), ", got ",
                     b.device());
}

inline void check_status(Status s, const char* op, const std::string& what) {
  DISAGG_CHECK_VALUE(s == Status::kOk, op, what, " (", status_string(s), ")");
}

// Dispatch over the three float types, binding `scalar_t` to the torch-free storage type.
#define DISAGG_DISPATCH_FLOAT(dtype, op, ...)                                     \
  [&] {                                                                           \
    switch (dtype) {                                                              \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }          \
      case at::kBFloat16: { using scalar_t = ::disagg::bf16_t; return __VA_ARGS__(); } \
      case at::kHalf: { using scalar_t = ::disagg::f16_t; return __VA_ARGS__(); } \
      default: TORCH_CHECK_VALUE(false, "disagg.", op, ": unsupported dtype ", dtype); \
    }                                                                             \
  }()

}  // namespace disagg
