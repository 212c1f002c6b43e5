// IVON phases on CUDA (Shen et al. 2024, Alg. 1; docs/spec.md "IVON"; rows in
// samkernels/ops/reference.py): the per-element maths of math/ivon.h bound to each phase's lists.
// z is regenerated from the (seed, step) of the sample's ivon_noise_, never stored.
// Torch-free: the glue (ops/ivon.cpp) passes raw pointers.
#include "cuda/bias_correction.cuh"
#include "cuda/multi_tensor.cuh"
#include "math/ivon.h"

namespace samkernels {
namespace cuda {
namespace {

// What ivon_accumulate_ needs besides the noise: the sample number.
template <typename M>
struct IvonAccumulate {
  math::IvonNoise<M> noise;
  M count;
  bool first;  // count 1: the running means start here

  static IvonAccumulate make(double ess, double weight_decay, int64_t count) {
    return {math::IvonNoise<M>::make(ess, weight_decay), static_cast<M>(count), count == 1};
  }
};

// Lines 2-3 for a sample before the last.  Lists: 0 params, 1 grads, 2 backups, 3 hessians,
// 4 avg_grads, 5 avg_nxgs.
template <typename M>
struct IvonAccumulateLists : ListsOf<IvonAccumulate<M>, 6, 3, Noise::kNormal> {
  __device__ __forceinline__ void operator()(M (&x)[6], M, M z) const {
    const auto& m = this->maths;
    const M g = x[1];
    const M nxg = m.noise.sigma_z(x[3], z) * g;
    x[4] = m.first ? g : math::ivon_running_mean(x[4], g, m.count);
    x[5] = m.first ? nxg : math::ivon_running_mean(x[5], nxg, m.count);
    x[0] = x[2];  // w <- m, exact
  }
};

// Lines 2-8 with the last sample.  Lists: 0 params, 1 grads, 2 backups, 3 hessians, 4 momenta,
// 5 avg_grads, 6 avg_nxgs (5, 6 absent: one sample a step).
template <typename M>
struct IvonUpdateLists : ListsOf<IvonUpdateAt<M>, 7, 3, Noise::kNormal> {
  bool reads_device() const { return this->maths.debias_step != nullptr; }
  __device__ __forceinline__ void at_step(uint64_t) { this->maths.at_debias_step(); }
  __device__ __forceinline__ void operator()(M (&x)[7], M, M z) const {
    const auto& m = this->maths.update;
    const M mean = x[2], h = x[3];
    M gbar = x[1];
    M nxg = m.noise.sigma_z(h, z) * gbar;
    if (m.averaged) {
      gbar = math::ivon_running_mean(x[5], gbar, m.count);
      nxg = math::ivon_running_mean(x[6], nxg, m.count);
    }
    x[4] = m.momentum(x[4], gbar);
    x[3] = m.hessian(h, nxg);
    x[0] = m.mean(mean, x[4], x[3]);
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launch functions (declared in ops/ivon.cpp).
// ---------------------------------------------------------------------------------------------
cudaError_t launch_ivon_noise(const Group& g, uint64_t seed, uint64_t step,
                              const int64_t* device_step, double ess, double weight_decay,
                              cudaStream_t stream) {
  // line 2: theta = m + z / sqrt(lambda (h + delta))
  return launch_noise<math::IvonNoise>(g, seed, step, device_step, stream, ess, weight_decay);
}

cudaError_t launch_ivon_accumulate(const Group& g, uint64_t seed, uint64_t step,
                                   const int64_t* device_step, double ess, double weight_decay,
                                   int64_t count, const float* found_inf, cudaStream_t stream) {
  // count 1 writes the means without reading them
  const unsigned read = 0xEu | (count == 1 ? 0u : 0x30u);  // grads, backups, h, [means]
  return launch_phase<IvonAccumulateLists>(g, read, /*write: params, means*/ 0x31u,
                                           SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0},
                                           PhaseKeys{seed, step, nullptr, device_step}, stream,
                                           ess, weight_decay, count);
}

cudaError_t launch_ivon_update(const Group& g, uint64_t seed, uint64_t step,
                               const int64_t* device_step, double lr, double ess,
                               double weight_decay, double beta1, double beta2,
                               double clip_radius, double bias_correction,
                               const int64_t* debias_step, int64_t count, const float* found_inf,
                               cudaStream_t stream) {
  const bool averaged = g.lists[5] != nullptr;
  const unsigned read = 0x1Eu | (averaged ? 0x60u : 0u);  // grads, backups, h, gm, [means]
  return launch_phase<IvonUpdateLists>(g, read, /*write: params, h, gm*/ 0x19u,
                                       SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0},
                                       PhaseKeys{seed, step, nullptr, device_step}, stream,
                                       debias_step, lr, ess, weight_decay, beta1, beta2,
                                       clip_radius, bias_correction, count, averaged);
}

}  // namespace cuda
}  // namespace samkernels
