// SAM / ASAM phases on CUDA (docs/spec.md "SAM family"; reference.py grad_sumsq, sam_perturb_,
// sam_restore_sgd_, sam_restore_adam_).  Torch-free: the glue in ops_cuda.cpp passes raw pointers.
#include "cuda/multi_tensor.cuh"

namespace samkernels {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// grad_sumsq, stage 1: one float64 partial of sum (T g)^2 per chunk, T = |w| + eta for ASAM
// (docs/spec.md SAM table, ASAM row).  No atomics: each block owns its slot, a second launch sums the slots.
// Squares are formed in opmath, the K of one group summed in opmath and added in float64.
// ---------------------------------------------------------------------------------------------
template <typename P, class Tab>
__global__ void __launch_bounds__(kBlockSize)
    sumsq_kernel(const SK_GRID_CONSTANT Tab tab, double* __restrict__ partials, bool adaptive,
                 opmath_t<P> eta) {
  using M = opmath_t<P>;
  constexpr int K = group_size<P>;
  const ChunkInfo c = chunk_info(tab);
  const bool aligned = lists_aligned(tab, c.tensor, adaptive ? 3u : 2u);
  const void* w_base = tab.addr[0][c.tensor];
  const void* g_base = tab.addr[1][c.tensor];
  double acc = 0.0;
  for (int off = static_cast<int>(threadIdx.x) * K; off < c.n; off += kBlockSize * K) {
    const int cnt = c.n - off < K ? c.n - off : K;
    const bool vec = aligned && cnt == K;
    const int64_t idx = c.start + off;
    M g[K];
    load_group<P, K>(g_base, idx, cnt, vec, g);
    if (adaptive) {
      M w[K];
      load_group<P, K>(w_base, idx, cnt, vec, w);
#pragma unroll
      for (int k = 0; k < K; ++k) g[k] = g[k] * (sk_abs(w[k]) + eta);
    }
    M s = M(0);
#pragma unroll
    for (int k = 0; k < K; ++k) s += g[k] * g[k];  // lanes past cnt hold 0
    acc += static_cast<double>(s);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[tab.block_base + blockIdx.x] = acc;
}

// Stage 2: a single block adds the partials in a fixed order and writes sum or sqrt(sum).
__global__ void __launch_bounds__(kBlockSize)
    reduce_partials_kernel(const double* __restrict__ partials, int64_t n, bool take_sqrt,
                           double* out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kBlockSize) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    const double r = take_sqrt ? sqrt(acc) : acc;
    *out = r;
  }
}

template <typename P, int ArgBytes>
cudaError_t sumsq_sized(const Group& g, double* partials, int64_t first_block, bool adaptive,
                        double eta, cudaStream_t stream) {
  using Tab = Table<2, table_capacity<2, ArgBytes>()>;
  static_assert(sizeof(Tab) + 64 <= ArgBytes, "kernel arguments exceed the limit");
  const opmath_t<P> eta_m = static_cast<opmath_t<P>>(eta);
  return for_each_table<Tab>(g, first_block, [&](const Tab& tab, int blocks) {
    sumsq_kernel<P, Tab><<<blocks, kBlockSize, 0, stream>>>(tab, partials, adaptive, eta_m);
    return cudaGetLastError();
  });
}

// ---------------------------------------------------------------------------------------------
// sam_perturb_: backup <- w;  w <- w + e,  e = rho g / (||g|| + eps)  or (ASAM)
// e = rho T^2 g / (||T g|| + eps)  (docs/spec.md SAM table).  Lists: 0 params, 1 grads, 2 backups.
// The norm is read from device memory: no host sync.
// ---------------------------------------------------------------------------------------------
template <typename P_>
struct SamPerturbOp {
  using P = P_;
  using M = opmath_t<P>;
  static constexpr int kDepth = 3, kParamLists = 3, kGroup = group_size<P>;
  unsigned read_mask, write_mask;
  const double* norm;
  M rho, eps, eta;
  bool adaptive;

