// E-BiSAM's stochastic weight perturbation on CUDA (math/ebisam.h; docs/spec.md; schema in
// samkernels/ops/_spec.py): the maths bound to the lists, with u the element's Philox uniform
// (philox.h), regenerated, never stored.  The norm stage is grad_sumsq's (cuda/sam.cu).
// Torch-free: the glue (cuda/phase_glue.cpp) passes raw pointers.
#include "cuda/multi_tensor.cuh"
#include "math/ebisam.h"

namespace samkernels {
namespace cuda {
namespace {

// backup <- w; w <- w + g scale where chosen, the norm read from device memory.  Elements not
// chosen are written back unchanged (P -> opmath -> P is exact).  Lists: 0 params, 1 grads,
// 2 backups.
template <typename M>
struct EbisamPerturbLists {
  static constexpr int kLists = 3, kParamLists = 3;
  static constexpr Noise kNoise = Noise::kUniform;
  math::EbisamPerturb<M> maths;
  const double* norm;

  static EbisamPerturbLists make(const Group&, const double* norm, double rho, double beta,
                                 double eps) {
    return {math::EbisamPerturb<M>::make(rho, beta, eps), norm};
  }
  __device__ __forceinline__ M prepare() const { return maths.scale(*norm); }
  __device__ __forceinline__ void operator()(M (&x)[kLists], M scale, M u) const {
    x[2] = x[0];  // exact copy of w
    x[0] = maths(x[0], x[1], scale, u);
  }
};

}  // namespace

cudaError_t launch_ebisam_perturb(const Group& g, const double* norm, uint64_t seed, uint64_t step,
                                  double rho, double beta, double eps, const float* found_inf,
                                  cudaStream_t stream) {
  return launch_phase<EbisamPerturbLists>(g, /*read: params, grads*/ 0x3u,
                                          /*write: params, backups*/ 0x5u,
                                          SkipCopy{found_inf, /*src=params*/ 0, /*dst=backups*/ 2},
                                          seed, step, stream, norm, rho, beta, eps);
}

}  // namespace cuda
}  // namespace samkernels
