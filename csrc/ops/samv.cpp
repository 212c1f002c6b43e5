// SAM-variant phases (GSAM, WSAM, LookSAM, FriendlySAM; docs/spec.md "SAM variants"; rows and
// float64 references in samkernels/ops/reference.py).  The family's torch-facing code: the CPU
// kernels and, in CUDA builds, the glue to the launch functions of cuda/samv.cu.  Per-element
// maths: math/samv.h (shared by both).
//   samv_dots           [<u,u>, <u,b>, <b,b>], u = a - shift b, float64 (one read of both lists)
//   samv_perturb_       backup <- w, w <- w + rho T^2 u / (norm + eps); keeps g0 / FriendlySAM's m
//   samv_restore_sgd_   w <- backup, SGD step with d = c0 g + c1 s, then + c2 g + c3 s; out
//   samv_restore_adam_  the same with Adam / AdamW
#include <torch/library.h>

#include <array>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/multi_tensor.h"
#include "math/samv.h"
#ifdef SAMKERNELS_WITH_CUDA
#include "cuda/glue.h"
#endif

namespace samkernels {
namespace {

std::vector<ListArg> samv_dots_lists(at::TensorList lhs, at::TensorList rhs) {
  return {{"lhs", lhs, kP}, {"rhs", rhs, kS}};
}

std::vector<ListArg> samv_perturb_lists(at::TensorList params, at::TensorList grads,
                                        at::TensorList backups, at::TensorList saved,
                                        at::TensorList momenta) {
  return {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP, W},
          {"saved", saved, kS, W, Opt}, {"momenta", momenta, kS, W, Opt}};
}

std::vector<ListArg> samv_restore_sgd_lists(at::TensorList params, at::TensorList grads,
                                            at::TensorList backups, at::TensorList saved,
                                            at::TensorList momentum_bufs, at::TensorList outs,
                                            double momentum) {
  // reference: the buffers are only touched with momentum
  return {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP},
          {"saved", saved, kS},
          {"momentum_bufs", momentum != 0.0 ? momentum_bufs : at::TensorList{}, kS, W,
           /*optional=*/momentum == 0.0},
          {"outs", outs, kS, W, Opt}};
}

std::vector<ListArg> samv_restore_adam_lists(at::TensorList params, at::TensorList grads,
                                             at::TensorList backups, at::TensorList saved,
                                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                             at::TensorList outs) {
  return {{"params", params, kP, W}, {"grads", grads, kP},        {"backups", backups, kP},
          {"saved", saved, kS},       {"exp_avgs", exp_avgs, kS, W}, {"exp_avg_sqs", exp_avg_sqs, kS, W},
          {"outs", outs, kS, W, Opt}};
}

}  // namespace

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

// f(std::bool_constant<a>{}, std::bool_constant<b>{}): the loops below branch at compile time
// (a branch or an optional pointer inside them keeps the compiler from vectorising).
template <class F>
void with_flags(bool a, bool b, F&& f) {
  if (a) {
    if (b) f(std::true_type{}, std::true_type{});
    else f(std::true_type{}, std::false_type{});
  } else {
    if (b) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  }
}

at::Tensor samv_dots(at::TensorList lhs, at::TensorList rhs, double shift) {
  PhaseLists pl("samv_dots", samv_dots_lists(lhs, rhs));
  const auto s = pl.sums<3>([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const scalar_t* ap = v.param(0);
    const opmath_t* bp = v.state(1);
    double uu = 0.0, ub = 0.0, bb = 0.0;
    if (shift != 0.0) {
#pragma omp simd reduction(+ : uu, ub, bb)
      for (int64_t i = v.begin; i < v.end; ++i) {
        double x, y, z;
        math::samv_dot_terms(static_cast<double>(ap[i]), static_cast<double>(bp[i]), shift, x,
                             y, z);
        uu += x;
        ub += y;
        bb += z;
      }
    } else {
#pragma omp simd reduction(+ : uu, ub, bb)
      for (int64_t i = v.begin; i < v.end; ++i) {
        double x, y, z;
        math::samv_dot_terms(static_cast<double>(ap[i]), static_cast<double>(bp[i]), 0.0, x, y,
                             z);
        uu += x;
        ub += y;
        bb += z;
      }
    }
    return std::array<double, 3>{uu, ub, bb};
  });
  return at::tensor(std::vector<double>{s[0], s[1], s[2]},
                    at::TensorOptions().dtype(at::kDouble));
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("samv_dots", &samv_dots); }

