// bSAM phases on the CPU (Algorithm 1 of Möllenhoff & Khan 2022; docs/spec.md lines 1-7; schemas
// in samkernels/ops/_spec.py).  Per-element maths: math/bsam.h (shared with CUDA).
//   bsam_noise_    line 1:     backup <- omega, w <- omega + z / sqrt(N s)   (Philox noise)
//   bsam_perturb_  lines 3, 5: w <- omega + rho g / s, then s update (or accumulate sqrt(s)|g|)
//   bsam_update_   lines 5-7:  momentum and mean update, w <- omega
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "cpu/multi_tensor.h"
#include "cpu/normal_block.h"
#include "math/bsam.h"

namespace samkernels {
namespace cpu {
namespace {

void bsam_noise(at::TensorList params, at::TensorList backups, at::TensorList precisions,
                at::IntArrayRef param_ids, int64_t seed, int64_t step, double num_data) {
  PhaseLists pl("bsam_noise_",
                {{"params", params, kP, W}, {"backups", backups, kP, W},
                 {"precisions", precisions, kS}},
                c10::nullopt, param_ids, /*takes_ids=*/true);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    noise_chunk(v, math::BsamNoise<opmath_t>::make(num_data), static_cast<uint64_t>(seed),
                static_cast<uint64_t>(step), static_cast<uint32_t>(param_ids[v.tensor]));
  });
  pl.finish();
}

void bsam_perturb(at::TensorList params, at::TensorList grads, at::TensorList backups,
                  at::TensorList precisions, at::TensorList accums, double rho, double beta2,
                  double delta, double gamma, const c10::optional<at::Tensor>& found_inf) {
  const bool accumulate = !accums.empty();  // empty list: no accumulation, line 5 runs here
  PhaseLists pl("bsam_perturb_",
                {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP},
                 {"precisions", precisions, kS, !accumulate}, {"accums", accums, kS, W, Opt}},
                found_inf);
  if (pl.skip()) return copy_lists(params, backups);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths = math::BsamPerturb<opmath_t>::make(rho, beta2, delta, gamma, accumulate);
    scalar_t* wp = v.param(0);
    const scalar_t* gp = v.param(1);
    const scalar_t* bp = v.param(2);
    opmath_t* sp = v.state(3);
    opmath_t* ap = v.state(4);
    for (int64_t i = v.begin; i < v.end; ++i) {
      const opmath_t gi = static_cast<opmath_t>(gp[i]), si = sp[i];
      wp[i] = static_cast<scalar_t>(maths(static_cast<opmath_t>(bp[i]), gi, si));  // line 3
      const opmath_t h = math::BsamPrecision<opmath_t>::sharpness(si, gi);
      if (accumulate) ap[i] = ap[i] + h;  // line 5 deferred to the update
      else sp[i] = maths.line5(si, h);    // line 5
    }
  });
  pl.finish();
}

void bsam_update(at::TensorList params, at::TensorList grads, at::TensorList backups,
                 at::TensorList precisions, at::TensorList momenta, at::TensorList accums, double lr,
                 double beta1, double beta2, double delta, double gamma, double accum_scale,
                 bool released_order, const c10::optional<at::Tensor>& found_inf) {
  const bool accumulate = !accums.empty();  // empty list: line 5 already ran in bsam_perturb_
  check_released_order("bsam_update_", accumulate, released_order);
  PhaseLists pl("bsam_update_",
                {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP},
                 {"precisions", precisions, kS, accumulate}, {"momenta", momenta, kS, W},
                 {"accums", accums, kS, false, Opt}},
                found_inf);
  if (pl.skip()) return copy_lists(params, backups);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths = math::BsamUpdate<opmath_t>::make(lr, beta1, beta2, delta, gamma,
                                                        accum_scale, released_order, accumulate);
    scalar_t* wp = v.param(0);
    const scalar_t* gp = v.param(1);
    const scalar_t* bp = v.param(2);
    opmath_t* sp = v.state(3);
    opmath_t* mp = v.state(4);
    const opmath_t* ap = v.state(5);
    for (int64_t i = v.begin; i < v.end; ++i) {
      const opmath_t omega = static_cast<opmath_t>(bp[i]);
      const opmath_t s_old = sp[i];
      opmath_t s_new = s_old;
      if (accumulate) {
        s_new = maths.precision(s_old, ap[i]);  // line 5 (m-sharpness average)
        sp[i] = s_new;
      }
      const opmath_t gm = maths.momentum(mp[i], static_cast<opmath_t>(gp[i]), omega);  // line 6
      mp[i] = gm;
      wp[i] = static_cast<scalar_t>(maths.mean(omega, gm, s_old, s_new));  // line 7
    }
  });
  pl.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(samkernels, CPU, m) {
  m.impl("bsam_noise_", &bsam_noise);
  m.impl("bsam_perturb_", &bsam_perturb);
  m.impl("bsam_update_", &bsam_update);
}

}  // namespace cpu
}  // namespace samkernels
