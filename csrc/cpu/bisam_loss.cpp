// BiSAM ascent loss Q (paper eq. 11/14, SPEC.md "BiSAM"), forward and gradient fused, CPU kernel.
//
//   z_j = mu * phi(F_j),  F_j = f_j - f_y          (F_y = 0, phi(0) = 0)
//   loss_row = (1/mu) * logsumexp_j(z_j) - log(K)/mu
//   p = softmax(z);  g_k = p_k phi'(F_k) (k != y);  g_y = -sum_{j != y} p_j phi'(F_j)
//
// phi: 0 = neglog, eq. 18: phi(x) = 1 - softplus(gamma - x), gamma = log(e - 1);
//      1 = tanh,   eq. 17: phi(x) = tanh(alpha x).
// One row at a time, in cache: pass 1 evaluates z and phi' into scratch and takes the max, pass 2
// exponentiates and sums, pass 3 writes the gradient (times grad_scale).  Semantics:
// samkernels/ops/bisam_loss.py (bisam_loss_reference).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bisam_loss_args.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kPhiNegLog = 0;
constexpr int64_t kPhiTanh = 1;
constexpr double kGamma = 0.54132485461291810;  // log(e - 1): makes phi_neglog(0) = 0 (eq. 18)

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

// exp(x) for x <= 0 (all our arguments are), Cephes polynomial, ~1 ulp; 0 below -87.
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

// phi and phi' at F, without overflow for any |F| (only exp of non-positive arguments).
template <typename acc_t, int64_t PHI>
SK_INLINE void phi_eval(acc_t F, acc_t alpha, acc_t& phi, acc_t& dphi) {
  if (PHI == kPhiNegLog) {
    // phi = 1 - softplus(v), v = gamma - F; phi' = sigmoid(v)
    const acc_t v = static_cast<acc_t>(kGamma) - F;
    const acc_t a = exp_neg(-abs_(v));
    phi = acc_t(1) - ((v > acc_t(0) ? v : acc_t(0)) + log1p_unit(a));
    dphi = (v >= acc_t(0) ? acc_t(1) : a) / (acc_t(1) + a);
  } else {
    // tanh(t) = (1 - a)/(1 + a), a = exp(-2|t|); tanh'(t) = 4a/(1 + a)^2 (no 1 - tanh^2
    // cancellation)
    const acc_t t = alpha * F;
    const acc_t a = exp_neg(acc_t(-2) * abs_(t));
    const acc_t th = (acc_t(1) - a) / (acc_t(1) + a);
    phi = t < acc_t(0) ? -th : th;
    dphi = alpha * acc_t(4) * a / ((acc_t(1) + a) * (acc_t(1) + a));
  }
}

// One row.  x: the row (K values, upcast); z, d: scratch (K each); g: gradient out or nullptr
// (may alias x: x is no longer read when g is written).  Returns the row's loss.
template <typename acc_t, int64_t PHI>
SK_INLINE acc_t bisam_row(const acc_t* x, int64_t K, int64_t y, acc_t mu, acc_t alpha,
                          acc_t* __restrict z, acc_t* __restrict d, acc_t* g, acc_t grad_scale) {
  const acc_t xy = x[y];
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < K; ++j) {
    acc_t ph, dp;
    phi_eval<acc_t, PHI>(x[j] - xy, alpha, ph, dp);
    z[j] = mu * ph;
    d[j] = dp;
    m = z[j] > m ? z[j] : m;
  }
  // m >= z_y = mu phi(0) ~ 0, so z - m <= 0 and exp never overflows.  The target's own phi' is
  // zeroed so that s1 sums j != y only (subtracting it afterwards would cancel catastrophically).
  d[y] = acc_t(0);
  acc_t s = 0, s1 = 0;
#pragma omp simd reduction(+ : s, s1)
  for (int64_t j = 0; j < K; ++j) {
    const acc_t e = exp_neg(z[j] - m);
    z[j] = e;
    s += e;
    s1 += e * d[j];
  }
  if (g != nullptr) {
    const acc_t c = grad_scale / s;
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) g[j] = z[j] * d[j] * c;
    g[y] = -s1 * c;  // dQ/df_y = -sum_{j != y} p_j phi'(F_j)
  }
  return (m + std::log(s) - std::log(static_cast<acc_t>(K))) / mu;
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

SK_MULTIVERSION float bisam_row_f32(const float* x, int64_t K, int64_t y, float mu, float alpha,
                                    int64_t phi, float* z, float* d, float* g, float grad_scale) {
  return phi == kPhiTanh ? bisam_row<float, kPhiTanh>(x, K, y, mu, alpha, z, d, g, grad_scale)
                         : bisam_row<float, kPhiNegLog>(x, K, y, mu, alpha, z, d, g, grad_scale);
}

