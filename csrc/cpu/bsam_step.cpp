// bSAM phases on the CPU (Algorithm 1 of Möllenhoff & Khan 2022; docs/spec.md lines 1-7):
//   bsam_noise_    line 1:     backup <- omega, w <- omega + z / sqrt(N s)   (Philox noise)
//   bsam_perturb_  lines 3, 5: w <- omega + rho g / s, then s update (or accumulate sqrt(s)|g|)
//   bsam_update_   lines 5-7:  momentum and mean update, w <- omega
// Semantics: samkernels/ops/reference.py.
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "cpu/multi_tensor.h"
#include "cpu/normal_block.h"
#include "philox.h"

namespace samkernels {
namespace cpu {
namespace {

void bsam_noise(at::TensorList params, at::TensorList backups, at::TensorList precisions,
                at::IntArrayRef param_ids, int64_t seed, int64_t step, double num_data) {
  check_lists("bsam_noise_", params, {{"backups", backups}}, {{"precisions", precisions}});
  check_ids("bsam_noise_", param_ids, params);
  Contig p(params), b(backups), s(precisions);
  const auto chunks = make_chunks(p.list());  // chunk starts are multiples of 4 = Philox quads
  for_each_chunk(chunks, total_numel(p.list()), [&](int64_t, const Chunk& c) {
    SK_DISPATCH_PARAM(p[c.tensor].scalar_type(), "bsam_noise_", [&] {
      scalar_t* wp = p[c.tensor].data_ptr<scalar_t>();
      scalar_t* bp = b[c.tensor].data_ptr<scalar_t>();
      const opmath_t* sp = s[c.tensor].data_ptr<opmath_t>();
      const uint32_t pid = static_cast<uint32_t>(param_ids[c.tensor]);
      const opmath_t n = static_cast<opmath_t>(num_data);
      for_each_normal_run<opmath_t>(
          static_cast<uint64_t>(seed), static_cast<uint64_t>(step), pid, c.begin, c.end,
          [&](int64_t q, int len, const opmath_t* z) {
            opmath_t sd[kBlockElems];
            for (int k = 0; k < len; ++k) sd[k] = n * sp[q + k];
            sqrt_inplace(sd, len);  // same rounding as std::sqrt, vectorized for fp32
            for (int k = 0; k < len; ++k) {
              const opmath_t omega = static_cast<opmath_t>(wp[q + k]);
              bp[q + k] = wp[q + k];
              wp[q + k] = static_cast<scalar_t>(omega + z[k] / sd[k]);
            }
          });
    });
  });
  p.write_back();
  b.write_back();
}

void bsam_perturb(at::TensorList params, at::TensorList grads, at::TensorList backups,
                  at::TensorList precisions, at::TensorList accums, double rho, double beta2,
                  double delta, double gamma, const c10::optional<at::Tensor>& found_inf) {
  const bool accumulate = !accums.empty();
  check_lists("bsam_perturb_", params, {{"grads", grads}, {"backups", backups}},
              {{"precisions", precisions}});
  if (accumulate) check_lists("bsam_perturb_", params, {}, {{"accums", accums}});
  if (skip_requested("bsam_perturb_", found_inf)) return copy_lists(params, backups);
  Contig p(params), g(grads), b(backups), s(precisions), a(accumulate ? accums : precisions);
  const auto chunks = make_chunks(p.list());
  for_each_chunk(chunks, total_numel(p.list()), [&](int64_t, const Chunk& c) {
    SK_DISPATCH_PARAM(p[c.tensor].scalar_type(), "bsam_perturb_", [&] {
      scalar_t* wp = p[c.tensor].data_ptr<scalar_t>();
      const scalar_t* gp = g[c.tensor].data_ptr<scalar_t>();
      const scalar_t* bp = b[c.tensor].data_ptr<scalar_t>();
      opmath_t* sp = s[c.tensor].data_ptr<opmath_t>();
      opmath_t* ap = accumulate ? a[c.tensor].data_ptr<opmath_t>() : nullptr;
      const opmath_t r = rho, b2 = beta2, omb2 = 1.0 - beta2, add = delta + gamma;  // 1-b in double
      for (int64_t i = c.begin; i < c.end; ++i) {
        const opmath_t gi = static_cast<opmath_t>(gp[i]), si = sp[i];
        wp[i] = static_cast<scalar_t>(static_cast<opmath_t>(bp[i]) + r * gi / si);  // line 3
        const opmath_t h = std::sqrt(si) * std::abs(gi);
        if (accumulate) ap[i] = ap[i] + h;                      // line 5 deferred to the update
        else sp[i] = b2 * si + omb2 * (h + add);           // line 5
      }
    });
  });
  p.write_back();
  s.write_back();
  if (accumulate) a.write_back();
}

void bsam_update(at::TensorList params, at::TensorList grads, at::TensorList backups,
                 at::TensorList precisions, at::TensorList momenta, at::TensorList accums, double lr,
                 double beta1, double beta2, double delta, double gamma, double accum_scale,
                 bool released_order, const c10::optional<at::Tensor>& found_inf) {
  const bool accumulate = !accums.empty();
  TORCH_CHECK(accumulate || !released_order, "bsam_update_: released_order=True needs accums (line 5 must wait for the update to keep the old s)");
  check_lists("bsam_update_", params, {{"grads", grads}, {"backups", backups}},
              {{"precisions", precisions}, {"momenta", momenta}});
  if (accumulate) check_lists("bsam_update_", params, {}, {{"accums", accums}});
  if (skip_requested("bsam_update_", found_inf)) return copy_lists(params, backups);
  Contig p(params), g(grads), b(backups), s(precisions), m(momenta), a(accumulate ? accums : precisions);
  const auto chunks = make_chunks(p.list());
  for_each_chunk(chunks, total_numel(p.list()), [&](int64_t, const Chunk& c) {
    SK_DISPATCH_PARAM(p[c.tensor].scalar_type(), "bsam_update_", [&] {
      scalar_t* wp = p[c.tensor].data_ptr<scalar_t>();
      const scalar_t* gp = g[c.tensor].data_ptr<scalar_t>();
      const scalar_t* bp = b[c.tensor].data_ptr<scalar_t>();
      opmath_t* sp = s[c.tensor].data_ptr<opmath_t>();
      opmath_t* mp = m[c.tensor].data_ptr<opmath_t>();
      const opmath_t* ap = accumulate ? a[c.tensor].data_ptr<opmath_t>() : nullptr;
      const opmath_t lr_ = lr, b1 = beta1, b2 = beta2, dl = delta, add = delta + gamma;
      const opmath_t omb1 = 1.0 - beta1, omb2 = 1.0 - beta2;  // in double, then rounded
      const opmath_t scale = accum_scale;
      for (int64_t i = c.begin; i < c.end; ++i) {
        const opmath_t omega = static_cast<opmath_t>(bp[i]);
        const opmath_t s_old = sp[i];
        opmath_t s_new = s_old;
        if (accumulate) {
          s_new = b2 * s_old + omb2 * (ap[i] * scale + add);  // line 5 (m-sharpness average)
          sp[i] = s_new;
        }
        const opmath_t gm = b1 * mp[i] + omb1 * (static_cast<opmath_t>(gp[i]) + dl * omega);  // 6
        mp[i] = gm;
        wp[i] = static_cast<scalar_t>(omega - lr_ * gm / (released_order ? s_old : s_new));  // 7
      }
    });
  });
  p.write_back();
  s.write_back();
  m.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(samkernels, CPU, m) {
  m.impl("bsam_noise_", &bsam_noise);
  m.impl("bsam_perturb_", &bsam_perturb);
  m.impl("bsam_update_", &bsam_update);
}

}  // namespace cpu
}  // namespace samkernels
