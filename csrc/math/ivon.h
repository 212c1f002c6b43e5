// Per-element maths of the IVON phases (Shen et al. 2024, "Variational Learning is Effective for
// Large Deep Networks", Alg. 1; docs/spec.md "IVON"; rows in samkernels/ops/reference.py), shared
// by ops/ivon.cpp and cuda/ivon.cu.  Coefficients in opmath M, formed once by make() in double
// (1 - beta, (1 - beta2)^2 / 2), then rounded.  Expression order is the reference's.
#pragma once
#include <cstdint>

#include "math/common.h"

namespace samkernels {
namespace math {

// sigma z = z / sqrt(lambda (h + delta)): the posterior's noise (q = N(m, 1 / (lambda (h +
// delta)))).  ivon_noise_ (line 2): theta = m + sigma z; the gradient phases regenerate it.
template <typename M>
struct IvonNoise {
  M ess, weight_decay;

  static IvonNoise make(double ess, double weight_decay) {
    return {static_cast<M>(ess), static_cast<M>(weight_decay)};
  }
  SK_HD M sigma_z(M h, M z) const { return z / sk_sqrt(ess * (h + weight_decay)); }
  SK_HD M operator()(M m, M h, M z) const { return m + sigma_z(h, z); }  // noise_chunk's maths
};

// Running mean over the samples of a step (Welford): avg + (x - avg) / count, count >= 2.
template <typename M>
SK_HD M ivon_running_mean(M avg, M x, M count) {
  return avg + (x - avg) / count;
}

// ivon_update_ (lines 4-8) with gbar, nxg the means over the step's samples:
//   gm <- beta1 gm + (1 - beta1) gbar
//   f = nxg (h + delta) lambda;  h <- beta2 h + (1 - beta2) f + (1 - beta2)^2 / 2 (h - f)^2 / (h + delta)
//   m <- m - lr clip((gm / bc + delta m) / (h + delta), -c, c)
template <typename M>
struct IvonUpdate {
  IvonNoise<M> noise;
  M lr, beta1, one_minus_beta1, beta2, one_minus_beta2, half_sq_one_minus_beta2, clip_radius,
      bias_correction, count;
  bool averaged;  // the running means of earlier samples are given (count >= 2)

  static IvonUpdate make(double lr, double ess, double weight_decay, double beta1, double beta2,
                         double clip_radius, double bias_correction, int64_t count,
                         bool averaged) {
    return {IvonNoise<M>::make(ess, weight_decay),
            static_cast<M>(lr),
            static_cast<M>(beta1),
            static_cast<M>(1.0 - beta1),
            static_cast<M>(beta2),
            static_cast<M>(1.0 - beta2),
            static_cast<M>(0.5 * (1.0 - beta2) * (1.0 - beta2)),
            static_cast<M>(clip_radius),
            static_cast<M>(bias_correction),
            static_cast<M>(count),
            averaged};
  }
  SK_HD M momentum(M gm, M gbar) const { return beta1 * gm + one_minus_beta1 * gbar; }
  SK_HD M hessian(M h, M nxg) const {
    const M hd = h + noise.weight_decay;
    const M f = nxg * hd * noise.ess;  // the reparameterised Hessian estimate, mean of g z / sigma
    const M d = h - f;
    return beta2 * h + one_minus_beta2 * f + half_sq_one_minus_beta2 * (d * d) / hd;
  }
  SK_HD M mean(M m, M gm, M h_new) const {
    const M u = (gm / bias_correction + noise.weight_decay * m) / (h_new + noise.weight_decay);
    // torch.clamp: NaN stays NaN
    const M c = u < -clip_radius ? -clip_radius : (u > clip_radius ? clip_radius : u);
    return m - lr * c;
  }
};

}  // namespace math
}  // namespace samkernels