void samv_perturb(at::TensorList params, at::TensorList grads, at::TensorList backups,
                  at::TensorList saved, at::TensorList momenta, const at::Tensor& norm, double rho,
                  double eps, bool adaptive, double eta, double sigma, double lmbda, bool first,
                  const c10::optional<at::Tensor>& found_inf) {
  PhaseLists pl("samv_perturb_", samv_perturb_lists(params, grads, backups, saved, momenta),
                found_inf);
  const double n = scalar_arg("samv_perturb_", "norm", norm);
  if (pl.skip()) return copy_lists(backups, params);  // skip form: backup only, w stays
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths =
        math::SamvPerturb<opmath_t>::make(rho, eps, adaptive, eta, sigma, lmbda, first);
    const opmath_t scale = maths.scale(n);
    const auto p = gradient_lists(v);
    opmath_t* sp = v.state(3);
    opmath_t* mp = v.state(4);
    with_flags(sp != nullptr, mp != nullptr, [&](auto keep, auto friendly) {
#pragma omp simd
      for (int64_t i = v.begin; i < v.end; ++i) {
        const auto w = static_cast<opmath_t>(p.w[i]);
        const auto g = static_cast<opmath_t>(p.g[i]);
        p.b[i] = p.w[i];
        if constexpr (decltype(keep)::value) sp[i] = g;
        opmath_t u = g;
        if constexpr (decltype(friendly)::value) {
          opmath_t m = mp[i];
          u = maths.friendly(g, m);
          mp[i] = m;
        }
        p.w[i] = static_cast<scalar_t>(maths(w, u, scale));
      }
    });
  });
  pl.finish();
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("samv_perturb_", &samv_perturb); }

void samv_restore_sgd(at::TensorList params, at::TensorList grads, at::TensorList backups,
                      at::TensorList saved, at::TensorList momentum_bufs, at::TensorList outs,
                      const at::Tensor& coeffs, double lr, double momentum, double dampening,
                      bool nesterov, double weight_decay, bool first,
                      const c10::optional<at::Tensor>& found_inf) {
  PhaseLists pl("samv_restore_sgd_",
                samv_restore_sgd_lists(params, grads, backups, saved, momentum_bufs, outs,
                                       momentum),
                found_inf);
  const auto c = coeff_arg("samv_restore_sgd_", coeffs);
  if (pl.skip()) return copy_lists(params, backups);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths =
        math::SgdRestore<opmath_t>::make(lr, momentum, dampening, nesterov, weight_decay, first);
    const auto mix = math::SamvMix<opmath_t>::make(c.data());
    const auto p = gradient_lists(v);
    const opmath_t* sp = v.state(3);
    opmath_t* mp = v.state(4);
    opmath_t* op = v.state(5);
    with_flags(mp != nullptr, op != nullptr, [&](auto has_buf, auto has_out) {
#pragma omp simd
      for (int64_t i = v.begin; i < v.end; ++i) {
        const auto g = static_cast<opmath_t>(p.g[i]);
        const opmath_t s = sp[i];
        opmath_t buf = 0;
        if constexpr (decltype(has_buf)::value) buf = mp[i];
        const opmath_t w = maths(static_cast<opmath_t>(p.b[i]), mix(0, g, s), buf);
        if constexpr (decltype(has_buf)::value) mp[i] = buf;
        if constexpr (decltype(has_out)::value) op[i] = mix(4, g, s);
        p.w[i] = static_cast<scalar_t>(w + mix(2, g, s));
      }
    });
  });
  pl.finish();
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("samv_restore_sgd_", &samv_restore_sgd); }