double bisam_row_f64(const double* x, int64_t K, int64_t y, double mu, double alpha, int64_t phi,
                     double* z, double* d, double* g, double grad_scale) {
  return phi == kPhiTanh ? bisam_row<double, kPhiTanh>(x, K, y, mu, alpha, z, d, g, grad_scale)
                         : bisam_row<double, kPhiNegLog>(x, K, y, mu, alpha, z, d, g, grad_scale);
}

template <typename scalar_t>
void bisam_rows(const at::Tensor& logits, const int64_t* target, at::Tensor& loss_rows,
                at::Tensor* grad, double mu, int64_t phi, double alpha, int64_t ignore_index,
                double grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;  // float for fp16/bf16/fp32, double for fp64
  constexpr bool kDirect = std::is_same<scalar_t, acc_t>::value;  // no up/down-cast copy needed
  const int64_t B = logits.size(0), K = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  acc_t* loss = loss_rows.mutable_data_ptr<acc_t>();
  scalar_t* gbase = grad != nullptr ? grad->mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 32768 / K);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch((kDirect ? 2 : 3) * K);
    acc_t* z = scratch.data();
    acc_t* d = z + K;
    acc_t* xbuf = kDirect ? nullptr : d + K;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = target[i];
      scalar_t* grow = gbase != nullptr ? gbase + i * K : nullptr;
      if (y == ignore_index) {  // like F.cross_entropy: contributes 0, gradient 0
        loss[i] = acc_t(0);
        if (grow != nullptr) std::fill(grow, grow + K, scalar_t(0));
        continue;
      }
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
      if constexpr (std::is_same<acc_t, double>::value) {
        loss[i] = bisam_row_f64(x, K, y, mu, alpha, phi, z, d, g, grad_scale);
      } else {
        loss[i] = bisam_row_f32(x, K, y, static_cast<float>(mu), static_cast<float>(alpha), phi, z,
                                d, g, static_cast<float>(grad_scale));
      }
      if constexpr (!kDirect) {
        if (grow != nullptr)
          for (int64_t j = 0; j < K; ++j) grow[j] = static_cast<scalar_t>(xbuf[j]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bisam_loss_fwd_cpu(const at::Tensor& logits_in,
                                                      const at::Tensor& target_in, double mu,
                                                      int64_t phi, double alpha,
                                                      int64_t ignore_index, double grad_scale,
                                                      bool compute_grad) {
  samkernels::check_bisam_loss_args(logits_in, target_in, mu, phi);
  const auto dt = logits_in.scalar_type();
  TORCH_CHECK(logits_in.device().is_cpu() && target_in.device().is_cpu(),
              "bisam_loss (CPU kernel): logits and target must be CPU tensors");

  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t B = logits.size(0), K = logits.size(1);
  const int64_t* t = target.const_data_ptr<int64_t>();
  // Checked before any work so a bad label never reads outside its row.
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK_INDEX(t[i] == ignore_index || (t[i] >= 0 && t[i] < K), "bisam_loss: target[", i,
                      "] = ", t[i], " is out of range for ", K,
                      " classes (and is not ignore_index = ", ignore_index, ")");
  }

  at::Tensor loss_rows =
      at::empty({B}, logits.options().dtype(dt == at::kDouble ? at::kDouble : at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({B, K}, logits.options().memory_format(
                                                         at::MemoryFormat::Contiguous))
                                 : at::empty({0}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "bisam_loss_fwd_cpu", [&] {
    bisam_rows<scalar_t>(logits, t, loss_rows, compute_grad ? &grad : nullptr, mu, phi, alpha,
                         ignore_index, grad_scale);
  });
  return {loss_rows, grad};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(samkernels, m) {
  // loss_rows: per-row Q (float32, float64 for float64 logits; 0 for ignored rows);
  // grad: grad_scale * d loss_row / d logits in the logits' dtype, (B, K) contiguous, or an empty
  // tensor when compute_grad is false.  phi: 0 = neglog (eq. 18), 1 = tanh (eq. 17).
  m.def("bisam_loss_fwd(Tensor logits, Tensor target, float mu, int phi, float alpha, "
        "int ignore_index, float grad_scale, bool compute_grad) "
        "-> (Tensor loss_rows, Tensor grad)");
}

TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("bisam_loss_fwd", &bisam_loss_fwd_cpu); }
