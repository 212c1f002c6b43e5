// MFVI-family phases (Ujváry et al., "Rethinking SAM as Variational Inference"; docs/spec.md
// "MFVI family"; rows in samkernels/ops/reference.py).  The family's torch-facing code: the CPU
// kernels and, in CUDA builds, the glue to the launch functions of cuda/vi.cu.  Per-element
// maths: math/vi.h (shared by both).
//   vi_noise_      RandomSAM Alg. 1 / MFVI Alg. 2 line 3: backup <- mu, w <- mu + std z (Philox)
//   mfvi_update_   MFVI Alg. 2 lines 4-5: mean step (KL/N, momentum) and log-variance step, with z
//                  regenerated from the counter instead of stored
//   vsam_sumsq     g^T Sigma g over a whole list (eq. 2's normaliser)
//   vsam_perturb_  VSAM Alg. 3 lines 3, 6-7: w <- mu + e (eq. 2), then the Sigma step of eq. 42
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/multi_tensor.h"
#include "cpu/normal_block.h"
#include "math/vi.h"
#ifdef SAMKERNELS_WITH_CUDA
#include "cuda/glue.h"
#endif

namespace samkernels {
namespace {

std::vector<ListArg> vi_noise_lists(at::TensorList params, at::TensorList backups,
                                    at::TensorList variances) {
  return noise_lists(params, backups, {"variances", variances, kS, false, Opt});
}

std::vector<ListArg> mfvi_update_lists(at::TensorList params, at::TensorList grads,
                                       at::TensorList backups, at::TensorList variances,
                                       at::TensorList momenta) {
  return {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP},
          {"variances", variances, kS, W}, {"momenta", momenta, kS, W, Opt}};
}

std::vector<ListArg> vsam_sumsq_lists(at::TensorList grads, at::TensorList variances) {
  return {{"grads", grads, kP}, {"variances", variances, kS}};
}

std::vector<ListArg> vsam_perturb_lists(at::TensorList params, at::TensorList grads,
                                        at::TensorList backups, at::TensorList variances) {
  return {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP, W},
          {"variances", variances, kS, W}};
}

}  // namespace

namespace cpu {
namespace {

void vi_noise(at::TensorList params, at::TensorList backups, at::TensorList variances,
              at::IntArrayRef param_ids, int64_t seed, int64_t step, double sigma,
              const c10::optional<at::Tensor>& device_step) {
  const bool learned = !variances.empty();  // MFVI: std = sqrt(Sigma); RandomSAM: std = sigma0
  // without variances the state passed to the maths is 0, unread
  noise_phase<math::ViNoise>("vi_noise_", vi_noise_lists(params, backups, variances), param_ids,
                             seed, step, device_step, sigma, learned);
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("vi_noise_", &vi_noise); }

void mfvi_update(at::TensorList params, at::TensorList grads, at::TensorList backups,
                 at::TensorList variances, at::TensorList momenta, at::IntArrayRef param_ids,
                 int64_t seed, int64_t step, double lr, double var_lr, double momentum,
                 double prior_var, double num_data, const c10::optional<at::Tensor>& found_inf,
                 const c10::optional<at::Tensor>& device_step) {
  const bool use_momentum = !momenta.empty();
  PhaseLists pl("mfvi_update_", mfvi_update_lists(params, grads, backups, variances, momenta),
                found_inf, param_ids, /*takes_ids=*/true);
  step = at_step("mfvi_update_", step, device_step, params);
  if (pl.skip()) return copy_lists(params, backups);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths = math::MfviUpdate<opmath_t>::make(lr, var_lr, momentum, prior_var, num_data,
                                                        use_momentum);
    const auto p = gradient_lists(v);
    opmath_t* vp = v.state(3);
    opmath_t* mp = v.state(4);
    // z: the noise of the vi_noise_ call with the same (seed, step)
    for_each_normal(v, seed, step, param_ids, [&](int64_t i, opmath_t z) {
      const opmath_t mu = static_cast<opmath_t>(p.b[i]);
      const opmath_t gi = static_cast<opmath_t>(p.g[i]);
      opmath_t d = maths.direction(mu, gi);
      if (use_momentum) {
        d = maths.with_momentum(mp[i], d);
        mp[i] = d;
      }
      vp[i] = maths.variance(vp[i], gi, z);
      p.w[i] = static_cast<scalar_t>(maths.mean(mu, d));
    });
  });
  pl.finish();
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("mfvi_update_", &mfvi_update); }

