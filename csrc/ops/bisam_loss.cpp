// BiSAM ascent loss Q (paper eq. 11/14, docs/spec.md "BiSAM"), forward and gradient fused: the
// CPU kernels and, in CUDA builds, the glue to the kernel of cuda/bisam_loss.cu.
//
//   z_j = mu * phi(F_j),  F_j = f_j - f_y          (F_y = 0, phi(0) = 0)
//   loss_row = (1/mu) * logsumexp_j(z_j) - log(K)/mu
//   p = softmax(z);  g_k = p_k phi'(F_k) (k != y);  g_y = -sum_{j != y} p_j phi'(F_j)
//
// phi: 0 = neglog, eq. 18: phi(x) = 1 - softplus(gamma - x), gamma = log(e - 1);
//      1 = tanh,   eq. 17: phi(x) = tanh(alpha x).
// One row at a time, in cache: pass 1 evaluates z and phi' into scratch (and takes the max when mu
// is too large for a fixed shift), pass 2 exponentiates and sums, pass 3 writes the gradient (times
// grad_scale).  Rows of at most 32 classes go a block of rows at a time instead (bisam_rows_flat).
// Ops: bisam_loss_fwd (per-row loss + gradient buffer; the one op with a CUDA kernel),
// bisam_loss_fwd_reduced (label check, count, rows and reduction in one call) and bisam_loss (the
// same with its autograd in C++: the eager CPU path of samkernels.bisam_loss).  Semantics:
// samkernels/ops/bisam_loss.py (bisam_loss_reference).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "math/bisam_loss.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#ifdef SAMKERNELS_WITH_CUDA
#include "cuda/bisam_loss.h"
#include "cuda/glue.h"  // light c10 headers only
#endif

namespace samkernels {
namespace {

// Argument checks of samkernels::bisam_loss_fwd made by its CPU kernel and its CUDA glue, so both
// backends reject the same inputs with the same messages.
void check_bisam_loss_args(const at::Tensor& logits, const at::Tensor& target, double mu,
                           int64_t phi) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "bisam_loss: logits must be 2-D (batch, classes), got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(0),
                    "bisam_loss: target must be 1-D with logits.size(0) = ", logits.size(0),
                    " entries, got shape ", target.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "bisam_loss: target must be int64, got ",
                   target.scalar_type());
  const auto dt = logits.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   "bisam_loss: logits must be float32/float64/float16/bfloat16, got ", dt);
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "bisam_loss: logits need at least one class");
  TORCH_CHECK_VALUE(mu > 0 && std::isfinite(mu), "bisam_loss: mu must be positive and finite, got ",
                    mu);
  TORCH_CHECK_VALUE(phi == 0 || phi == 1,  // 0: neglog, 1: tanh
                    "bisam_loss: phi code must be 0 (neglog) or 1 (tanh), got ", phi);
}

}  // namespace
}  // namespace samkernels

