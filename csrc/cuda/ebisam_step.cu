// E-BiSAM's stochastic weight perturbation on CUDA (Xie et al., BiSAM paper Alg. 3 lines 3-7;
// ESAM's SWP, Du et al. 2022; reference_vi.py ebisam_perturb_): coordinate i is perturbed iff
// u_i < beta, u_i the Philox uniform of (seed, step, param_id, i) -- regenerated, never stored --
// by e_i = rho / (1 - beta) g_i / (||g|| + eps).  Torch-free: the glue in ops_cuda.cpp passes raw
// pointers; the norm stage is grad_sumsq's (sam_step.cu).
#include "cuda/multi_tensor.cuh"
#include "philox.h"

namespace samkernels {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// backup <- w;  w <- w + g scale where chosen, scale = rho / (1 - beta) / (||g|| + eps) with the
// norm read from device memory.  Element i uses word i & 3 of Philox block
// (i >> 2, pid, step_lo, step_hi), key = seed (the words philox_normal4 turns into normals),
// u = ((x >> 9) + 1/2) 2^-23, chosen iff (double) u < beta.  A group starts at a multiple of
// kGroup (>= 4, a multiple of 4): it covers kGroup / 4 whole blocks.  Elements not chosen are
// written back unchanged (P -> opmath -> P is exact).  Lists: 0 params, 1 grads, 2 backups.
// ---------------------------------------------------------------------------------------------
template <typename P_>
struct EsamPerturbOp {
  using P = P_;
  using M = opmath_t<P>;
  static constexpr int kDepth = 3, kParamLists = 3, kGroup = group_size<P>;
  static_assert(kGroup % 4 == 0, "a group must cover whole Philox blocks");
  unsigned read_mask, write_mask;
  const double* norm;
  uint64_t seed, step;
  double beta;
  M rho_scaled, eps;  // rho_scaled = rho / (1 - beta)

  // reference: scale = rho / (1.0 - beta) / (grad_norm.to(w.dtype) + eps)
  __device__ __forceinline__ M prepare() const {
    return rho_scaled / (static_cast<M>(*norm) + eps);
  }

  __device__ __forceinline__ void operator()(M (&r)[kDepth][kGroup], int, int64_t idx,
                                             uint32_t pid, M scale) const {
#pragma unroll
    for (int q = 0; q < kGroup / 4; ++q) {
      const Philox4 b = philox4x32_10(
          static_cast<uint32_t>(static_cast<uint64_t>(idx >> 2) + q), pid,
          static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32),
          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = 4 * q + j;
        const M w = r[0][k];
        r[2][k] = w;  // exact copy of w
        const bool chosen = static_cast<double>(philox_uniform(b.x[j])) < beta;  // line 4
        r[0][k] = chosen ? w + r[1][k] * scale : w;
      }
    }
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launch function (launch.h).
// ---------------------------------------------------------------------------------------------
cudaError_t launch_ebisam_perturb(const Group& g, const double* norm, uint64_t seed, uint64_t step,
                                double rho, double beta, double eps, const float* found_inf,
                                cudaStream_t stream) {
  return dispatch_param(g.param, [&](auto tag) {
    using P = typename decltype(tag)::type;
    using M = opmath_t<P>;
    EsamPerturbOp<P> op;
    op.read_mask = 0x3u;   // params, grads
    op.write_mask = 0x5u;  // params, backups
    op.norm = norm;
    op.seed = seed;
    op.step = step;
    op.beta = beta;
    op.rho_scaled = static_cast<M>(rho / (1.0 - beta));
    op.eps = static_cast<M>(eps);
    return apply(g, op, stream, SkipCopy{found_inf, /*src=params*/ 0, /*dst=backups*/ 2});
  });
}

}  // namespace cuda
}  // namespace samkernels
