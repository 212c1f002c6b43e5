// Torch glue shared by the CUDA ops of every family (the CUDA half of csrc/ops/<family>.cpp,
// compiled only in CUDA builds).  One helper, PhaseLists, does what every phase needs from the
// roles of its tensor lists: checks them, makes non-contiguous tensors dense (and copies written
// ones back), groups the tensors by parameter dtype and fills the torch-free Groups of launch.h;
// each op then calls its launch function on the current stream.  Norms: reduce / phase_norm.
// Only light c10 CUDA headers are included (no ATen/cuda/CUDAContext.h, which pulls in cuBLAS and
// cuSPARSE headers): the glue must build against any CUDA build of torch.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "cuda/launch.h"
#include "phase_checks.h"

namespace samkernels {
namespace cuda {

using at::Tensor;
using at::TensorList;

// Every launch function returns the first error of its kernel launches (cudaGetLastError).
#define SK_CHECK_LAUNCH(expr)                                                                  \
  do {                                                                                         \
    const cudaError_t sk_err_ = (expr);                                                        \
    TORCH_CHECK(sk_err_ == cudaSuccess, "samkernels: CUDA kernel launch failed: ",             \
                cudaGetErrorString(sk_err_));                                                  \
  } while (0)

inline ParamType param_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ParamType::kFloat;
    case at::kDouble:
      return ParamType::kDouble;
    case at::kHalf:
      return ParamType::kHalf;
    case at::kBFloat16:
      return ParamType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "samkernels: unsupported parameter dtype ", t,
              " (expected float32, float64, float16 or bfloat16)");
  return ParamType::kFloat;  // unreachable
}

