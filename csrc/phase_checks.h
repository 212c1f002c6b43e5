// Argument checks of the phases that both the CPU kernels (cpu/*.cpp) and the CUDA glue
// (cuda/phase_glue.cpp) make, written once so both backends reject the same inputs with the same
// messages.  Schemas: samkernels/ops/_spec.py.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace samkernels {

inline void check_ids(const char* op, at::IntArrayRef param_ids, size_t n_params) {
  TORCH_CHECK(param_ids.size() == n_params, op, ": param_ids has ", param_ids.size(),
              " entries but params has ", n_params);
}

// bsam_update_: the released (JAX) order divides by the s from before line 5, so line 5 must have
// been deferred to this call.
inline void check_released_order(const char* op, bool accumulate, bool released_order) {
  TORCH_CHECK(accumulate || !released_order, op,
              ": released_order=True needs accums (line 5 must wait for the update to keep the "
              "old s)");
}

inline void check_ebisam_beta(const char* op, double beta) {
  TORCH_CHECK(beta >= 0.0 && beta < 1.0, op, ": beta must be in [0, 1), got ", beta);
}

inline void check_adam_step(const char* op, int64_t step) {
  TORCH_CHECK(step >= 1, op, ": step counts from 1, got ", step);
}

}  // namespace samkernels
