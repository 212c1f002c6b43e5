// SAM / ASAM phases on the CPU (docs/spec.md "SAM family"; schemas in samkernels/ops/_spec.py):
// global gradient norm, perturbation with backup, and restore fused with the base optimizer's
// update (SGD with momentum, Adam, AdamW).  Per-element maths: math/sam.h (shared with CUDA).
// Each element is read and written once per phase.
#include <torch/library.h>

#include <cmath>

#include "cpu/multi_tensor.h"
#include "math/sam.h"

namespace samkernels {
namespace cpu {
namespace {

at::Tensor grad_sumsq(at::TensorList params, at::TensorList grads, bool adaptive, double eta) {
  // params are read only for ASAM, but checked against the grads either way (same contract as
  // every phase: a grad of the wrong size or dtype is an error naming it)
  PhaseLists pl("grad_sumsq", {{"params", params, kP}, {"grads", grads, kP}});
  return norm_tensor(pl.sum([&](const auto& v) { return chunk_sumsq(v, 0, 1, adaptive, eta); }));
}

at::Tensor sam_perturb(at::TensorList params, at::TensorList grads, at::TensorList backups,
                       const c10::optional<at::Tensor>& grad_norm, double rho, double eps,
                       bool adaptive, double eta, const c10::optional<at::Tensor>& found_inf) {
  PhaseLists pl("sam_perturb_",
                {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP, W}},
                found_inf);
  const double norm =
      grad_norm.has_value()
          ? grad_norm->item<double>()
          : std::sqrt(pl.sum([&](const auto& v) { return chunk_sumsq(v, 0, 1, adaptive, eta); }));
  if (pl.skip()) {  // skip form: backup only, w stays
    copy_lists(backups, params);
    return norm_tensor(norm);
  }
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths = math::SamPerturb<opmath_t>::make(rho, eps, adaptive, eta);
    const auto scale = maths.scale(norm);
    scalar_t* wp = v.param(0);
    const scalar_t* gp = v.param(1);
    scalar_t* bp = v.param(2);
    for (int64_t i = v.begin; i < v.end; ++i) {
      const auto w = static_cast<opmath_t>(wp[i]);
      bp[i] = wp[i];
      wp[i] = static_cast<scalar_t>(maths(w, static_cast<opmath_t>(gp[i]), scale));
    }
  });
  pl.finish();
  return norm_tensor(norm);
}

void sam_restore_sgd(at::TensorList params, at::TensorList grads, at::TensorList backups,
                     at::TensorList momentum_bufs, double lr, double momentum, double dampening,
                     bool nesterov, double weight_decay, bool first,
                     const c10::optional<at::Tensor>& found_inf) {
  // the buffers are only touched with momentum
  PhaseLists pl("sam_restore_sgd_",
                {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP},
                 {"momentum_bufs", momentum != 0.0 ? momentum_bufs : at::TensorList{}, kS, W,
                  /*optional=*/momentum == 0.0}},
                found_inf);
  if (pl.skip()) return copy_lists(params, backups);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths =
        math::SgdRestore<opmath_t>::make(lr, momentum, dampening, nesterov, weight_decay, first);
    scalar_t* wp = v.param(0);
    const scalar_t* gp = v.param(1);
    const scalar_t* bp = v.param(2);
    opmath_t* mp = v.state(3);
    if (mp == nullptr) {
      for (int64_t i = v.begin; i < v.end; ++i) {
        opmath_t unused = 0;
        wp[i] = static_cast<scalar_t>(
            maths(static_cast<opmath_t>(bp[i]), static_cast<opmath_t>(gp[i]), unused));
      }
      return;
    }
    for (int64_t i = v.begin; i < v.end; ++i) {  // restore: w from the copy of the mean weights
      opmath_t buf = mp[i];
      wp[i] = static_cast<scalar_t>(
          maths(static_cast<opmath_t>(bp[i]), static_cast<opmath_t>(gp[i]), buf));
      mp[i] = buf;
    }
  });
  pl.finish();
}

void sam_restore_adam(at::TensorList params, at::TensorList grads, at::TensorList backups,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, int64_t step, double lr,
                      double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                      const c10::optional<at::Tensor>& found_inf) {
  PhaseLists pl("sam_restore_adam_",
                {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP},
                 {"exp_avgs", exp_avgs, kS, W}, {"exp_avg_sqs", exp_avg_sqs, kS, W}},
                found_inf);
  check_adam_step("sam_restore_adam_", step);
  if (pl.skip()) return copy_lists(params, backups);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths = math::AdamRestore<opmath_t>::make(step, lr, beta1, beta2, eps,
                                                         weight_decay, decoupled);
    scalar_t* wp = v.param(0);
    const scalar_t* gp = v.param(1);
    const scalar_t* bp = v.param(2);
    opmath_t* mp = v.state(3);
    opmath_t* vp = v.state(4);
    for (int64_t i = v.begin; i < v.end; ++i) {
      opmath_t m = mp[i], s = vp[i];
      wp[i] = static_cast<scalar_t>(
          maths(static_cast<opmath_t>(bp[i]), static_cast<opmath_t>(gp[i]), m, s));
      mp[i] = m;
      vp[i] = s;
    }
  });
  pl.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(samkernels, CPU, m) {
  m.impl("grad_sumsq", &grad_sumsq);
  m.impl("sam_perturb_", &sam_perturb);
  m.impl("sam_restore_sgd_", &sam_restore_sgd);
  m.impl("sam_restore_adam_", &sam_restore_adam);
}

}  // namespace cpu
}  // namespace samkernels
