// MFVI-family phases on CUDA (Ujváry et al., "Rethinking SAM as Variational Inference"; docs/spec.md "MFVI
// family"; reference_vi.py vi_noise_, mfvi_update_, vsam_sumsq, vsam_perturb_):
//   vi_noise_      RandomSAM Alg. 1 / MFVI Alg. 2 line 3: backup <- mu, w <- mu + std z (Philox)
//   mfvi_update_   MFVI Alg. 2 lines 4-5, z regenerated from the counter instead of stored
//   vsam_sumsq     g^T Sigma g, stage 1 (float64 partials; stage 2 is launch_reduce_partials)
//   vsam_perturb_  VSAM Alg. 3 lines 3, 6-7: w <- mu + e (eq. 2), then the Sigma step of eq. 42
// Torch-free: the glue in ops_cuda.cpp passes raw pointers.  Maths in opmath, as the reference;
// the expressions keep the reference's order of operations.
#include "cuda/multi_tensor.cuh"
#include "philox.h"

namespace samkernels {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// vi_noise_: backup <- mu;  w <- mu + std z,  std = sqrt(Sigma) (MFVI) or sigma (RandomSAM), z the
// shared Philox normals exactly as BsamNoiseOp (philox.h: element i of parameter `pid` uses block
// (i >> 2, pid, step_lo, step_hi), key = seed, lane i & 3; a group covers kGroup / 4 whole blocks).
// Lists: 0 params, 1 backups, 2 variances (absent: fixed sigma).
// ---------------------------------------------------------------------------------------------
template <typename P_>
struct ViNoiseOp {
  using P = P_;
  using M = opmath_t<P>;
  static constexpr int kDepth = 3, kParamLists = 2, kGroup = group_size<P>;
  static_assert(kGroup % 4 == 0, "a group must cover whole Philox blocks");
  unsigned read_mask, write_mask;
  uint64_t seed, step;
  M sigma;
  bool learned;

  __device__ __forceinline__ M prepare() const { return M(0); }

