// MFVI-family phases on CUDA (Ujváry et al., "Rethinking SAM as Variational Inference";
// docs/spec.md "MFVI family"; schemas in samkernels/ops/_spec.py): the per-element maths of
// math/vi.h bound to each phase's lists.  vsam_sumsq's stage 2 is launch_reduce_partials.
// Torch-free: the glue (cuda/phase_glue.cpp) passes raw pointers.
#include "cuda/multi_tensor.cuh"
#include "math/vi.h"

namespace samkernels {
namespace cuda {
namespace {

// vi_noise_ with z the Philox normal of the element (philox.h).  Lists: 0 params, 1 backups,
// 2 variances (absent: the fixed sigma).
template <typename M>
struct ViNoiseLists {
  static constexpr int kLists = 3, kParamLists = 2;
  static constexpr Noise kNoise = Noise::kNormal;
  math::ViNoise<M> maths;

  static ViNoiseLists make(const Group& g, double sigma) {
    return {math::ViNoise<M>::make(sigma, g.lists[2] != nullptr)};
  }
  __device__ __forceinline__ M prepare() const { return M(0); }
  __device__ __forceinline__ void operator()(M (&x)[kLists], M, M z) const {
    x[1] = x[0];  // exact copy of mu
    x[0] = maths(x[0], x[2], z);
  }
};

// mfvi_update_ with z regenerated as vi_noise_ drew it.  Lists: 0 params, 1 grads, 2 backups,
// 3 variances, 4 momenta (absent: no momentum).
template <typename M>
struct MfviUpdateLists {
  static constexpr int kLists = 5, kParamLists = 3;
  static constexpr Noise kNoise = Noise::kNormal;
  math::MfviUpdate<M> maths;
  bool use_momentum;

  static MfviUpdateLists make(const Group& g, double lr, double var_lr, double momentum,
                              double prior_var, double num_data) {
    return {math::MfviUpdate<M>::make(lr, var_lr, momentum, prior_var, num_data),
            g.lists[4] != nullptr};
  }
  __device__ __forceinline__ M prepare() const { return M(0); }
  __device__ __forceinline__ void operator()(M (&x)[kLists], M, M z) const {
    const M mu = x[2], g = x[1];
    M d = maths.direction(mu, g);
    if (use_momentum) {
      d = maths.with_momentum(x[4], d);
      x[4] = d;
    }
    x[3] = maths.variance(x[3], g, z);
    x[0] = maths.mean(mu, d);
  }
};

// vsam_sumsq's summand Sigma g^2.  Lists: 0 grads (parameter dtype), 1 variances (opmath).
template <typename P>
struct SigmaSumsqTerm {
  using M = opmath_t<P>;
  using A = P;
  using B = M;
  unsigned mask;

  static SigmaSumsqTerm make() { return {3u}; }
  __device__ __forceinline__ M operator()(M g, M var) const { return math::sigma_gsq(g, var); }
};

// vsam_perturb_ with inv = 1 / (sqrt(g^T Sigma g) + eps) from the norm in device memory (no host
// sync).  Lists: 0 params, 1 grads, 2 backups, 3 variances.
template <typename M>
struct VsamPerturbLists {
  static constexpr int kLists = 4, kParamLists = 3;
  static constexpr Noise kNoise = Noise::kNone;
  math::VsamPerturb<M> maths;
  const double* norm;

  static VsamPerturbLists make(const Group&, const double* norm, double dim, double eps,
                               double var_lr, double prior_var, double num_data, bool log_step,
                               double min_var) {
    return {math::VsamPerturb<M>::make(dim, eps, var_lr, prior_var, num_data, log_step, min_var),
            norm};
  }
  __device__ __forceinline__ M prepare() const { return maths.inverse(*norm); }
  __device__ __forceinline__ void operator()(M (&x)[kLists], M inv, M) const {
    const M mu = x[0], g = x[1], var = x[3];
    x[2] = mu;  // exact copy of mu
    x[0] = maths.perturbed(mu, g, var, inv);
    x[3] = maths.variance(var, g, inv);
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launch functions (launch.h).
// ---------------------------------------------------------------------------------------------
cudaError_t launch_vi_noise(const Group& g, uint64_t seed, uint64_t step, double sigma,
                            cudaStream_t stream) {
  const unsigned read = 0x1u | (g.lists[2] != nullptr ? 0x4u : 0u);  // params, [variances]
  return launch_phase<ViNoiseLists>(g, read, /*write: params, backups*/ 0x3u, SkipCopy{}, seed,
                                    step, stream, sigma);
}

cudaError_t launch_mfvi_update(const Group& g, uint64_t seed, uint64_t step, double lr,
                               double var_lr, double momentum, double prior_var, double num_data,
                               const float* found_inf, cudaStream_t stream) {
  const unsigned m = g.lists[4] != nullptr ? 0x10u : 0u;  // [momenta]
  return launch_phase<MfviUpdateLists>(g, /*grads, backups, variances*/ 0xEu | m,
                                       /*params, variances*/ 0x9u | m,
                                       SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0},
                                       seed, step, stream, lr, var_lr, momentum, prior_var,
                                       num_data);
}

cudaError_t launch_vsam_sumsq_partials(const Group& g, double* partials, int64_t first_block,
                                       cudaStream_t stream) {
  return launch_partials<SigmaSumsqTerm>(g, partials, first_block, stream);
}

cudaError_t launch_vsam_perturb(const Group& g, const double* norm, double dim, double eps,
                                double var_lr, double prior_var, double num_data, bool log_step,
                                double min_var, const float* found_inf, cudaStream_t stream) {
  return launch_phase<VsamPerturbLists>(g, /*read: params, grads, variances*/ 0xBu,
                                        /*write: params, backups, variances*/ 0xDu,
                                        SkipCopy{found_inf, /*src=params*/ 0, /*dst=backups*/ 2},
                                        0, 0, stream, norm, dim, eps, var_lr, prior_var, num_data,
                                        log_step, min_var);
}

}  // namespace cuda
}  // namespace samkernels
