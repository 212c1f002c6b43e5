// Argument checks of samkernels::bisam_loss_fwd shared by its CPU kernel and its CUDA glue, so
// both backends reject the same inputs with the same messages.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

namespace samkernels {

inline void check_bisam_loss_args(const at::Tensor& logits, const at::Tensor& target, double mu,
                                  int64_t phi) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "bisam_loss: logits must be 2-D (batch, classes), got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(0),
                    "bisam_loss: target must be 1-D with logits.size(0) = ", logits.size(0),
                    " entries, got shape ", target.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "bisam_loss: target must be int64, got ",
                   target.scalar_type());
  const auto dt = logits.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   "bisam_loss: logits must be float32/float64/float16/bfloat16, got ", dt);
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "bisam_loss: logits need at least one class");
  TORCH_CHECK_VALUE(mu > 0 && std::isfinite(mu), "bisam_loss: mu must be positive and finite, got ",
                    mu);
  TORCH_CHECK_VALUE(phi == 0 || phi == 1,  // 0: neglog, 1: tanh
                    "bisam_loss: phi code must be 0 (neglog) or 1 (tanh), got ", phi);
}

}  // namespace samkernels
