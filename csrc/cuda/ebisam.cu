// E-BiSAM's stochastic weight perturbation on CUDA (math/ebisam.h; docs/spec.md; schema in
// samkernels/ops/reference.py): the maths bound to the lists, with u the element's Philox uniform
// (philox.h), regenerated, never stored.  The norm stage is grad_sumsq's (cuda/sam.cu).
// Torch-free: the glue (ops/ebisam.cpp) passes raw pointers.
#include "cuda/multi_tensor.cuh"
#include "math/ebisam.h"

namespace samkernels {
namespace cuda {
namespace {

// backup <- w; w <- w + g scale where chosen.  Elements not chosen are written back unchanged
// (P -> opmath -> P is exact).  Lists: 0 params, 1 grads, 2 backups.
template <typename M>
struct EbisamPerturbLists
    : ListsOf<math::EbisamPerturb<M>, 3, 3, Noise::kUniform, /*Scaled=*/true> {
  __device__ __forceinline__ void operator()(M (&x)[3], M scale, M u) const {
    x[2] = x[0];  // exact copy of w
    x[0] = this->maths(x[0], x[1], scale, u);
  }
};

}  // namespace

cudaError_t launch_ebisam_perturb(const Group& g, const double* norm, uint64_t seed, uint64_t step,
                                  const int64_t* device_step, double rho, double beta, double eps,
                                  const float* found_inf, cudaStream_t stream) {
  return launch_phase<EbisamPerturbLists>(g, /*read: params, grads*/ 0x3u,
                                          /*write: params, backups*/ 0x5u,
                                          SkipCopy{found_inf, /*src=params*/ 0, /*dst=backups*/ 2},
                                          PhaseKeys{seed, step, norm, device_step}, stream, rho,
                                          beta, eps);
}

}  // namespace cuda
}  // namespace samkernels