// reference.py `opmath`: the dtype of the maths and of the optimizer state.
inline at::ScalarType opmath(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The `found_inf` contract: None -> nullptr (the phase always runs); else a one-element float32
// tensor on the tensors' device whose address the kernels read (nonzero: the skip form).  The
// host never reads it.
inline const float* found_inf_ptr(const char* op, const std::optional<Tensor>& found_inf,
                                  TensorList base) {
  if (!found_inf.has_value() || !found_inf->defined()) return nullptr;
  const Tensor& f = *found_inf;
  TORCH_CHECK(f.scalar_type() == at::kFloat, op, ": found_inf must be a float32 tensor, got ",
              f.scalar_type());
  TORCH_CHECK(f.numel() == 1 && f.dim() <= 1, op,
              ": found_inf must hold one element (shape [] or [1]), got shape ", f.sizes());
  TORCH_CHECK(f.is_cuda(), op, ": found_inf is on ", f.device(),
              "; it must be on the params' CUDA device");
  if (!base.empty())
    TORCH_CHECK(f.device() == base[0].device(), op, ": found_inf is on ", f.device(),
                " but params[0] is on ", base[0].device());
  return f.data_ptr<float>();
}

// The `device_step` contract (phase_checks.h): None -> nullptr; else the address of the int64
// the kernels add to `step` on the device.  The host never reads it.
inline const int64_t* device_step_ptr(const char* op, const std::optional<Tensor>& device_step,
                                      TensorList base, const char* name = "device_step") {
  if (!has_device_step(device_step)) return nullptr;
  check_device_step(op, device_step, base, name);
  return device_step->data_ptr<int64_t>();
}

// The tensor lists of one phase call, in its launch function's list order.  The base list (the
// first one present: params, or grads for the sums) decides device and dtype groups; every other
// present list must match it one to one: same device and numel, dtype by role; written lists must
// not overlap themselves.  Dense stand-ins are chosen jointly per index i: the tensors i of all
// lists are used as they are when each is non-overlapping and dense with the sizes and strides of
// the base's (e.g. channels_last weights with channels_last state); otherwise, or with
// logical_order (the noise phases: element i of the row-major order gets Philox number i), each is
// made contiguous (a copy only where it is not already).  finish() copies written stand-ins back
// (stream-ordered, no sync).  Built in place, never copied: the groups point into it.
class PhaseLists {
 public:
  PhaseLists(const char* op, std::vector<ListArg> lists, bool logical_order = false,
             const std::optional<Tensor>& found_inf = std::nullopt, at::IntArrayRef ids = {},
             bool takes_ids = false)
      : args_(std::move(lists)) {
    TORCH_CHECK(args_.size() <= static_cast<size_t>(kMaxLists), op, ": too many lists");
    base_ = 0;
    while (base_ + 1 < args_.size() && args_[base_].optional && args_[base_].list.empty()) ++base_;
    check(op);
    if (takes_ids) check_ids(op, ids, base().size());
    skip = found_inf_ptr(op, found_inf, base());
    if (base().empty()) return;
    guard_.emplace(base()[0].device());
    stream = current_stream();
    densify(logical_order);
    build(ids);
  }
  PhaseLists(const PhaseLists&) = delete;
  PhaseLists& operator=(const PhaseLists&) = delete;

  TensorList base() const { return args_[base_].list; }
  bool empty() const { return base().empty(); }
  const std::vector<Group>& groups() const { return groups_; }
  int64_t chunks() const {
    int64_t n = 0;
    for (const Group& g : groups_) n += count_chunks(g.numel, g.count);
    return n;
  }
  // launch(group) for every dtype group (each returns its first CUDA error), then finish().
  template <class Launch>
  void run(Launch&& launch) {
    for (const Group& g : groups_) SK_CHECK_LAUNCH(launch(g));
    finish();
  }
  void finish() {
    for (size_t l = 0; l < args_.size(); ++l)
      if (args_[l].written && present(l))
        for (size_t i = 0; i < work_[l].size(); ++i)
          if (!work_[l][i].is_same(args_[l].list[i])) args_[l].list[i].copy_(work_[l][i]);
  }

  const float* skip = nullptr;
  cudaStream_t stream = nullptr;

 private:
  bool present(size_t l) const { return !(args_[l].optional && args_[l].list.empty()); }

  void check(const char* op) const {
    const ListArg& b = args_[base_];
    for (size_t i = 0; i < b.list.size(); ++i) {
      const Tensor& p = b.list[i];
      TORCH_CHECK(p.defined(), op, ": ", b.name, "[", i, "] is undefined");
      TORCH_CHECK(p.is_cuda(), op, ": ", b.name, "[", i, "] is on ", p.device(),
                  "; the cuda backend needs CUDA tensors");
      TORCH_CHECK(p.device() == b.list[0].device(), op, ": ", b.name, "[", i, "] is on ",
                  p.device(), " but ", b.name, "[0] is on ", b.list[0].device(),
                  " (all tensors must share a device)");
      param_type(p.scalar_type());  // throws on unsupported dtypes
    }
    for (size_t l = 0; l < args_.size(); ++l) {
      if (!present(l)) continue;
      const ListArg& a = args_[l];
      if (l != base_) {
        TORCH_CHECK(a.list.size() == b.list.size(), op, ": ", a.name, " has ", a.list.size(),
                    " tensors but ", b.name, " has ", b.list.size());
        for (size_t i = 0; i < a.list.size(); ++i) {
          const Tensor& t = a.list[i];
          const Tensor& p = b.list[i];
          TORCH_CHECK(t.defined(), op, ": ", a.name, "[", i, "] is undefined");
          TORCH_CHECK(t.device() == p.device(), op, ": ", a.name, "[", i, "] is on ", t.device(),
                      " but ", b.name, "[", i, "] is on ", p.device());
          TORCH_CHECK(t.numel() == p.numel(), op, ": ", a.name, "[", i, "] has ", t.numel(),
                      " elements but ", b.name, "[", i, "] has ", p.numel());
          const bool state = a.role == Role::kState;
          const at::ScalarType want = state ? opmath(p.scalar_type()) : p.scalar_type();
          TORCH_CHECK(t.scalar_type() == want, op, ": ", a.name, "[", i, "] has dtype ",
                      t.scalar_type(), ", expected ", want,
                      state ? " (optimizer state is float32, float64 for float64 params)"
                            : " (the dtype of params[i])");
        }
      }
      if (a.written)  // an element must not appear twice (expanded tensors)
        for (size_t i = 0; i < a.list.size(); ++i)
          TORCH_CHECK(at::has_internal_overlap(a.list[i]) != at::MemOverlap::Yes, op, ": ",
                      a.name, "[", i,
                      "] has internally overlapping memory (e.g. an expanded tensor) and is "
                      "written");
    }
  }

  void densify(bool logical_order) {
    work_.resize(args_.size());
    const TensorList b = base();
    for (size_t i = 0; i < b.size(); ++i) {
      bool shared = !logical_order;
      for (size_t l = 0; l < args_.size(); ++l) {
        if (!present(l)) continue;
        const Tensor& t = args_[l].list[i];
        shared = shared && t.is_non_overlapping_and_dense() && t.sizes() == b[i].sizes() &&
                 t.strides() == b[i].strides();
      }
      for (size_t l = 0; l < args_.size(); ++l)
        if (present(l))
          work_[l].push_back(shared ? args_[l].list[i] : args_[l].list[i].contiguous());
    }
  }

  // Groups by parameter dtype; ids (param ids or empty) become the per-tensor tags.
  void build(at::IntArrayRef ids) {
    const TensorList b = base();
    for (size_t i = 0; i < b.size(); ++i) {
      Slot& slot = slots_[static_cast<int>(param_type(b[i].scalar_type()))];
      slot.used = true;
      slot.numel.push_back(b[i].numel());
      for (size_t l = 0; l < args_.size(); ++l)
        if (present(l)) slot.ptrs[l].push_back(work_[l][i].data_ptr());
      if (!ids.empty())
        slot.tags.push_back(static_cast<uint64_t>(ids[i]));  // both words: docs/spec.md "Noise"
    }
    for (int s = 0; s < 4; ++s) {
      Slot& slot = slots_[s];
      if (!slot.used) continue;
      Group g;
      g.param = static_cast<ParamType>(s);
      g.count = static_cast<int64_t>(slot.numel.size());
      g.numel = slot.numel.data();
      for (size_t l = 0; l < args_.size(); ++l)
        g.lists[l] = present(l) ? slot.ptrs[l].data() : nullptr;
      g.tags = slot.tags.empty() ? nullptr : slot.tags.data();
      groups_.push_back(g);
    }
  }

  struct Slot {
    bool used = false;
    std::vector<int64_t> numel;
    std::array<std::vector<void*>, kMaxLists> ptrs;
    std::vector<uint64_t> tags;
  };
  std::vector<ListArg> args_;
  size_t base_ = 0;
  std::vector<std::vector<Tensor>> work_;
  std::array<Slot, 4> slots_;  // indexed by ParamType
  std::vector<Group> groups_;
  std::optional<c10::cuda::CUDAGuard> guard_;
};

inline Tensor zero_norm() {
  return at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(at::kCUDA));
}

