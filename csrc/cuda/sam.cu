// SAM / ASAM phases on CUDA (docs/spec.md "SAM family"; rows in samkernels/ops/reference.py): the
// per-element maths of math/sam.h bound to each phase's lists.  Torch-free: the glue
// (ops/sam.cpp) passes raw pointers.
#include "cuda/bias_correction.cuh"
#include "cuda/multi_tensor.cuh"
#include "math/sam.h"

namespace samkernels {
namespace cuda {
namespace {

// grad_sumsq's summand (T g)^2, T = |w| + eta for ASAM, in float64 (the norm contract).
// Lists: 0 params (read only when adaptive), 1 grads.
template <typename P>
struct SumsqTerm : TermOf<P, P, P, double> {
  using M = double;
  double eta;
  bool adaptive;

  static SumsqTerm make(bool adaptive, double eta) { return {{adaptive ? 3u : 2u}, eta, adaptive}; }
  __device__ __forceinline__ M operator()(M w, M g) const {
    const M t = adaptive ? math::asam_scaled(g, w, eta) : g;
    return t * t;
  }
};

// nonfinite_flag's summand g - g: +0 for every finite g, NaN for inf and NaN (IEEE: nvcc keeps
// it, no fast math).  Lists: 1 grads (list 0 is not read).
template <typename P>
struct NonfiniteTerm : TermOf<P, P, P> {
  using M = opmath_t<P>;
  static NonfiniteTerm make() { return {{2u}}; }
  __device__ __forceinline__ M operator()(M, M g) const { return g - g; }
};

// Lists: 0 params, 1 grads, 2 backups.
template <typename M>
struct SamPerturbLists : ListsOf<math::SamPerturb<M>, 3, 3, Noise::kNone, /*Scaled=*/true> {
  __device__ __forceinline__ void operator()(M (&x)[3], M scale, M) const {
    x[2] = x[0];  // backups hold the mean weights; exact: opmath holds every P value
    x[0] = this->maths(x[0], x[1], scale);
  }
};

// Lists: 0 params (written), 1 grads, 2 backups, 3 momentum_bufs (absent without momentum).
template <typename M>
struct SgdLists : ListsOf<math::SgdRestore<M>, 4, 3> {
  __device__ __forceinline__ void operator()(M (&x)[4], M, M) const {
    x[0] = this->maths(x[2], x[1], x[3]);
  }
};

// Lists: 0 params, 1 grads, 2 backups, 3 exp_avgs, 4 exp_avg_sqs.
template <typename M>
struct AdamLists : ListsOf<AdamAtStep<M>, 5, 3> {
  static constexpr bool kStepped = true;
  __device__ __forceinline__ void at_step(uint64_t t) { this->maths.at_step(t); }
  __device__ __forceinline__ void operator()(M (&x)[5], M, M) const {
    x[0] = this->maths(x[2], x[1], x[3], x[4]);
  }
};

// Stage 2 of every norm: a single block adds the partials in a fixed order and writes sum or
// sqrt(sum).
__global__ void __launch_bounds__(kBlockSize)
    reduce_partials_kernel(const double* __restrict__ partials, int64_t n, bool take_sqrt,
                           double* out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kBlockSize) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = take_sqrt ? sqrt(acc) : acc;
}

// nonfinite_flag's stage 2: one block; a NaN partial marks a non-finite chunk.
__global__ void __launch_bounds__(kBlockSize)
    flag_partials_kernel(const double* __restrict__ partials, int64_t n, float* flag) {
  int bad = 0;
  for (int64_t i = threadIdx.x; i < n; i += kBlockSize) bad |= partials[i] != partials[i];
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) *flag = bad ? 1.0f : 0.0f;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launch functions (declared in ops/sam.cpp; the norm stages in launch.h).
// ---------------------------------------------------------------------------------------------
cudaError_t launch_grad_sumsq_partials(const Group& g, double* partials, int64_t first_block,
                                       bool adaptive, double eta, cudaStream_t stream) {
  return launch_partials<SumsqTerm>(g, partials, first_block, stream, adaptive, eta);
}

cudaError_t launch_reduce_partials(const double* partials, int64_t n, bool take_sqrt, double* out,
                                   cudaStream_t stream) {
  reduce_partials_kernel<<<1, kBlockSize, 0, stream>>>(partials, n, take_sqrt, out);
  return cudaGetLastError();
}

cudaError_t launch_nonfinite_partials(const Group& g, double* partials, int64_t first_block,
                                      cudaStream_t stream) {
  return launch_partials<NonfiniteTerm>(g, partials, first_block, stream);
}

cudaError_t launch_flag_partials(const double* partials, int64_t n, float* flag,
                                 cudaStream_t stream) {
  flag_partials_kernel<<<1, kBlockSize, 0, stream>>>(partials, n, flag);
  return cudaGetLastError();
}

cudaError_t launch_sam_perturb(const Group& g, const double* norm, double rho, double eps,
                               bool adaptive, double eta, const float* found_inf,
                               cudaStream_t stream) {
  return launch_phase<SamPerturbLists>(g, /*read: params, grads*/ 0x3u,
                                       /*write: params, backups*/ 0x5u,
                                       SkipCopy{found_inf, /*src=params*/ 0, /*dst=backups*/ 2},
                                       PhaseKeys{0, 0, norm}, stream, rho, eps, adaptive, eta);
}

cudaError_t launch_sam_restore_sgd(const Group& g, double lr, double momentum, double dampening,
                                   bool nesterov, double weight_decay, bool first,
                                   const float* found_inf, cudaStream_t stream) {
  const bool use_momentum = momentum != 0.0;  // `first`: the buffers are written, not read
  const unsigned read = 0x6u | (use_momentum && !first ? 0x8u : 0u);  // grads, backups, [bufs]
  const unsigned write = 0x1u | (use_momentum ? 0x8u : 0u);           // params, [bufs]
  return launch_phase<SgdLists>(g, read, write,
                                SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0},
                                PhaseKeys{}, stream, lr, momentum, dampening, nesterov,
                                weight_decay, first);
}

cudaError_t launch_sam_restore_adam(const Group& g, int64_t step, const int64_t* device_step,
                                    double lr, double beta1, double beta2, double eps,
                                    double weight_decay, bool decoupled, const float* found_inf,
                                    cudaStream_t stream) {
  return launch_phase<AdamLists>(g, /*read: grads, backups, exp_avgs, exp_avg_sqs*/ 0x1Eu,
                                 /*write: params, exp_avgs, exp_avg_sqs*/ 0x19u,
                                 SkipCopy{found_inf, /*src=backups*/ 2, /*dst=params*/ 0},
                                 PhaseKeys{0, static_cast<uint64_t>(step), nullptr, device_step},
                                 stream, step, lr, beta1, beta2, eps, weight_decay, decoupled);
}

}  // namespace cuda
}  // namespace samkernels
