// MFVI-family phases on CUDA (Ujváry et al., "Rethinking SAM as Variational Inference";
// docs/spec.md "MFVI family"; rows in samkernels/ops/reference.py): the per-element maths of
// math/vi.h bound to each phase's lists.  vsam_sumsq's stage 2 is launch_reduce_partials.
// Torch-free: the glue (ops/vi.cpp) passes raw pointers.
#include "cuda/multi_tensor.cuh"
#include "math/vi.h"

namespace samkernels {
namespace cuda {
namespace {

// mfvi_update_ with z regenerated as vi_noise_ drew it.  Lists: 0 params, 1 grads, 2 backups,
// 3 variances, 4 momenta (absent: no momentum).
template <typename M>
struct MfviUpdateLists : ListsOf<math::MfviUpdate<M>, 5, 3, Noise::kNormal> {
  __device__ __forceinline__ void operator()(M (&x)[5], M, M z) const {
    const auto& m = this->maths;
    const M mu = x[2], g = x[1];
    M d = m.direction(mu, g);
    if (m.use_momentum) {
      d = m.with_momentum(x[4], d);
      x[4] = d;
    }
    x[3] = m.variance(x[3], g, z);
    x[0] = m.mean(mu, d);
  }
};

// vsam_sumsq's summand Sigma g^2, in float64 (the norm contract).  Lists: 0 grads (parameter
// dtype), 1 variances (opmath).
template <typename P>
struct SigmaSumsqTerm : TermOf<P, P, opmath_t<P>, double> {
  using M = double;

  static SigmaSumsqTerm make() { return {{3u}}; }
  __device__ __forceinline__ M operator()(M g, M var) const { return math::sigma_gsq(g, var); }
};

// vsam_perturb_.  Lists: 0 params, 1 grads, 2 backups, 3 variances.
template <typename M>
struct VsamPerturbLists : ListsOf<math::VsamPerturb<M>, 4, 3, Noise::kNone, /*Scaled=*/true> {
  __device__ __forceinline__ void operator()(M (&x)[4], M inv, M) const {
    const M mu = x[0], g = x[1], var = x[3];
    x[2] = mu;  // exact copy of mu
    x[0] = this->maths.perturbed(mu, g, var, inv);
    x[3] = this->maths.variance(var, g, inv);
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launch functions (declared in ops/vi.cpp).
// ---------------------------------------------------------------------------------------------
cudaError_t launch_vi_noise(const Group& g, uint64_t seed, uint64_t step,
                            const int64_t* device_step, double sigma, cudaStream_t stream) {
  // list 2 absent (no variances): the fixed sigma
  return launch_noise<math::ViNoise>(g, seed, step, device_step, stream, sigma,
                                     g.lists[2] != nullptr);
}

cudaError_t launch_mfvi_update(const Group& g, uint64_t seed, uint64_t step,
                               const int64_t* device_step, double lr, double var_lr,
                               double momentum, double prior_var, double num_data,
                               const float* found_inf, cudaStream_t stream) {
  const unsigned m = g.lists[4] != nullptr ? 0x10u : 0u;  // [momenta]
  return launch_phase<MfviUpdateLists>(g, /*grads, backups, variances*/ 0xEu | m,
                                       /*params, variances*/ 0x9u | m,
                                       SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0},
                                       PhaseKeys{seed, step, nullptr, device_step}, stream, lr,
                                       var_lr, momentum, prior_var, num_data, m != 0u);
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
                                        PhaseKeys{0, 0, norm}, stream, dim, eps, var_lr, prior_var,
                                        num_data, log_step, min_var);
}

}  // namespace cuda
}  // namespace samkernels
