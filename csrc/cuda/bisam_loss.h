// Torch-free interface of the fused BiSAM ascent-loss kernel (bisam_loss.cu), called by the torch
// glue in csrc/ops/bisam_loss.cpp.  Semantics: samkernels/ops/bisam_loss.py (bisam_loss_reference)
// and the CPU kernel in csrc/ops/bisam_loss.cpp: per row, the loss Q_i (eq. 11/14 of the BiSAM paper)
// and, when `grad` is set, grad_scale * dQ_i/df_i.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/launch.h"

namespace samkernels {
namespace cuda {

struct BiSAMLossArgs {
  ParamType dtype = ParamType::kFloat;    // of logits and grad
  const void* logits = nullptr;           // B x K, column stride 1
  int64_t row_stride = 0;                 // of logits, in elements
  const int64_t* target = nullptr;        // B labels (ignore_index, or else in [0, K))
  void* loss_rows = nullptr;              // B values: double for kDouble, float otherwise
  void* grad = nullptr;                   // B x K contiguous, logits' dtype; nullptr: no gradient
  int64_t B = 0, K = 0;
  double mu = 1.0, alpha = 0.1, grad_scale = 1.0;
  int64_t ignore_index = -100;
  int phi = 0;  // 0: neglog (eq. 18), 1: tanh (eq. 17)
};

// Enqueues the kernel on `stream`; returns the launch error (cudaGetLastError), if any.  Rows whose
// label is neither ignore_index nor in [0, K) get NaN loss and gradient (the host asserts them).
cudaError_t launch_bisam_loss_fwd(const BiSAMLossArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace samkernels
