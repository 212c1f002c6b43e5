// The BiSAM ascent loss's per-class maths (paper eq. 11/14/17/18; docs/spec.md "BiSAM"), shared by
// the CPU kernel (ops/bisam_loss.cpp) and the CUDA kernel (cuda/bisam_loss.cu).  The two differ
// only in the exp / log1p they evaluate it with: the CPU's vectorisable polynomials or CUDA's
// libdevice, passed as `Fn` (static abs, exp, log1p of acc_t).
#pragma once
#include <cstdint>

#include "math/common.h"

namespace samkernels {
namespace math {

constexpr int64_t kPhiNegLog = 0;  // eq. 18
constexpr int64_t kPhiTanh = 1;    // eq. 17
constexpr double kGamma = 0.54132485461291810;  // log(e - 1): makes phi_neglog(0) = 0 (eq. 18)

// Largest mu whose softmax sums need no running max: both phi are <= 1, so z_j = mu phi(F_j) <= mu,
// and z_y = mu phi(0) = 0 puts e^0 = 1 in every sum, hence 1 <= s = sum_j e^{z_j} <= K e^mu:
// finite for K < 2^31 (float32: e^50 2^31 ~ 1e31; float64: e^500 2^31 ~ 3e226).
constexpr double kFixedShiftMaxMuF32 = 50.0;
constexpr double kFixedShiftMaxMuF64 = 500.0;

// phi and phi' at F = f_j - f_y, with exp of non-positive arguments only: finite for any |F|.
template <class Fn, typename acc_t, int64_t PHI>
SK_HD void phi_eval(acc_t F, acc_t alpha, acc_t& phi, acc_t& dphi) {
  if (PHI == kPhiNegLog) {
    // eq. 18: phi = 1 - softplus(v), v = gamma - F; phi' = sigmoid(v)
    const acc_t v = static_cast<acc_t>(kGamma) - F;
    const acc_t a = Fn::exp(-Fn::abs(v));
    phi = acc_t(1) - ((v > acc_t(0) ? v : acc_t(0)) + Fn::log1p(a));
    dphi = (v >= acc_t(0) ? acc_t(1) : a) / (acc_t(1) + a);
  } else {
    // eq. 17: tanh(t) = (1 - a)/(1 + a), a = exp(-2|t|); tanh'(t) = 4a/(1 + a)^2 (no 1 - tanh^2
    // cancellation)
    const acc_t t = alpha * F;
    const acc_t a = Fn::exp(acc_t(-2) * Fn::abs(t));
    const acc_t th = (acc_t(1) - a) / (acc_t(1) + a);
    phi = t < acc_t(0) ? -th : th;
    dphi = alpha * acc_t(4) * a / ((acc_t(1) + a) * (acc_t(1) + a));
  }
}

}  // namespace math
}  // namespace samkernels
