// Per-element maths of E-BiSAM's stochastic weight perturbation (Xie et al., BiSAM paper Alg. 3
// lines 3-7; ESAM's SWP, Du et al. 2022; docs/spec.md; row in samkernels/ops/reference.py), shared
// by ops/ebisam.cpp and cuda/ebisam.cu: coordinate i is perturbed iff u_i < beta, u_i the Philox
// uniform of (seed, step, param_id, i) (philox.h), by e_i = rho / (1 - beta) g_i / (||g|| + eps).
#pragma once
#include "math/common.h"

namespace samkernels {
namespace math {

template <typename M>
struct EbisamPerturb {
  M rho_scaled, eps;  // rho_scaled = rho / (1 - beta), in double then rounded
  double beta;

  static EbisamPerturb make(double rho, double beta, double eps) {
    return {static_cast<M>(rho / (1.0 - beta)), static_cast<M>(eps), beta};
  }
  // line 5's scale, normalised as BiSAM Alg. 1 line 4 (reference: grad_norm.to(w.dtype) + eps)
  SK_HD M scale(double norm) const { return rho_scaled / (static_cast<M>(norm) + eps); }
  // line 4: chosen with probability beta (the uniform compared in double)
  SK_HD bool chosen(M u) const { return static_cast<double>(u) < beta; }
  SK_HD M perturbed(M w, M g, M scale) const { return w + g * scale; }
  SK_HD M operator()(M w, M g, M scale, M u) const {
    return chosen(u) ? perturbed(w, g, scale) : w;
  }
};

}  // namespace math
}  // namespace samkernels
