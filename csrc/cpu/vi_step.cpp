// MFVI-family phases on the CPU (Ujváry et al., "Rethinking SAM as Variational Inference";
// docs/spec.md "MFVI family"):
//   vi_noise_      RandomSAM Alg. 1 / MFVI Alg. 2 line 3: backup <- mu, w <- mu + std z (Philox)
//   mfvi_update_   MFVI Alg. 2 lines 4-5: mean step (KL/N, momentum) and log-variance step, with z
//                  regenerated from the counter instead of stored
//   vsam_sumsq     g^T Sigma g over a whole list (eq. 2's normaliser)
//   vsam_perturb_  VSAM Alg. 3 lines 3, 6-7: w <- mu + e (eq. 2), then the Sigma step of eq. 42
// Semantics: samkernels/ops/reference_vi.py.
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

void vi_noise(at::TensorList params, at::TensorList backups, at::TensorList variances,
              at::IntArrayRef param_ids, int64_t seed, int64_t step, double sigma) {
  const bool learned = !variances.empty();  // MFVI: std = sqrt(Sigma); RandomSAM: std = sigma0
  check_lists("vi_noise_", params, {{"backups", backups}}, {});
  if (learned) check_lists("vi_noise_", params, {}, {{"variances", variances}});
  check_ids("vi_noise_", param_ids, params);
  Contig p(params), b(backups), v(learned ? variances : params);
  const auto chunks = make_chunks(p.list());  // chunk starts are multiples of 4 = Philox quads
  for_each_chunk(chunks, total_numel(p.list()), [&](int64_t, const Chunk& c) {
    SK_DISPATCH_PARAM(p[c.tensor].scalar_type(), "vi_noise_", [&] {
      scalar_t* wp = p[c.tensor].data_ptr<scalar_t>();
      scalar_t* bp = b[c.tensor].data_ptr<scalar_t>();
      const opmath_t* vp = learned ? v[c.tensor].data_ptr<opmath_t>() : nullptr;
      const uint32_t pid = static_cast<uint32_t>(param_ids[c.tensor]);
      const opmath_t sig = static_cast<opmath_t>(sigma);
      for_each_normal_run<opmath_t>(
          static_cast<uint64_t>(seed), static_cast<uint64_t>(step), pid, c.begin, c.end,
          [&](int64_t q, int len, const opmath_t* z) {
            opmath_t sd[kBlockElems];
            if (learned) {
              for (int k = 0; k < len; ++k) sd[k] = vp[q + k];
              sqrt_inplace(sd, len);  // same rounding as std::sqrt, vectorized for fp32
            } else {
              for (int k = 0; k < len; ++k) sd[k] = sig;
            }
            for (int k = 0; k < len; ++k) {
              const opmath_t mu = static_cast<opmath_t>(wp[q + k]);
              bp[q + k] = wp[q + k];
              wp[q + k] = static_cast<scalar_t>(mu + sd[k] * z[k]);
            }
          });
    });
  });
  p.write_back();
  b.write_back();
}

void mfvi_update(at::TensorList params, at::TensorList grads, at::TensorList backups,
                 at::TensorList variances, at::TensorList momenta, at::IntArrayRef param_ids,
                 int64_t seed, int64_t step, double lr, double var_lr, double momentum,
                 double prior_var, double num_data, const c10::optional<at::Tensor>& found_inf) {
  const bool use_momentum = !momenta.empty();
  check_lists("mfvi_update_", params, {{"grads", grads}, {"backups", backups}},
              {{"variances", variances}});
  if (use_momentum) check_lists("mfvi_update_", params, {}, {{"momenta", momenta}});
  check_ids("mfvi_update_", param_ids, params);
  if (skip_requested("mfvi_update_", found_inf)) return copy_lists(params, backups);
  Contig p(params), g(grads), b(backups), v(variances), m(use_momentum ? momenta : variances);
  const auto chunks = make_chunks(p.list());
  for_each_chunk(chunks, total_numel(p.list()), [&](int64_t, const Chunk& c) {
    SK_DISPATCH_PARAM(p[c.tensor].scalar_type(), "mfvi_update_", [&] {
      scalar_t* wp = p[c.tensor].data_ptr<scalar_t>();
      const scalar_t* gp = g[c.tensor].data_ptr<scalar_t>();
      const scalar_t* bp = b[c.tensor].data_ptr<scalar_t>();
      opmath_t* vp = v[c.tensor].data_ptr<opmath_t>();
      opmath_t* mp = use_momentum ? m[c.tensor].data_ptr<opmath_t>() : nullptr;
      const uint32_t pid = static_cast<uint32_t>(param_ids[c.tensor]);
      const opmath_t lr_ = lr, vlr = var_lr, mom = momentum;
      const opmath_t nprior = num_data * prior_var, inv_prior = 1.0 / prior_var;
      const opmath_t two_n = 2.0 * num_data;
      const auto body = [&](int64_t i, opmath_t zi) {
        const opmath_t mu = static_cast<opmath_t>(bp[i]);
        const opmath_t gi = static_cast<opmath_t>(gp[i]);
        const opmath_t var = vp[i];
        opmath_t d = gi + mu / nprior;  // eq. 7: data gradient + KL/N (eq. 39) on mu
        if (use_momentum) {
          d = mom * mp[i] + d;
          mp[i] = d;
        }
        // u = log Sigma: reparametrised data term + KL/N term (eq. 39)
        const opmath_t du = opmath_t(0.5) * gi * zi * std::sqrt(var) +
                            (var * inv_prior - opmath_t(1)) / two_n;
        vp[i] = var * std::exp(-vlr * du);
        wp[i] = static_cast<scalar_t>(mu - lr_ * d);
      };
      // z: the noise of the vi_noise_ call with the same (seed, step)
      for_each_normal_run<opmath_t>(
          static_cast<uint64_t>(seed), static_cast<uint64_t>(step), pid, c.begin, c.end,
          [&](int64_t q, int len, const opmath_t* z) {
            for (int k = 0; k < len; ++k) body(q + k, z[k]);
          });
    });
  });
  p.write_back();
  v.write_back();
  if (use_momentum) m.write_back();
}