namespace {

using samkernels::math::kFixedShiftMaxMuF32;
using samkernels::math::kFixedShiftMaxMuF64;
using samkernels::math::kPhiNegLog;
using samkernels::math::kPhiTanh;

// Inlined into each target clone below, so every clone vectorises the row loops for its ISA.
#if defined(__GNUC__)
#define SK_INLINE inline __attribute__((always_inline))
#else
#define SK_INLINE inline
#endif

// --- float maths the compiler can vectorise (std::exp/log1p calls block it without -ffast-math)
SK_INLINE float abs_(float x) { return __builtin_fabsf(x); }
SK_INLINE double abs_(double x) { return __builtin_fabs(x); }
SK_INLINE float bits_to_float(int32_t i) { float f; std::memcpy(&f, &i, 4); return f; }

// exp(x) for x <= 88 (our arguments are <= 0, or <= mu <= 50 with the fixed shift), Cephes
// polynomial, ~1 ulp; 0 below -87.
SK_INLINE float exp_neg(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  // round(x / ln2) with the 1.5 * 2^23 trick: no floorf call, so the loop stays vectorisable
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float scaled = y * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : scaled;
}

// log(1 + u) for u in [0, 1]: 2 atanh(t), t = u / (2 + u) <= 1/3, odd series to t^13 (< 2e-8 rel.)
SK_INLINE float log1p_unit(float u) {
  const float t = u / (2.0f + u);
  const float t2 = t * t;
  float p = 1.0f / 13.0f;
  p = p * t2 + 1.0f / 11.0f;
  p = p * t2 + 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  p = p * t2 + 1.0f;
  return 2.0f * t * p;
}

inline double exp_neg(double x) { return std::exp(x); }
inline double log1p_unit(double u) { return std::log1p(u); }

// The CPU's functions for math/bisam_loss.h's phi_eval: the vectorisable polynomials above for
// float, libm for double.
struct CpuFn {
  SK_INLINE static float abs(float x) { return abs_(x); }
  SK_INLINE static double abs(double x) { return abs_(x); }
  SK_INLINE static float exp(float x) { return exp_neg(x); }
  SK_INLINE static double exp(double x) { return exp_neg(x); }
  SK_INLINE static float log1p(float x) { return log1p_unit(x); }
  SK_INLINE static double log1p(double x) { return log1p_unit(x); }
};

template <typename acc_t, int64_t PHI>
SK_INLINE void phi_eval(acc_t F, acc_t alpha, acc_t& phi, acc_t& dphi) {
  samkernels::math::phi_eval<CpuFn, acc_t, PHI>(F, alpha, phi, dphi);
}

// Largest mu whose sums need no running max (as in the Triton kernel): math/bisam_loss.h's
// kFixedShiftMaxMu*.  Terms that underflow are < 1e-38 of s, so no precision is lost either.
// Rows of at most kFlatMaxK classes go a block of rows at a time (bisam_block); kFlatBlock is
// the elements per block (four scratch arrays of it stay in L1/L2).
constexpr int64_t kFlatMaxK = 32;
constexpr int64_t kFlatBlock = 2048;

// One row.  x: the row (K values, upcast); z, d: scratch (K each); g: gradient out or nullptr
// (may alias x: x is no longer read when g is written).  Returns the row's loss.
// Pass 1 evaluates z = mu phi and phi' into scratch (and, unless FIXED, takes the max m of z),
// pass 2 exponentiates z - m and sums, pass 3 writes the gradient.  FIXED (mu at most
// kFixedShiftMaxMu*): m = 0, no max.  (Fusing passes 1 and 2 runs out of vector registers: slower.)
template <typename acc_t, int64_t PHI, bool FIXED>
SK_INLINE acc_t bisam_row(const acc_t* x, int64_t K, int64_t y, acc_t mu, acc_t alpha, acc_t log_k,
                          acc_t* __restrict z, acc_t* __restrict d, acc_t* g, acc_t grad_scale) {
  const acc_t xy = x[y];
  acc_t m = 0, s = 0;
  if constexpr (FIXED) {
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) {
      acc_t ph, dp;
      phi_eval<acc_t, PHI>(x[j] - xy, alpha, ph, dp);
      z[j] = mu * ph;  // <= mu <= 50 (float): in exp_neg's range
      d[j] = dp;
    }
  } else {
    m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < K; ++j) {
      acc_t ph, dp;
      phi_eval<acc_t, PHI>(x[j] - xy, alpha, ph, dp);
      z[j] = mu * ph;
      d[j] = dp;
      m = z[j] > m ? z[j] : m;
    }
    // m >= z_y = mu phi(0) = 0, so z - m <= 0 and exp never overflows
  }
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < K; ++j) {
    const acc_t e = exp_neg(z[j] - m);
    z[j] = e;
    s += e;
  }
  if (g != nullptr) {
    // The target's own phi' is zeroed so that s1 sums j != y only (subtracting it afterwards
    // would cancel catastrophically).
    d[y] = acc_t(0);
    const acc_t c = grad_scale / s;
    acc_t s1 = 0;
#pragma omp simd reduction(+ : s1)
    for (int64_t j = 0; j < K; ++j) {
      const acc_t p = z[j] * d[j];
      s1 += p;
      g[j] = p * c;
    }
    g[y] = -s1 * c;  // dQ/df_y = -sum_{j != y} p_j phi'(F_j)
  }
  return (m + std::log(s) - log_k) / mu;
}

