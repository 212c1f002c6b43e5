// Host-side interface between the torch glue (phase_glue.cpp, compiled by the C++ compiler against
// torch) and the CUDA kernels (*.cu, compiled by nvcc WITHOUT any torch/ATen/c10 header: the CPU
// build of torch lacks some of its CUDA headers, so the .cu files must stand alone).
// Only raw device addresses, sizes and scalars cross this boundary.  Semantics of every launch:
// the same-named phase in samkernels/ops/reference.py (the executable spec).
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace samkernels {
namespace cuda {

// Elements per chunk; one thread block handles one chunk of one tensor (as apex / ATen).
constexpr int64_t kChunkSize = 65536;
// Most tensor lists one phase touches (bsam_update_: params, grads, backups, s, gm, accums).
constexpr int kMaxLists = 6;

// Parameter dtype of one group.  State lists (momentum, exp_avg, precision, ...) are stored in the
// op-math type: float64 for float64 parameters, float32 otherwise (reference.py `opmath`).
enum class ParamType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

// One dtype group: `count` tensors, each of `numel[i]` elements, all lists contiguous.
// lists[l][i] is the address of tensor i of list l; lists[l] == nullptr means list l is absent
// (e.g. no momentum buffers, empty `accums`).  Which list index means what is fixed per launch
// function below.  Tensors with numel 0 are skipped.
struct Group {
  ParamType param = ParamType::kFloat;
  int64_t count = 0;
  const int64_t* numel = nullptr;
  void* const* lists[kMaxLists] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  const uint32_t* tags = nullptr;  // per tensor (bsam_noise_: param_ids), may be nullptr
};

// Blocks (= partial sums) that launch_grad_sumsq_partials writes for these sizes.
inline int64_t count_chunks(const int64_t* numel, int64_t count) {
  int64_t blocks = 0;
  for (int64_t i = 0; i < count; ++i)
    if (numel[i] > 0) blocks += (numel[i] + kChunkSize - 1) / kChunkSize;
  return blocks;
}

// Every launch function returns the first CUDA error of its launches (cudaSuccess if none).
//
// `found_inf` (the phases that take it): address of a one-element float32 flag in device memory,
// or nullptr.  The kernels read it (the host never does); nonzero selects the phase's skip form:
//   perturb phases (sam, ebisam, vsam):      backups <- params, bit for bit; nothing else written;
//   restore / update phases (sam_restore_sgd/adam, bsam_perturb/update, mfvi_update):
//                                          params <- backups, bit for bit; state lists untouched.

// grad_sumsq stage 1.  Lists: 0 params (read only when adaptive), 1 grads.  Writes one float64
// partial sum of (T g)^2 per block to partials[first_block ...], count_chunks(...) of them.
cudaError_t launch_grad_sumsq_partials(const Group& g, double* partials, int64_t first_block,
                                       bool adaptive, double eta, cudaStream_t stream);

// grad_sumsq stage 2: one block sums partials[0 .. n) in a fixed order (deterministic) and writes
// the sum, or its square root when take_sqrt, to *out (float64: the norm contract).
cudaError_t launch_reduce_partials(const double* partials, int64_t n, bool take_sqrt, double* out,
                                   cudaStream_t stream);

// sam_perturb_ given the norm in device memory (*norm, float64).  Lists: 0 params, 1 grads,
// 2 backups.
cudaError_t launch_sam_perturb(const Group& g, const double* norm, double rho, double eps,
                               bool adaptive, double eta, const float* found_inf,
                               cudaStream_t stream);

// sam_restore_sgd_.  Lists: 0 params, 1 grads, 2 backups, 3 momentum_bufs (nullptr when
// momentum == 0).
cudaError_t launch_sam_restore_sgd(const Group& g, double lr, double momentum, double dampening,
                                   bool nesterov, double weight_decay, bool first,
                                   const float* found_inf, cudaStream_t stream);

// sam_restore_adam_ at Adam step `step` (>= 1; bias corrections in double, math/sam.h).
// Lists: 0 params, 1 grads, 2 backups, 3 exp_avgs, 4 exp_avg_sqs.
cudaError_t launch_sam_restore_adam(const Group& g, int64_t step, double lr, double beta1,
                                    double beta2, double eps, double weight_decay, bool decoupled,
                                    const float* found_inf, cudaStream_t stream);

// bsam_noise_ (docs/spec.md bSAM line 1).  Lists: 0 params, 1 backups, 2 precisions; tags = param ids.
cudaError_t launch_bsam_noise(const Group& g, uint64_t seed, uint64_t step, double num_data,
                              cudaStream_t stream);

// bsam_perturb_ (docs/spec.md bSAM lines 3 and 5).  Lists: 0 params, 1 grads, 2 backups, 3 precisions,
// 4 accums (nullptr: no accumulation, line 5 runs here).
cudaError_t launch_bsam_perturb(const Group& g, double rho, double beta2, double delta, double gamma,
                                const float* found_inf, cudaStream_t stream);

// bsam_update_ (docs/spec.md bSAM lines 5-7).  Lists: 0 params, 1 grads, 2 backups, 3 precisions,
// 4 momenta, 5 accums (nullptr: line 5 already ran in bsam_perturb_).
cudaError_t launch_bsam_update(const Group& g, double lr, double beta1, double beta2, double delta,
                               double gamma, double accum_scale, bool released_order,
                               const float* found_inf, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// MFVI family and E-BiSAM (vi.cu, ebisam.cu).
// ---------------------------------------------------------------------------------------------

// vi_noise_ (RandomSAM Alg. 1 / MFVI Alg. 2 line 3): backup <- mu, w <- mu + std z, z the shared
// Philox normals (as bsam_noise_); std = sqrt(Sigma), or `sigma` when list 2 is absent.
// Lists: 0 params, 1 backups, 2 variances (nullptr: fixed sigma); tags = param ids.
cudaError_t launch_vi_noise(const Group& g, uint64_t seed, uint64_t step, double sigma,
                            cudaStream_t stream);

// mfvi_update_ (MFVI Alg. 2 lines 4-5, z regenerated from (seed, step)).  Lists: 0 params,
// 1 grads, 2 backups, 3 variances, 4 momenta (nullptr: no momentum); tags = param ids.
cudaError_t launch_mfvi_update(const Group& g, uint64_t seed, uint64_t step, double lr,
                               double var_lr, double momentum, double prior_var, double num_data,
                               const float* found_inf, cudaStream_t stream);

// vsam_sumsq stage 1 (finish with launch_reduce_partials).  Lists: 0 grads, 1 variances.  Writes
// one float64 partial of sum Sigma g^2 per block to partials[first_block ...].
cudaError_t launch_vsam_sumsq_partials(const Group& g, double* partials, int64_t first_block,
                                       cudaStream_t stream);

// vsam_perturb_ (VSAM Alg. 3 lines 3, 6-7) given sqrt(g^T Sigma g) in device memory (*norm,
// float64).  Lists: 0 params, 1 grads, 2 backups, 3 variances.
cudaError_t launch_vsam_perturb(const Group& g, const double* norm, double dim, double eps,
                                double var_lr, double prior_var, double num_data, bool log_step,
                                double min_var, const float* found_inf, cudaStream_t stream);

// ebisam_perturb_ (E-BiSAM Alg. 3 lines 3-7) given ||g|| in device memory (*norm, float64): element
// i is perturbed iff the Philox uniform of word i & 3 of block (i >> 2, pid, step) is < beta.
// Lists: 0 params, 1 grads, 2 backups; tags = param ids.
cudaError_t launch_ebisam_perturb(const Group& g, const double* norm, uint64_t seed, uint64_t step,
                                double rho, double beta, double eps, const float* found_inf,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace samkernels