// Stage 1 of a global reduction over the phase's tensors: `stage1(partials, group, first)`
// launches group's float64 partials from slot `first` on; pl.chunks() slots in all.
template <class Stage1>
Tensor partials_of(const PhaseLists& pl, Stage1&& stage1) {
  Tensor partials = at::empty({pl.chunks()}, pl.base()[0].options().dtype(at::kDouble));
  int64_t first = 0;
  for (const Group& g : pl.groups()) {
    SK_CHECK_LAUNCH(stage1(partials.data_ptr<double>(), g, first));
    first += count_chunks(g.numel, g.count);
  }
  return partials;
}

// A global sum over the phase's tensors (float64, fixed order): the partials of `stage1`, which
// one block then adds (sqrt when take_sqrt) into a 0-dim float64 tensor, the norm contract of
// every backend.
template <class Stage1>
Tensor reduce(const PhaseLists& pl, bool take_sqrt, Stage1&& stage1) {
  const Tensor partials = partials_of(pl, stage1);
  Tensor out = at::empty({}, partials.options());
  SK_CHECK_LAUNCH(launch_reduce_partials(partials.data_ptr<double>(), partials.numel(),
                                         take_sqrt, out.data_ptr<double>(), pl.stream));
  return out;
}

// The norm a perturb phase scales by: the caller's (one element, any float dtype and device; a
// fresh 0-dim float64 on the tensors' device is returned, as the CPU kernels return it) or the
// sqrt of the sum `stage1` writes.  The kernels read it from device memory (never .item()).
template <class Stage1>
Tensor phase_norm(const char* op, const char* name, const std::optional<Tensor>& given,
                  const PhaseLists& pl, Stage1&& stage1) {
  if (given.has_value() && given->defined()) {
    TORCH_CHECK(given->numel() == 1, op, ": ", name, " must hold one element, got shape ",
                given->sizes());
    const at::Device device = pl.empty() ? given->device() : pl.base()[0].device();
    return given->reshape({}).to(device, at::kDouble, /*non_blocking=*/false, /*copy=*/true);
  }
  if (pl.empty()) return zero_norm();
  return reduce(pl, /*take_sqrt=*/true, stage1);
}

// A noise phase's glue (bsam_noise_, vi_noise_, ivon_noise_): the lists in row-major order
// (element i takes Philox number i of its parameter), the param ids as the tags, then
// launch(group, seed, step, device step, args..., stream) for every dtype group.
template <class Launch, class... Args>
void noise_phase(const char* op, std::vector<ListArg> lists, at::IntArrayRef param_ids,
                 int64_t seed, int64_t step, const std::optional<Tensor>& device_step,
                 Launch&& launch, const Args&... args) {
  PhaseLists pl(op, std::move(lists), /*logical_order=*/true, std::nullopt, param_ids,
                /*takes_ids=*/true);
  const int64_t* at = device_step_ptr(op, device_step, pl.base());
  pl.run([&](const Group& g) {
    return launch(g, static_cast<uint64_t>(seed), static_cast<uint64_t>(step), at, args...,
                  pl.stream);
  });
}

// The group with its lists renumbered: list l of the result is list from[l] of g.
inline Group remap_lists(const Group& g, std::initializer_list<int> from) {
  Group r = g;
  int l = 0;
  for (int f : from) r.lists[l++] = g.lists[f];
  for (; l < kMaxLists; ++l) r.lists[l] = nullptr;
  return r;
}

}  // namespace cuda
}  // namespace samkernels
