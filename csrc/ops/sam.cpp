// SAM / ASAM phases (docs/spec.md "SAM family"; rows in samkernels/ops/reference.py): global
// gradient norm, perturbation with backup, and restore fused with the base optimizer's update
// (SGD with momentum, Adam, AdamW).  The family's torch-facing code: the CPU kernels and, in CUDA
// builds, the glue to the launch functions of cuda/sam.cu.  Per-element maths: math/sam.h (shared
// by both).  Each element is read and written once per phase.
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/multi_tensor.h"
#include "math/sam.h"
#ifdef SAMKERNELS_WITH_CUDA
#include "cuda/glue.h"
#endif

namespace samkernels {
namespace {

std::vector<ListArg> grad_sumsq_lists(at::TensorList params, at::TensorList grads) {
  // params are read only for ASAM (T = |w| + eta), but checked against the grads either way (same
  // contract as every phase: a grad of the wrong size or dtype is an error naming it)
  return {{"params", params, kP}, {"grads", grads, kP}};
}

std::vector<ListArg> nonfinite_flag_lists(at::TensorList grads) {
  return {{"grads", grads, kP}};
}

std::vector<ListArg> sam_perturb_lists(at::TensorList params, at::TensorList grads,
                                       at::TensorList backups) {
  return {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP, W}};
}

std::vector<ListArg> sam_restore_sgd_lists(at::TensorList params, at::TensorList grads,
                                           at::TensorList backups, at::TensorList momentum_bufs,
                                           double momentum) {
  // reference: the buffers are only touched with momentum
  return {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP},
          {"momentum_bufs", momentum != 0.0 ? momentum_bufs : at::TensorList{}, kS, W,
           /*optional=*/momentum == 0.0}};
}

std::vector<ListArg> sam_restore_adam_lists(at::TensorList params, at::TensorList grads,
                                            at::TensorList backups, at::TensorList exp_avgs,
                                            at::TensorList exp_avg_sqs) {
  return {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP},
          {"exp_avgs", exp_avgs, kS, W}, {"exp_avg_sqs", exp_avg_sqs, kS, W}};
}

}  // namespace

namespace cpu {
namespace {

at::Tensor grad_sumsq(at::TensorList params, at::TensorList grads, bool adaptive, double eta) {
  PhaseLists pl("grad_sumsq", grad_sumsq_lists(params, grads));
  return norm_tensor(pl.sum([&](const auto& v) { return chunk_sumsq(v, 0, 1, adaptive, eta); }));
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("grad_sumsq", &grad_sumsq); }

at::Tensor nonfinite_flag(at::TensorList grads) {
  PhaseLists pl("nonfinite_flag", nonfinite_flag_lists(grads));
  const double s = pl.sum([&](const auto& v) { return chunk_nonfinite(v, 0); });
  return at::scalar_tensor(std::isnan(s) ? 1.0 : 0.0, at::TensorOptions().dtype(at::kFloat));
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("nonfinite_flag", &nonfinite_flag); }

at::Tensor sam_perturb(at::TensorList params, at::TensorList grads, at::TensorList backups,
                       const c10::optional<at::Tensor>& grad_norm, double rho, double eps,
                       bool adaptive, double eta, const c10::optional<at::Tensor>& found_inf) {
  PhaseLists pl("sam_perturb_", sam_perturb_lists(params, grads, backups), found_inf);
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
    const auto p = gradient_lists(v);
    for (int64_t i = v.begin; i < v.end; ++i) {
      const auto w = static_cast<opmath_t>(p.w[i]);
      p.b[i] = p.w[i];
      p.w[i] = static_cast<scalar_t>(maths(w, static_cast<opmath_t>(p.g[i]), scale));
    }
  });
  pl.finish();
  return norm_tensor(norm);
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("sam_perturb_", &sam_perturb); }

