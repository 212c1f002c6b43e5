// Per-element maths of the SAM-variant phases (GSAM, WSAM, LookSAM, FriendlySAM; docs/spec.md
// "SAM variants"; rows in samkernels/ops/reference.py), shared by the CPU kernels (ops/samv.cpp)
// and the CUDA functors (cuda/samv.cu).  The restores reuse math/sam.h's base steps with the
// mixed direction d = c0 g + c1 s.
#pragma once
#include <cstdint>

#include "math/common.h"
#include "math/sam.h"

namespace samkernels {
namespace math {

// samv_perturb_: u = g (and s <- g), or FriendlySAM's u = g - sigma m, m <- lmbda m + (1-lmbda) g
// (first step: u = g, m <- g); w <- w + rho T^2 u / (norm + eps), T = |w| + eta or 1.
template <typename M>
struct SamvPerturb {
  SamPerturb<M> ascent;  // SAM's (ASAM's) step along u: math/sam.h
  M sigma, lmbda, one_minus_lmbda;
  bool first;

  static SamvPerturb make(double rho, double eps, bool adaptive, double eta, double sigma,
                          double lmbda, bool first) {
    return {SamPerturb<M>::make(rho, eps, adaptive, eta), static_cast<M>(sigma),
            static_cast<M>(lmbda), static_cast<M>(1.0 - lmbda), first};
  }
  SK_HD M scale(double norm) const { return ascent.scale(norm); }
  // FriendlySAM's direction u from g and the momentum m (updated in place)
  SK_HD M friendly(M g, M& m) const {
    if (first) {
      m = g;
      return g;
    }
    const M u = g - sigma * m;
    m = lmbda * m + one_minus_lmbda * g;
    return u;
  }
  SK_HD M operator()(M w, M u, M scale) const { return ascent(w, u, scale); }
};

// The coefficients of samv_restore_{sgd,adam}_: d = c0 g + c1 s (the base step's direction),
// w += c2 g + c3 s after it, out = c4 g + c5 s; each rounded to M from the float64 tensor.
template <typename M>
struct SamvMix {
  M c[6];

  SK_HD static SamvMix make(const double* coeffs) {
    SamvMix m;
    for (int j = 0; j < 6; ++j) m.c[j] = static_cast<M>(coeffs[j]);
    return m;
  }
  SK_HD M operator()(int j, M g, M s) const { return c[j] * g + c[j + 1] * s; }
};

// samv_dots: the float64 terms (u u, u b, b b), u = a - shift b.
SK_HD void samv_dot_terms(double a, double b, double shift, double& uu, double& ub, double& bb) {
  const double u = shift != 0.0 ? a - shift * b : a;
  uu = u * u;
  ub = u * b;
  bb = b * b;
}

}  // namespace math
}  // namespace samkernels