void samv_restore_adam(at::TensorList params, at::TensorList grads, at::TensorList backups,
                       at::TensorList saved, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                       at::TensorList outs, const at::Tensor& coeffs, int64_t step, double lr,
                       double beta1, double beta2, double eps, double weight_decay,
                       bool decoupled, const c10::optional<at::Tensor>& found_inf,
                       const c10::optional<at::Tensor>& device_step) {
  PhaseLists pl("samv_restore_adam_",
                samv_restore_adam_lists(params, grads, backups, saved, exp_avgs, exp_avg_sqs,
                                        outs),
                found_inf);
  step = at_step("samv_restore_adam_", step, device_step, params);
  check_adam_step("samv_restore_adam_", step);
  const auto c = coeff_arg("samv_restore_adam_", coeffs);
  if (pl.skip()) return copy_lists(params, backups);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths = math::AdamRestore<opmath_t>::make(step, lr, beta1, beta2, eps,
                                                         weight_decay, decoupled);
    const auto mix = math::SamvMix<opmath_t>::make(c.data());
    const auto p = gradient_lists(v);
    const opmath_t* sp = v.state(3);
    opmath_t* mp = v.state(4);
    opmath_t* vp = v.state(5);
    opmath_t* op = v.state(6);
    with_flags(op != nullptr, false, [&](auto has_out, auto) {
#pragma omp simd
      for (int64_t i = v.begin; i < v.end; ++i) {
        const auto g = static_cast<opmath_t>(p.g[i]);
        const opmath_t s = sp[i];
        opmath_t m = mp[i], q = vp[i];
        const opmath_t w = maths(static_cast<opmath_t>(p.b[i]), mix(0, g, s), m, q);
        mp[i] = m;
        vp[i] = q;
        if constexpr (decltype(has_out)::value) op[i] = mix(4, g, s);
        p.w[i] = static_cast<scalar_t>(w + mix(2, g, s));
      }
    });
  });
  pl.finish();
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("samv_restore_adam_", &samv_restore_adam); }

}  // namespace

}  // namespace cpu

