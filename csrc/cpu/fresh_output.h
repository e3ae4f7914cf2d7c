// New CPU output tensors for the ops that allocate their result. A large fresh buffer costs a
// page fault per 4 KiB page on first touch, often as much as the op's own memory traffic; outputs
// of kHugePageBytes and more are advised onto transparent huge pages (2 MiB) before the kernel
// writes them, which cuts those faults by 512x where the kernel allows it (THP "madvise" mode).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace disagg {

constexpr int64_t kHugePageBytes = int64_t(8) << 20;

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t n = static_cast<int64_t>(t.nbytes());
  if (n >= kHugePageBytes && t.device().is_cpu()) {
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const uintptr_t b = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t s = (b + kHuge - 1) & ~(kHuge - 1), e = (b + static_cast<uintptr_t>(n)) & ~(kHuge - 1);
    // advice only: a kernel without THP refuses it and the buffer works as before
    if (e > s) (void)madvise(reinterpret_cast<void*>(s), e - s, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace disagg