// Short rows (K <= kFlatMaxK), fixed shift: phi, phi' and e^{mu phi} of a block of rows in loops
// over all its n elements (xy holds each row's f_y repeated K times), so the SIMD lanes stay full
// instead of paying a vector loop's set-up and tail per short row; the per-row sums and the
// gradient follow in bisam_rows_flat.
template <typename acc_t, int64_t PHI>
SK_INLINE void bisam_block(const acc_t* x, const acc_t* xy, int64_t n, acc_t mu, acc_t alpha,
                           acc_t* __restrict e, acc_t* __restrict d) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    acc_t ph, dp;
    phi_eval<acc_t, PHI>(x[j] - xy[j], alpha, ph, dp);
    e[j] = mu * ph;
    d[j] = dp;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) e[j] = exp_neg(e[j]);
}

// float rows get AVX2/AVX-512 clones picked at load time (setup.py compiles for the x86-64 base).
// no-trapping-math: with the default, GCC will not if-convert the selects above (it treats float
// ops as trapping once they sit under a condition) and leaves pass 1 scalar.  No trap is ever
// enabled, so the results are the same; everything the clones call is always_inline, since a
// function with other optimisation flags would not be inlined into them.
// (-DSAMKERNELS_NO_MULTIVERSION keeps only the baseline build, e.g. to test it on an AVX2 host.)
#if defined(__GNUC__) && !defined(__clang__)
#if __GNUC__ >= 11 && defined(__x86_64__) && !defined(SAMKERNELS_NO_MULTIVERSION)
#define SK_MULTIVERSION                                                                   \
  __attribute__((optimize("no-trapping-math"),                                            \
                 target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SK_MULTIVERSION __attribute__((optimize("no-trapping-math")))
#endif
#else
#define SK_MULTIVERSION
#endif

template <typename acc_t, bool FIXED>
SK_INLINE acc_t row_phi(const acc_t* x, int64_t K, int64_t y, acc_t mu, acc_t alpha, acc_t log_k,
                        int64_t phi, acc_t* z, acc_t* d, acc_t* g, acc_t grad_scale) {
  return phi == kPhiTanh
             ? bisam_row<acc_t, kPhiTanh, FIXED>(x, K, y, mu, alpha, log_k, z, d, g, grad_scale)
             : bisam_row<acc_t, kPhiNegLog, FIXED>(x, K, y, mu, alpha, log_k, z, d, g, grad_scale);
}

SK_MULTIVERSION float bisam_row_f32(const float* x, int64_t K, int64_t y, float mu, float alpha,
                                    float log_k, int64_t phi, bool fixed, float* z, float* d,
                                    float* g, float grad_scale) {
  return fixed ? row_phi<float, true>(x, K, y, mu, alpha, log_k, phi, z, d, g, grad_scale)
               : row_phi<float, false>(x, K, y, mu, alpha, log_k, phi, z, d, g, grad_scale);
}

double bisam_row_f64(const double* x, int64_t K, int64_t y, double mu, double alpha, double log_k,
                     int64_t phi, bool fixed, double* z, double* d, double* g, double grad_scale) {
  return fixed ? row_phi<double, true>(x, K, y, mu, alpha, log_k, phi, z, d, g, grad_scale)
               : row_phi<double, false>(x, K, y, mu, alpha, log_k, phi, z, d, g, grad_scale);
}

SK_MULTIVERSION void bisam_block_f32(const float* x, const float* xy, int64_t n, float mu,
                                     float alpha, int64_t phi, float* e, float* d) {
  if (phi == kPhiTanh) {
    bisam_block<float, kPhiTanh>(x, xy, n, mu, alpha, e, d);
  } else {
    bisam_block<float, kPhiNegLog>(x, xy, n, mu, alpha, e, d);
  }
}

void bisam_block_f64(const double* x, const double* xy, int64_t n, double mu, double alpha,
                     int64_t phi, double* e, double* d) {
  if (phi == kPhiTanh) {
    bisam_block<double, kPhiTanh>(x, xy, n, mu, alpha, e, d);
  } else {
    bisam_block<double, kPhiNegLog>(x, xy, n, mu, alpha, e, d);
  }
}

// A row labelled ignore_index, like F.cross_entropy, contributes 0 and gets a zero gradient row
// (grow, K entries, when the gradient is wanted): true after writing both.
template <typename scalar_t, typename acc_t>
inline bool ignored_row(int64_t y, int64_t ignore_index, acc_t& loss, scalar_t* grow, int64_t K) {
  if (y != ignore_index) return false;
  loss = acc_t(0);
  if (grow != nullptr) std::fill(grow, grow + K, scalar_t(0));
  return true;
}

// Rows [begin, end) of short rows, a block at a time (fixed shift only).
template <typename scalar_t, typename acc_t>
void bisam_rows_flat(const scalar_t* base, int64_t row_stride, const int64_t* target, acc_t* loss,
                     scalar_t* gbase, int64_t K, acc_t mu, acc_t alpha, acc_t log_k, int64_t phi,
                     int64_t ignore_index, acc_t grad_scale, int64_t begin, int64_t end) {
  constexpr bool kDirect = std::is_same<scalar_t, acc_t>::value;
  const int64_t rows_per_block = std::max<int64_t>(1, kFlatBlock / K);
  const int64_t cap = rows_per_block * K;
  std::vector<acc_t> scratch(4 * cap);
  acc_t* xb = scratch.data();  // the block's logits when they need a cast or are strided
  acc_t* xy = xb + cap;
  acc_t* e = xy + cap;
  acc_t* d = e + cap;
  for (int64_t b0 = begin; b0 < end; b0 += rows_per_block) {
    const int64_t b1 = std::min(end, b0 + rows_per_block), n = (b1 - b0) * K;
    const acc_t* x = xb;
    bool copied = true;
    if constexpr (kDirect) {
      if (row_stride == K) {
        x = base + b0 * K;
        copied = false;
      }
    }
    if (copied) {
      for (int64_t i = b0; i < b1; ++i) {
        const scalar_t* row = base + i * row_stride;
        acc_t* dst = xb + (i - b0) * K;
        for (int64_t j = 0; j < K; ++j) dst[j] = static_cast<acc_t>(row[j]);
      }
    }
    for (int64_t i = b0; i < b1; ++i) {
      const int64_t y = target[i];
      const acc_t* xr = x + (i - b0) * K;
      const acc_t v = y == ignore_index ? acc_t(0) : xr[y];  // ignored rows: computed, not used
      std::fill(xy + (i - b0) * K, xy + (i - b0 + 1) * K, v);
    }
    if constexpr (std::is_same<acc_t, double>::value) {
      bisam_block_f64(x, xy, n, mu, alpha, phi, e, d);
    } else {
      bisam_block_f32(x, xy, n, mu, alpha, phi, e, d);
    }
    for (int64_t i = b0; i < b1; ++i) {
      const int64_t y = target[i];
      scalar_t* grow = gbase != nullptr ? gbase + i * K : nullptr;
      if (ignored_row(y, ignore_index, loss[i], grow, K)) continue;
      const acc_t* er = e + (i - b0) * K;
      acc_t* dr = d + (i - b0) * K;
      acc_t s = 0;
      for (int64_t j = 0; j < K; ++j) s += er[j];
      loss[i] = (std::log(s) - log_k) / mu;
      if (grow != nullptr) {
        dr[y] = acc_t(0);  // s1 sums j != y only (see bisam_row)
        const acc_t c = grad_scale / s;
        acc_t s1 = 0;
        for (int64_t j = 0; j < K; ++j) {
          const acc_t p = er[j] * dr[j];
          s1 += p;
          grow[j] = static_cast<scalar_t>(p * c);
        }
        grow[y] = static_cast<scalar_t>(-s1 * c);
      }
    }
  }
}

template <typename scalar_t>
void bisam_rows(const at::Tensor& logits, const int64_t* target, at::Tensor& loss_rows,
                at::Tensor* grad, double mu, int64_t phi, double alpha, int64_t ignore_index,
                double grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;  // float for fp16/bf16/fp32, double for fp64
  constexpr bool kDirect = std::is_same<scalar_t, acc_t>::value;  // no up/down-cast copy needed
  constexpr bool kDouble = std::is_same<acc_t, double>::value;
  const int64_t B = logits.size(0), K = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  acc_t* loss = loss_rows.mutable_data_ptr<acc_t>();
  scalar_t* gbase = grad != nullptr ? grad->mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 32768 / K);
  const double log_k = std::log(static_cast<double>(K));  // once per call, not per row
  const bool fixed = mu <= (kDouble ? kFixedShiftMaxMuF64 : kFixedShiftMaxMuF32);
  if (fixed && K <= kFlatMaxK) {
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      bisam_rows_flat<scalar_t, acc_t>(base, row_stride, target, loss, gbase, K,
                                       static_cast<acc_t>(mu), static_cast<acc_t>(alpha),
                                       static_cast<acc_t>(log_k), phi, ignore_index,
                                       static_cast<acc_t>(grad_scale), begin, end);
    });
    return;
  }
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch((kDirect ? 2 : 3) * K);
    acc_t* z = scratch.data();
    acc_t* d = z + K;
    acc_t* xbuf = kDirect ? nullptr : d + K;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = target[i];
      scalar_t* grow = gbase != nullptr ? gbase + i * K : nullptr;
      if (ignored_row(y, ignore_index, loss[i], grow, K)) continue;
      const scalar_t* row = base + i * row_stride;
      const acc_t* x;
      acc_t* g;
      if constexpr (kDirect) {
        x = row;
        g = grow;
      } else {
        for (int64_t j = 0; j < K; ++j) xbuf[j] = static_cast<acc_t>(row[j]);
        x = xbuf;
        g = grow != nullptr ? xbuf : nullptr;
      }
      if constexpr (kDouble) {
        loss[i] = bisam_row_f64(x, K, y, mu, alpha, log_k, phi, fixed, z, d, g, grad_scale);
      } else {
        loss[i] = bisam_row_f32(x, K, y, static_cast<float>(mu), static_cast<float>(alpha),
                                static_cast<float>(log_k), phi, fixed, z, d, g,
                                static_cast<float>(grad_scale));
      }
      if constexpr (!kDirect) {
        if (grow != nullptr)
          for (int64_t j = 0; j < K; ++j) grow[j] = static_cast<scalar_t>(xbuf[j]);
      }
    }
  });
}

