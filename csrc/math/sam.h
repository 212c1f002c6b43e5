// Per-element maths of the SAM / ASAM phases (docs/spec.md "SAM family"; schemas in
// samkernels/ops/reference.py), shared by the CPU kernels (ops/sam.cpp) and the CUDA functors
// (cuda/sam.cu).  Each struct holds a phase's coefficients in opmath M (float, double for double
// parameters), formed once on the host by make() from the op's double arguments; the maths is
// the same expression, in the same order, on both backends.
#pragma once
#include <cmath>
#include <cstdint>

#include "math/common.h"

namespace samkernels {
namespace math {

// ASAM's T g (T = |w| + eta), the summand of the adaptive norm ||T g||^2.
template <typename T>
SK_HD T asam_scaled(T g, T w, T eta) {
  return g * (sk_abs(w) + eta);
}

// sam_perturb_: w <- w + e, e = rho g / (||g|| + eps), or for ASAM e = rho T^2 g / (||T g|| + eps).
template <typename M>
struct SamPerturb {
  M rho, eps, eta;
  bool adaptive;

  static SamPerturb make(double rho, double eps, bool adaptive, double eta) {
    return {static_cast<M>(rho), static_cast<M>(eps), static_cast<M>(eta), adaptive};
  }
  // rho / (||g|| + eps), the norm rounded to M first (reference: grad_norm.to(w.dtype) + eps)
  SK_HD M scale(double norm) const { return rho / (static_cast<M>(norm) + eps); }
  SK_HD M operator()(M w, M g, M scale) const {
    M e = g;
    if (adaptive) {
      const M t = sk_abs(w) + eta;
      e = e * (t * t);
    }
    return w + e * scale;
  }
};

// sam_restore_sgd_: w <- backup, then torch.optim.SGD's step with the perturbed gradient g.
// Returns the new w; `buf` is the momentum buffer (read unless `first`, written with momentum).
template <typename M>
struct SgdRestore {
  M lr, momentum, one_minus_dampening, weight_decay;
  bool use_weight_decay, use_momentum, nesterov, first;

  static SgdRestore make(double lr, double momentum, double dampening, bool nesterov,
                         double weight_decay, bool first) {
    return {static_cast<M>(lr), static_cast<M>(momentum), static_cast<M>(1.0 - dampening),
            static_cast<M>(weight_decay), weight_decay != 0.0, momentum != 0.0, nesterov, first};
  }
  SK_HD M operator()(M w, M g, M& buf) const {
    M d = g;
    if (use_weight_decay) d = d + weight_decay * w;
    if (use_momentum) {
      const M b = first ? d : momentum * buf + one_minus_dampening * d;  // first: torch's init
      buf = b;
      d = nesterov ? d + momentum * b : b;
    }
    return w - lr * d;
  }
};

// sam_restore_adam_: w <- backup, then Adam (L2 in the gradient) or AdamW (decoupled) with the
// perturbed gradient g.  Bias corrections in double, as the reference: step_size =
// lr / (1 - beta1^t), sqrt_bc2 = sqrt(1 - beta2^t); 1 - beta in double, then rounded (1 - beta2
// formed from an fp32-rounded beta2 is 1.3e-5 off).  make() forms them on the host; a step read on
// the device gets them there (cuda/bias_correction.cuh), through the same set_bias_corrections.
template <typename M>
struct AdamRestore {
  M beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size, sqrt_bc2;
  bool use_weight_decay, decoupled;

  static AdamRestore make(int64_t step, double lr, double beta1, double beta2, double eps,
                          double weight_decay, bool decoupled) {
    AdamRestore a{static_cast<M>(beta1),       static_cast<M>(1.0 - beta1),
                  static_cast<M>(beta2),       static_cast<M>(1.0 - beta2),
                  static_cast<M>(eps),         static_cast<M>(weight_decay),
                  static_cast<M>(1.0 - lr * weight_decay), M(0),
                  M(0),                        weight_decay != 0.0,
                  decoupled};
    a.set_bias_corrections(lr, 1.0 - std::pow(beta1, static_cast<double>(step)),
                           1.0 - std::pow(beta2, static_cast<double>(step)));
    return a;
  }
  // step_size and sqrt_bc2 from bc1 = 1 - beta1^t and bc2 = 1 - beta2^t, each rounded once to M.
  SK_HD void set_bias_corrections(double lr, double bc1, double bc2) {
    step_size = static_cast<M>(lr / bc1);
    sqrt_bc2 = static_cast<M>(sk_sqrt(bc2));
  }
  // Returns the new w; m, v are exp_avg and exp_avg_sq, updated in place.
  SK_HD M operator()(M w, M g, M& m, M& v) const {
    if (use_weight_decay) {
      if (decoupled) w = w * decay;  // AdamW: w (1 - lr wd)
      else g = g + weight_decay * w;
    }
    m = beta1 * m + one_minus_beta1 * g;
    v = beta2 * v + one_minus_beta2 * g * g;
    return w - step_size * m / (sk_sqrt(v) / sqrt_bc2 + eps);
  }
};

}  // namespace math
}  // namespace samkernels
