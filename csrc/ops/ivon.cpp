// IVON phases (Shen et al. 2024, "Variational Learning is Effective for Large Deep Networks",
// Alg. 1; docs/spec.md "IVON"; rows in samkernels/ops/reference.py).  The family's torch-facing
// code: the CPU kernels and, in CUDA builds, the glue to the launch functions of cuda/ivon.cu.
// Per-element maths: math/ivon.h (shared by both).  sigma z is never stored: the gradient phases
// regenerate z from the (seed, step) of the sample's ivon_noise_.
//   ivon_noise_       line 2:    backup <- m, w <- m + z / sqrt(lambda (h + delta))   (Philox)
//   ivon_accumulate_  lines 2-3: running means of g and sigma z g over a step's samples, w <- m
//   ivon_update_      lines 2-8: the last sample's g, momentum, Hessian and mean update, w <- m
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/multi_tensor.h"
#include "cpu/normal_block.h"
#include "math/ivon.h"
#ifdef SAMKERNELS_WITH_CUDA
#include "cuda/glue.h"
#endif

namespace samkernels {
namespace {

std::vector<ListArg> ivon_noise_lists(at::TensorList params, at::TensorList backups,
                                      at::TensorList hessians) {
  return noise_lists(params, backups, {"hessians", hessians, kS});
}

std::vector<ListArg> ivon_accumulate_lists(at::TensorList params, at::TensorList grads,
                                           at::TensorList backups, at::TensorList hessians,
                                           at::TensorList avg_grads, at::TensorList avg_nxgs) {
  return {{"params", params, kP, W},       {"grads", grads, kP},
          {"backups", backups, kP},        {"hessians", hessians, kS},
          {"avg_grads", avg_grads, kS, W}, {"avg_nxgs", avg_nxgs, kS, W}};
}

std::vector<ListArg> ivon_update_lists(at::TensorList params, at::TensorList grads,
                                       at::TensorList backups, at::TensorList hessians,
                                       at::TensorList momenta, at::TensorList avg_grads,
                                       at::TensorList avg_nxgs) {
  return {{"params", params, kP, W},
          {"grads", grads, kP},
          {"backups", backups, kP},
          {"hessians", hessians, kS, W},
          {"momenta", momenta, kS, W},
          {"avg_grads", avg_grads, kS, false, Opt},
          {"avg_nxgs", avg_nxgs, kS, false, Opt}};
}

// The two running means come together: both given or both empty.
void check_ivon_means(const char* op, at::TensorList avg_grads, at::TensorList avg_nxgs) {
  TORCH_CHECK(avg_grads.size() == avg_nxgs.size(), op, ": avg_grads has ", avg_grads.size(),
              " tensors but avg_nxgs has ", avg_nxgs.size());
}

}  // namespace

namespace cpu {
namespace {

void ivon_noise(at::TensorList params, at::TensorList backups, at::TensorList hessians,
                at::IntArrayRef param_ids, int64_t seed, int64_t step, double ess,
                double weight_decay, const c10::optional<at::Tensor>& device_step) {
  noise_phase<math::IvonNoise>("ivon_noise_", ivon_noise_lists(params, backups, hessians),
                               param_ids, seed, step, device_step, ess, weight_decay);
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("ivon_noise_", &ivon_noise); }

void ivon_accumulate(at::TensorList params, at::TensorList grads, at::TensorList backups,
                     at::TensorList hessians, at::TensorList avg_grads, at::TensorList avg_nxgs,
                     at::IntArrayRef param_ids, int64_t seed, int64_t step, double ess,
                     double weight_decay, int64_t count,
                     const c10::optional<at::Tensor>& found_inf,
                     const c10::optional<at::Tensor>& device_step) {
  check_ivon_count("ivon_accumulate_", count, true);
  PhaseLists pl("ivon_accumulate_",
                ivon_accumulate_lists(params, grads, backups, hessians, avg_grads, avg_nxgs),
                found_inf, param_ids, /*takes_ids=*/true);
  step = at_step("ivon_accumulate_", step, device_step, params);
  if (pl.skip()) return copy_lists(params, backups);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto noise = math::IvonNoise<opmath_t>::make(ess, weight_decay);
    const opmath_t n = static_cast<opmath_t>(count);
    const bool first = count == 1;
    const auto p = gradient_lists(v);
    const opmath_t* hp = v.state(3);
    opmath_t* ap = v.state(4);
    opmath_t* np = v.state(5);
    // z: the noise of the ivon_noise_ call with the same (seed, step)
    for_each_normal(v, seed, step, param_ids, [&](int64_t i, opmath_t z) {
      const opmath_t gi = static_cast<opmath_t>(p.g[i]);
      const opmath_t nxg = noise.sigma_z(hp[i], z) * gi;
      ap[i] = first ? gi : math::ivon_running_mean(ap[i], gi, n);
      np[i] = first ? nxg : math::ivon_running_mean(np[i], nxg, n);
      p.w[i] = p.b[i];  // back to the mean for the next sample
    });
  });
  pl.finish();
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("ivon_accumulate_", &ivon_accumulate); }

void ivon_update(at::TensorList params, at::TensorList grads, at::TensorList backups,
                 at::TensorList hessians, at::TensorList momenta, at::TensorList avg_grads,
                 at::TensorList avg_nxgs, at::IntArrayRef param_ids, int64_t seed, int64_t step,
                 double lr, double ess, double weight_decay, double beta1, double beta2,
                 double clip_radius, double bias_correction, int64_t count,
                 const c10::optional<at::Tensor>& found_inf,
                 const c10::optional<at::Tensor>& device_step,
                 const c10::optional<at::Tensor>& debias_step) {
  const bool averaged = !avg_grads.empty();
  check_ivon_count("ivon_update_", count, averaged || params.empty());
  check_ivon_means("ivon_update_", avg_grads, avg_nxgs);
  PhaseLists pl("ivon_update_",
                ivon_update_lists(params, grads, backups, hessians, momenta, avg_grads, avg_nxgs),
                found_inf, param_ids, /*takes_ids=*/true);
  step = at_step("ivon_update_", step, device_step, params);
  bias_correction = ivon_bias_correction("ivon_update_", bias_correction, beta1, debias_step, params);
  if (pl.skip()) return copy_lists(params, backups);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths = math::IvonUpdate<opmath_t>::make(
        lr, ess, weight_decay, beta1, beta2, clip_radius, bias_correction, count, averaged);
    const auto p = gradient_lists(v);
    opmath_t* hp = v.state(3);
    opmath_t* mp = v.state(4);
    const opmath_t* ap = v.state(5);
    const opmath_t* np = v.state(6);
    for_each_normal(v, seed, step, param_ids, [&](int64_t i, opmath_t z) {
      const opmath_t m = static_cast<opmath_t>(p.b[i]);
      const opmath_t h = hp[i];
      opmath_t gbar = static_cast<opmath_t>(p.g[i]);
      opmath_t nxg = maths.noise.sigma_z(h, z) * gbar;
      if (averaged) {
        gbar = math::ivon_running_mean(ap[i], gbar, maths.count);
        nxg = math::ivon_running_mean(np[i], nxg, maths.count);
      }
      const opmath_t gm = maths.momentum(mp[i], gbar);
      const opmath_t h_new = maths.hessian(h, nxg);
      mp[i] = gm;
      hp[i] = h_new;
      p.w[i] = static_cast<scalar_t>(maths.mean(m, gm, h_new));
    });
  });
  pl.finish();
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("ivon_update_", &ivon_update); }

}  // namespace

}  // namespace cpu

