// SAM-variant phases on the CPU (GSAM, WSAM, LookSAM, FriendlySAM; docs/spec.md "SAM variants";
// rows and float64 references in samkernels/ops/reference.py).  Per-element maths: math/samv.h
// (shared with CUDA).
//   samv_dots           [<u,u>, <u,b>, <b,b>], u = a - shift b, float64 (one read of both lists)
//   samv_perturb_       backup <- w, w <- w + rho T^2 u / (norm + eps); keeps g0 / FriendlySAM's m
//   samv_restore_sgd_   w <- backup, SGD step with d = c0 g + c1 s, then + c2 g + c3 s; out
//   samv_restore_adam_  the same with Adam / AdamW
#include <torch/library.h>

#include <array>
#include <cmath>

#include "cpu/multi_tensor.h"
#include "math/samv.h"

namespace samkernels {
namespace cpu {
namespace {

// A 0-dim (or one-element) tensor argument read on the host: free on the CPU.
double scalar_arg(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must hold one element, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(),
              " but the parameters are on the CPU");
  return t.item<double>();
}

// The six coefficients (c0 .. c5) of the restores, as doubles.
std::array<double, 6> coeff_arg(const char* op, const at::Tensor& coeffs) {
  TORCH_CHECK(coeffs.numel() == 6, op, ": coeffs must hold 6 values (c0 .. c5), got shape ",
              coeffs.sizes());
  TORCH_CHECK(coeffs.device().is_cpu(), op, ": coeffs is on ", coeffs.device(),
              " but the parameters are on the CPU");
  const at::Tensor c = coeffs.to(at::kDouble).contiguous();
  std::array<double, 6> out;
  for (int j = 0; j < 6; ++j) out[j] = c.data_ptr<double>()[j];
  return out;
}

at::Tensor samv_dots(at::TensorList lhs, at::TensorList rhs, double shift) {
  PhaseLists pl("samv_dots", {{"lhs", lhs, kP}, {"rhs", rhs, kS}});
  const auto s = pl.sums<3>([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const scalar_t* ap = v.param(0);
    const opmath_t* bp = v.state(1);
    double uu = 0.0, ub = 0.0, bb = 0.0;
#pragma omp simd reduction(+ : uu, ub, bb)
    for (int64_t i = v.begin; i < v.end; ++i) {
      double x, y, z;
      math::samv_dot_terms(static_cast<double>(ap[i]), static_cast<double>(bp[i]), shift, x, y,
                           z);
      uu += x;
      ub += y;
      bb += z;
    }
    return std::array<double, 3>{uu, ub, bb};
  });
  return at::tensor(std::vector<double>{s[0], s[1], s[2]},
                    at::TensorOptions().dtype(at::kDouble));
}

void samv_perturb(at::TensorList params, at::TensorList grads, at::TensorList backups,
                  at::TensorList saved, at::TensorList momenta, const at::Tensor& norm, double rho,
                  double eps, bool adaptive, double eta, double sigma, double lmbda, bool first,
                  const c10::optional<at::Tensor>& found_inf) {
  PhaseLists pl("samv_perturb_",
                {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP, W},
                 {"saved", saved, kS, W, Opt}, {"momenta", momenta, kS, W, Opt}},
                found_inf);
  const double n = scalar_arg("samv_perturb_", "norm", norm);
  if (pl.skip()) return copy_lists(backups, params);  // skip form: backup only, w stays
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths =
        math::SamvPerturb<opmath_t>::make(rho, eps, adaptive, eta, sigma, lmbda, first);
    const opmath_t scale = maths.scale(n);
    scalar_t* wp = v.param(0);
    const scalar_t* gp = v.param(1);
    scalar_t* bp = v.param(2);
    opmath_t* sp = v.state(3);
    opmath_t* mp = v.state(4);
    for (int64_t i = v.begin; i < v.end; ++i) {
      const auto w = static_cast<opmath_t>(wp[i]);
      const auto g = static_cast<opmath_t>(gp[i]);
      bp[i] = wp[i];
      if (sp != nullptr) sp[i] = g;
      opmath_t u = g;
      if (mp != nullptr) {
        opmath_t m = mp[i];
        u = maths.friendly(g, m);
        mp[i] = m;
      }
      wp[i] = static_cast<scalar_t>(maths(w, u, scale));
    }
  });
  pl.finish();
}

