// SAM-variant phases on CUDA (GSAM, WSAM, LookSAM, FriendlySAM; docs/spec.md "SAM variants";
// rows in samkernels/ops/reference.py): the per-element maths of math/samv.h bound to each phase's
// lists.  Torch-free: the glue (ops/samv.cpp) passes raw pointers.  The norm and the restores'
// six coefficients are float64 device memory, read by the kernels: no host sync.
#include "cuda/bias_correction.cuh"
#include "cuda/multi_tensor.cuh"
#include "math/samv.h"

namespace samkernels {
namespace cuda {
namespace {

// Lists: 0 params, 1 grads, 2 backups, 3 saved (g0 kept), 4 momenta (FriendlySAM's m).  An absent
// list is neither read nor written (masks); without momenta make() gets first = true, so u = g.
template <typename M>
struct SamvPerturbLists : ListsOf<math::SamvPerturb<M>, 5, 3, Noise::kNone, /*Scaled=*/true> {
  __device__ __forceinline__ void operator()(M (&x)[5], M scale, M) const {
    x[2] = x[0];  // backups hold the mean weights; exact: opmath holds every P value
    x[3] = x[1];  // g0, exact in opmath
    M m = x[4];
    const M u = this->maths.friendly(x[1], m);
    x[4] = m;
    x[0] = this->maths(x[0], u, scale);
  }
};

// The six coefficients, read from device memory (the same address for every thread: cached).
template <typename M>
__device__ __forceinline__ math::SamvMix<M> load_mix(const double* coeffs) {
  double c[6];
#pragma unroll
  for (int j = 0; j < 6; ++j) c[j] = __ldg(coeffs + j);
  return math::SamvMix<M>::make(c);
}

// A restore of SAM's (math/sam.h: SgdRestore; cuda/bias_correction.cuh: AdamAtStep) on the
// variant's gradient mix: the base step from the backup with mix 0 of (g, saved), plus mix 2;
// `out` gets mix 4.
template <class Base>
struct MixedRestore {
  Base base;
  const double* coeffs;