// Range check of every label before any work (a bad one never reads outside its row), and the
// number of rows that are not ignore_index (the mean's denominator).  c10::IndexError naming the
// first bad row: IndexError in Python, mapped to TargetOutOfRangeError by the wrapper.
int64_t check_targets(const int64_t* t, int64_t B, int64_t K, int64_t ignore_index) {
  int64_t count = 0;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t y = t[i];
    if (y == ignore_index) continue;
    TORCH_CHECK_INDEX(y >= 0 && y < K, "bisam_loss: target[", i, "] = ", y,
                      " is out of range for ", K, " classes (and is not ignore_index = ",
                      ignore_index, ")");
    ++count;
  }
  return count;
}

// Checks, strides and the label pass shared by both CPU ops.  Returns the valid-row count.
int64_t prepare_cpu(const at::Tensor& logits_in, const at::Tensor& target_in, double mu,
                    int64_t phi, int64_t ignore_index, at::Tensor& logits, at::Tensor& target) {
  samkernels::check_bisam_loss_args(logits_in, target_in, mu, phi);
  TORCH_CHECK(logits_in.device().is_cpu() && target_in.device().is_cpu(),
              "bisam_loss (CPU kernel): logits and target must be CPU tensors");
  logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  target = target_in.is_contiguous() ? target_in : target_in.contiguous();
  return check_targets(target.const_data_ptr<int64_t>(), logits.size(0), logits.size(1),
                       ignore_index);
}

