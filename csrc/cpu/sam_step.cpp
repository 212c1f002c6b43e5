// SAM / ASAM phases on the CPU (docs/spec.md "SAM family"): global gradient norm, perturbation with backup,
// and restore fused with the base optimizer's update (SGD with momentum, Adam, AdamW).
// Semantics: samkernels/ops/reference.py.  Each element is read and written once per phase.
#include <torch/library.h>

#include <cmath>

#include "cpu/multi_tensor.h"

namespace samkernels {
namespace cpu {
namespace {

// The norm contract of every backend: a returned norm is a 0-dim float64 tensor (the sums are
// float64 already), whatever the parameters' dtypes, as reference.py returns it.
const at::TensorOptions kNormOptions = at::TensorOptions().dtype(at::kDouble);

at::Tensor grad_sumsq(at::TensorList params, at::TensorList grads, bool adaptive, double eta) {
  if (adaptive) check_lists("grad_sumsq", params, {{"grads", grads}}, {});
  Contig g(grads), p(adaptive ? params : grads);
  return at::scalar_tensor(sumsq(p, g, adaptive, eta), at::TensorOptions().dtype(at::kDouble));
}

at::Tensor sam_perturb(at::TensorList params, at::TensorList grads, at::TensorList backups,
                       const c10::optional<at::Tensor>& grad_norm, double rho, double eps,
                       bool adaptive, double eta, const c10::optional<at::Tensor>& found_inf) {
  check_lists("sam_perturb_", params, {{"grads", grads}, {"backups", backups}}, {});
  Contig p(params), g(grads), b(backups);
  const double norm = grad_norm.has_value() ? grad_norm->item<double>()
                                            : std::sqrt(sumsq(p, g, adaptive, eta));
  if (skip_requested("sam_perturb_", found_inf)) {  // skip form: backup only, w stays
    copy_lists(backups, params);
    return at::scalar_tensor(norm, kNormOptions);
  }
  const auto chunks = make_chunks(p.list());
  for_each_chunk(chunks, total_numel(p.list()), [&](int64_t, const Chunk& c) {
    SK_DISPATCH_PARAM(p[c.tensor].scalar_type(), "sam_perturb_", [&] {
      scalar_t* wp = p[c.tensor].data_ptr<scalar_t>();
      scalar_t* bp = b[c.tensor].data_ptr<scalar_t>();
      const scalar_t* gp = g[c.tensor].data_ptr<scalar_t>();
      const opmath_t scale = static_cast<opmath_t>(rho) /
                             (static_cast<opmath_t>(norm) + static_cast<opmath_t>(eps));
      const opmath_t et = static_cast<opmath_t>(eta);
      for (int64_t i = c.begin; i < c.end; ++i) {
        const opmath_t w = static_cast<opmath_t>(wp[i]);
        opmath_t e = static_cast<opmath_t>(gp[i]);
        if (adaptive) {
          const opmath_t t = std::abs(w) + et;  // ASAM: e = rho T^2 g / ||T g||
          e = e * (t * t);
        }
        bp[i] = wp[i];
        wp[i] = static_cast<scalar_t>(w + e * scale);
      }
    });
  });
  p.write_back();
  b.write_back();
  return at::scalar_tensor(norm, kNormOptions);
}

void sam_restore_sgd(at::TensorList params, at::TensorList grads, at::TensorList backups,
                     at::TensorList momentum_bufs, double lr, double momentum, double dampening,
                     bool nesterov, double weight_decay, bool first,
                     const c10::optional<at::Tensor>& found_inf) {
  const bool use_momentum = momentum != 0.0;
  if (use_momentum)
    check_lists("sam_restore_sgd_", params, {{"grads", grads}, {"backups", backups}},
                {{"momentum_bufs", momentum_bufs}});
  else
    check_lists("sam_restore_sgd_", params, {{"grads", grads}, {"backups", backups}}, {});
  if (skip_requested("sam_restore_sgd_", found_inf)) return copy_lists(params, backups);
  Contig p(params), g(grads), b(backups), m(use_momentum ? momentum_bufs : params);
  const auto chunks = make_chunks(p.list());
  for_each_chunk(chunks, total_numel(p.list()), [&](int64_t, const Chunk& c) {
    SK_DISPATCH_PARAM(p[c.tensor].scalar_type(), "sam_restore_sgd_", [&] {
      scalar_t* wp = p[c.tensor].data_ptr<scalar_t>();
      const scalar_t* gp = g[c.tensor].data_ptr<scalar_t>();
      const scalar_t* bp = b[c.tensor].data_ptr<scalar_t>();
      opmath_t* mp = use_momentum ? m[c.tensor].data_ptr<opmath_t>() : nullptr;
      const opmath_t lr_ = lr, mom = momentum, damp = 1.0 - dampening, wd = weight_decay;
      for (int64_t i = c.begin; i < c.end; ++i) {
        const opmath_t w = static_cast<opmath_t>(bp[i]);  // restore: copy of the mean weights
        opmath_t d = static_cast<opmath_t>(gp[i]);
        if (weight_decay != 0.0) d = d + wd * w;
        if (use_momentum) {
          const opmath_t buf = first ? d : mom * mp[i] + damp * d;
          mp[i] = buf;
          d = nesterov ? d + mom * buf : buf;
        }
        wp[i] = static_cast<scalar_t>(w - lr_ * d);
      }
    });
  });
  p.write_back();
  if (use_momentum) m.write_back();
}

void sam_restore_adam(at::TensorList params, at::TensorList grads, at::TensorList backups,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, int64_t step, double lr,
                      double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                      const c10::optional<at::Tensor>& found_inf) {
  check_lists("sam_restore_adam_", params, {{"grads", grads}, {"backups", backups}},
              {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}});
  TORCH_CHECK(step >= 1, "sam_restore_adam_: step counts from 1, got ", step);
  if (skip_requested("sam_restore_adam_", found_inf)) return copy_lists(params, backups);
  Contig p(params), g(grads), b(backups), m(exp_avgs), v(exp_avg_sqs);
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  const auto chunks = make_chunks(p.list());
  for_each_chunk(chunks, total_numel(p.list()), [&](int64_t, const Chunk& c) {
    SK_DISPATCH_PARAM(p[c.tensor].scalar_type(), "sam_restore_adam_", [&] {
      scalar_t* wp = p[c.tensor].data_ptr<scalar_t>();
      const scalar_t* gp = g[c.tensor].data_ptr<scalar_t>();
      const scalar_t* bp = b[c.tensor].data_ptr<scalar_t>();
      opmath_t* mp = m[c.tensor].data_ptr<opmath_t>();
      opmath_t* vp = v[c.tensor].data_ptr<opmath_t>();
      // 1 - beta in double, then rounded: (1 - b2) from an fp32-rounded b2 is 1.3e-5 off
      const opmath_t b1 = beta1, b2 = beta2, wd = weight_decay;
      const opmath_t omb1 = 1.0 - beta1, omb2 = 1.0 - beta2;
      const opmath_t decay = 1.0 - lr * weight_decay, step_size = lr / bc1;
      const opmath_t bc2s = bc2_sqrt, ep = eps;
      for (int64_t i = c.begin; i < c.end; ++i) {
        opmath_t w = static_cast<opmath_t>(bp[i]);
        opmath_t d = static_cast<opmath_t>(gp[i]);
        if (weight_decay != 0.0) {
          if (decoupled) w = w * decay;  // AdamW
          else d = d + wd * w;            // Adam: L2 in the gradient
        }
        const opmath_t mi = b1 * mp[i] + omb1 * d;
        const opmath_t vi = b2 * vp[i] + omb2 * d * d;
        mp[i] = mi;
        vp[i] = vi;
        wp[i] = static_cast<scalar_t>(w - step_size * mi / (std::sqrt(vi) / bc2s + ep));
      }
    });
  });
  p.write_back();
  m.write_back();
  v.write_back();
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
