// Per-element maths of the MFVI-family phases (Ujváry et al., "Rethinking SAM as Variational
// Inference"; docs/spec.md "MFVI family"; rows in samkernels/ops/reference.py), shared by
// ops/vi.cpp and cuda/vi.cu.  Coefficients in opmath M, formed once by make() in double.
#pragma once
#include <cmath>

#include "math/common.h"

namespace samkernels {
namespace math {

// vi_noise_ (RandomSAM Alg. 1 / MFVI Alg. 2 line 3): w <- mu + std z, std = sqrt(Sigma) (MFVI)
// or the fixed sigma (RandomSAM), z a standard normal (philox.h).
template <typename M>
struct ViNoise {
  M sigma;
  bool learned;

  static ViNoise make(double sigma, bool learned) { return {static_cast<M>(sigma), learned}; }
  SK_HD M operator()(M mu, M var, M z) const {
    const M sd = learned ? sk_sqrt(var) : sigma;
    return mu + sd * z;
  }
};

// mfvi_update_ (MFVI Alg. 2 lines 4-5), g taken at mu + sqrt(Sigma) z, z regenerated:
//   d = g + mu / (N prior_var)  [eq. 7: data gradient + KL/N, eq. 39];  [momenta] d = m buf + d
//   w <- mu - lr d
//   du = g z sqrt(Sigma) / 2 + (Sigma / prior_var - 1) / (2N);  Sigma <- Sigma exp(-var_lr du)
template <typename M>
struct MfviUpdate {
  M lr, neg_var_lr, momentum, n_prior, inv_prior, two_n;
  bool use_momentum;

  static MfviUpdate make(double lr, double var_lr, double momentum, double prior_var,
                         double num_data, bool use_momentum) {
    return {static_cast<M>(lr),        -static_cast<M>(var_lr),
            static_cast<M>(momentum),  static_cast<M>(num_data * prior_var),
            static_cast<M>(1.0 / prior_var), static_cast<M>(2.0 * num_data), use_momentum};
  }
  SK_HD M direction(M mu, M g) const { return g + mu / n_prior; }
  SK_HD M with_momentum(M buf, M d) const { return momentum * buf + d; }
  SK_HD M mean(M mu, M d) const { return mu - lr * d; }
  // u = log Sigma: reparametrised data term + KL/N term (eq. 39)
  SK_HD M variance(M var, M g, M z) const {
    const M du = M(0.5) * g * z * sk_sqrt(var) + (var * inv_prior - M(1)) / two_n;
    return var * sk_exp(neg_var_lr * du);
  }
};

// vsam_sumsq's summand Sigma g^2 (eq. 2's normaliser g^T Sigma g).
template <typename T>
SK_HD T sigma_gsq(T g, T var) {
  return var * g * g;
}

// vsam_perturb_ (VSAM Alg. 3 line 3, eq. 2, then lines 6-7, eq. 42), sq = sqrt(p),
// inv = 1 / (sqrt(g^T Sigma g) + eps):
//   w <- mu + sq Sigma g inv
//   log_step: Sigma <- Sigma exp(-var_lr du), du = sq Sigma g^2 inv / 2 + Sigma / (2 N prior) - 1/(2N)
//   else:     Sigma <- max(Sigma - var_lr dv, min_var),
//             dv = sq g^2 inv / 2 + 1 / (2 N prior) - (1 / (2N)) / Sigma
template <typename M>
struct VsamPerturb {
  M eps, sq, half_sq, var_lr, neg_var_lr, two_n_prior, half_n, prior_term, min_var;
  bool log_step;

  static VsamPerturb make(double dim, double eps, double var_lr, double prior_var,
                          double num_data, bool log_step, double min_var) {
    const M sq = static_cast<M>(std::sqrt(dim));  // reference: math.sqrt(dim), a Python float
    return {static_cast<M>(eps),      sq,
            M(0.5) * sq,              static_cast<M>(var_lr),
            -static_cast<M>(var_lr),  static_cast<M>(2.0 * num_data * prior_var),
            static_cast<M>(0.5 / num_data), static_cast<M>(0.5 / (num_data * prior_var)),
            static_cast<M>(min_var),  log_step};
  }
  // 1 / (norm + eps), the norm rounded to M first (reference: sigma_norm.to(w.dtype) + eps)
  SK_HD M scale(double norm) const { return M(1) / (static_cast<M>(norm) + eps); }
  SK_HD M perturbed(M mu, M g, M var, M inv) const { return mu + sq * var * g * inv; }  // eq. 2
  SK_HD M variance(M var, M g, M inv) const {
    if (log_step) {  // Sigma * dL/dSigma of eq. 42: a gradient step on log Sigma
      const M du = half_sq * var * g * g * inv + var / two_n_prior - half_n;
      return var * sk_exp(neg_var_lr * du);
    }
    // Alg. 3 line 7 on Sigma itself, clamped to stay positive (torch.clamp: NaN stays NaN)
    const M dv = half_sq * g * g * inv + prior_term - half_n / var;
    const M v = var - var_lr * dv;
    return v < min_var ? min_var : v;
  }
};

}  // namespace math
}  // namespace samkernels
