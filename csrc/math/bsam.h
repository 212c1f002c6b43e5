// Per-element maths of the bSAM phases (Algorithm 1 of Möllenhoff & Khan 2022; docs/spec.md
// "Bayesian SAM, bSAM" lines 1-7; rows in samkernels/ops/reference.py), shared by ops/bsam.cpp and
// cuda/bsam.cu.  Coefficients in opmath M, formed once by make(); 1 - beta and delta + gamma in
// double, then rounded.
#pragma once
#include "math/common.h"

namespace samkernels {
namespace math {

// Line 1: theta = omega + z / sqrt(N s), z a standard normal (philox.h).
template <typename M>
struct BsamNoise {
  M num_data;

  static BsamNoise make(double num_data) { return {static_cast<M>(num_data)}; }
  SK_HD M operator()(M omega, M s, M z) const { return omega + z / sk_sqrt(num_data * s); }
};

// Line 5: s <- beta2 s + (1 - beta2)(h + delta + gamma), h = sqrt(s)|g| (or its m-sharpness
// average).  Shared by bsam_perturb_ (in place) and bsam_update_ (deferred, from the accums).
template <typename M>
struct BsamPrecision {
  M beta2, one_minus_beta2, delta_gamma;

  SK_HD static M sharpness(M s, M g) { return sk_sqrt(s) * sk_abs(g); }
  SK_HD M operator()(M s, M h) const { return beta2 * s + one_minus_beta2 * (h + delta_gamma); }
};

template <typename M>
BsamPrecision<M> make_bsam_precision(double beta2, double delta, double gamma) {
  return {static_cast<M>(beta2), static_cast<M>(1.0 - beta2), static_cast<M>(delta + gamma)};
}

// Line 3: w <- omega + rho g / s (s from before line 5); then line 5 here, or h accumulated.
// accumulate: line 5 deferred to bsam_update_ (accum += h), else run here.
template <typename M>
struct BsamPerturb {
  M rho;
  BsamPrecision<M> line5;
  bool accumulate;

  static BsamPerturb make(double rho, double beta2, double delta, double gamma, bool accumulate) {
    return {static_cast<M>(rho), make_bsam_precision<M>(beta2, delta, gamma), accumulate};
  }
  SK_HD M operator()(M omega, M g, M s) const { return omega + rho * g / s; }
};

// Lines 5-7 with g_eps = the gradient at the perturbed point:
//   [accums] s <- line 5 with h = accum * accum_scale
//   gm <- beta1 gm + (1 - beta1)(g + delta omega);  w <- omega - lr gm / s
// (s from line 5, or the old s with released_order: the authors' JAX order).  accumulate: line 5
// runs here, from the accums.
template <typename M>
struct BsamUpdate {
  M lr, beta1, one_minus_beta1, delta, accum_scale;
  BsamPrecision<M> line5;
  bool released_order, accumulate;

  static BsamUpdate make(double lr, double beta1, double beta2, double delta, double gamma,
                         double accum_scale, bool released_order, bool accumulate) {
    return {static_cast<M>(lr), static_cast<M>(beta1), static_cast<M>(1.0 - beta1),
            static_cast<M>(delta), static_cast<M>(accum_scale),
            make_bsam_precision<M>(beta2, delta, gamma), released_order, accumulate};
  }
  SK_HD M precision(M s_old, M accum) const { return line5(s_old, accum * accum_scale); }
  SK_HD M momentum(M gm, M g, M omega) const {
    return beta1 * gm + one_minus_beta1 * (g + delta * omega);  // line 6
  }
  SK_HD M mean(M omega, M gm, M s_old, M s_new) const {
    return omega - lr * gm / (released_order ? s_old : s_new);  // line 7
  }
};

}  // namespace math
}  // namespace samkernels