// sum Sigma g^2 over all tensors; fixed-order sum of per-chunk partials (thread-count independent).
double weighted_sumsq(const Contig& g, const Contig& v) {
  const auto chunks = make_chunks(g.list());
  std::vector<double> partial(chunks.size(), 0.0);
  for_each_chunk(chunks, total_numel(g.list()), [&](int64_t ci, const Chunk& c) {
    SK_DISPATCH_PARAM(g[c.tensor].scalar_type(), "vsam_sumsq", [&] {
      const scalar_t* gp = g[c.tensor].data_ptr<scalar_t>();
      const opmath_t* vp = v[c.tensor].data_ptr<opmath_t>();
      double acc = 0.0;
      for (int64_t i = c.begin; i < c.end; ++i) {
        const double gi = static_cast<double>(gp[i]);
        acc += static_cast<double>(vp[i]) * gi * gi;
      }
      partial[ci] = acc;
    });
  });
  double total = 0.0;
  for (double x : partial) total += x;
  return total;
}

at::Tensor vsam_sumsq(at::TensorList grads, at::TensorList variances) {
  check_lists("vsam_sumsq", grads, {}, {{"variances", variances}});
  Contig g(grads), v(variances);
  return at::scalar_tensor(weighted_sumsq(g, v), at::TensorOptions().dtype(at::kDouble));
}

at::Tensor vsam_perturb(at::TensorList params, at::TensorList grads, at::TensorList backups,
                        at::TensorList variances, const c10::optional<at::Tensor>& sigma_norm,
                        double dim, double eps, double var_lr, double prior_var, double num_data,
                        bool log_step, double min_var, const c10::optional<at::Tensor>& found_inf) {
  check_lists("vsam_perturb_", params, {{"grads", grads}, {"backups", backups}},
              {{"variances", variances}});
  Contig p(params), g(grads), b(backups), v(variances);
  const double norm = sigma_norm.has_value() ? sigma_norm->item<double>()
                                             : std::sqrt(weighted_sumsq(g, v));
  if (skip_requested("vsam_perturb_", found_inf)) {  // skip form: backup only; w, Sigma stay
    copy_lists(backups, params);
    return at::scalar_tensor(norm, kNormOptions);
  }
  const auto chunks = make_chunks(p.list());
  for_each_chunk(chunks, total_numel(p.list()), [&](int64_t, const Chunk& c) {
    SK_DISPATCH_PARAM(p[c.tensor].scalar_type(), "vsam_perturb_", [&] {
      scalar_t* wp = p[c.tensor].data_ptr<scalar_t>();
      scalar_t* bp = b[c.tensor].data_ptr<scalar_t>();
      const scalar_t* gp = g[c.tensor].data_ptr<scalar_t>();
      opmath_t* vp = v[c.tensor].data_ptr<opmath_t>();
      const opmath_t inv = opmath_t(1) / (static_cast<opmath_t>(norm) + static_cast<opmath_t>(eps));
      const opmath_t sq = std::sqrt(dim), vlr = var_lr, lo = min_var;
      const opmath_t half_n = 0.5 / num_data, prior_term = 0.5 / (num_data * prior_var);
      const opmath_t two_n_prior = 2.0 * num_data * prior_var;
      for (int64_t i = c.begin; i < c.end; ++i) {
        const opmath_t mu = static_cast<opmath_t>(wp[i]);
        const opmath_t gi = static_cast<opmath_t>(gp[i]);
        const opmath_t var = vp[i];
        bp[i] = wp[i];
        wp[i] = static_cast<scalar_t>(mu + sq * var * gi * inv);  // eq. 2
        if (log_step) {  // Sigma * dL/dSigma of eq. 42: a gradient step on log Sigma
          const opmath_t du = opmath_t(0.5) * sq * var * gi * gi * inv + var / two_n_prior - half_n;
          vp[i] = var * std::exp(-vlr * du);
        } else {  // Alg. 3 line 7 on Sigma itself, clamped to stay positive
          const opmath_t dv = opmath_t(0.5) * sq * gi * gi * inv + prior_term - half_n / var;
          vp[i] = std::max(var - vlr * dv, lo);
        }
      }
    });
  });
  p.write_back();
  b.write_back();
  v.write_back();
  return at::scalar_tensor(norm, kNormOptions);
}

}  // namespace

TORCH_LIBRARY_IMPL(samkernels, CPU, m) {
  m.impl("vi_noise_", &vi_noise);
  m.impl("mfvi_update_", &mfvi_update);
  m.impl("vsam_sumsq", &vsam_sumsq);
  m.impl("vsam_perturb_", &vsam_perturb);
}

}  // namespace cpu
}  // namespace samkernels