void sam_restore_sgd(at::TensorList params, at::TensorList grads, at::TensorList backups,
                     at::TensorList momentum_bufs, double lr, double momentum, double dampening,
                     bool nesterov, double weight_decay, bool first,
                     const c10::optional<at::Tensor>& found_inf) {
  PhaseLists pl("sam_restore_sgd_",
                sam_restore_sgd_lists(params, grads, backups, momentum_bufs, momentum), found_inf);
  if (pl.skip()) return copy_lists(params, backups);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths =
        math::SgdRestore<opmath_t>::make(lr, momentum, dampening, nesterov, weight_decay, first);
    const auto p = gradient_lists(v);
    opmath_t* mp = v.state(3);
    if (mp == nullptr) {
      for (int64_t i = v.begin; i < v.end; ++i) {
        opmath_t unused = 0;
        p.w[i] = static_cast<scalar_t>(
            maths(static_cast<opmath_t>(p.b[i]), static_cast<opmath_t>(p.g[i]), unused));
      }
      return;
    }
    for (int64_t i = v.begin; i < v.end; ++i) {  // restore: w from the copy of the mean weights
      opmath_t buf = mp[i];
      p.w[i] = static_cast<scalar_t>(
          maths(static_cast<opmath_t>(p.b[i]), static_cast<opmath_t>(p.g[i]), buf));
      mp[i] = buf;
    }
  });
  pl.finish();
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("sam_restore_sgd_", &sam_restore_sgd); }

void sam_restore_adam(at::TensorList params, at::TensorList grads, at::TensorList backups,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, int64_t step, double lr,
                      double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                      const c10::optional<at::Tensor>& found_inf,
                      const c10::optional<at::Tensor>& device_step) {
  PhaseLists pl("sam_restore_adam_",
                sam_restore_adam_lists(params, grads, backups, exp_avgs, exp_avg_sqs), found_inf);
  step = at_step("sam_restore_adam_", step, device_step, params);
  check_adam_step("sam_restore_adam_", step);
  if (pl.skip()) return copy_lists(params, backups);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths = math::AdamRestore<opmath_t>::make(step, lr, beta1, beta2, eps,
                                                         weight_decay, decoupled);
    const auto p = gradient_lists(v);
    opmath_t* mp = v.state(3);
    opmath_t* vp = v.state(4);
    for (int64_t i = v.begin; i < v.end; ++i) {
      opmath_t m = mp[i], s = vp[i];
      p.w[i] = static_cast<scalar_t>(
          maths(static_cast<opmath_t>(p.b[i]), static_cast<opmath_t>(p.g[i]), m, s));
      mp[i] = m;
      vp[i] = s;
    }
  });
  pl.finish();
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("sam_restore_adam_", &sam_restore_adam); }

}  // namespace

}  // namespace cpu

#ifdef SAMKERNELS_WITH_CUDA
namespace cuda {

// Launch functions of cuda/sam.cu (grad_sumsq's two stages: cuda/launch.h).

// nonfinite_flag stage 1: one float64 partial per chunk of list 1 (the grads), the sum of
// (g - g): 0 iff the chunk is finite, NaN otherwise.  Stage 2: *flag = 1.0f if one of
// partials[0 .. n) is NaN, else 0.0f.
cudaError_t launch_nonfinite_partials(const Group& g, double* partials, int64_t first_block,
                                      cudaStream_t stream);
cudaError_t launch_flag_partials(const double* partials, int64_t n, float* flag,
                                 cudaStream_t stream);

// sam_perturb_ given the norm in device memory (*norm, float64).  Lists: 0 params, 1 grads,
// 2 backups.
cudaError_t launch_sam_perturb(const Group& g, const double* norm, double rho, double eps,
                               bool adaptive, double eta, const float* found_inf,
                               cudaStream_t stream);

// sam_restore_sgd_.  Lists: 0 params, 1 grads, 2 backups, 3 momentum_bufs (nullptr when
// momentum == 0).
cudaError_t launch_sam_restore_sgd(const Group& g, double lr, double momentum, double dampening,
                                   bool nesterov, double weight_decay, bool first,
                                   const float* found_inf, cudaStream_t stream);

// sam_restore_adam_ at Adam step `step` (>= 1; bias corrections in double, math/sam.h), plus
// *device_step when not nullptr.  Lists: 0 params, 1 grads, 2 backups, 3 exp_avgs, 4 exp_avg_sqs.
cudaError_t launch_sam_restore_adam(const Group& g, int64_t step, const int64_t* device_step,
                                    double lr, double beta1,
                                    double beta2, double eps, double weight_decay, bool decoupled,
                                    const float* found_inf, cudaStream_t stream);

namespace {

Tensor grad_sumsq_cuda(TensorList params, TensorList grads, bool adaptive, double eta) {
  PhaseLists pl("samkernels::grad_sumsq", grad_sumsq_lists(params, grads));
  if (pl.empty()) return zero_norm();
  return reduce(pl, /*take_sqrt=*/false, [&](double* parts, const Group& g, int64_t first) {
    return launch_grad_sumsq_partials(g, parts, first, adaptive, eta, pl.stream);
  });
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("grad_sumsq", &grad_sumsq_cuda); }

Tensor nonfinite_flag_cuda(TensorList grads) {
  PhaseLists pl("samkernels::nonfinite_flag", nonfinite_flag_lists(grads));
  if (pl.empty()) return at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA));
  const Tensor partials = partials_of(pl, [&](double* parts, const Group& g, int64_t first) {
    // the partials kernel reads its list 1 (list 0, unread, aliases it)
    return launch_nonfinite_partials(remap_lists(g, {0, 0}), parts, first, pl.stream);
  });
  Tensor flag = at::empty({}, partials.options().dtype(at::kFloat));
  SK_CHECK_LAUNCH(launch_flag_partials(partials.data_ptr<double>(), partials.numel(),
                                       flag.data_ptr<float>(), pl.stream));
  return flag;
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("nonfinite_flag", &nonfinite_flag_cuda); }

