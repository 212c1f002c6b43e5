// bSAM phases on CUDA (docs/spec.md "Bayesian SAM, bSAM", Algorithm 1 lines 1-7; schemas in
// samkernels/ops/_spec.py): the per-element maths of math/bsam.h bound to each phase's lists.
// Torch-free: the glue (cuda/phase_glue.cpp) passes raw pointers.
#include "cuda/multi_tensor.cuh"
#include "math/bsam.h"

namespace samkernels {
namespace cuda {
namespace {

// Line 1 with z the Philox normal of the element (philox.h).  Lists: 0 params, 1 backups,
// 2 precisions.
template <typename M>
struct BsamNoiseLists {
  static constexpr int kLists = 3, kParamLists = 2;
  static constexpr Noise kNoise = Noise::kNormal;
  math::BsamNoise<M> maths;

  static BsamNoiseLists make(const Group&, double num_data) {
    return {math::BsamNoise<M>::make(num_data)};
  }
  __device__ __forceinline__ M prepare() const { return M(0); }
  __device__ __forceinline__ void operator()(M (&x)[kLists], M, M z) const {
    x[1] = x[0];  // exact copy of omega
    x[0] = maths(x[0], x[2], z);
  }
};

// Lines 3 and 5 (line 5 deferred to bsam_update_ when there are accums: accum += sqrt(s)|g|).
// Lists: 0 params, 1 grads, 2 backups, 3 precisions, 4 accums (absent: line 5 runs here).
template <typename M>
struct BsamPerturbLists {
  static constexpr int kLists = 5, kParamLists = 3;
  static constexpr Noise kNoise = Noise::kNone;
  math::BsamPerturb<M> maths;
  bool accumulate;

  static BsamPerturbLists make(const Group& g, double rho, double beta2, double delta,
                               double gamma) {
    return {math::BsamPerturb<M>::make(rho, beta2, delta, gamma), g.lists[4] != nullptr};
  }
  __device__ __forceinline__ M prepare() const { return M(0); }
  __device__ __forceinline__ void operator()(M (&x)[kLists], M, M) const {
    const M g = x[1], s = x[3];
    x[0] = maths(x[2], g, s);
    const M h = math::BsamPrecision<M>::sharpness(s, g);
    if (accumulate)
      x[4] = x[4] + h;
    else
      x[3] = maths.line5(s, h);
  }
};

// Lines 5-7.  Lists: 0 params, 1 grads, 2 backups, 3 precisions, 4 momenta, 5 accums (absent:
// line 5 already ran in bsam_perturb_).
template <typename M>
struct BsamUpdateLists {
  static constexpr int kLists = 6, kParamLists = 3;
  static constexpr Noise kNoise = Noise::kNone;
  math::BsamUpdate<M> maths;
  bool accumulate;

  static BsamUpdateLists make(const Group& g, double lr, double beta1, double beta2, double delta,
                              double gamma, double accum_scale, bool released_order) {
    return {math::BsamUpdate<M>::make(lr, beta1, beta2, delta, gamma, accum_scale, released_order),
            g.lists[5] != nullptr};
  }
  __device__ __forceinline__ M prepare() const { return M(0); }
  __device__ __forceinline__ void operator()(M (&x)[kLists], M, M) const {
    const M omega = x[2], s_old = x[3];
    const M s_new = accumulate ? maths.precision(s_old, x[5]) : s_old;
    x[3] = s_new;
    x[4] = maths.momentum(x[4], x[1], omega);
    x[0] = maths.mean(omega, x[4], s_old, s_new);
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launch functions (launch.h).
// ---------------------------------------------------------------------------------------------
cudaError_t launch_bsam_noise(const Group& g, uint64_t seed, uint64_t step, double num_data,
                              cudaStream_t stream) {
  return launch_phase<BsamNoiseLists>(g, /*read: params, precisions*/ 0x5u,
                                      /*write: params, backups*/ 0x3u, SkipCopy{}, seed, step,
                                      stream, num_data);
}

cudaError_t launch_bsam_perturb(const Group& g, double rho, double beta2, double delta, double gamma,
                                const float* found_inf, cudaStream_t stream) {
  const bool accumulate = g.lists[4] != nullptr;
  const unsigned read = 0xEu | (accumulate ? 0x10u : 0u);    // grads, backups, s, [accums]
  const unsigned write = 0x1u | (accumulate ? 0x10u : 0x8u);  // params, accums or s
  return launch_phase<BsamPerturbLists>(g, read, write,
                                        SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0},
                                        0, 0, stream, rho, beta2, delta, gamma);
}

cudaError_t launch_bsam_update(const Group& g, double lr, double beta1, double beta2, double delta,
                               double gamma, double accum_scale, bool released_order,
                               const float* found_inf, cudaStream_t stream) {
  const bool accumulate = g.lists[5] != nullptr;
  const unsigned read = 0x1Eu | (accumulate ? 0x20u : 0u);  // grads, backups, s, gm, [accums]
  const unsigned write = 0x11u | (accumulate ? 0x8u : 0u);  // params, gm, [s]
  return launch_phase<BsamUpdateLists>(g, read, write,
                                       SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0},
                                       0, 0, stream, lr, beta1, beta2, delta, gamma, accum_scale,
                                       released_order);
}

}  // namespace cuda
}  // namespace samkernels