// sum Sigma g^2 over the lists g_list, v_list of a phase, in float64.
double weighted_sumsq(PhaseLists& pl, int g_list, int v_list) {
  return pl.sum([&](const auto& v) {
    const auto* gp = v.param(g_list);
    const auto* vp = v.state(v_list);
    double acc = 0.0;
    for (int64_t i = v.begin; i < v.end; ++i)
      acc += math::sigma_gsq(static_cast<double>(gp[i]), static_cast<double>(vp[i]));
    return acc;
  });
}

at::Tensor vsam_sumsq(at::TensorList grads, at::TensorList variances) {
  PhaseLists pl("vsam_sumsq", vsam_sumsq_lists(grads, variances));
  return norm_tensor(weighted_sumsq(pl, 0, 1));
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("vsam_sumsq", &vsam_sumsq); }

at::Tensor vsam_perturb(at::TensorList params, at::TensorList grads, at::TensorList backups,
                        at::TensorList variances, const c10::optional<at::Tensor>& sigma_norm,
                        double dim, double eps, double var_lr, double prior_var, double num_data,
                        bool log_step, double min_var, const c10::optional<at::Tensor>& found_inf) {
  PhaseLists pl("vsam_perturb_", vsam_perturb_lists(params, grads, backups, variances),
                found_inf);
  // sqrt(g^T Sigma g) over this list unless given; with the Sigma before the update
  const double norm = sigma_norm.has_value() ? sigma_norm->item<double>()
                                             : std::sqrt(weighted_sumsq(pl, 1, 3));
  if (pl.skip()) {  // skip form: backup only; w, Sigma stay
    copy_lists(backups, params);
    return norm_tensor(norm);
  }
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths = math::VsamPerturb<opmath_t>::make(dim, eps, var_lr, prior_var, num_data,
                                                         log_step, min_var);
    const opmath_t inv = maths.scale(norm);
    const auto p = gradient_lists(v);
    opmath_t* vp = v.state(3);
    for (int64_t i = v.begin; i < v.end; ++i) {
      const opmath_t mu = static_cast<opmath_t>(p.w[i]);
      const opmath_t gi = static_cast<opmath_t>(p.g[i]);
      const opmath_t var = vp[i];
      p.b[i] = p.w[i];
      p.w[i] = static_cast<scalar_t>(maths.perturbed(mu, gi, var, inv));  // eq. 2
      vp[i] = maths.variance(var, gi, inv);                                // eq. 42 / line 7
    }
  });
  pl.finish();
  return norm_tensor(norm);
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("vsam_perturb_", &vsam_perturb); }

}  // namespace

}  // namespace cpu

