// What the CPU kernels (cpu/multi_tensor.h) and the CUDA glue (cuda/glue.h) of the phases share:
// the roles of the tensor lists, and the argument checks both make, written once so both backends
// reject the same inputs with the same messages.  Schemas: the rows in samkernels/ops/reference.py.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace samkernels {

// The role of a tensor list (the op table's roles): parameter dtype (params, grads, backups) or
// optimizer state (float32, float64 for float64 params).  An optional list may be empty (absent).
enum class Role { kParam, kState };

// One tensor list of a phase call.  csrc/ops/<family>.cpp states each phase's lists once (a
// function <op>_lists), in the order of its CUDA launch function's lists, for the CPU kernel and
// the CUDA glue: both devices' PhaseLists take them.
struct ListArg {
  const char* name;
  at::TensorList list;
  Role role;
  bool written = false;
  bool optional = false;
};

constexpr Role kP = Role::kParam;
constexpr Role kS = Role::kState;
constexpr bool W = true;    // written
constexpr bool Opt = true;  // optional (may be empty)

// The lists of a noise phase (the op table's NOISED lists, then the state its maths reads):
// params and backups written, in this order for the CPU kernel and the launch function.
inline std::vector<ListArg> noise_lists(at::TensorList params, at::TensorList backups,
                                        ListArg state) {
  return {{"params", params, kP, W}, {"backups", backups, kP, W}, state};
}

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

// The CUDA glue's Adam checks, when the step is known on the host.
inline void check_adam_bias_corrections(const char* op, int64_t step, double beta1, double beta2) {
  check_adam_step(op, step);
  TORCH_CHECK(std::pow(beta1, static_cast<double>(step)) != 1.0 &&
                  std::pow(beta2, static_cast<double>(step)) != 1.0,
              op, ": a bias correction 1 - beta**step is zero");
}

// DEVICE_STEP (samkernels/ops/_spec.py): the ops that take a `step` also take `device_step`, None
// or a one-element int64 tensor on the parameters' device, and use step + its value.  The CPU
// kernels read it (host memory); the CUDA kernels read it on the device, so the host cannot check
// what depends on the value there (Adam's step >= 1): the capturable optimizers guarantee it.
inline bool has_device_step(const c10::optional<at::Tensor>& device_step) {
  return device_step.has_value() && device_step->defined();
}

inline void check_device_step(const char* op, const c10::optional<at::Tensor>& device_step,
                              at::TensorList base, const char* name = "device_step") {
  if (!has_device_step(device_step)) return;
  const at::Tensor& s = *device_step;
  TORCH_CHECK(s.scalar_type() == at::kLong && s.numel() == 1, op, ": ", name,
              " must be a one-element int64 tensor, got ", s.scalar_type(), " of shape ",
              s.sizes());
  if (!base.empty())
    TORCH_CHECK(s.device() == base[0].device(), op, ": ", name, " is on ", s.device(),
                " but params[0] is on ", base[0].device());
}

// ivon_update_'s bias correction: 1 - beta1^t in double, t from `debias_step` when given (on the
// CPU: host memory), else the `bias_correction` argument.
inline double ivon_bias_correction(const char* op, double bias_correction, double beta1,
                                   const c10::optional<at::Tensor>& debias_step,
                                   at::TensorList base) {
  if (!has_device_step(debias_step)) return bias_correction;
  check_device_step(op, debias_step, base, "debias_step");
  return 1.0 - std::pow(beta1, static_cast<double>(debias_step->item<int64_t>()));
}

// ivon_accumulate_ / ivon_update_: ``count`` numbers the samples of a step from 1; from the
// second on, the running means of the earlier ones are needed.
inline void check_ivon_count(const char* op, int64_t count, bool has_means) {
  TORCH_CHECK(count >= 1, op, ": count numbers the samples of a step from 1, got ", count);
  TORCH_CHECK(count == 1 || has_means, op, ": count=", count,
              " needs avg_grads and avg_nxgs (the running means of the earlier samples)");
}

}  // namespace samkernels
