// Bias corrections 1 - beta^t at a step read on the device (the counter of a capturable optimizer,
// unknown to the host when a CUDA graph replays): the Adam restores' (PhaseKeys::device_step) and
// ivon_update_'s (its debias_step).  Torch-free.
//
// The host forms 1 - beta^t as 1.0 - std::pow(beta, double(t)) (math/sam.h, phase_checks.h; the
// reference: `1 - beta ** step`).  CUDA's pow is only within 2 ulp, so the device forms beta^t by squaring in
// double-double instead: relative error below about t 2^-104 before the one rounding to double,
// i.e. correctly rounded for any step a run reaches.  That is std::pow's value except where libm
// itself misrounds (glibc's pow is within 0.52 ulp): for betas 0.9, 0.95, 0.98, 0.99, 0.999 and
// 0.9999 at steps 1 ... 1e5, 342 of the 600,000 powers, which changed no fp32 step_size or
// sqrt_bc2 (lr 1e-3) and 6 float64 ones (beta 0.9999).
#pragma once
#include <cstdint>

#include "cuda/multi_tensor.cuh"
#include "math/ivon.h"
#include "math/sam.h"

namespace samkernels {
namespace cuda {

// (h, l) <- (h, l) (bh, bl) in double-double (Dekker's product by fma, then renormalised so that
// h is the double nearest h + l).  p and the renormalisation are _rn intrinsics, which nvcc and
// ptxas never contract into an fma: a contracted h = p + e, i.e. fma(h, bh, e), would add the
// product's rounding error twice (the small cross terms may fuse).
__device__ __forceinline__ void dd_mul(double& h, double& l, double bh, double bl) {
  const double p = __dmul_rn(h, bh);
  double e = fma(h, bh, -p);  // exact: h bh = p + e
  e += h * bl + l * bh;
  h = __dadd_rn(p, e);
  l = __dsub_rn(e, __dsub_rn(h, p));
}

// 1.0 - std::pow(beta, double(t)), bit for bit where that pow is correctly rounded (see above).
__device__ __forceinline__ double one_minus_power(double beta, int64_t t) {
  const double e = static_cast<double>(t);  // the exponent the host's pow gets
  if (!(fabs(beta) < 1.0) || !(e >= 0.0)) return 1.0 - pow(beta, e);  // beyond Adam's range
  uint64_t n = static_cast<uint64_t>(e);
  double rh = 1.0, rl = 0.0, bh = beta, bl = 0.0;  // result; beta^(2^k)
  for (;;) {
    if (n & 1u) dd_mul(rh, rl, bh, bl);
    n >>= 1;
    if (n == 0) break;
    // a factor beta^(2^j), j >= 1, is still to come: the power is below 2^-120, 1 - it is 1
    if (fabs(bh) < 0x1p-60) return 1.0;
    dd_mul(bh, bl, bh, bl);
  }
  return 1.0 - rh;  // rh: the power rounded to double
}

// math::AdamRestore with what its step-dependent coefficients are formed from: make() as the host
// path (step known there), at_step(t) on the device for t = step + *device_step.
template <typename M>
struct AdamAtStep {
  math::AdamRestore<M> adam;
  double lr, beta1, beta2;

  static AdamAtStep make(int64_t step, double lr, double beta1, double beta2, double eps,
                         double weight_decay, bool decoupled) {
    return {math::AdamRestore<M>::make(step, lr, beta1, beta2, eps, weight_decay, decoupled), lr,
            beta1, beta2};
  }
  __device__ __forceinline__ void at_step(uint64_t t) {
    const auto s = static_cast<int64_t>(t);
    adam.set_bias_corrections(lr, one_minus_power(beta1, s), one_minus_power(beta2, s));
  }
  __device__ __forceinline__ M operator()(M w, M g, M& m, M& v) const { return adam(w, g, m, v); }
};

// math::IvonUpdate whose bias correction 1 - beta1^t is formed on the device from t = *debias_step
// when that is given (else make()'s `bias_correction` stands).
template <typename M>
struct IvonUpdateAt {
  math::IvonUpdate<M> update;
  double beta1;
  const int64_t* debias_step;

  static IvonUpdateAt make(const int64_t* debias_step, double lr, double ess, double weight_decay,
                           double beta1, double beta2, double clip_radius, double bias_correction,
                           int64_t count, bool averaged) {
    return {math::IvonUpdate<M>::make(lr, ess, weight_decay, beta1, beta2, clip_radius,
                                      bias_correction, count, averaged),
            beta1, debias_step};
  }
  __device__ __forceinline__ void at_debias_step() {
    if (debias_step != nullptr)
      update.bias_correction = static_cast<M>(one_minus_power(beta1, *debias_step));
  }
};

}  // namespace cuda
}  // namespace samkernels