// (per-row loss in the accumulation dtype, gradient (B, K) contiguous or an empty tensor)
std::tuple<at::Tensor, at::Tensor> run_rows(const at::Tensor& logits, const at::Tensor& target,
                                            double mu, int64_t phi, double alpha,
                                            int64_t ignore_index, double grad_scale,
                                            bool compute_grad) {
  const auto dt = logits.scalar_type();
  const int64_t B = logits.size(0), K = logits.size(1);
  at::Tensor loss_rows =
      at::empty({B}, logits.options().dtype(dt == at::kDouble ? at::kDouble : at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({B, K}, logits.options().memory_format(
                                                         at::MemoryFormat::Contiguous))
                                 : at::empty({0}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "bisam_loss_cpu", [&] {
    bisam_rows<scalar_t>(logits, target.const_data_ptr<int64_t>(), loss_rows,
                         compute_grad ? &grad : nullptr, mu, phi, alpha, ignore_index, grad_scale);
  });
  return {loss_rows, grad};
}

std::tuple<at::Tensor, at::Tensor> bisam_loss_fwd_cpu(const at::Tensor& logits_in,
                                                      const at::Tensor& target_in, double mu,
                                                      int64_t phi, double alpha,
                                                      int64_t ignore_index, double grad_scale,
                                                      bool compute_grad) {
  at::Tensor logits, target;
  prepare_cpu(logits_in, target_in, mu, phi, ignore_index, logits, target);
  return run_rows(logits, target, mu, phi, alpha, ignore_index, grad_scale, compute_grad);
}

// --- the whole loss in one call: label check + count + rows + reduction (eager CPU fast path) ---
constexpr int64_t kReduceNone = 0;  // reduction codes of bisam_loss / bisam_loss_fwd_reduced
constexpr int64_t kReduceMean = 1;
constexpr int64_t kReduceSum = 2;

std::tuple<at::Tensor, at::Tensor> bisam_loss_fwd_reduced_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, double mu, int64_t phi,
    double alpha, int64_t reduction, int64_t ignore_index, bool compute_grad) {
  TORCH_CHECK_VALUE(reduction == kReduceNone || reduction == kReduceMean ||
                        reduction == kReduceSum,
                    "bisam_loss: reduction code must be 0 (none), 1 (mean) or 2 (sum), got ",
                    reduction);
  at::Tensor logits, target;
  const int64_t count = prepare_cpu(logits_in, target_in, mu, phi, ignore_index, logits, target);
  // the mean's 1/count goes into the gradient (no rows: a zero gradient, as F.cross_entropy)
  const double grad_scale =
      reduction == kReduceMean ? 1.0 / static_cast<double>(std::max<int64_t>(count, 1)) : 1.0;
  auto [rows, grad] = run_rows(logits, target, mu, phi, alpha, ignore_index, grad_scale,
                               compute_grad);
  const auto dt = logits.scalar_type();
  if (reduction == kReduceNone) return {rows.scalar_type() == dt ? rows : rows.to(dt), grad};
  at::Tensor out = at::empty({}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "bisam_loss_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* r = rows.const_data_ptr<acc_t>();
    double total = 0;  // in order, in double: deterministic and exact enough for any B
    for (int64_t i = 0; i < rows.numel(); ++i) total += static_cast<double>(r[i]);
    // mean: 0/0 = NaN when every row is ignored, like F.cross_entropy
    if (reduction == kReduceMean) total /= static_cast<double>(count);
    *out.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(static_cast<acc_t>(total));
  });
  return {out, grad};
}

