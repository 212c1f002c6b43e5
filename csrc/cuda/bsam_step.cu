// bSAM phases on CUDA (docs/spec.md "Bayesian SAM, bSAM", Algorithm 1 lines 1-7; reference.py
// bsam_noise_, bsam_perturb_, bsam_update_).  Torch-free: the glue in ops_cuda.cpp passes raw
// pointers.
#include "cuda/multi_tensor.cuh"
#include "philox.h"

namespace samkernels {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// docs/spec.md bSAM line 1: backup <- omega;  w <- theta = omega + z / sqrt(N s),  z ~ N(0, I) from the
// shared Philox contract (philox.h): element i of parameter `pid` uses block
// (i >> 2, pid, step_lo, step_hi) with key = seed, lane i & 3.  A group starts at a multiple of
// kGroup (>= 4, a multiple of 4), so it covers kGroup / 4 whole Philox blocks: one call gives the
// normals of 4 consecutive elements.  Lists: 0 params, 1 backups, 2 precisions.
// ---------------------------------------------------------------------------------------------
template <typename P_>
struct BsamNoiseOp {
  using P = P_;
  using M = opmath_t<P>;
  static constexpr int kDepth = 3, kParamLists = 2, kGroup = group_size<P>;
  static_assert(kGroup % 4 == 0, "a group must cover whole Philox blocks");
  unsigned read_mask, write_mask;
  uint64_t seed, step;
  M num_data;

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
        const M w = r[0][k];
        r[1][k] = w;  // exact copy of omega
        r[0][k] = w + z[j] / sk_sqrt(num_data * r[2][k]);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// docs/spec.md bSAM line 3: w <- omega + rho g / s (s from before line 5), and line 5,
// s <- beta2 s + (1 - beta2)(sqrt(s)|g| + delta + gamma), in place when there are no accums;
// with accums, accum += sqrt(s)|g| and line 5 waits for bsam_update_.
// Lists: 0 params, 1 grads, 2 backups, 3 precisions, 4 accums.
// ---------------------------------------------------------------------------------------------
template <typename P_>
struct BsamPerturbOp {
  using P = P_;
  using M = opmath_t<P>;
  static constexpr int kDepth = 5, kParamLists = 3, kGroup = group_size<P>;
  unsigned read_mask, write_mask;
  M rho, beta2, one_minus_beta2, delta, gamma;
  bool accumulate;

  __device__ __forceinline__ M prepare() const { return M(0); }

  __device__ __forceinline__ void operator()(M (&r)[kDepth][kGroup], int, int64_t, uint32_t,
                                             M) const {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const M omega = r[2][k], g = r[1][k], s = r[3][k];
      r[0][k] = omega + rho * g / s;
      const M h = sk_sqrt(s) * sk_abs(g);
      if (accumulate)
        r[4][k] = r[4][k] + h;
      else
        r[3][k] = beta2 * s + one_minus_beta2 * (h + delta + gamma);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// docs/spec.md bSAM lines 5-7 with g_eps = grads:
//   [accums] s <- beta2 s + (1 - beta2)(accum * accum_scale + delta + gamma)
//   gm <- beta1 gm + (1 - beta1)(g_eps + delta omega);  w <- omega - lr gm / s
// (s from line 5, or the old s with released_order: the authors' JAX order).
// Lists: 0 params, 1 grads, 2 backups, 3 precisions, 4 momenta, 5 accums.
// ---------------------------------------------------------------------------------------------
template <typename P_>
struct BsamUpdateOp {
  using P = P_;
  using M = opmath_t<P>;
  static constexpr int kDepth = 6, kParamLists = 3, kGroup = group_size<P>;
  unsigned read_mask, write_mask;
  M lr, beta1, one_minus_beta1, beta2, one_minus_beta2, delta, gamma, accum_scale;
  bool accumulate, released_order;

  __device__ __forceinline__ M prepare() const { return M(0); }

  __device__ __forceinline__ void operator()(M (&r)[kDepth][kGroup], int, int64_t, uint32_t,
                                             M) const {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const M omega = r[2][k], g = r[1][k], s_old = r[3][k];
      M s_new = s_old;
      if (accumulate) {
        s_new = beta2 * s_old + one_minus_beta2 * (r[5][k] * accum_scale + delta + gamma);
        r[3][k] = s_new;
      }
      const M m = beta1 * r[4][k] + one_minus_beta1 * (g + delta * omega);
      r[4][k] = m;
      r[0][k] = omega - lr * m / (released_order ? s_old : s_new);
    }
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launch functions (launch.h).
// ---------------------------------------------------------------------------------------------
cudaError_t launch_bsam_noise(const Group& g, uint64_t seed, uint64_t step, double num_data,
                              cudaStream_t stream) {
  return dispatch_param(g.param, [&](auto tag) {
    using P = typename decltype(tag)::type;
    using M = opmath_t<P>;
    BsamNoiseOp<P> op;
    op.read_mask = 0x5u;   // params, precisions
    op.write_mask = 0x3u;  // params, backups
    op.seed = seed;
    op.step = step;
    op.num_data = static_cast<M>(num_data);
    return apply(g, op, stream);
  });
}

cudaError_t launch_bsam_perturb(const Group& g, double rho, double beta2, double delta, double gamma,
                                const float* found_inf, cudaStream_t stream) {
  return dispatch_param(g.param, [&](auto tag) {
    using P = typename decltype(tag)::type;
    using M = opmath_t<P>;
    BsamPerturbOp<P> op;
    const bool accumulate = g.lists[4] != nullptr;
    op.read_mask = 0xEu | (accumulate ? 0x10u : 0u);  // grads, backups, s, [accums]
    op.write_mask = 0x1u | (accumulate ? 0x10u : 0x8u);  // params, accums or s
    op.rho = static_cast<M>(rho);
    op.beta2 = static_cast<M>(beta2);
    op.one_minus_beta2 = static_cast<M>(1.0 - beta2);
    op.delta = static_cast<M>(delta);
    op.gamma = static_cast<M>(gamma);
    op.accumulate = accumulate;
    return apply(g, op, stream, SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0});
  });
}

cudaError_t launch_bsam_update(const Group& g, double lr, double beta1, double beta2, double delta,
                               double gamma, double accum_scale, bool released_order,
                               const float* found_inf, cudaStream_t stream) {
  return dispatch_param(g.param, [&](auto tag) {
    using P = typename decltype(tag)::type;
    using M = opmath_t<P>;
    BsamUpdateOp<P> op;
    const bool accumulate = g.lists[5] != nullptr;
    op.read_mask = 0x1Eu | (accumulate ? 0x20u : 0u);   // grads, backups, s, gm, [accums]
    op.write_mask = 0x11u | (accumulate ? 0x8u : 0u);   // params, gm, [s]
    op.lr = static_cast<M>(lr);
    op.beta1 = static_cast<M>(beta1);
    op.one_minus_beta1 = static_cast<M>(1.0 - beta1);
    op.beta2 = static_cast<M>(beta2);
    op.one_minus_beta2 = static_cast<M>(1.0 - beta2);
    op.delta = static_cast<M>(delta);
    op.gamma = static_cast<M>(gamma);
    op.accum_scale = static_cast<M>(accum_scale);
    op.accumulate = accumulate;
    op.released_order = released_order;
    return apply(g, op, stream, SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0});
  });
}

}  // namespace cuda
}  // namespace samkernels
