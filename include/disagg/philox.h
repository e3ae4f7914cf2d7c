// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a
// counter-based generator, so a draw is a pure function of (key, counter). That is what makes
// sampling reproducible and CUDA-graph safe: no generator state lives between calls, the caller
// passes a seed (key) and an offset (counter) as tensors. Torch-free; usable from host and device.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DISAGG_HOST_DEVICE __host__ __device__
#else
#define DISAGG_HOST_DEVICE
#endif

namespace disagg {

struct Philox4x32 {
  uint32_t v[4];
};

namespace detail {

DISAGG_HOST_DEVICE inline void philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *lo = a * b;
  *hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *lo = static_cast<uint32_t>(p);
  *hi = static_cast<uint32_t>(p >> 32);
#endif
}

}  // namespace detail

// Ten rounds of Philox4x32 on counter c under key k (the constants of the reference paper).
DISAGG_HOST_DEVICE inline Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                   uint32_t k0, uint32_t k1) {
  const uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  const uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    detail::philox_mulhilo(kM0, c0, &hi0, &lo0);
    detail::philox_mulhilo(kM1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n1 = lo1;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    const uint32_t n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += kW0;
    k1 += kW1;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// The uniform number in [0, 1) with 53 random bits for draw `draw` of stream (seed, offset):
// key = seed, counter = (offset low, offset high, draw, 0), two words of the output block make
// the double. Distinct (offset, draw) pairs never share a counter, so a caller that advances
// `offset` by one per call gets fresh numbers for up to 2^32 draws per call.
DISAGG_HOST_DEVICE inline double philox_uniform(uint64_t seed, uint64_t offset, uint32_t draw) {
  const Philox4x32 r =
      philox4x32_10(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), draw, 0u,
                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint64_t bits = (static_cast<uint64_t>(r.v[0] >> 5) << 26) | static_cast<uint64_t>(r.v[1] >> 6);
  return static_cast<double>(bits) * (1.0 / 9007199254740992.0);  // 2^-53
}

}  // namespace disagg
