// bSAM phases (Algorithm 1 of Möllenhoff & Khan 2022; docs/spec.md lines 1-7; rows in
// samkernels/ops/reference.py).  The family's torch-facing code: the CPU kernels and, in CUDA
// builds, the glue to the launch functions of cuda/bsam.cu.  Per-element maths: math/bsam.h
// (shared by both).
//   bsam_noise_    line 1:     backup <- omega, w <- omega + z / sqrt(N s)   (Philox noise)
//   bsam_perturb_  lines 3, 5: w <- omega + rho g / s, then s update (or accumulate sqrt(s)|g|)
//   bsam_update_   lines 5-7:  momentum and mean update, w <- omega
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/multi_tensor.h"
#include "cpu/normal_block.h"
#include "math/bsam.h"
#ifdef SAMKERNELS_WITH_CUDA
#include "cuda/glue.h"
#endif

namespace samkernels {
namespace {

std::vector<ListArg> bsam_noise_lists(at::TensorList params, at::TensorList backups,
                                      at::TensorList precisions) {
  return noise_lists(params, backups, {"precisions", precisions, kS});
}

// accumulate (accums not empty): line 5 waits for bsam_update_, the sharpness goes to accums
std::vector<ListArg> bsam_perturb_lists(at::TensorList params, at::TensorList grads,
                                        at::TensorList backups, at::TensorList precisions,
                                        at::TensorList accums, bool accumulate) {
  return {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP},
          {"precisions", precisions, kS, !accumulate}, {"accums", accums, kS, W, Opt}};
}

std::vector<ListArg> bsam_update_lists(at::TensorList params, at::TensorList grads,
                                       at::TensorList backups, at::TensorList precisions,
                                       at::TensorList momenta, at::TensorList accums,
                                       bool accumulate) {
  return {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP},
          {"precisions", precisions, kS, accumulate}, {"momenta", momenta, kS, W},
          {"accums", accums, kS, false, Opt}};
}

}  // namespace

namespace cpu {
namespace {

void bsam_noise(at::TensorList params, at::TensorList backups, at::TensorList precisions,
                at::IntArrayRef param_ids, int64_t seed, int64_t step, double num_data,
                const c10::optional<at::Tensor>& device_step) {
  noise_phase<math::BsamNoise>("bsam_noise_", bsam_noise_lists(params, backups, precisions),
                               param_ids, seed, step, device_step, num_data);
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("bsam_noise_", &bsam_noise); }

void bsam_perturb(at::TensorList params, at::TensorList grads, at::TensorList backups,
                  at::TensorList precisions, at::TensorList accums, double rho, double beta2,
                  double delta, double gamma, const c10::optional<at::Tensor>& found_inf) {
  const bool accumulate = !accums.empty();  // empty list: no accumulation, line 5 runs here
  PhaseLists pl("bsam_perturb_",
                bsam_perturb_lists(params, grads, backups, precisions, accums, accumulate),
                found_inf);
  if (pl.skip()) return copy_lists(params, backups);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths = math::BsamPerturb<opmath_t>::make(rho, beta2, delta, gamma, accumulate);
    const auto p = gradient_lists(v);
    opmath_t* sp = v.state(3);
    opmath_t* ap = v.state(4);
    for (int64_t i = v.begin; i < v.end; ++i) {
      const opmath_t gi = static_cast<opmath_t>(p.g[i]), si = sp[i];
      p.w[i] = static_cast<scalar_t>(maths(static_cast<opmath_t>(p.b[i]), gi, si));  // line 3
      const opmath_t h = math::BsamPrecision<opmath_t>::sharpness(si, gi);
      if (accumulate) ap[i] = ap[i] + h;  // line 5 deferred to the update
      else sp[i] = maths.line5(si, h);    // line 5
    }
  });
  pl.finish();
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("bsam_perturb_", &bsam_perturb); }