  // reference: scale = rho / (grad_norm.to(w.dtype) + eps)
  __device__ __forceinline__ M prepare() const { return rho / (static_cast<M>(*norm) + eps); }

  __device__ __forceinline__ void operator()(M (&r)[kDepth][kGroup], int, int64_t, uint32_t,
                                             M scale) const {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const M w = r[0][k], g = r[1][k];
      r[2][k] = w;  // backups hold the mean weights; exact: opmath holds every P value
      M e;
      if (adaptive) {
        const M t = sk_abs(w) + eta;
        e = g * (t * t) * scale;
      } else {
        e = g * scale;
      }
      r[0][k] = w + e;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// sam_restore_sgd_: w <- backup, then torch.optim.SGD with g_e (docs/spec.md SAM table, second step).
// Lists: 0 params (written), 1 grads, 2 backups, 3 momentum_bufs.
// ---------------------------------------------------------------------------------------------
template <typename P_>
struct SamRestoreSgdOp {
  using P = P_;
  using M = opmath_t<P>;
  static constexpr int kDepth = 4, kParamLists = 3, kGroup = group_size<P>;
  unsigned read_mask, write_mask;
  M lr, momentum, one_minus_dampening, weight_decay;
  bool use_weight_decay, use_momentum, nesterov, first;

  __device__ __forceinline__ M prepare() const { return M(0); }

  __device__ __forceinline__ void operator()(M (&r)[kDepth][kGroup], int, int64_t, uint32_t,
                                             M) const {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const M w = r[2][k];
      M d = r[1][k];
      if (use_weight_decay) d = d + weight_decay * w;
      if (use_momentum) {
        // `first`: buffers uninitialised, take d (torch.optim.SGD); they were not read.
        const M buf = first ? d : r[3][k] * momentum + one_minus_dampening * d;
        r[3][k] = buf;
        d = nesterov ? d + momentum * buf : buf;
      }
      r[0][k] = w - lr * d;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// sam_restore_adam_: w <- backup, then Adam (L2) / AdamW (decoupled) with g_e; bias corrections
// precomputed on the host exactly as reference.py.  Lists: 0 params, 1 grads, 2 backups,
// 3 exp_avgs, 4 exp_avg_sqs.
// ---------------------------------------------------------------------------------------------
template <typename P_>
struct SamRestoreAdamOp {
  using P = P_;
  using M = opmath_t<P>;
  static constexpr int kDepth = 5, kParamLists = 3, kGroup = group_size<P>;
  unsigned read_mask, write_mask;
  M step_size, sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
      decay_factor;
  bool use_weight_decay, decoupled;

  __device__ __forceinline__ M prepare() const { return M(0); }

  __device__ __forceinline__ void operator()(M (&r)[kDepth][kGroup], int, int64_t, uint32_t,
                                             M) const {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      M w = r[2][k], d = r[1][k];
      if (use_weight_decay) {
        if (decoupled)
          w = w * decay_factor;  // 1 - lr * weight_decay
        else
          d = d + weight_decay * w;
      }
      const M m = beta1 * r[3][k] + one_minus_beta1 * d;
      const M v = beta2 * r[4][k] + one_minus_beta2 * d * d;
      r[3][k] = m;
      r[4][k] = v;
      const M denom = sk_sqrt(v) / sqrt_bc2 + eps;
      r[0][k] = w - step_size * m / denom;
    }
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launch functions (launch.h).
// ---------------------------------------------------------------------------------------------
cudaError_t launch_grad_sumsq_partials(const Group& g, double* partials, int64_t first_block,
                                       bool adaptive, double eta, cudaStream_t stream) {
  return dispatch_param(g.param, [&](auto tag) {
    using P = typename decltype(tag)::type;
#if SK_LARGE_ARGS
    if (large_args_usable())
      return sumsq_sized<P, kLargeArgBytes>(g, partials, first_block, adaptive, eta, stream);
#endif
    return sumsq_sized<P, kSmallArgBytes>(g, partials, first_block, adaptive, eta, stream);
  });
}

cudaError_t launch_reduce_partials(const double* partials, int64_t n, bool take_sqrt, double* out,
                                   cudaStream_t stream) {
  reduce_partials_kernel<<<1, kBlockSize, 0, stream>>>(partials, n, take_sqrt, out);
  return cudaGetLastError();
}

cudaError_t launch_sam_perturb(const Group& g, const double* norm, double rho, double eps,
                               bool adaptive, double eta, const float* found_inf,
                               cudaStream_t stream) {
  return dispatch_param(g.param, [&](auto tag) {
    using P = typename decltype(tag)::type;
    using M = opmath_t<P>;
    SamPerturbOp<P> op;
    op.read_mask = 0x3u;   // params, grads
    op.write_mask = 0x5u;  // params, backups
    op.norm = norm;
    op.rho = static_cast<M>(rho);
    op.eps = static_cast<M>(eps);
    op.eta = static_cast<M>(eta);
    op.adaptive = adaptive;
    return apply(g, op, stream, SkipCopy{found_inf, /*src=params*/ 0, /*dst=backups*/ 2});
  });
}

cudaError_t launch_sam_restore_sgd(const Group& g, double lr, double momentum, double dampening,
                                   bool nesterov, double weight_decay, bool first,
                                   const float* found_inf, cudaStream_t stream) {
  return dispatch_param(g.param, [&](auto tag) {
    using P = typename decltype(tag)::type;
    using M = opmath_t<P>;
    SamRestoreSgdOp<P> op;
    const bool use_momentum = momentum != 0.0;
    op.read_mask = 0x6u | (use_momentum && !first ? 0x8u : 0u);  // grads, backups, [bufs]
    op.write_mask = 0x1u | (use_momentum ? 0x8u : 0u);           // params, [bufs]
    op.lr = static_cast<M>(lr);
    op.momentum = static_cast<M>(momentum);
    op.one_minus_dampening = static_cast<M>(1.0 - dampening);
    op.weight_decay = static_cast<M>(weight_decay);
    op.use_weight_decay = weight_decay != 0.0;
    op.use_momentum = use_momentum;
    op.nesterov = nesterov;
    op.first = first;
    return apply(g, op, stream, SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0});
  });
}

cudaError_t launch_sam_restore_adam(const Group& g, double lr, double step_size, double sqrt_bc2,
                                    double beta1, double beta2, double eps, double weight_decay,
                                    bool decoupled, const float* found_inf, cudaStream_t stream) {
  return dispatch_param(g.param, [&](auto tag) {
    using P = typename decltype(tag)::type;
    using M = opmath_t<P>;
    SamRestoreAdamOp<P> op;
    op.read_mask = 0x1Eu;   // grads, backups, exp_avgs, exp_avg_sqs
    op.write_mask = 0x19u;  // params, exp_avgs, exp_avg_sqs
    op.step_size = static_cast<M>(step_size);
    op.sqrt_bc2 = static_cast<M>(sqrt_bc2);
    op.beta1 = static_cast<M>(beta1);
    op.one_minus_beta1 = static_cast<M>(1.0 - beta1);
    op.beta2 = static_cast<M>(beta2);
    op.one_minus_beta2 = static_cast<M>(1.0 - beta2);
    op.eps = static_cast<M>(eps);
    op.weight_decay = static_cast<M>(weight_decay);
    op.decay_factor = static_cast<M>(1.0 - lr * weight_decay);
    op.use_weight_decay = weight_decay != 0.0;
    op.decoupled = decoupled;
    return apply(g, op, stream, SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0});
  });
}

}  // namespace cuda
}  // namespace samkernels