void samv_restore_sgd(at::TensorList params, at::TensorList grads, at::TensorList backups,
                      at::TensorList saved, at::TensorList momentum_bufs, at::TensorList outs,
                      const at::Tensor& coeffs, double lr, double momentum, double dampening,
                      bool nesterov, double weight_decay, bool first,
                      const c10::optional<at::Tensor>& found_inf) {
  PhaseLists pl("samv_restore_sgd_",
                {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP},
                 {"saved", saved, kS},
                 {"momentum_bufs", momentum != 0.0 ? momentum_bufs : at::TensorList{}, kS, W,
                  /*optional=*/momentum == 0.0},
                 {"outs", outs, kS, W, Opt}},
                found_inf);
  const auto c = coeff_arg("samv_restore_sgd_", coeffs);
  if (pl.skip()) return copy_lists(params, backups);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths =
        math::SgdRestore<opmath_t>::make(lr, momentum, dampening, nesterov, weight_decay, first);
    const auto mix = math::SamvMix<opmath_t>::make(c.data());
    scalar_t* wp = v.param(0);
    const scalar_t* gp = v.param(1);
    const scalar_t* bp = v.param(2);
    const opmath_t* sp = v.state(3);
    opmath_t* mp = v.state(4);
    opmath_t* op = v.state(5);
    for (int64_t i = v.begin; i < v.end; ++i) {
      const auto g = static_cast<opmath_t>(gp[i]);
      const opmath_t s = sp[i];
      opmath_t buf = mp != nullptr ? mp[i] : opmath_t(0);
      const opmath_t w = maths(static_cast<opmath_t>(bp[i]), mix(0, g, s), buf);
      if (mp != nullptr) mp[i] = buf;
      if (op != nullptr) op[i] = mix(4, g, s);
      wp[i] = static_cast<scalar_t>(w + mix(2, g, s));
    }
  });
  pl.finish();
}

void samv_restore_adam(at::TensorList params, at::TensorList grads, at::TensorList backups,
                       at::TensorList saved, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                       at::TensorList outs, const at::Tensor& coeffs, int64_t step, double lr,
                       double beta1, double beta2, double eps, double weight_decay,
                       bool decoupled, const c10::optional<at::Tensor>& found_inf) {
  PhaseLists pl("samv_restore_adam_",
                {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP},
                 {"saved", saved, kS}, {"exp_avgs", exp_avgs, kS, W},
                 {"exp_avg_sqs", exp_avg_sqs, kS, W}, {"outs", outs, kS, W, Opt}},
                found_inf);
  check_adam_step("samv_restore_adam_", step);
  const auto c = coeff_arg("samv_restore_adam_", coeffs);
  if (pl.skip()) return copy_lists(params, backups);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths = math::AdamRestore<opmath_t>::make(step, lr, beta1, beta2, eps,
                                                         weight_decay, decoupled);
    const auto mix = math::SamvMix<opmath_t>::make(c.data());
    scalar_t* wp = v.param(0);
    const scalar_t* gp = v.param(1);
    const scalar_t* bp = v.param(2);
    const opmath_t* sp = v.state(3);
    opmath_t* mp = v.state(4);
    opmath_t* vp = v.state(5);
    opmath_t* op = v.state(6);
    for (int64_t i = v.begin; i < v.end; ++i) {
      const auto g = static_cast<opmath_t>(gp[i]);
      const opmath_t s = sp[i];
      opmath_t m = mp[i], q = vp[i];
      const opmath_t w = maths(static_cast<opmath_t>(bp[i]), mix(0, g, s), m, q);
      mp[i] = m;
      vp[i] = q;
      if (op != nullptr) op[i] = mix(4, g, s);
      wp[i] = static_cast<scalar_t>(w + mix(2, g, s));
    }
  });
  pl.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(samkernels, CPU, m) {
  m.impl("samv_dots", &samv_dots);
  m.impl("samv_perturb_", &samv_perturb);
  m.impl("samv_restore_sgd_", &samv_restore_sgd);
  m.impl("samv_restore_adam_", &samv_restore_adam);
}

}  // namespace cpu
}  // namespace samkernels
