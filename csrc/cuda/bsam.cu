// bSAM phases on CUDA (docs/spec.md "Bayesian SAM, bSAM", Algorithm 1 lines 1-7; schemas in
// samkernels/ops/reference.py): the per-element maths of math/bsam.h bound to each phase's lists.
// Torch-free: the glue (ops/bsam.cpp) passes raw pointers.
#include "cuda/multi_tensor.cuh"
#include "math/bsam.h"

namespace samkernels {
namespace cuda {
namespace {

// Lines 3 and 5.  Lists: 0 params, 1 grads, 2 backups, 3 precisions, 4 accums (absent: line 5
// runs here).
template <typename M>
struct BsamPerturbLists : ListsOf<math::BsamPerturb<M>, 5, 3> {
  __device__ __forceinline__ void operator()(M (&x)[5], M, M) const {
    const M g = x[1], s = x[3];
    x[0] = this->maths(x[2], g, s);
    const M h = math::BsamPrecision<M>::sharpness(s, g);
    if (this->maths.accumulate)
      x[4] = x[4] + h;
    else
      x[3] = this->maths.line5(s, h);
  }
};

// Lines 5-7.  Lists: 0 params, 1 grads, 2 backups, 3 precisions, 4 momenta, 5 accums (absent:
// line 5 already ran in bsam_perturb_).
template <typename M>
struct BsamUpdateLists : ListsOf<math::BsamUpdate<M>, 6, 3> {
  __device__ __forceinline__ void operator()(M (&x)[6], M, M) const {
    const auto& m = this->maths;
    const M omega = x[2], s_old = x[3];
    const M s_new = m.accumulate ? m.precision(s_old, x[5]) : s_old;
    x[3] = s_new;
    x[4] = m.momentum(x[4], x[1], omega);
    x[0] = m.mean(omega, x[4], s_old, s_new);
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launch functions (declared in ops/bsam.cpp).
// ---------------------------------------------------------------------------------------------
cudaError_t launch_bsam_noise(const Group& g, uint64_t seed, uint64_t step,
                              const int64_t* device_step, double num_data, cudaStream_t stream) {
  return launch_noise<math::BsamNoise>(g, seed, step, device_step, stream, num_data);  // line 1
}

cudaError_t launch_bsam_perturb(const Group& g, double rho, double beta2, double delta, double gamma,
                                const float* found_inf, cudaStream_t stream) {
  const bool accumulate = g.lists[4] != nullptr;
  const unsigned read = 0xEu | (accumulate ? 0x10u : 0u);    // grads, backups, s, [accums]
  const unsigned write = 0x1u | (accumulate ? 0x10u : 0x8u);  // params, accums or s
  return launch_phase<BsamPerturbLists>(g, read, write,
                                        SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0},
                                        PhaseKeys{}, stream, rho, beta2, delta, gamma, accumulate);
}

cudaError_t launch_bsam_update(const Group& g, double lr, double beta1, double beta2, double delta,
                               double gamma, double accum_scale, bool released_order,
                               const float* found_inf, cudaStream_t stream) {
  const bool accumulate = g.lists[5] != nullptr;
  const unsigned read = 0x1Eu | (accumulate ? 0x20u : 0u);  // grads, backups, s, gm, [accums]
  const unsigned write = 0x11u | (accumulate ? 0x8u : 0u);  // params, gm, [s]
  return launch_phase<BsamUpdateLists>(g, read, write,
                                       SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0},
                                       PhaseKeys{}, stream, lr, beta1, beta2, delta, gamma,
                                       accum_scale, released_order, accumulate);
}

}  // namespace cuda
}  // namespace samkernels
