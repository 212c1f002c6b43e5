// Torch glue of the fused BiSAM loss kernel: the CUDA implementation of samkernels::bisam_loss_fwd
// (schema in csrc/cpu/bisam_loss.cpp, semantics in samkernels/ops/bisam_loss.py).  Checks the
// arguments and calls the torch-free launcher of bisam_loss.h on the current stream.  Only light
// c10 CUDA headers (as phase_glue.cpp): ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers.
// Labels are not range-checked here (that would be a host sync): the kernel writes NaN for a bad
// row without reading outside it, and the Python wrapper asserts asynchronously.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "bisam_loss_args.h"
#include "cuda/bisam_loss.h"

namespace samkernels {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> bisam_loss_fwd_cuda(const at::Tensor& logits_in,
                                                       const at::Tensor& target_in, double mu,
                                                       int64_t phi, double alpha,
                                                       int64_t ignore_index, double grad_scale,
                                                       bool compute_grad) {
  check_bisam_loss_args(logits_in, target_in, mu, phi);
  TORCH_CHECK(logits_in.is_cuda() && target_in.device() == logits_in.device(),
              "bisam_loss (CUDA kernel): logits and target must be on the same CUDA device");
  BiSAMDtype dtype = BiSAMDtype::kFloat;
  switch (logits_in.scalar_type()) {
    case at::kFloat:
      dtype = BiSAMDtype::kFloat;
      break;
    case at::kDouble:
      dtype = BiSAMDtype::kDouble;
      break;
    case at::kHalf:
      dtype = BiSAMDtype::kHalf;
      break;
    case at::kBFloat16:
      dtype = BiSAMDtype::kBFloat16;
      break;
    default:
      TORCH_CHECK_TYPE(false, "bisam_loss: logits must be float32/float64/float16/bfloat16, got ",
                       logits_in.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t B = logits.size(0), K = logits.size(1);
  at::Tensor loss_rows = at::empty(
      {B}, logits.options().dtype(dtype == BiSAMDtype::kDouble ? at::kDouble : at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({B, K}, logits.options())
                                 : at::empty({0}, logits.options());
  if (B == 0) return {loss_rows, grad};

  BiSAMLossArgs args;
  args.dtype = dtype;
  args.logits = logits.const_data_ptr();
  args.row_stride = logits.stride(0);
  args.target = target.const_data_ptr<int64_t>();
  args.loss_rows = loss_rows.mutable_data_ptr();
  args.grad = compute_grad ? grad.mutable_data_ptr() : nullptr;
  args.B = B;
  args.K = K;
  args.mu = mu;
  args.alpha = alpha;
  args.grad_scale = grad_scale;
  args.ignore_index = ignore_index;
  args.phi = static_cast<int>(phi);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  const cudaError_t err = launch_bisam_loss_fwd(args, stream);
  TORCH_CHECK(err == cudaSuccess, "bisam_loss: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return {loss_rows, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(samkernels, CUDA, m) { m.impl("bisam_loss_fwd", &bisam_loss_fwd_cuda); }

}  // namespace cuda
}  // namespace samkernels