  __device__ __forceinline__ void operator()(M (&r)[kDepth][kGroup], int, int64_t idx,
                                             uint32_t pid, M) const {
#pragma unroll
    for (int q = 0; q < kGroup / 4; ++q) {
      M z[4];
      philox_normal4<M>(seed, step, pid, static_cast<uint64_t>(idx >> 2) + q, z);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = 4 * q + j;
        const M mu = r[0][k];
        r[1][k] = mu;  // exact copy of mu
        const M sd = learned ? sk_sqrt(r[2][k]) : sigma;
        r[0][k] = mu + sd * z[j];
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// mfvi_update_ (Alg. 2 lines 4-5), g taken at theta = mu + sqrt(Sigma) z, z regenerated from
// (seed, step) as in vi_noise_:
//   d = g + mu / (N prior_var);  [momenta] buf = momentum buf + d, d = buf;  w <- mu - lr d
//   du = g z sqrt(Sigma) / 2 + (Sigma / prior_var - 1) / (2N);  Sigma <- Sigma exp(-var_lr du)
// Lists: 0 params, 1 grads, 2 backups, 3 variances, 4 momenta (absent: no momentum).
// ---------------------------------------------------------------------------------------------
template <typename P_>
struct MfviUpdateOp {
  using P = P_;
  using M = opmath_t<P>;
  static constexpr int kDepth = 5, kParamLists = 3, kGroup = group_size<P>;
  static_assert(kGroup % 4 == 0, "a group must cover whole Philox blocks");
  unsigned read_mask, write_mask;
  uint64_t seed, step;
  M lr, neg_var_lr, momentum, n_prior, prior_var, two_n;
  bool use_momentum;

  __device__ __forceinline__ M prepare() const { return M(0); }

  __device__ __forceinline__ void operator()(M (&r)[kDepth][kGroup], int, int64_t idx,
                                             uint32_t pid, M) const {
#pragma unroll
    for (int q = 0; q < kGroup / 4; ++q) {
      M z[4];
      philox_normal4<M>(seed, step, pid, static_cast<uint64_t>(idx >> 2) + q, z);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = 4 * q + j;
        const M mu = r[2][k], g = r[1][k], var = r[3][k];
        M d = g + mu / n_prior;  // eq. 7: data gradient + KL/N (eq. 39) on mu
        if (use_momentum) {
          d = momentum * r[4][k] + d;
          r[4][k] = d;
        }
        // u = log Sigma: reparametrised data term + KL/N term (eq. 39)
        const M du = M(0.5) * g * z[j] * sk_sqrt(var) + (var / prior_var - M(1)) / two_n;
        r[3][k] = var * sk_exp(neg_var_lr * du);
        r[0][k] = mu - lr * d;
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// vsam_sumsq, stage 1: one float64 partial of sum Sigma g^2 per chunk (as sumsq_kernel: products
// in opmath, the K of one group summed in opmath and added in float64; no atomics).
// Lists: 0 grads (parameter dtype), 1 variances (opmath).
// ---------------------------------------------------------------------------------------------
template <typename P, class Tab>
__global__ void __launch_bounds__(kBlockSize)
    vsam_sumsq_kernel(const SK_GRID_CONSTANT Tab tab, double* __restrict__ partials) {
  using M = opmath_t<P>;
  constexpr int K = group_size<P>;
  const ChunkInfo c = chunk_info(tab);
  const bool aligned = lists_aligned(tab, c.tensor, 3u);
  const void* g_base = tab.addr[0][c.tensor];
  const void* v_base = tab.addr[1][c.tensor];
  double acc = 0.0;
  for (int off = static_cast<int>(threadIdx.x) * K; off < c.n; off += kBlockSize * K) {
    const int cnt = c.n - off < K ? c.n - off : K;
    const bool vec = aligned && cnt == K;
    const int64_t idx = c.start + off;
    M g[K], v[K];
    load_group<P, K>(g_base, idx, cnt, vec, g);
    load_group<M, K>(v_base, idx, cnt, vec, v);
    M s = M(0);
#pragma unroll
    for (int k = 0; k < K; ++k) s += v[k] * (g[k] * g[k]);  // lanes past cnt hold 0
    acc += static_cast<double>(s);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[tab.block_base + blockIdx.x] = acc;
}

template <typename P, int ArgBytes>
cudaError_t vsam_sumsq_sized(const Group& g, double* partials, int64_t first_block,
                             cudaStream_t stream) {
  using Tab = Table<2, table_capacity<2, ArgBytes>()>;
  static_assert(sizeof(Tab) + 64 <= ArgBytes, "kernel arguments exceed the limit");
  return for_each_table<Tab>(g, first_block, [&](const Tab& tab, int blocks) {
    vsam_sumsq_kernel<P, Tab><<<blocks, kBlockSize, 0, stream>>>(tab, partials);
    return cudaGetLastError();
  });
}

// ---------------------------------------------------------------------------------------------
// vsam_perturb_ (Alg. 3 line 3, eq. 2, then lines 6-7, eq. 42), inv = 1 / (sqrt(g^T Sigma g) + eps)
// read from device memory (no host sync), sq = sqrt(p):
//   backup <- mu;  w <- mu + sq Sigma g inv
//   log_step: Sigma <- Sigma exp(-var_lr du),  du = sq Sigma g^2 inv / 2 + Sigma / (2 N prior) - 1/(2N)
//   else:     Sigma <- max(Sigma - var_lr dv, min_var),
//             dv = sq g^2 inv / 2 + 1 / (2 N prior) - 1 / (2 N Sigma)
// Lists: 0 params, 1 grads, 2 backups, 3 variances.
// ---------------------------------------------------------------------------------------------
template <typename P_>
struct VsamPerturbOp {
  using P = P_;
  using M = opmath_t<P>;
  static constexpr int kDepth = 4, kParamLists = 3, kGroup = group_size<P>;
  unsigned read_mask, write_mask;
  const double* norm;
  M eps, sq, half_sq, var_lr, neg_var_lr, two_n_prior, half_n, prior_term, num_data, min_var;
  bool log_step;

  // reference: inv = 1.0 / (sigma_norm.to(w.dtype) + eps)
  __device__ __forceinline__ M prepare() const { return M(1) / (static_cast<M>(*norm) + eps); }

  __device__ __forceinline__ void operator()(M (&r)[kDepth][kGroup], int, int64_t, uint32_t,
                                             M inv) const {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const M mu = r[0][k], g = r[1][k], var = r[3][k];
      r[2][k] = mu;  // exact copy of mu
      r[0][k] = mu + sq * var * g * inv;  // eq. 2
      if (log_step) {  // Sigma * dL/dSigma of eq. 42: a gradient step on log Sigma
        const M du = half_sq * var * g * g * inv + var / two_n_prior - half_n;
        r[3][k] = var * sk_exp(neg_var_lr * du);
      } else {  // Alg. 3 line 7 on Sigma itself, clamped (torch.clamp: NaN stays NaN)
        const M dv = half_sq * g * g * inv + prior_term - M(0.5) / (num_data * var);
        const M v = var - var_lr * dv;
        r[3][k] = v < min_var ? min_var : v;
      }
    }
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launch functions (launch.h).
// ---------------------------------------------------------------------------------------------
cudaError_t launch_vi_noise(const Group& g, uint64_t seed, uint64_t step, double sigma,
                            cudaStream_t stream) {
  return dispatch_param(g.param, [&](auto tag) {
    using P = typename decltype(tag)::type;
    using M = opmath_t<P>;
    ViNoiseOp<P> op;
    const bool learned = g.lists[2] != nullptr;
    op.read_mask = 0x1u | (learned ? 0x4u : 0u);  // params, [variances]
    op.write_mask = 0x3u;                         // params, backups
    op.seed = seed;
    op.step = step;
    op.sigma = static_cast<M>(sigma);
    op.learned = learned;
    return apply(g, op, stream);
  });
}

cudaError_t launch_mfvi_update(const Group& g, uint64_t seed, uint64_t step, double lr,
                               double var_lr, double momentum, double prior_var, double num_data,
                               const float* found_inf, cudaStream_t stream) {
  return dispatch_param(g.param, [&](auto tag) {
    using P = typename decltype(tag)::type;
    using M = opmath_t<P>;
    MfviUpdateOp<P> op;
    const bool use_momentum = g.lists[4] != nullptr;
    op.read_mask = 0xEu | (use_momentum ? 0x10u : 0u);   // grads, backups, variances, [momenta]
    op.write_mask = 0x9u | (use_momentum ? 0x10u : 0u);  // params, variances, [momenta]
    op.seed = seed;
    op.step = step;
    op.lr = static_cast<M>(lr);
    op.neg_var_lr = static_cast<M>(-var_lr);
    op.momentum = static_cast<M>(momentum);
    op.n_prior = static_cast<M>(num_data * prior_var);
    op.prior_var = static_cast<M>(prior_var);
    op.two_n = static_cast<M>(2.0 * num_data);
    op.use_momentum = use_momentum;
    return apply(g, op, stream, SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0});
  });
}

cudaError_t launch_vsam_sumsq_partials(const Group& g, double* partials, int64_t first_block,
                                       cudaStream_t stream) {
  return dispatch_param(g.param, [&](auto tag) {
    using P = typename decltype(tag)::type;
#if SK_LARGE_ARGS
    if (large_args_usable())
      return vsam_sumsq_sized<P, kLargeArgBytes>(g, partials, first_block, stream);
#endif
    return vsam_sumsq_sized<P, kSmallArgBytes>(g, partials, first_block, stream);
  });
}

cudaError_t launch_vsam_perturb(const Group& g, const double* norm, double dim, double eps,
                                double var_lr, double prior_var, double num_data, bool log_step,
                                double min_var, const float* found_inf, cudaStream_t stream) {
  return dispatch_param(g.param, [&](auto tag) {
    using P = typename decltype(tag)::type;
    using M = opmath_t<P>;
    VsamPerturbOp<P> op;
    op.read_mask = 0xBu;   // params, grads, variances
    op.write_mask = 0xDu;  // params, backups, variances
    op.norm = norm;
    const double sq = std::sqrt(dim);  // reference: math.sqrt(dim), a Python float
    op.eps = static_cast<M>(eps);
    op.sq = static_cast<M>(sq);
    op.half_sq = static_cast<M>(0.5 * sq);
    op.var_lr = static_cast<M>(var_lr);
    op.neg_var_lr = static_cast<M>(-var_lr);
    op.two_n_prior = static_cast<M>(2.0 * num_data * prior_var);
    op.half_n = static_cast<M>(0.5 / num_data);
    op.prior_term = static_cast<M>(0.5 / (num_data * prior_var));
    op.num_data = static_cast<M>(num_data);
    op.min_var = static_cast<M>(min_var);
    op.log_step = log_step;
    return apply(g, op, stream, SkipCopy{found_inf, /*src=params*/ 0, /*dst=backups*/ 2});
  });
}

}  // namespace cuda
}  // namespace samkernels
