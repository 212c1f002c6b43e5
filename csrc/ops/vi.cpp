// MFVI-family phases on the CPU (Ujváry et al., "Rethinking SAM as Variational Inference";
// docs/spec.md "MFVI family"; schemas in samkernels/ops/_spec.py).  Per-element maths: math/vi.h
// (shared with CUDA).
//   vi_noise_      RandomSAM Alg. 1 / MFVI Alg. 2 line 3: backup <- mu, w <- mu + std z (Philox)
//   mfvi_update_   MFVI Alg. 2 lines 4-5: mean step (KL/N, momentum) and log-variance step, with z
//                  regenerated from the counter instead of stored
//   vsam_sumsq     g^T Sigma g over a whole list (eq. 2's normaliser)
//   vsam_perturb_  VSAM Alg. 3 lines 3, 6-7: w <- mu + e (eq. 2), then the Sigma step of eq. 42
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "cpu/multi_tensor.h"
#include "cpu/normal_block.h"
#include "math/vi.h"

namespace samkernels {
namespace cpu {
namespace {

void vi_noise(at::TensorList params, at::TensorList backups, at::TensorList variances,
              at::IntArrayRef param_ids, int64_t seed, int64_t step, double sigma) {
  const bool learned = !variances.empty();  // MFVI: std = sqrt(Sigma); RandomSAM: std = sigma0
  PhaseLists pl("vi_noise_",
                {{"params", params, kP, W}, {"backups", backups, kP, W},
                 {"variances", variances, kS, false, Opt}},
                c10::nullopt, param_ids, /*takes_ids=*/true);
  pl.run([&](const auto& v) {  // without variances the state passed to the maths is 0, unread
    SK_CHUNK_TYPES(v);
    noise_chunk(v, math::ViNoise<opmath_t>::make(sigma, learned), static_cast<uint64_t>(seed),
                static_cast<uint64_t>(step), static_cast<uint32_t>(param_ids[v.tensor]));
  });
  pl.finish();
}

void mfvi_update(at::TensorList params, at::TensorList grads, at::TensorList backups,
                 at::TensorList variances, at::TensorList momenta, at::IntArrayRef param_ids,
                 int64_t seed, int64_t step, double lr, double var_lr, double momentum,
                 double prior_var, double num_data, const c10::optional<at::Tensor>& found_inf) {
  const bool use_momentum = !momenta.empty();
  PhaseLists pl("mfvi_update_",
                {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP},
                 {"variances", variances, kS, W}, {"momenta", momenta, kS, W, Opt}},
                found_inf, param_ids, /*takes_ids=*/true);
  if (pl.skip()) return copy_lists(params, backups);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths = math::MfviUpdate<opmath_t>::make(lr, var_lr, momentum, prior_var, num_data,
                                                        use_momentum);
    scalar_t* wp = v.param(0);
    const scalar_t* gp = v.param(1);
    const scalar_t* bp = v.param(2);
    opmath_t* vp = v.state(3);
    opmath_t* mp = v.state(4);
    // z: the noise of the vi_noise_ call with the same (seed, step)
    for_each_normal_run<opmath_t>(
        static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
        static_cast<uint32_t>(param_ids[v.tensor]), v.begin, v.end,
        [&](int64_t q, int len, const opmath_t* z) {
          for (int k = 0; k < len; ++k) {
            const int64_t i = q + k;
            const opmath_t mu = static_cast<opmath_t>(bp[i]);
            const opmath_t gi = static_cast<opmath_t>(gp[i]);
            opmath_t d = maths.direction(mu, gi);
            if (use_momentum) {
              d = maths.with_momentum(mp[i], d);
              mp[i] = d;
            }
            vp[i] = maths.variance(vp[i], gi, z[k]);
            wp[i] = static_cast<scalar_t>(maths.mean(mu, d));
          }
        });
  });
  pl.finish();
}

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
  PhaseLists pl("vsam_sumsq", {{"grads", grads, kP}, {"variances", variances, kS}});
  return norm_tensor(weighted_sumsq(pl, 0, 1));
}

at::Tensor vsam_perturb(at::TensorList params, at::TensorList grads, at::TensorList backups,
                        at::TensorList variances, const c10::optional<at::Tensor>& sigma_norm,
                        double dim, double eps, double var_lr, double prior_var, double num_data,
                        bool log_step, double min_var, const c10::optional<at::Tensor>& found_inf) {
  PhaseLists pl("vsam_perturb_",
                {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP, W},
                 {"variances", variances, kS, W}},
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
    scalar_t* wp = v.param(0);
    const scalar_t* gp = v.param(1);
    scalar_t* bp = v.param(2);
    opmath_t* vp = v.state(3);
    for (int64_t i = v.begin; i < v.end; ++i) {
      const opmath_t mu = static_cast<opmath_t>(wp[i]);
      const opmath_t gi = static_cast<opmath_t>(gp[i]);
      const opmath_t var = vp[i];
      bp[i] = wp[i];
      wp[i] = static_cast<scalar_t>(maths.perturbed(mu, gi, var, inv));  // eq. 2
      vp[i] = maths.variance(var, gi, inv);                                // eq. 42 / line 7
    }
  });
  pl.finish();
  return norm_tensor(norm);
}

}  // namespace

TORCH_LIBRARY_IMPL(samkernels, CPU, m) {
  m.impl("vi_noise_", &vi_noise);
  m.impl("mfvi_update_", &mfvi_update);
  m.impl("vsam_sumsq", &vsam_sumsq);
  m.impl("vsam_perturb_", &vsam_perturb);
}

}  // namespace cpu
}  // namespace samkernels