void bsam_update(at::TensorList params, at::TensorList grads, at::TensorList backups,
                 at::TensorList precisions, at::TensorList momenta, at::TensorList accums,
                 double lr, double beta1, double beta2, double delta, double gamma,
                 double accum_scale, bool released_order,
                 const c10::optional<at::Tensor>& found_inf) {
  const bool accumulate = !accums.empty();  // empty list: line 5 already ran in bsam_perturb_
  check_released_order("bsam_update_", accumulate, released_order);
  PhaseLists pl("bsam_update_",
                bsam_update_lists(params, grads, backups, precisions, momenta, accums, accumulate),
                found_inf);
  if (pl.skip()) return copy_lists(params, backups);
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths = math::BsamUpdate<opmath_t>::make(lr, beta1, beta2, delta, gamma,
                                                        accum_scale, released_order, accumulate);
    const auto p = gradient_lists(v);
    opmath_t* sp = v.state(3);
    opmath_t* mp = v.state(4);
    const opmath_t* ap = v.state(5);
    for (int64_t i = v.begin; i < v.end; ++i) {
      const opmath_t omega = static_cast<opmath_t>(p.b[i]);
      const opmath_t s_old = sp[i];
      opmath_t s_new = s_old;
      if (accumulate) {
        s_new = maths.precision(s_old, ap[i]);  // line 5 (m-sharpness average)
        sp[i] = s_new;
      }
      const opmath_t gm = maths.momentum(mp[i], static_cast<opmath_t>(p.g[i]), omega);  // line 6
      mp[i] = gm;
      p.w[i] = static_cast<scalar_t>(maths.mean(omega, gm, s_old, s_new));  // line 7
    }
  });
  pl.finish();
}
TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("bsam_update_", &bsam_update); }

}  // namespace

}  // namespace cpu

#ifdef SAMKERNELS_WITH_CUDA
namespace cuda {

// Launch functions of cuda/bsam.cu.

// bsam_noise_ (docs/spec.md bSAM line 1).  Lists: 0 params, 1 backups, 2 precisions;
// tags = param ids.
cudaError_t launch_bsam_noise(const Group& g, uint64_t seed, uint64_t step,
                              const int64_t* device_step, double num_data, cudaStream_t stream);

// bsam_perturb_ (docs/spec.md bSAM lines 3 and 5).  Lists: 0 params, 1 grads, 2 backups,
// 3 precisions, 4 accums (nullptr: no accumulation, line 5 runs here).
cudaError_t launch_bsam_perturb(const Group& g, double rho, double beta2, double delta,
                                double gamma, const float* found_inf, cudaStream_t stream);

// bsam_update_ (docs/spec.md bSAM lines 5-7).  Lists: 0 params, 1 grads, 2 backups, 3 precisions,
// 4 momenta, 5 accums (nullptr: line 5 already ran in bsam_perturb_).
cudaError_t launch_bsam_update(const Group& g, double lr, double beta1, double beta2, double delta,
                               double gamma, double accum_scale, bool released_order,
                               const float* found_inf, cudaStream_t stream);

namespace {

void bsam_noise_cuda(TensorList params, TensorList backups, TensorList precisions,
                     at::IntArrayRef param_ids, int64_t seed, int64_t step, double num_data,
                     const std::optional<Tensor>& device_step) {
  noise_phase("samkernels::bsam_noise_", bsam_noise_lists(params, backups, precisions),
              param_ids, seed, step, device_step, &launch_bsam_noise, num_data);
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("bsam_noise_", &bsam_noise_cuda); }

void bsam_perturb_cuda(TensorList params, TensorList grads, TensorList backups,
                       TensorList precisions, TensorList accums, double rho, double beta2,
                       double delta, double gamma, const std::optional<Tensor>& found_inf) {
  const bool accumulate = !accums.empty();  // empty list: no accumulation, line 5 runs here
  PhaseLists pl("samkernels::bsam_perturb_",
                bsam_perturb_lists(params, grads, backups, precisions, accums, accumulate), false,
                found_inf);
  pl.run([&](const Group& g) {
    return launch_bsam_perturb(g, rho, beta2, delta, gamma, pl.skip, pl.stream);
  });
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("bsam_perturb_", &bsam_perturb_cuda); }

void bsam_update_cuda(TensorList params, TensorList grads, TensorList backups,
                      TensorList precisions, TensorList momenta, TensorList accums, double lr,
                      double beta1, double beta2, double delta, double gamma, double accum_scale,
                      bool released_order, const std::optional<Tensor>& found_inf) {
  const char* op = "samkernels::bsam_update_";
  const bool accumulate = !accums.empty();  // empty list: line 5 already ran in bsam_perturb_
  check_released_order(op, accumulate, released_order);
  PhaseLists pl(op,
                bsam_update_lists(params, grads, backups, precisions, momenta, accums, accumulate),
                false, found_inf);
  pl.run([&](const Group& g) {
    return launch_bsam_update(g, lr, beta1, beta2, delta, gamma, accum_scale, released_order,
                              pl.skip, pl.stream);
  });
}
TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("bsam_update_", &bsam_update_cuda); }

}  // namespace

}  // namespace cuda
#endif  // SAMKERNELS_WITH_CUDA
}  // namespace samkernels