#ifdef SAMKERNELS_WITH_CUDA
namespace cuda {

// Launch functions of cuda/ivon.cu.  tags = param ids; z is the shared Philox normal of (seed,
// step, param id, element).

// ivon_noise_ (line 2): backup <- m, w <- m + z / sqrt(lambda (h + delta)).  Lists: 0 params,
// 1 backups, 2 hessians.
cudaError_t launch_ivon_noise(const Group& g, uint64_t seed, uint64_t step,
                              const int64_t* device_step, double ess, double weight_decay,
                              cudaStream_t stream);

// ivon_accumulate_ (lines 2-3, sample `count` >= 1 of a step, z regenerated): running means of g
// and sigma z g, w <- m.  Lists: 0 params, 1 grads, 2 backups, 3 hessians, 4 avg_grads,
// 5 avg_nxgs.
cudaError_t launch_ivon_accumulate(const Group& g, uint64_t seed, uint64_t step,
                                   const int64_t* device_step, double ess,
                                   double weight_decay, int64_t count, const float* found_inf,
                                   cudaStream_t stream);

// ivon_update_ (lines 2-8, z regenerated).  Lists: 0 params, 1 grads, 2 backups, 3 hessians,
// 4 momenta, 5 avg_grads, 6 avg_nxgs (5, 6 nullptr: one sample, count 1).  With `debias_step`
// (not nullptr) the kernels form bias_correction = 1 - beta1^t from the int64 t it points to.
cudaError_t launch_ivon_update(const Group& g, uint64_t seed, uint64_t step,
                               const int64_t* device_step, double lr,
                               double ess, double weight_decay, double beta1, double beta2,
                               double clip_radius, double bias_correction,
                               const int64_t* debias_step, int64_t count,
                               const float* found_inf, cudaStream_t stream);

namespace {

void ivon_noise_cuda(TensorList params, TensorList backups, TensorList hessians,
                     at::IntArrayRef param_ids, int64_t seed, int64_t step, double ess,
                     double weight_decay, const std::optional<Tensor>& device_step) {
  noise_phase("samkernels::ivon_noise_", ivon_noise_lists(params, backups, hessians), param_ids,
              seed, step, device_step, &launch_ivon_noise, ess, weight_decay);
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("ivon_noise_", &ivon_noise_cuda); }

void ivon_accumulate_cuda(TensorList params, TensorList grads, TensorList backups,
                          TensorList hessians, TensorList avg_grads, TensorList avg_nxgs,
                          at::IntArrayRef param_ids, int64_t seed, int64_t step, double ess,
                          double weight_decay, int64_t count,
                          const std::optional<Tensor>& found_inf,
                          const std::optional<Tensor>& device_step) {
  check_ivon_count("samkernels::ivon_accumulate_", count, true);
  // z is regenerated per element of the row-major order, as ivon_noise_ drew it
  PhaseLists pl("samkernels::ivon_accumulate_",
                ivon_accumulate_lists(params, grads, backups, hessians, avg_grads, avg_nxgs),
                /*logical_order=*/true, found_inf, param_ids, /*takes_ids=*/true);
  const int64_t* at = device_step_ptr("samkernels::ivon_accumulate_", device_step, params);
  pl.run([&](const Group& g) {
    return launch_ivon_accumulate(g, static_cast<uint64_t>(seed), static_cast<uint64_t>(step), at,
                                  ess, weight_decay, count, pl.skip, pl.stream);
  });
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("ivon_accumulate_", &ivon_accumulate_cuda); }

void ivon_update_cuda(TensorList params, TensorList grads, TensorList backups,
                      TensorList hessians, TensorList momenta, TensorList avg_grads,
                      TensorList avg_nxgs, at::IntArrayRef param_ids, int64_t seed, int64_t step,
                      double lr, double ess, double weight_decay, double beta1, double beta2,
                      double clip_radius, double bias_correction, int64_t count,
                      const std::optional<Tensor>& found_inf,
                      const std::optional<Tensor>& device_step,
                      const std::optional<Tensor>& debias_step) {
  check_ivon_count("samkernels::ivon_update_", count, !avg_grads.empty() || params.empty());
  check_ivon_means("samkernels::ivon_update_", avg_grads, avg_nxgs);
  PhaseLists pl("samkernels::ivon_update_",
                ivon_update_lists(params, grads, backups, hessians, momenta, avg_grads, avg_nxgs),
                /*logical_order=*/true, found_inf, param_ids, /*takes_ids=*/true);
  const int64_t* at = device_step_ptr("samkernels::ivon_update_", device_step, params);
  const int64_t* debias_at =
      device_step_ptr("samkernels::ivon_update_", debias_step, params, "debias_step");
  pl.run([&](const Group& g) {
    return launch_ivon_update(g, static_cast<uint64_t>(seed), static_cast<uint64_t>(step), at, lr,
                              ess, weight_decay, beta1, beta2, clip_radius, bias_correction,
                              debias_at, count, pl.skip, pl.stream);
  });
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("ivon_update_", &ivon_update_cuda); }

}  // namespace

}  // namespace cuda
#endif  // SAMKERNELS_WITH_CUDA
}  // namespace samkernels