#ifdef SAMKERNELS_WITH_CUDA
namespace cuda {

// Launch functions of cuda/samv.cu.

// samv_dots stage 1.  Lists: 0 lhs (parameter dtype), 1 rhs (opmath).  Writes three float64
// partials (u u, u b, b b; u = a - shift b) per block to partials[3 first_block ...],
// 3 count_chunks(...) of them.
cudaError_t launch_samv_dots_partials(const Group& g, double* partials, int64_t first_block,
                                      double shift, cudaStream_t stream);

// samv_dots stage 2: one block sums the n triples of partials in a fixed order into out[0..2].
cudaError_t launch_samv_reduce3(const double* partials, int64_t n, double* out,
                                cudaStream_t stream);

// samv_perturb_ with the norm in device memory (*norm, float64).  Lists: 0 params, 1 grads,
// 2 backups, 3 saved (nullptr: not kept), 4 momenta (nullptr: no FriendlySAM momentum).
cudaError_t launch_samv_perturb(const Group& g, const double* norm, double rho, double eps,
                                bool adaptive, double eta, double sigma, double lmbda, bool first,
                                const float* found_inf, cudaStream_t stream);

// samv_restore_sgd_ with the six coefficients in device memory (coeffs[0..5], float64).
// Lists: 0 params, 1 grads, 2 backups, 3 saved, 4 momentum_bufs (nullptr when momentum == 0),
// 5 outs (nullptr: none).
cudaError_t launch_samv_restore_sgd(const Group& g, const double* coeffs, double lr,
                                    double momentum, double dampening, bool nesterov,
                                    double weight_decay, bool first, const float* found_inf,
                                    cudaStream_t stream);

// samv_restore_adam_ at Adam step `step` (>= 1), plus *device_step when not nullptr.  Lists:
// 0 params, 1 grads, 2 backups, 3 saved, 4 exp_avgs, 5 exp_avg_sqs, 6 outs (nullptr: none).
cudaError_t launch_samv_restore_adam(const Group& g, const double* coeffs, int64_t step,
                                     const int64_t* device_step, double lr, double beta1, double beta2, double eps,
                                     double weight_decay, bool decoupled, const float* found_inf,
                                     cudaStream_t stream);

namespace {

// A float64 tensor argument on the lists' device, `n` values (a norm, the coefficients).
Tensor device_values(const char* op, const char* name, const Tensor& t, const PhaseLists& pl,
                     int64_t n) {
  TORCH_CHECK(t.numel() == n, op, ": ", name, " must hold ", n, n == 1 ? " value" : " values",
              ", got shape ", t.sizes());
  TORCH_CHECK(t.device() == pl.base()[0].device(), op, ": ", name, " is on ", t.device(),
              " but the parameters are on ", pl.base()[0].device());
  return t.reshape({n}).to(at::kDouble).contiguous();
}

Tensor samv_dots_cuda(TensorList lhs, TensorList rhs, double shift) {
  PhaseLists pl("samkernels::samv_dots", samv_dots_lists(lhs, rhs));
  if (pl.empty()) return at::zeros({3}, at::TensorOptions().dtype(at::kDouble).device(at::kCUDA));
  const auto f64 = pl.base()[0].options().dtype(at::kDouble);
  const int64_t n = pl.chunks();
  Tensor partials = at::empty({3 * n}, f64);
  Tensor out = at::empty({3}, f64);
  int64_t first = 0;
  for (const Group& g : pl.groups()) {
    SK_CHECK_LAUNCH(launch_samv_dots_partials(g, partials.data_ptr<double>(), first, shift,
                                              pl.stream));
    first += count_chunks(g.numel, g.count);
  }
  SK_CHECK_LAUNCH(launch_samv_reduce3(partials.data_ptr<double>(), n, out.data_ptr<double>(),
                                      pl.stream));
  return out;
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("samv_dots", &samv_dots_cuda); }

void samv_perturb_cuda(TensorList params, TensorList grads, TensorList backups, TensorList saved,
                       TensorList momenta, const Tensor& norm, double rho, double eps,
                       bool adaptive, double eta, double sigma, double lmbda, bool first,
                       const std::optional<Tensor>& found_inf) {
  const char* op = "samkernels::samv_perturb_";
  PhaseLists pl(op, samv_perturb_lists(params, grads, backups, saved, momenta), false, found_inf);
  if (pl.empty()) return;
  const Tensor n = device_values(op, "norm", norm, pl, 1);
  pl.run([&](const Group& g) {
    return launch_samv_perturb(g, n.data_ptr<double>(), rho, eps, adaptive, eta, sigma, lmbda,
                               first, pl.skip, pl.stream);
  });
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("samv_perturb_", &samv_perturb_cuda); }

void samv_restore_sgd_cuda(TensorList params, TensorList grads, TensorList backups,
                           TensorList saved, TensorList momentum_bufs, TensorList outs,
                           const Tensor& coeffs, double lr, double momentum, double dampening,
                           bool nesterov, double weight_decay, bool first,
                           const std::optional<Tensor>& found_inf) {
  const char* op = "samkernels::samv_restore_sgd_";
  PhaseLists pl(op,
                samv_restore_sgd_lists(params, grads, backups, saved, momentum_bufs, outs,
                                       momentum),
                false, found_inf);
  if (pl.empty()) return;
  const Tensor c = device_values(op, "coeffs", coeffs, pl, 6);
  pl.run([&](const Group& g) {
    return launch_samv_restore_sgd(g, c.data_ptr<double>(), lr, momentum, dampening, nesterov,
                                   weight_decay, first, pl.skip, pl.stream);
  });
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("samv_restore_sgd_", &samv_restore_sgd_cuda); }

void samv_restore_adam_cuda(TensorList params, TensorList grads, TensorList backups,
                            TensorList saved, TensorList exp_avgs, TensorList exp_avg_sqs,
                            TensorList outs, const Tensor& coeffs, int64_t step, double lr,
                            double beta1, double beta2, double eps, double weight_decay,
                            bool decoupled, const std::optional<Tensor>& found_inf,
                            const std::optional<Tensor>& device_step) {
  const char* op = "samkernels::samv_restore_adam_";
  PhaseLists pl(op,
                samv_restore_adam_lists(params, grads, backups, saved, exp_avgs, exp_avg_sqs,
                                        outs),
                false, found_inf);
  const int64_t* at = device_step_ptr(op, device_step, params);
  if (at == nullptr) check_adam_bias_corrections(op, step, beta1, beta2);
  if (pl.empty()) return;
  const Tensor c = device_values(op, "coeffs", coeffs, pl, 6);
  pl.run([&](const Group& g) {
    return launch_samv_restore_adam(g, c.data_ptr<double>(), step, at, lr, beta1, beta2, eps,
                                    weight_decay, decoupled, pl.skip, pl.stream);
  });
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("samv_restore_adam_", &samv_restore_adam_cuda); }

}  // namespace

}  // namespace cuda
#endif  // SAMKERNELS_WITH_CUDA
}  // namespace samkernels