#ifdef SAMKERNELS_WITH_CUDA
namespace cuda {

// Launch functions of cuda/vi.cu.

// vi_noise_ (RandomSAM Alg. 1 / MFVI Alg. 2 line 3): backup <- mu, w <- mu + std z, z the shared
// Philox normals (as bsam_noise_); std = sqrt(Sigma), or `sigma` when list 2 is absent.
// Lists: 0 params, 1 backups, 2 variances (nullptr: fixed sigma); tags = param ids.
cudaError_t launch_vi_noise(const Group& g, uint64_t seed, uint64_t step,
                            const int64_t* device_step, double sigma, cudaStream_t stream);

// mfvi_update_ (MFVI Alg. 2 lines 4-5, z regenerated from (seed, step)).  Lists: 0 params,
// 1 grads, 2 backups, 3 variances, 4 momenta (nullptr: no momentum); tags = param ids.
cudaError_t launch_mfvi_update(const Group& g, uint64_t seed, uint64_t step,
                               const int64_t* device_step, double lr,
                               double var_lr, double momentum, double prior_var, double num_data,
                               const float* found_inf, cudaStream_t stream);

// vsam_sumsq stage 1 (finish with launch_reduce_partials).  Lists: 0 grads, 1 variances.  Writes
// one float64 partial of sum Sigma g^2 per block to partials[first_block ...].
cudaError_t launch_vsam_sumsq_partials(const Group& g, double* partials, int64_t first_block,
                                       cudaStream_t stream);

// vsam_perturb_ (VSAM Alg. 3 lines 3, 6-7) given sqrt(g^T Sigma g) in device memory (*norm,
// float64).  Lists: 0 params, 1 grads, 2 backups, 3 variances.
cudaError_t launch_vsam_perturb(const Group& g, const double* norm, double dim, double eps,
                                double var_lr, double prior_var, double num_data, bool log_step,
                                double min_var, const float* found_inf, cudaStream_t stream);

namespace {

void vi_noise_cuda(TensorList params, TensorList backups, TensorList variances,
                   at::IntArrayRef param_ids, int64_t seed, int64_t step, double sigma,
                   const std::optional<Tensor>& device_step) {
  noise_phase("samkernels::vi_noise_", vi_noise_lists(params, backups, variances), param_ids,
              seed, step, device_step, &launch_vi_noise, sigma);
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("vi_noise_", &vi_noise_cuda); }

void mfvi_update_cuda(TensorList params, TensorList grads, TensorList backups,
                      TensorList variances, TensorList momenta, at::IntArrayRef param_ids,
                      int64_t seed, int64_t step, double lr, double var_lr, double momentum,
                      double prior_var, double num_data, const std::optional<Tensor>& found_inf,
                      const std::optional<Tensor>& device_step) {
  // z is regenerated per element of the row-major order, as vi_noise_ drew it
  PhaseLists pl("samkernels::mfvi_update_",
                mfvi_update_lists(params, grads, backups, variances, momenta),
                /*logical_order=*/true, found_inf, param_ids, /*takes_ids=*/true);
  const int64_t* at = device_step_ptr("samkernels::mfvi_update_", device_step, params);
  pl.run([&](const Group& g) {
    return launch_mfvi_update(g, static_cast<uint64_t>(seed), static_cast<uint64_t>(step), at, lr,
                              var_lr, momentum, prior_var, num_data, pl.skip, pl.stream);
  });
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("mfvi_update_", &mfvi_update_cuda); }

Tensor vsam_sumsq_cuda(TensorList grads, TensorList variances) {
  PhaseLists pl("samkernels::vsam_sumsq", vsam_sumsq_lists(grads, variances));
  if (pl.empty()) return zero_norm();
  return reduce(pl, /*take_sqrt=*/false, [&](double* parts, const Group& g, int64_t first) {
    return launch_vsam_sumsq_partials(g, parts, first, pl.stream);
  });
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("vsam_sumsq", &vsam_sumsq_cuda); }

Tensor vsam_perturb_cuda(TensorList params, TensorList grads, TensorList backups,
                         TensorList variances, const std::optional<Tensor>& sigma_norm,
                         double dim, double eps, double var_lr, double prior_var,
                         double num_data, bool log_step, double min_var,
                         const std::optional<Tensor>& found_inf) {
  const char* op = "samkernels::vsam_perturb_";
  PhaseLists pl(op, vsam_perturb_lists(params, grads, backups, variances), false, found_inf);
  // sqrt(g^T Sigma g) over this list unless given; with the Sigma before the update
  const Tensor norm = phase_norm(op, "sigma_norm", sigma_norm, pl,
                                 [&](double* parts, const Group& g, int64_t first) {
                                   return launch_vsam_sumsq_partials(remap_lists(g, {1, 3}), parts,
                                                                     first, pl.stream);
                                 });
  pl.run([&](const Group& g) {
    return launch_vsam_perturb(g, norm.data_ptr<double>(), dim, eps, var_lr, prior_var, num_data,
                               log_step, min_var, pl.skip, pl.stream);
  });
  return norm;
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("vsam_perturb_", &vsam_perturb_cuda); }

}  // namespace

}  // namespace cuda
#endif  // SAMKERNELS_WITH_CUDA
}  // namespace samkernels
