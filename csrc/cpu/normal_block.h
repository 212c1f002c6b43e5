// CPU-only block versions of philox.h's Philox noise for fp32 opmath: a block of kBlockQuads
// consecutive quads at a time into a stack array, in loops GCC vectorizes at -O3 on baseline
// x86-64 (SSE2).  The scalar philox_normal4 spends ~9 ns/element in libm log/sqrt/sin/cos; these
// run the 4 lanes of a vector through Philox, a polynomial log and sincos instead.
// Same contract as philox.h (words bit-identical; normals within ~2 ulp of the exact
// transform).  Double opmath keeps the exact std:: path of philox_normal4.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "cpu/multi_tensor.h"
#include "philox.h"

namespace samkernels {
namespace cpu {

constexpr int kBlockQuads = 256;                 // 1024 elements: 4 KiB of z, L1-resident
constexpr int kBlockElems = 4 * kBlockQuads;

// Quads a block needs for a run of `len` elements: rounded up to 8 so the vector loops have no
// scalar tail (same code path, same bits, whatever the run length), at most kBlockQuads.  A
// 3-element tensor then costs 8 quads of Philox, not 256.
inline int block_quads(int64_t len) {
  const int64_t q = ((len + 3) / 4 + 7) / 8 * 8;
  return static_cast<int>(std::min<int64_t>(q, kBlockQuads));
}

// Philox4x32-10 words of quads quad0 .. quad0 + kBlockQuads - 1, lane k of quad j in x[k][j].
// Same counter/key layout as philox_normal4; uint64 products vectorize as pmuludq.
inline void philox_block(uint64_t seed, uint64_t step, uint32_t pid, uint64_t quad0,
                         uint32_t (*x)[kBlockQuads], int nq = kBlockQuads) {
  const uint32_t c1_ = pid, c2_ = static_cast<uint32_t>(step);
  const uint32_t c3_ = static_cast<uint32_t>(step >> 32);
  const uint32_t k0_ = static_cast<uint32_t>(seed), k1_ = static_cast<uint32_t>(seed >> 32);
  const uint32_t q0 = static_cast<uint32_t>(quad0);
#pragma omp simd
  for (int j = 0; j < nq; ++j) {
    uint32_t c0 = q0 + static_cast<uint32_t>(j), c1 = c1_, c2 = c2_, c3 = c3_;
    uint32_t k0 = k0_, k1 = k1_;
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
      c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      c1 = static_cast<uint32_t>(p1);
      c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c3 = static_cast<uint32_t>(p0);
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    x[0][j] = c0;
    x[1][j] = c1;
    x[2][j] = c2;
    x[3][j] = c3;
  }
}

// philox_uniform without the unsigned->float conversion (x >> 9 fits int32: cvtdq2ps).
inline float block_uniform(uint32_t x) {
  return (static_cast<float>(static_cast<int32_t>(x >> 9)) + 0.5f) * 1.1920928955078125e-07f;
}

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// Branch-free a-or-b by bit masks.  GCC (-ftrapping-math) turns a float `c ? x - 1 : x` into
// control flow, which blocks vectorization; integer and/or selects vectorize on SSE2.
inline float select_bits(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return bits_to_float((float_to_bits(a) & m) | (float_to_bits(b) & ~m));
}

// -2 log(u) for u in (0, 1) normal (u >= 2^-24): Cephes logf (~1 ulp), branch-free.
inline float minus_two_log(float u) {
  const uint32_t ix = float_to_bits(u);
  const float m = bits_to_float((ix & 0x007fffffu) | 0x3f000000u);  // u = m 2^e, m in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  const float e = static_cast<float>(static_cast<int32_t>(ix >> 23) - 126 -
                                     static_cast<int32_t>(small));
  const float x = (m - 1.0f) + select_bits(small, m, 0.0f);  // m - 1 or 2m - 1, both exact
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  const float l = x + y + 0.693359375f * e;
  return -2.0f * l;
}

// cos(2 pi u), sin(2 pi u) for u in (0, 1).  The reduction is done on u, where it is exact
// (u has 2^-24 granularity): v = u - round(u), quadrant q = round(4 v), r = v - q / 4 in
// [-1/8, 1/8]; then Cephes sinf/cosf on a = 2 pi r in [-pi/4, pi/4].
inline void sincos_2pi(float u, float* c, float* s) {
  const float v = u - select_bits(u >= 0.5f, 1.0f, 0.0f);        // [-0.5, 0.5), exact (Sterbenz)
  const float half = bits_to_float(0x3f000000u | (float_to_bits(v) & 0x80000000u));  // +-0.5
  const float fq = static_cast<float>(static_cast<int32_t>(v * 4.0f + half));
  const float r = v - 0.25f * fq;                                // exact
  const float a = r * 6.28318548202514648f + r * -1.7484556e-07f;  // 2 pi as hi + lo
  const float z = a * a;
  float sn = -1.9515295891e-4f;
  sn = sn * z + 8.3321608736e-3f;
  sn = sn * z - 1.6666654611e-1f;
  sn = a + a * z * sn;
  float cs = 2.443315711809948e-5f;
  cs = cs * z - 1.388731625493765e-3f;
  cs = cs * z + 4.166664568298827e-2f;
  cs = 1.0f - 0.5f * z + z * z * cs;
  const int q = static_cast<int32_t>(fq) & 3;                     // angle = a + q pi / 2
  const float cq = select_bits(q & 1, sn, cs), sq = select_bits(q & 1, cs, sn);
  // sign flips by xor: cos negated for q = 1, 2; sin for q = 2, 3
  const uint32_t cneg = static_cast<uint32_t>(((q + 1) >> 1) & 1) << 31;
  const uint32_t sneg = static_cast<uint32_t>(q >> 1) << 31;
  *c = bits_to_float(float_to_bits(cq) ^ cneg);
  *s = bits_to_float(float_to_bits(sq) ^ sneg);
}

// x[k] <- sqrt(x[k]) for k < n, correctly rounded like std::sqrt.  Separate because with
// -fmath-errno (the default) GCC will not vectorize std::sqrt.
inline void sqrt_inplace(float* x, int n) {
  int k = 0;
#if defined(__SSE2__)
  for (; k + 4 <= n; k += 4) _mm_storeu_ps(x + k, _mm_sqrt_ps(_mm_loadu_ps(x + k)));
#endif
  for (; k < n; ++k) x[k] = std::sqrt(x[k]);
}

// Four normals per quad for quads quad0 .. quad0 + nq - 1 into z[0 .. 4 nq):
// z[4 j + k] is philox_normal4(seed, step, pid, quad0 + j)[k] up to rounding.
inline void normal_block(uint64_t seed, uint64_t step, uint32_t pid, uint64_t quad0, float* z,
                         int nq = kBlockQuads) {
  alignas(16) uint32_t x[4][kBlockQuads];
  alignas(16) float r[2][kBlockQuads];
  philox_block(seed, step, pid, quad0, x, nq);
#pragma omp simd
  for (int j = 0; j < nq; ++j) {
    r[0][j] = minus_two_log(block_uniform(x[0][j]));
    r[1][j] = minus_two_log(block_uniform(x[2][j]));
  }
  sqrt_inplace(r[0], nq);
  sqrt_inplace(r[1], nq);
#pragma omp simd
  for (int j = 0; j < nq; ++j) {
    float c1, s1, c3, s3;
    sincos_2pi(block_uniform(x[1][j]), &c1, &s1);
    sincos_2pi(block_uniform(x[3][j]), &c3, &s3);
    z[4 * j + 0] = r[0][j] * c1;
    z[4 * j + 1] = r[0][j] * s1;
    z[4 * j + 2] = r[1][j] * c3;
    z[4 * j + 3] = r[1][j] * s3;
  }
}

// Uniforms philox_uniform(word) of quads quad0 .. quad0 + nq - 1: u[4 j + k] exact.
inline void uniform_block(uint64_t seed, uint64_t step, uint32_t pid, uint64_t quad0, float* u,
                          int nq = kBlockQuads) {
  alignas(16) uint32_t x[4][kBlockQuads];
  philox_block(seed, step, pid, quad0, x, nq);
#pragma omp simd
  for (int j = 0; j < nq; ++j) {
    u[4 * j + 0] = block_uniform(x[0][j]);
    u[4 * j + 1] = block_uniform(x[1][j]);
    u[4 * j + 2] = block_uniform(x[2][j]);
    u[4 * j + 3] = block_uniform(x[3][j]);
  }
}

// Double overload of sqrt_inplace, so callers templated on opmath_t need no branch.
inline void sqrt_inplace(double* x, int n) {
  for (int k = 0; k < n; ++k) x[k] = std::sqrt(x[k]);
}

// A tensor's Philox key from its 64-bit param id (docs/spec.md "Noise"): the parameter word (low
// 32 bits) and the tensor's first block in its parameter's stream (high 32 bits: a shard that
// starts at element 4 * first).  Block counters wrap at 2^32, as philox.h's words do.
struct NoiseKey {
  uint32_t pid;
  uint64_t first;
  explicit NoiseKey(int64_t param_id)
      : pid(static_cast<uint32_t>(param_id)), first(static_cast<uint64_t>(param_id) >> 32) {}
};

// Which numbers of an element's Philox word a run hands out: its standard normal (Box-Muller of
// its quad) or its uniform (E-BiSAM's mask).
enum class Draw { kNormal, kUniform };

// The numbers `D` of elements [begin, end) of the tensor keyed `key` (begin a multiple of 4),
// handed out in runs: f(q, len, x) with x[k] the number of element q + k, k < len.  fp32 opmath
// takes the vectorized blocks above (runs of kBlockElems); double keeps philox_normal4's /
// philox_uniform4's exact path (runs of one quad).  The one loop every CPU noise kernel uses.
template <typename T, Draw D, typename F>
inline void for_each_run(uint64_t seed, uint64_t step, NoiseKey key, int64_t begin, int64_t end,
                         F&& f) {
  if constexpr (std::is_same<T, float>::value) {
    alignas(16) float x[kBlockElems];
    for (int64_t q = begin; q < end; q += kBlockElems) {
      const uint64_t quad = key.first + static_cast<uint64_t>(q >> 2);
      if constexpr (D == Draw::kNormal)
        normal_block(seed, step, key.pid, quad, x, block_quads(end - q));
      else
        uniform_block(seed, step, key.pid, quad, x, block_quads(end - q));
      f(q, static_cast<int>(std::min<int64_t>(end - q, kBlockElems)), static_cast<const T*>(x));
    }
  } else {
    for (int64_t q = begin; q < end; q += 4) {
      const uint64_t quad = key.first + static_cast<uint64_t>(q >> 2);
      T x[4];
      if constexpr (D == Draw::kNormal)
        philox_normal4<T>(seed, step, key.pid, quad, x);
      else
        philox_uniform4<T>(seed, step, key.pid, quad, x);
      f(q, static_cast<int>(std::min<int64_t>(end - q, 4)), static_cast<const T*>(x));
    }
  }
}

// f(i, z) for every element i of the chunk view `v` (cpu/multi_tensor.h), z its normal of
// (seed, step, the id of parameter v.tensor): the noise phases' z, regenerated by the gradient
// phases of the same (seed, step).
template <typename V, class F>
inline void for_each_normal(const V& v, int64_t seed, int64_t step, at::IntArrayRef param_ids,
                            F&& f) {
  using opmath_t = typename V::opmath_t;
  for_each_run<opmath_t, Draw::kNormal>(static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                                        NoiseKey(param_ids[v.tensor]), v.begin, v.end,
                                        [&](int64_t q, int len, const opmath_t* z) {
                                          for (int k = 0; k < len; ++k) f(q + k, z[k]);
                                        });
}

// The noise phases (bsam_noise_, vi_noise_, ivon_noise_) on one chunk view `v`: list 1 (backups)
// <- list 0 (params), then w <- maths(w, state, z); list 2 is the state the maths reads
// (precisions, variances, hessians), 0 where that list is absent.
template <typename V, typename Maths>
inline void noise_chunk(const V& v, const Maths& maths, int64_t seed, int64_t step,
                        at::IntArrayRef param_ids) {
  using scalar_t = typename V::scalar_t;
  using opmath_t = typename V::opmath_t;
  scalar_t* wp = v.param(0);
  scalar_t* bp = v.param(1);
  const opmath_t* sp = v.state(2);
  for_each_normal(v, seed, step, param_ids, [&](int64_t i, opmath_t z) {
    const opmath_t w = static_cast<opmath_t>(wp[i]);
    bp[i] = wp[i];
    const opmath_t s = sp ? sp[i] : opmath_t(0);
    wp[i] = static_cast<scalar_t>(maths(w, s, z));
  });
}

// A noise phase's CPU kernel: `lists` as noise_chunk reads them, z keyed by (seed, step, param
// id, element); the maths of each dtype is Maths<opmath_t>::make(args...).
template <template <typename> class Maths, class... Args>
void noise_phase(const char* op, std::vector<ListArg> lists, at::IntArrayRef param_ids,
                 int64_t seed, int64_t step, const c10::optional<at::Tensor>& device_step,
                 const Args&... args) {
  PhaseLists pl(op, std::move(lists), c10::nullopt, param_ids, /*takes_ids=*/true);
  step = at_step(op, step, device_step, pl.base());
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    noise_chunk(v, Maths<opmath_t>::make(args...), seed, step, param_ids);
  });
  pl.finish();
}

}  // namespace cpu
}  // namespace samkernels
