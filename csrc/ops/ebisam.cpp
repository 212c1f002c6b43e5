// E-BiSAM's stochastic weight perturbation (math/ebisam.h; docs/spec.md; schema in
// samkernels/ops/reference.py): coordinate i is perturbed iff u_i < beta, u_i the Philox uniform of
// (seed, step, param_id, i) -- regenerated, never stored -- by
// e_i = rho/(1-beta) g_i / (||g|| + eps).  The family's torch-facing code: the CPU kernel and, in
// CUDA builds, the glue to cuda/ebisam.cu.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/multi_tensor.h"
#include "cpu/normal_block.h"
#include "math/ebisam.h"
#include "philox.h"
#ifdef SAMKERNELS_WITH_CUDA
#include "cuda/glue.h"
#endif

namespace samkernels {
namespace {

std::vector<ListArg> ebisam_perturb_lists(at::TensorList params, at::TensorList grads,
                                          at::TensorList backups) {
  return {{"params", params, kP, W}, {"grads", grads, kP}, {"backups", backups, kP, W}};
}

}  // namespace

namespace cpu {
namespace {

at::Tensor ebisam_perturb(at::TensorList params, at::TensorList grads, at::TensorList backups,
                          at::IntArrayRef param_ids, const c10::optional<at::Tensor>& grad_norm,
                          int64_t seed, int64_t step, double rho, double beta, double eps,
                          const c10::optional<at::Tensor>& found_inf,
                          const c10::optional<at::Tensor>& device_step) {
  PhaseLists pl("ebisam_perturb_", ebisam_perturb_lists(params, grads, backups), found_inf,
                param_ids, /*takes_ids=*/true);
  step = at_step("ebisam_perturb_", step, device_step, params);
  check_ebisam_beta("ebisam_perturb_", beta);
  const double norm =
      grad_norm.has_value()
          ? grad_norm->item<double>()
          : std::sqrt(pl.sum([&](const auto& v) { return chunk_sumsq(v, 0, 1, false, 0.0); }));
  if (pl.skip()) {  // skip form: backup only, w stays
    copy_lists(backups, params);
    return norm_tensor(norm);
  }
  pl.run([&](const auto& v) {
    SK_CHUNK_TYPES(v);
    const auto maths = math::EbisamPerturb<opmath_t>::make(rho, beta, eps);
    const opmath_t scale = maths.scale(norm);
    const auto p = gradient_lists(v);
    const NoiseKey key(param_ids[v.tensor]);
    // u[k]: the uniform of element q + k
    for_each_run<opmath_t, Draw::kUniform>(
        static_cast<uint64_t>(seed), static_cast<uint64_t>(step), key, v.begin, v.end,
        [&](int64_t q, int len, const opmath_t* u) {
          for (int64_t i = q; i < q + len; ++i) {
            p.b[i] = p.w[i];
            if (maths.chosen(u[i - q]))  // elements not chosen are not rewritten
              p.w[i] = static_cast<scalar_t>(maths.perturbed(static_cast<opmath_t>(p.w[i]),
                                                             static_cast<opmath_t>(p.g[i]), scale));
          }
        });
  });
  pl.finish();
  return norm_tensor(norm);
}

}  // namespace

TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("ebisam_perturb_", &ebisam_perturb); }

}  // namespace cpu

#ifdef SAMKERNELS_WITH_CUDA
namespace cuda {

// ebisam_perturb_ (E-BiSAM Alg. 3 lines 3-7) given ||g|| in device memory (*norm, float64): element
// i is perturbed iff the Philox uniform of word i & 3 of block (i >> 2, pid, step) is < beta.
// Lists: 0 params, 1 grads, 2 backups; tags = param ids.  Defined in cuda/ebisam.cu.
cudaError_t launch_ebisam_perturb(const Group& g, const double* norm, uint64_t seed, uint64_t step,
                                  const int64_t* device_step, double rho, double beta, double eps,
                                  const float* found_inf, cudaStream_t stream);

namespace {

Tensor ebisam_perturb_cuda(TensorList params, TensorList grads, TensorList backups,
                           at::IntArrayRef param_ids, const std::optional<Tensor>& grad_norm,
                           int64_t seed, int64_t step, double rho, double beta, double eps,
                           const std::optional<Tensor>& found_inf,
                           const std::optional<Tensor>& device_step) {
  const char* op = "samkernels::ebisam_perturb_";
  // the mask of element i is Philox number i of the row-major order
  PhaseLists pl(op, ebisam_perturb_lists(params, grads, backups), /*logical_order=*/true,
                found_inf, param_ids, /*takes_ids=*/true);
  check_ebisam_beta(op, beta);
  const int64_t* at = device_step_ptr(op, device_step, params);
  // ||g|| over all coordinates, masked or not (grad_sumsq's stage 1: lists 0 params, 1 grads)
  const Tensor norm = phase_norm(op, "grad_norm", grad_norm, pl,
                                 [&](double* parts, const Group& g, int64_t first) {
                                   return launch_grad_sumsq_partials(g, parts, first, false, 0.0,
                                                                     pl.stream);
                                 });
  pl.run([&](const Group& g) {
    return launch_ebisam_perturb(g, norm.data_ptr<double>(), static_cast<uint64_t>(seed),
                                 static_cast<uint64_t>(step), at, rho, beta, eps, pl.skip,
                                 pl.stream);
  });
  return norm;
}

}  // namespace

TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("ebisam_perturb_", &ebisam_perturb_cuda); }

}  // namespace cuda
#endif  // SAMKERNELS_WITH_CUDA
}  // namespace samkernels
