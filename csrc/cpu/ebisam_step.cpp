// E-BiSAM's stochastic weight perturbation on the CPU (Xie et al., BiSAM paper Alg. 3 lines 3-7;
// ESAM's SWP, Du et al. 2022):  coordinate i is perturbed iff u_i < beta, u_i the Philox uniform of
// (seed, step, param_id, i) — regenerated, never stored — by e_i = rho/(1-beta) g_i / (||g|| + eps).
// Semantics: samkernels/ops/reference_vi.py (ebisam_perturb_).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cpu/multi_tensor.h"
#include "philox.h"
#include "cpu/normal_block.h"

namespace samkernels {
namespace cpu {
namespace {

// The norm contract of every backend: a returned norm is a 0-dim float64 tensor (the sums are
// float64 already), whatever the parameters' dtypes, as reference.py returns it.
const at::TensorOptions kNormOptions = at::TensorOptions().dtype(at::kDouble);

at::Tensor ebisam_perturb(at::TensorList params, at::TensorList grads, at::TensorList backups,
                        at::IntArrayRef param_ids, const c10::optional<at::Tensor>& grad_norm,
                        int64_t seed, int64_t step, double rho, double beta, double eps,
                        const c10::optional<at::Tensor>& found_inf) {
  check_lists("ebisam_perturb_", params, {{"grads", grads}, {"backups", backups}}, {});
  check_ids("ebisam_perturb_", param_ids, params);
  TORCH_CHECK(beta >= 0.0 && beta < 1.0, "ebisam_perturb_: beta must be in [0, 1), got ", beta);
  Contig p(params), g(grads), b(backups);
  const double norm = grad_norm.has_value() ? grad_norm->item<double>() : std::sqrt(sumsq(g, g, false, 0.0));
  if (skip_requested("ebisam_perturb_", found_inf)) {  // skip form: backup only, w stays
    copy_lists(backups, params);
    return at::scalar_tensor(norm, kNormOptions);
  }
  const auto chunks = make_chunks(p.list());  // chunk starts are multiples of 4 = Philox quads
  for_each_chunk(chunks, total_numel(p.list()), [&](int64_t, const Chunk& c) {
    SK_DISPATCH_PARAM(p[c.tensor].scalar_type(), "ebisam_perturb_", [&] {
      scalar_t* wp = p[c.tensor].data_ptr<scalar_t>();
      scalar_t* bp = b[c.tensor].data_ptr<scalar_t>();
      const scalar_t* gp = g[c.tensor].data_ptr<scalar_t>();
      const uint32_t pid = static_cast<uint32_t>(param_ids[c.tensor]);
      // Alg. 3 line 5: rho/(1-beta) on the chosen coordinates, normalised as BiSAM Alg. 1 line 4
      const opmath_t scale = static_cast<opmath_t>(rho / (1.0 - beta)) /
                             (static_cast<opmath_t>(norm) + static_cast<opmath_t>(eps));
      if constexpr (std::is_same<opmath_t, float>::value) {  // vectorized block uniforms
        alignas(16) float u[kBlockElems];
        for (int64_t q = c.begin; q < c.end; q += kBlockElems) {
          uniform_block(static_cast<uint64_t>(seed), static_cast<uint64_t>(step), pid,
                        static_cast<uint64_t>(q >> 2), u, block_quads(c.end - q));
          const int64_t stop = std::min(c.end, q + kBlockElems);
          for (int64_t i = q; i < stop; ++i) {
            bp[i] = wp[i];
            if (static_cast<double>(u[i - q]) < beta)  // line 4: chosen w.p. beta
              wp[i] = static_cast<scalar_t>(static_cast<opmath_t>(wp[i]) +
                                            static_cast<opmath_t>(gp[i]) * scale);
          }
        }
        return;
      }
      for (int64_t q = c.begin; q < c.end; q += 4) {
        const Philox4 blk = philox4x32_10(
            static_cast<uint32_t>(q >> 2), pid, static_cast<uint32_t>(step),
            static_cast<uint32_t>(static_cast<uint64_t>(step) >> 32), static_cast<uint32_t>(seed),
            static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32));
        const int64_t stop = std::min(c.end, q + 4);
        for (int64_t i = q; i < stop; ++i) {
          bp[i] = wp[i];
          if (static_cast<double>(philox_uniform(blk.x[i - q])) < beta)  // line 4: chosen w.p. beta
            wp[i] = static_cast<scalar_t>(static_cast<opmath_t>(wp[i]) +
                                          static_cast<opmath_t>(gp[i]) * scale);
        }
      }
    });
  });
  p.write_back();
  b.write_back();
  return at::scalar_tensor(norm, kNormOptions);
}

}  // namespace

TORCH_LIBRARY_IMPL(samkernels, CPU, m) { m.impl("ebisam_perturb_", &ebisam_perturb); }

}  // namespace cpu
}  // namespace samkernels
