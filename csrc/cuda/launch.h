// Host-side interface between the torch glue (csrc/ops/<family>.cpp with cuda/glue.h, compiled by
// the C++ compiler against torch) and the CUDA kernels (*.cu, compiled by nvcc WITHOUT any
// torch/ATen/c10 header: the CPU build of torch lacks some of its CUDA headers, so the .cu files
// must stand alone).  Only raw device addresses, sizes and scalars cross this boundary.  This
// header holds what the families share; each phase's launch function is declared next to its one
// caller, the glue in csrc/ops/<family>.cpp.  Semantics of every launch: the same-named phase in
// samkernels/ops/reference.py (the executable spec).
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace samkernels {
namespace cuda {

// Elements per chunk; one thread block handles one chunk of one tensor (as apex / ATen).
constexpr int64_t kChunkSize = 65536;
// Most tensor lists one phase touches (samv_restore_adam_: params, grads, backups, saved,
// exp_avgs, exp_avg_sqs, outs; ivon_update_: params, grads, backups, h, gm, two running means).
constexpr int kMaxLists = 7;

// Parameter dtype of one group.  State lists (momentum, exp_avg, precision, ...) are stored in the
// op-math type: float64 for float64 parameters, float32 otherwise (reference.py `opmath`).
enum class ParamType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

// One dtype group: `count` tensors, each of `numel[i]` elements, all lists contiguous.
// lists[l][i] is the address of tensor i of list l; lists[l] == nullptr means list l is absent
// (e.g. no momentum buffers, empty `accums`).  Which list index means what is fixed per launch
// function (its declaration says).  Tensors with numel 0 are skipped.
struct Group {
  ParamType param = ParamType::kFloat;
  int64_t count = 0;
  const int64_t* numel = nullptr;
  void* const* lists[kMaxLists] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  const uint64_t* tags = nullptr;  // per tensor (the noise phases: param_ids), may be nullptr
};

// Blocks (= partial sums) that launch_grad_sumsq_partials writes for these sizes.
inline int64_t count_chunks(const int64_t* numel, int64_t count) {
  int64_t blocks = 0;
  for (int64_t i = 0; i < count; ++i)
    if (numel[i] > 0) blocks += (numel[i] + kChunkSize - 1) / kChunkSize;
  return blocks;
}

// Every launch function returns the first CUDA error of its launches (cudaSuccess if none).
// Philox keys (seed, step) cross as uint64_t: the two's-complement bits of the ops' int64
// arguments (reference: & 0xFFFFFFFF on each word).
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

}  // namespace cuda
}  // namespace samkernels