std::tuple<at::Tensor, at::Tensor> call_fwd_reduced(const at::Tensor& logits,
                                                    const at::Tensor& target, double mu,
                                                    int64_t phi, double alpha, int64_t reduction,
                                                    int64_t ignore_index, bool compute_grad) {
  // through the dispatcher, so FakeTensor/meta tracing reaches the fake registered in Python
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("samkernels::bisam_loss_fwd_reduced", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double,
                                                    int64_t, double, int64_t, int64_t, bool)>();
  return op.call(logits, target, mu, phi, alpha, reduction, ignore_index, compute_grad);
}

// Autograd of samkernels::bisam_loss in C++ (no Python on the forward or the backward path).
// forward saves the kernel's gradient buffer (1/count folded in for the mean); backward returns it
// as is for a grad_output of 1 (loss.backward()), else scales a copy (retain_graph safe).
struct BiSAMLossFunction : public torch::autograd::Function<BiSAMLossFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& target, double mu, int64_t phi, double alpha,
                            int64_t reduction, int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad] =
        call_fwd_reduced(logits, target, mu, phi, alpha, reduction, ignore_index, true);
    ctx->save_for_backward({grad});
    return loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const at::Tensor grad = ctx->get_saved_variables()[0];
    const at::Tensor& go = grad_outputs[0];
    at::Tensor g;
    if (go.dim() == 1) {  // reduction "none": one grad_output per row
      g = grad * go.unsqueeze(1);
    } else if (go.device().is_cpu() && !go.requires_grad() &&
               !go.key_set().has(c10::DispatchKey::Python) && go.item<double>() == 1.0) {
      g = grad;  // the common loss.backward(): the kernel's buffer is already the answer
    } else {
      g = grad * go;
    }
    return {g, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor bisam_loss_autograd(const at::Tensor& logits, const at::Tensor& target, double mu,
                               int64_t phi, double alpha, int64_t reduction,
                               int64_t ignore_index) {
  if (at::GradMode::is_enabled() && logits.requires_grad()) {
    return BiSAMLossFunction::apply(logits, target, mu, phi, alpha, reduction, ignore_index);
  }
  at::AutoDispatchBelowADInplaceOrView guard;  // no autograd: the kernel skips the gradient
  return std::get<0>(
      call_fwd_reduced(logits, target, mu, phi, alpha, reduction, ignore_index, false));
}

at::Tensor bisam_loss_cpu(const at::Tensor& logits, const at::Tensor& target, double mu,
                          int64_t phi, double alpha, int64_t reduction, int64_t ignore_index) {
  return std::get<0>(
      bisam_loss_fwd_reduced_cpu(logits, target, mu, phi, alpha, reduction, ignore_index, false));
}

}  // namespace