  template <class... Args>
  static MixedRestore make(const double* coeffs, const Args&... args) {
    return {Base::make(args...), coeffs};
  }
  template <typename M, class... State>
  __device__ __forceinline__ M operator()(M backup, M g, M s, M& out, State&... state) const {
    const math::SamvMix<M> mix = load_mix<M>(coeffs);
    const M w = base(backup, mix(0, g, s), state...);
    out = mix(4, g, s);
    return w + mix(2, g, s);
  }
};

// Lists: 0 params (written), 1 grads, 2 backups, 3 saved, 4 momentum_bufs, 5 outs.
template <typename M>
struct SamvSgdLists : ListsOf<MixedRestore<math::SgdRestore<M>>, 6, 3> {
  __device__ __forceinline__ void operator()(M (&x)[6], M, M) const {
    x[0] = this->maths(x[2], x[1], x[3], x[5], x[4]);
  }
};

// Lists: 0 params (written), 1 grads, 2 backups, 3 saved, 4 exp_avgs, 5 exp_avg_sqs, 6 outs.
template <typename M>
struct SamvAdamLists : ListsOf<MixedRestore<AdamAtStep<M>>, 7, 3> {
  static constexpr bool kStepped = true;
  __device__ __forceinline__ void at_step(uint64_t t) { this->maths.base.at_step(t); }
  __device__ __forceinline__ void operator()(M (&x)[7], M, M) const {
    x[0] = this->maths(x[2], x[1], x[3], x[6], x[4], x[5]);
  }
};

// samv_dots stage 1: three float64 sums per block (u u, u b, b b), u = a - shift b; lists 0 lhs
// (P), 1 rhs (opmath).
template <typename P, class Tab>
__global__ void __launch_bounds__(kBlockSize)
    samv_dots_kernel(const SK_GRID_CONSTANT Tab tab, double* __restrict__ partials,
                     double shift) {
  using M = opmath_t<P>;
  constexpr int K = group_size<P>;
  const ChunkInfo c = chunk_info(tab);
  const bool aligned = lists_aligned(tab, c.tensor, 3u);
  const void* a_base = tab.addr[0][c.tensor];
  const void* b_base = tab.addr[1][c.tensor];
  double uu = 0.0, ub = 0.0, bb = 0.0;
  for (int off = static_cast<int>(threadIdx.x) * K; off < c.n; off += kBlockSize * K) {
    const int cnt = c.n - off < K ? c.n - off : K;
    const bool vec = aligned && cnt == K;
    const int64_t idx = c.start + off;
    M a[K], b[K];
    load_group<P, K>(a_base, idx, cnt, vec, a);  // lanes past cnt hold 0: 0 terms
    load_group<M, K>(b_base, idx, cnt, vec, b);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      double x, y, z;
      math::samv_dot_terms(static_cast<double>(a[k]), static_cast<double>(b[k]), shift, x, y, z);
      uu += x;
      ub += y;
      bb += z;
    }
  }
  uu = block_sum(uu);
  __syncthreads();  // block_sum's shared slots are reused
  ub = block_sum(ub);
  __syncthreads();
  bb = block_sum(bb);
  if (threadIdx.x == 0) {
    double* out = partials + 3 * (tab.block_base + blockIdx.x);
    out[0] = uu;
    out[1] = ub;
    out[2] = bb;
  }
}

template <typename P, int ArgBytes>
cudaError_t samv_dots_sized(const Group& g, double* partials, int64_t first_block, double shift,
                            cudaStream_t stream) {
  using Tab = Table<2, table_capacity<2, ArgBytes>()>;
  static_assert(sizeof(Tab) + 16 <= ArgBytes, "kernel arguments exceed the limit");
  return for_each_table<Tab>(g, first_block, [&](const Tab& tab, int blocks) {
    samv_dots_kernel<P, Tab><<<blocks, kBlockSize, 0, stream>>>(tab, partials, shift);
    return cudaGetLastError();
  });
}

// samv_dots stage 2: one block adds the triples in a fixed order.
__global__ void __launch_bounds__(kBlockSize)
    samv_reduce3_kernel(const double* __restrict__ partials, int64_t n, double* out) {
  double a = 0.0, b = 0.0, c = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kBlockSize) {
    a += partials[3 * i];
    b += partials[3 * i + 1];
    c += partials[3 * i + 2];
  }
  a = block_sum(a);
  __syncthreads();
  b = block_sum(b);
  __syncthreads();
  c = block_sum(c);
  if (threadIdx.x == 0) {
    out[0] = a;
    out[1] = b;
    out[2] = c;
  }
}

unsigned present(const Group& g, int l) { return g.lists[l] != nullptr ? 1u << l : 0u; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launch functions (declared in ops/samv.cpp).
// ---------------------------------------------------------------------------------------------
cudaError_t launch_samv_dots_partials(const Group& g, double* partials, int64_t first_block,
                                      double shift, cudaStream_t stream) {
  return dispatch_param(g.param, [&](auto tag) {
    using P = typename decltype(tag)::type;
#if SK_LARGE_ARGS
    if (large_args_usable())
      return samv_dots_sized<P, kLargeArgBytes>(g, partials, first_block, shift, stream);
#endif
    return samv_dots_sized<P, kSmallArgBytes>(g, partials, first_block, shift, stream);
  });
}

cudaError_t launch_samv_reduce3(const double* partials, int64_t n, double* out,
                                cudaStream_t stream) {
  samv_reduce3_kernel<<<1, kBlockSize, 0, stream>>>(partials, n, out);
  return cudaGetLastError();
}

cudaError_t launch_samv_perturb(const Group& g, const double* norm, double rho, double eps,
                                bool adaptive, double eta, double sigma, double lmbda, bool first,
                                const float* found_inf, cudaStream_t stream) {
  const bool has_m = g.lists[4] != nullptr;
  const unsigned read = 0x3u | (has_m && !first ? 0x10u : 0u);       // params, grads, [m]
  const unsigned write = 0x5u | present(g, 3) | present(g, 4);       // params, backups, [s], [m]
  return launch_phase<SamvPerturbLists>(g, read, write,
                                        SkipCopy{found_inf, /*src=params*/ 0, /*dst=backups*/ 2},
                                        PhaseKeys{0, 0, norm}, stream, rho, eps, adaptive, eta,
                                        sigma, lmbda, first || !has_m);
}

cudaError_t launch_samv_restore_sgd(const Group& g, const double* coeffs, double lr,
                                    double momentum, double dampening, bool nesterov,
                                    double weight_decay, bool first, const float* found_inf,
                                    cudaStream_t stream) {
  const bool use_momentum = momentum != 0.0 && g.lists[4] != nullptr;
  const unsigned read = 0xEu | (use_momentum && !first ? 0x10u : 0u);  // g, backups, s, [bufs]
  const unsigned write = 0x1u | (use_momentum ? 0x10u : 0u) | present(g, 5);  // w, [bufs], [out]
  return launch_phase<SamvSgdLists>(g, read, write,
                                    SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0},
                                    PhaseKeys{}, stream, coeffs, lr, momentum, dampening,
                                    nesterov, weight_decay, first);
}

cudaError_t launch_samv_restore_adam(const Group& g, const double* coeffs, int64_t step,
                                     const int64_t* device_step, double lr, double beta1,
                                     double beta2, double eps, double weight_decay, bool decoupled,
                                     const float* found_inf, cudaStream_t stream) {
  return launch_phase<SamvAdamLists>(g, /*read: grads, backups, saved, exp_avgs, exp_avg_sqs*/ 0x3Eu,
                                     /*write: params, exp_avgs, exp_avg_sqs, [outs]*/
                                     0x31u | present(g, 6),
                                     SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0},
                                     PhaseKeys{0, static_cast<uint64_t>(step), nullptr,
                                               device_step},
                                     stream, coeffs, step, lr, beta1, beta2, eps, weight_decay,
                                     decoupled);
}

}  // namespace cuda
}  // namespace samkernels
