// Runtime choice of the x86 SIMD kernels (torch-free). The AVX-512 and AVX2 kernels of a given
// op produce the same bits; the environment variable DISAGG_NO_AVX512=1 forces the AVX2 ones
// (tests use it to compare both paths on one machine), DISAGG_NO_SIMD=1 forces the portable C++,
// DISAGG_NO_AVX512BF16=1 keeps AVX-512 but not its bf16 conversions.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#define DISAGG_X86_SIMD 1
#else
#define DISAGG_X86_SIMD 0
#endif

namespace disagg {
namespace cpu {

inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

// AVX2 with F16C (every AVX2 CPU has both).
inline bool use_avx2() {
#if DISAGG_X86_SIMD
  static const bool on = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                         !env_flag("DISAGG_NO_SIMD");
  return on;
#else
  return false;
#endif
}

// AVX-512 F + BW + VL (Skylake-SP and later, Zen 4 and later).
inline bool use_avx512() {
#if DISAGG_X86_SIMD
  static const bool on = use_avx2() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         !env_flag("DISAGG_NO_AVX512");
  return on;
#else
  return false;
#endif
}

// AVX-512 BF16 (Cooper Lake, Sapphire Rapids and later, Zen 4 and later): float -> bf16 in one
// instruction (vcvtne2ps2bf16).
inline bool use_avx512bf16() {
#if DISAGG_X86_SIMD
  static const bool on = use_avx512() && __builtin_cpu_supports("avx512bf16") &&
                         !env_flag("DISAGG_NO_AVX512BF16");
  return on;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace disagg