TORCH_LIBRARY_IMPL(samkernels, CPU, m) {
  m.impl("bisam_loss_fwd", &bisam_loss_fwd_cpu);
  m.impl("bisam_loss_fwd_reduced", &bisam_loss_fwd_reduced_cpu);
  m.impl("bisam_loss", &bisam_loss_cpu);
}

TORCH_LIBRARY_IMPL(samkernels, Autograd, m) { m.impl("bisam_loss", &bisam_loss_autograd); }

#ifdef SAMKERNELS_WITH_CUDA
// The CUDA implementation of bisam_loss_fwd: checks the arguments and calls the torch-free launcher
// of cuda/bisam_loss.h on the current stream.  Labels are not range-checked here (that would be a
// host sync): the kernel writes NaN for a bad row without reading outside it, and the Python
// wrapper asserts asynchronously.
namespace samkernels {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> bisam_loss_fwd_cuda(const at::Tensor& logits_in,
                                                       const at::Tensor& target_in, double mu,
                                                       int64_t phi, double alpha,
                                                       int64_t ignore_index, double grad_scale,
                                                       bool compute_grad) {
  check_bisam_loss_args(logits_in, target_in, mu, phi);
  TORCH_CHECK(logits_in.is_cuda() && target_in.device() == logits_in.device(),
              "bisam_loss (CUDA kernel): logits and target must be on the same CUDA device");
  const at::ScalarType st = logits_in.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   "bisam_loss: logits must be float32/float64/float16/bfloat16, got ", st);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t B = logits.size(0), K = logits.size(1);
  at::Tensor loss_rows = at::empty({B}, logits.options().dtype(opmath(st)));
  at::Tensor grad = compute_grad ? at::empty({B, K}, logits.options())
                                 : at::empty({0}, logits.options());
  if (B == 0) return {loss_rows, grad};

  BiSAMLossArgs args;
  args.dtype = param_type(st);
  args.logits = logits.const_data_ptr();
  args.row_stride = logits.stride(0);
  args.target = target.const_data_ptr<int64_t>();
  args.loss_rows = loss_rows.mutable_data_ptr();
  args.grad = compute_grad ? grad.mutable_data_ptr() : nullptr;
  args.B = B;
  args.K = K;
  args.mu = mu;
  args.alpha = alpha;
  args.grad_scale = grad_scale;
  args.ignore_index = ignore_index;
  args.phi = static_cast<int>(phi);
  SK_CHECK_LAUNCH(launch_bisam_loss_fwd(args, current_stream()));
  return {loss_rows, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("bisam_loss_fwd", &bisam_loss_fwd_cuda); }

}  // namespace cuda
}  // namespace samkernels
#endif  // SAMKERNELS_WITH_CUDA