Tensor sam_perturb_cuda(TensorList params, TensorList grads, TensorList backups,
                        const std::optional<Tensor>& grad_norm, double rho, double eps,
                        bool adaptive, double eta, const std::optional<Tensor>& found_inf) {
  const char* op = "samkernels::sam_perturb_";
  PhaseLists pl(op, sam_perturb_lists(params, grads, backups), false, found_inf);
  const Tensor norm = phase_norm(op, "grad_norm", grad_norm, pl,
                                 [&](double* parts, const Group& g, int64_t first) {
                                   return launch_grad_sumsq_partials(g, parts, first, adaptive,
                                                                     eta, pl.stream);
                                 });
  pl.run([&](const Group& g) {
    return launch_sam_perturb(g, norm.data_ptr<double>(), rho, eps, adaptive, eta, pl.skip,
                              pl.stream);
  });
  return norm;
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("sam_perturb_", &sam_perturb_cuda); }

void sam_restore_sgd_cuda(TensorList params, TensorList grads, TensorList backups,
                          TensorList momentum_bufs, double lr, double momentum, double dampening,
                          bool nesterov, double weight_decay, bool first,
                          const std::optional<Tensor>& found_inf) {
  PhaseLists pl("samkernels::sam_restore_sgd_",
                sam_restore_sgd_lists(params, grads, backups, momentum_bufs, momentum), false,
                found_inf);
  pl.run([&](const Group& g) {
    return launch_sam_restore_sgd(g, lr, momentum, dampening, nesterov, weight_decay, first,
                                  pl.skip, pl.stream);
  });
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("sam_restore_sgd_", &sam_restore_sgd_cuda); }

void sam_restore_adam_cuda(TensorList params, TensorList grads, TensorList backups,
                           TensorList exp_avgs, TensorList exp_avg_sqs, int64_t step, double lr,
                           double beta1, double beta2, double eps, double weight_decay,
                           bool decoupled, const std::optional<Tensor>& found_inf,
                           const std::optional<Tensor>& device_step) {
  const char* op = "samkernels::sam_restore_adam_";
  PhaseLists pl(op, sam_restore_adam_lists(params, grads, backups, exp_avgs, exp_avg_sqs), false,
                found_inf);
  const int64_t* at = device_step_ptr(op, device_step, params);
  if (at == nullptr) check_adam_bias_corrections(op, step, beta1, beta2);
  pl.run([&](const Group& g) {
    return launch_sam_restore_adam(g, step, at, lr, beta1, beta2, eps, weight_decay, decoupled,
                                   pl.skip, pl.stream);
  });
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("sam_restore_adam_", &sam_restore_adam_cuda); }

}  // namespace

}  // namespace cuda
#endif  // SAMKERNELS_WITH_CUDA
}  // namespace samkernels
