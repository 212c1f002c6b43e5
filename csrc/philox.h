// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) and the
// Gaussian transform every samkernels backend shares: the one Philox module of the C++ and CUDA
// kernels (cpu/normal_block.h only vectorises it for fp32 on the CPU).  Header-only, free of torch.  Contract (see samkernels/ops/reference.py: philox_normal):
//   element i of parameter `pid` at noise step `step` uses
//   block = philox(counter = (i >> 2, pid, step_lo, step_hi), key = (seed_lo, seed_hi)), lane i & 3;
//   u_k = ((x_k >> 9) + 0.5) * 2^-23 in (0, 1) (exact in fp32); Box-Muller (u0,u1) -> lanes 0,1; (u2,u3) -> lanes 2,3.
#pragma once
#include <cmath>
#include <cstdint>

#include "math/common.h"

namespace samkernels {

struct Philox4 {
  uint32_t x[4];
};

SK_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

SK_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                            uint32_t k1) {
  SK_UNROLL
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo32(0xD2511F53u, c0, &hi0);
    uint32_t lo1 = mulhilo32(0xCD9E8D57u, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

SK_HD float philox_uniform(uint32_t x) {  // (x >> 9 + 1/2) / 2^23: exact in fp32, never 0 or 1
  return (static_cast<float>(x >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

// The four words of block `quad` (elements 4*quad .. 4*quad+3) of parameter `pid` at noise step
// `step`: counter (quad, pid, step_lo, step_hi), key (seed_lo, seed_hi).
SK_HD Philox4 philox_words(uint64_t seed, uint64_t step, uint32_t pid, uint64_t quad) {
  return philox4x32_10(static_cast<uint32_t>(quad), pid, static_cast<uint32_t>(step),
                       static_cast<uint32_t>(step >> 32), static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ void sk_sincospi(float x, float* s, float* c) { sincospif(x, s, c); }
__device__ __forceinline__ void sk_sincospi(double x, double* s, double* c) { sincospi(x, s, c); }
#endif

// Four standard normals for block `quad` (elements 4*quad .. 4*quad+3) of one parameter.
template <typename T>
SK_HD void philox_normal4(uint64_t seed, uint64_t step, uint32_t pid, uint64_t quad, T out[4]) {
  const Philox4 b = philox_words(seed, step, pid, quad);
  T u0 = philox_uniform(b.x[0]), u1 = philox_uniform(b.x[1]);
  T u2 = philox_uniform(b.x[2]), u3 = philox_uniform(b.x[3]);
  // Precise log and sqrt on every backend (the CUDA build has no --use_fast_math: __logf's
  // absolute error ~4e-7 exceeds |log u0| near u0 = 1 and would zero or NaN the tails).
  T r01 = std::sqrt(T(-2) * std::log(u0)), r23 = std::sqrt(T(-2) * std::log(u2));
#if defined(__CUDA_ARCH__)
  // sincospi(2u): 2u is exact and so is the reduction, so the device evaluates the transform of u
  // itself, as the CPU's fp32 sincos_2pi (cpu/normal_block.h) does; no rounding of 2 pi u and no
  // large-argument reduction path.
  T c1, s1, c3, s3;
  sk_sincospi(T(2) * u1, &s1, &c1);
  sk_sincospi(T(2) * u3, &s3, &c3);
  out[0] = r01 * c1;
  out[1] = r01 * s1;
  out[2] = r23 * c3;
  out[3] = r23 * s3;
#else
  const T two_pi = T(6.283185307179586476925286766559);
  out[0] = r01 * std::cos(two_pi * u1);
  out[1] = r01 * std::sin(two_pi * u1);
  out[2] = r23 * std::cos(two_pi * u3);
  out[3] = r23 * std::sin(two_pi * u3);
#endif
}

// The uniforms of block `quad` (as philox_normal4's u0..u3, before Box-Muller): E-BiSAM's mask.
template <typename T>
SK_HD void philox_uniform4(uint64_t seed, uint64_t step, uint32_t pid, uint64_t quad, T out[4]) {
  const Philox4 b = philox_words(seed, step, pid, quad);
  for (int k = 0; k < 4; ++k) out[k] = philox_uniform(b.x[k]);
}

}  // namespace samkernels
