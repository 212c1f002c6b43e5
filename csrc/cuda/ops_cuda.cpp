// Torch glue of the CUDA kernels: the `CUDA` implementations of the samkernels ops (schemas in
// csrc/samkernels.cpp, csrc/cpu/vi_step.cpp and csrc/cpu/ebisam_step.cpp; semantics in
// samkernels/ops/reference.py and reference_vi.py).  It checks the arguments, makes
// non-contiguous tensors contiguous (and copies mutated ones back), groups the tensors by
// parameter dtype and calls the torch-free launch functions of launch.h on the current stream.
// Only light c10 CUDA headers are included (no ATen/cuda/CUDAContext.h, which pulls in cuBLAS and
// cuSPARSE headers): this file must build against any CUDA build of torch.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

#include "cuda/launch.h"

namespace samkernels {
namespace cuda {
namespace {

using at::Tensor;
using at::TensorList;

// Every launch function returns the first error of its kernel launches (cudaGetLastError).
#define SK_CHECK_LAUNCH(expr)                                                                  \
  do {                                                                                         \
    const cudaError_t sk_err_ = (expr);                                                        \
    TORCH_CHECK(sk_err_ == cudaSuccess, "samkernels: CUDA kernel launch failed: ",             \
                cudaGetErrorString(sk_err_));                                                  \
  } while (0)

ParamType param_type(at::ScalarType t) {
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
at::ScalarType opmath(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_params(const char* op, TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined");
    TORCH_CHECK(p.is_cuda(), op, ": params[", i, "] is on ", p.device(),
                "; the cuda backend needs CUDA tensors");
    TORCH_CHECK(p.device() == params[0].device(), op, ": params[", i, "] is on ", p.device(),
                " but params[0] is on ", params[0].device(), " (all tensors must share a device)");
    param_type(p.scalar_type());  // throws on unsupported dtypes
  }
}

// `list` must match params one to one: same device and numel; dtype = the parameter's dtype
// (grads, backups) or its opmath dtype (optimizer state).
void check_list(const char* op, const char* name, TensorList list, TensorList params, bool state) {
  TORCH_CHECK(list.size() == params.size(), op, ": ", name, " has ", list.size(),
              " tensors but params has ", params.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const Tensor& t = list[i];
    const Tensor& p = params[i];
    TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK(t.device() == p.device(), op, ": ", name, "[", i, "] is on ", t.device(),
                " but params[", i, "] is on ", p.device());
    TORCH_CHECK(t.numel() == p.numel(), op, ": ", name, "[", i, "] has ", t.numel(),
                " elements but params[", i, "] has ", p.numel());
    const at::ScalarType want = state ? opmath(p.scalar_type()) : p.scalar_type();
    TORCH_CHECK(t.scalar_type() == want, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                ", expected ", want,
                state ? " (optimizer state is float32, float64 for float64 params)"
                      : " (the dtype of params[i])");
  }
}

// Lists the kernels write: an element must not appear twice (expanded tensors).
void check_writable(const char* op, const char* name, TensorList list) {
  for (size_t i = 0; i < list.size(); ++i)
    TORCH_CHECK(at::has_internal_overlap(list[i]) != at::MemOverlap::Yes, op, ": ", name, "[", i,
                "] has internally overlapping memory (e.g. an expanded tensor) and is written");
}

// Dense stand-ins, decided jointly per index i.  Elementwise phases walk memory linearly, so the
// tensors i of all lists can be used as they are when each is non-overlapping and dense with the
// sizes and strides of the first (e.g. channels_last weights with channels_last state).
// Otherwise, or with logical_order (bsam_noise_: element i of the row-major order gets Philox
// number i), every one of them is made contiguous (a copy only where it is not already).
std::vector<std::vector<Tensor>> dense_lists(std::initializer_list<TensorList> lists,
                                             bool logical_order = false) {
  std::vector<std::vector<Tensor>> out(lists.size());
  const size_t n = lists.begin()->size();
  for (auto& v : out) v.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const Tensor& first = (*lists.begin())[i];
    bool shared = !logical_order;
    for (const TensorList& l : lists)
      shared = shared && l[i].is_non_overlapping_and_dense() && l[i].sizes() == first.sizes() &&
               l[i].strides() == first.strides();
    size_t j = 0;
    for (const TensorList& l : lists) out[j++].push_back(shared ? l[i] : l[i].contiguous());
  }
  return out;
}

// Copies mutated stand-ins back into the non-contiguous originals (stream-ordered, no sync).
void copy_back(TensorList orig, const std::vector<Tensor>& work) {
  for (size_t i = 0; i < orig.size(); ++i)
    if (!work[i].is_same(orig[i])) orig[i].copy_(work[i]);
}

// The tensors of one op grouped by parameter dtype; `groups` point into the slots' vectors, so
// a GroupSet is built in place and never copied.
struct GroupSet {
  struct Slot {
    std::vector<int64_t> numel;
    std::array<std::vector<void*>, kMaxLists> ptrs;
    std::vector<uint32_t> tags;
  };
  std::array<Slot, 4> slots;  // indexed by ParamType
  std::vector<Group> groups;

  GroupSet() = default;
  GroupSet(const GroupSet&) = delete;
  GroupSet& operator=(const GroupSet&) = delete;

  // lists[l]: the contiguous tensors of list l (nullptr: absent); ids: param ids or empty.
  void build(TensorList params, const std::array<const std::vector<Tensor>*, kMaxLists>& lists,
             at::IntArrayRef ids = {}) {
    std::array<bool, 4> used{};
    for (size_t i = 0; i < params.size(); ++i) {
      const int s = static_cast<int>(param_type(params[i].scalar_type()));
      used[s] = true;
      Slot& slot = slots[s];
      slot.numel.push_back(params[i].numel());
      for (int l = 0; l < kMaxLists; ++l)
        if (lists[l] != nullptr) slot.ptrs[l].push_back((*lists[l])[i].data_ptr());
      if (!ids.empty())
        slot.tags.push_back(static_cast<uint32_t>(static_cast<uint64_t>(ids[i]) & 0xFFFFFFFFu));
    }
    for (int s = 0; s < 4; ++s) {
      if (!used[s]) continue;
      Slot& slot = slots[s];
      Group g;
      g.param = static_cast<ParamType>(s);
      g.count = static_cast<int64_t>(slot.numel.size());
      g.numel = slot.numel.data();
      for (int l = 0; l < kMaxLists; ++l)
        g.lists[l] = lists[l] != nullptr ? slot.ptrs[l].data() : nullptr;
      g.tags = slot.tags.empty() ? nullptr : slot.tags.data();
      groups.push_back(g);
    }
  }
};

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Stage 1 of the global norm for every group; returns the number of partials written.
int64_t sumsq_partials(const GroupSet& gs, double* partials, bool adaptive, double eta,
                       cudaStream_t stream) {
  int64_t first = 0;
  for (const Group& g : gs.groups) {
    SK_CHECK_LAUNCH(launch_grad_sumsq_partials(g, partials, first, adaptive, eta, stream));
    first += count_chunks(g.numel, g.count);
  }
  return first;
}

int64_t total_chunks(const GroupSet& gs) {
  int64_t n = 0;
  for (const Group& g : gs.groups) n += count_chunks(g.numel, g.count);
  return n;
}

// The group with its lists renumbered: list l of the result is list from[l] of g (-1: absent).
// Lets a phase run a stage whose launch numbers the lists differently (e.g. the norm partials).
Group remap_lists(const Group& g, std::initializer_list<int> from) {
  Group r = g;
  int l = 0;
  for (int f : from) r.lists[l++] = f >= 0 ? g.lists[f] : nullptr;
  for (; l < kMaxLists; ++l) r.lists[l] = nullptr;
  return r;
}

// The `found_inf` contract: None -> nullptr (the phase always runs); else a one-element float32
// tensor on the params' device whose address the kernels read (nonzero: the skip form).  The
// host never reads it.
const float* found_inf_ptr(const char* op, const std::optional<Tensor>& found_inf,
                           TensorList params) {
  if (!found_inf.has_value() || !found_inf->defined()) return nullptr;
  const Tensor& f = *found_inf;
  TORCH_CHECK(f.scalar_type() == at::kFloat, op, ": found_inf must be a float32 tensor, got ",
              f.scalar_type());
  TORCH_CHECK(f.numel() == 1 && f.dim() <= 1, op,
              ": found_inf must hold one element (shape [] or [1]), got shape ", f.sizes());
  TORCH_CHECK(f.is_cuda(), op, ": found_inf is on ", f.device(),
              "; it must be on the params' CUDA device");
  if (!params.empty())
    TORCH_CHECK(f.device() == params[0].device(), op, ": found_inf is on ", f.device(),
                " but params[0] is on ", params[0].device());
  return f.data_ptr<float>();
}

// A norm in device memory: `result` is what the op returns (a 0-dim float64, the norm contract of
// every backend), `norm64` the float64 the kernels read (never .item(): no host sync).
struct DeviceNorm {
  Tensor result, norm64;
};

// sqrt of a sum of partials: `stage1(partials)` writes n float64 partials (of tensors on the
// device of `like`), one block then reduces them in a fixed order.
template <class Stage1>
DeviceNorm reduce_norm(const Tensor& like, int64_t n, cudaStream_t stream, Stage1&& stage1) {
  const auto f64 = like.options().dtype(at::kDouble);
  Tensor partials = at::empty({n}, f64);
  double* parts = partials.data_ptr<double>();
  stage1(parts);
  DeviceNorm out;
  out.result = at::empty({}, f64);
  out.norm64 = out.result;
  SK_CHECK_LAUNCH(launch_reduce_partials(parts, n, /*take_sqrt=*/true,
                                         out.result.data_ptr<double>(), stream));
  return out;
}

// A norm the caller passed (one element, any float dtype and device): returned as a fresh 0-dim
// float64 tensor on `device` (as the CPU kernels return it).
DeviceNorm given_norm(const char* op, const char* name, const Tensor& given,
                      const at::Device& device) {
  TORCH_CHECK(given.numel() == 1, op, ": ", name, " must hold one element, got shape ",
              given.sizes());
  DeviceNorm out;
  out.norm64 = given.reshape({}).to(device, at::kDouble);  // no-op if already float64 there
  out.result = given.reshape({}).to(device, at::kDouble, /*non_blocking=*/false, /*copy=*/true);
  return out;
}

// ---------------------------------------------------------------------------------------------
// The ops (same signatures as the schemas in csrc/samkernels.cpp).
// ---------------------------------------------------------------------------------------------
Tensor grad_sumsq_cuda(TensorList params, TensorList grads, bool adaptive, double eta) {
  const char* op = "samkernels::grad_sumsq";
  // params are read only for ASAM (T = |w| + eta); plain SAM needs the grads alone (as the CPU
  // kernel), so then the grads also decide the dtype groups.
  const TensorList base = adaptive ? params : grads;
  check_params(op, base);
  if (adaptive) check_list(op, "grads", grads, params, false);
  if (base.empty()) return at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(at::kCUDA));
  const c10::cuda::CUDAGuard guard(base[0].device());
  const cudaStream_t stream = current_stream();
  const auto w = adaptive ? dense_lists({params, grads}) : dense_lists({grads});
  GroupSet gs;
  gs.build(base, {adaptive ? &w[0] : nullptr, &w.back(), nullptr, nullptr, nullptr, nullptr});
  const int64_t n = total_chunks(gs);
  const auto f64 = base[0].options().dtype(at::kDouble);
  Tensor partials = at::empty({n}, f64);
  Tensor out = at::empty({}, f64);  // float64 like reference.grad_sumsq
  sumsq_partials(gs, partials.data_ptr<double>(), adaptive, eta, stream);
  SK_CHECK_LAUNCH(launch_reduce_partials(partials.data_ptr<double>(), n, /*take_sqrt=*/false,
                                         out.data_ptr<double>(), stream));
  return out;
}

Tensor sam_perturb_cuda(TensorList params, TensorList grads, TensorList backups,
                        const std::optional<Tensor>& grad_norm, double rho, double eps,
                        bool adaptive, double eta, const std::optional<Tensor>& found_inf) {
  const char* op = "samkernels::sam_perturb_";
  check_params(op, params);
  check_list(op, "grads", grads, params, false);
  check_list(op, "backups", backups, params, false);
  check_writable(op, "params", params);
  check_writable(op, "backups", backups);
  const float* skip = found_inf_ptr(op, found_inf, params);
  const bool given = grad_norm.has_value() && grad_norm->defined();
  if (given) TORCH_CHECK(grad_norm->numel() == 1, op, ": grad_norm must hold one element");
  if (params.empty()) {
    if (given) return grad_norm->clone();
    return at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(at::kCUDA));
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = current_stream();
  const auto w = dense_lists({params, grads, backups});
  GroupSet gs;
  gs.build(params, {&w[0], &w[1], &w[2], nullptr, nullptr, nullptr});

  // The norm the kernels read, as float64 in device memory (never .item(): no host sync).
  Tensor result, norm64;
  if (given) {
    norm64 = grad_norm->to(params[0].device(), at::kDouble);  // no-op if already float64 there
    result = grad_norm->clone();  // a fresh tensor: the schema's return aliases no input
  } else {
    DeviceNorm norm = reduce_norm(params[0], total_chunks(gs), stream, [&](double* parts) {
      sumsq_partials(gs, parts, adaptive, eta, stream);
    });
    result = norm.result;
    norm64 = norm.norm64;
  }
  const double* norm_ptr = norm64.data_ptr<double>();
  for (const Group& grp : gs.groups)
    SK_CHECK_LAUNCH(launch_sam_perturb(grp, norm_ptr, rho, eps, adaptive, eta, skip, stream));
  copy_back(params, w[0]);
  copy_back(backups, w[2]);
  return result;
}

void sam_restore_sgd_cuda(TensorList params, TensorList grads, TensorList backups,
                          TensorList momentum_bufs, double lr, double momentum, double dampening,
                          bool nesterov, double weight_decay, bool first,
                          const std::optional<Tensor>& found_inf) {
  const char* op = "samkernels::sam_restore_sgd_";
  const bool use_momentum = momentum != 0.0;
  check_params(op, params);
  check_list(op, "grads", grads, params, false);
  check_list(op, "backups", backups, params, false);
  check_writable(op, "params", params);
  if (use_momentum) {  // reference: the buffers are only touched with momentum
    check_list(op, "momentum_bufs", momentum_bufs, params, true);
    check_writable(op, "momentum_bufs", momentum_bufs);
  }
  const float* skip = found_inf_ptr(op, found_inf, params);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = current_stream();
  const auto w = use_momentum ? dense_lists({params, grads, backups, momentum_bufs})
                              : dense_lists({params, grads, backups});
  GroupSet gs;
  gs.build(params, {&w[0], &w[1], &w[2], use_momentum ? &w[3] : nullptr, nullptr, nullptr});
  for (const Group& grp : gs.groups)
    SK_CHECK_LAUNCH(launch_sam_restore_sgd(grp, lr, momentum, dampening, nesterov, weight_decay,
                                           first, skip, stream));
  copy_back(params, w[0]);
  if (use_momentum) copy_back(momentum_bufs, w[3]);
}

void sam_restore_adam_cuda(TensorList params, TensorList grads, TensorList backups,
                           TensorList exp_avgs, TensorList exp_avg_sqs, int64_t step, double lr,
                           double beta1, double beta2, double eps, double weight_decay,
                           bool decoupled, const std::optional<Tensor>& found_inf) {
  const char* op = "samkernels::sam_restore_adam_";
  check_params(op, params);
  check_list(op, "grads", grads, params, false);
  check_list(op, "backups", backups, params, false);
  check_list(op, "exp_avgs", exp_avgs, params, true);
  check_list(op, "exp_avg_sqs", exp_avg_sqs, params, true);
  check_writable(op, "params", params);
  check_writable(op, "exp_avgs", exp_avgs);
  check_writable(op, "exp_avg_sqs", exp_avg_sqs);
  // Bias corrections on the host, as reference.py (Python's float ** int is C pow).
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  TORCH_CHECK(step >= 1, op, ": step counts from 1, got ", step);
  TORCH_CHECK(bc1 != 0.0 && bc2 != 0.0, op, ": a bias correction 1 - beta**step is zero");
  const float* skip = found_inf_ptr(op, found_inf, params);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = current_stream();
  const auto w = dense_lists({params, grads, backups, exp_avgs, exp_avg_sqs});
  GroupSet gs;
  gs.build(params, {&w[0], &w[1], &w[2], &w[3], &w[4], nullptr});
  for (const Group& grp : gs.groups)
    SK_CHECK_LAUNCH(launch_sam_restore_adam(grp, lr, lr / bc1, std::sqrt(bc2), beta1, beta2, eps,
                                            weight_decay, decoupled, skip, stream));
  copy_back(params, w[0]);
  copy_back(exp_avgs, w[3]);
  copy_back(exp_avg_sqs, w[4]);
}

void bsam_noise_cuda(TensorList params, TensorList backups, TensorList precisions,
                     at::IntArrayRef param_ids, int64_t seed, int64_t step, double num_data) {
  const char* op = "samkernels::bsam_noise_";
  check_params(op, params);
  check_list(op, "backups", backups, params, false);
  check_list(op, "precisions", precisions, params, true);
  TORCH_CHECK(param_ids.size() == params.size(), op, ": param_ids has ", param_ids.size(),
              " entries but params has ", params.size());
  check_writable(op, "params", params);
  check_writable(op, "backups", backups);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = current_stream();
  const auto w = dense_lists({params, backups, precisions}, /*logical_order=*/true);
  GroupSet gs;
  gs.build(params, {&w[0], &w[1], &w[2], nullptr, nullptr, nullptr}, param_ids);
  // Philox words take the two's-complement bits of seed and step (reference: & 0xFFFFFFFF).
  for (const Group& grp : gs.groups)
    SK_CHECK_LAUNCH(launch_bsam_noise(grp, static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                                      num_data, stream));
  copy_back(params, w[0]);
  copy_back(backups, w[1]);
}

void bsam_perturb_cuda(TensorList params, TensorList grads, TensorList backups,
                       TensorList precisions, TensorList accums, double rho, double beta2,
                       double delta, double gamma, const std::optional<Tensor>& found_inf) {
  const char* op = "samkernels::bsam_perturb_";
  const bool accumulate = !accums.empty();  // empty list: no accumulation, line 5 runs here
  check_params(op, params);
  check_list(op, "grads", grads, params, false);
  check_list(op, "backups", backups, params, false);
  check_list(op, "precisions", precisions, params, true);
  check_writable(op, "params", params);
  if (accumulate) {
    check_list(op, "accums", accums, params, true);
    check_writable(op, "accums", accums);
  } else {
    check_writable(op, "precisions", precisions);
  }
  const float* skip = found_inf_ptr(op, found_inf, params);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = current_stream();
  const auto w = accumulate ? dense_lists({params, grads, backups, precisions, accums})
                            : dense_lists({params, grads, backups, precisions});
  GroupSet gs;
  gs.build(params, {&w[0], &w[1], &w[2], &w[3], accumulate ? &w[4] : nullptr, nullptr});
  for (const Group& grp : gs.groups)
    SK_CHECK_LAUNCH(launch_bsam_perturb(grp, rho, beta2, delta, gamma, skip, stream));
  copy_back(params, w[0]);
  if (accumulate)
    copy_back(accums, w[4]);
  else
    copy_back(precisions, w[3]);
}

void bsam_update_cuda(TensorList params, TensorList grads, TensorList backups,
                      TensorList precisions, TensorList momenta, TensorList accums, double lr,
                      double beta1, double beta2, double delta, double gamma, double accum_scale,
                      bool released_order, const std::optional<Tensor>& found_inf) {
  const char* op = "samkernels::bsam_update_";
  const bool accumulate = !accums.empty();  // empty list: line 5 already ran in bsam_perturb_
  TORCH_CHECK(accumulate || !released_order, op, ": released_order=True needs accums (line 5 must wait for the update to keep the old s)");
  check_params(op, params);
  check_list(op, "grads", grads, params, false);
  check_list(op, "backups", backups, params, false);
  check_list(op, "precisions", precisions, params, true);
  check_list(op, "momenta", momenta, params, true);
  check_writable(op, "params", params);
  check_writable(op, "momenta", momenta);
  if (accumulate) {
    check_list(op, "accums", accums, params, true);
    check_writable(op, "precisions", precisions);
  }
  const float* skip = found_inf_ptr(op, found_inf, params);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = current_stream();
  const auto w = accumulate ? dense_lists({params, grads, backups, precisions, momenta, accums})
                            : dense_lists({params, grads, backups, precisions, momenta});
  GroupSet gs;
  gs.build(params, {&w[0], &w[1], &w[2], &w[3], &w[4], accumulate ? &w[5] : nullptr});
  for (const Group& grp : gs.groups)
    SK_CHECK_LAUNCH(launch_bsam_update(grp, lr, beta1, beta2, delta, gamma, accum_scale,
                                       released_order, skip, stream));
  copy_back(params, w[0]);
  copy_back(momenta, w[4]);
  if (accumulate) copy_back(precisions, w[3]);
}

// ---------------------------------------------------------------------------------------------
// MFVI family and E-BiSAM (schemas in csrc/cpu/vi_step.cpp and csrc/cpu/ebisam_step.cpp; semantics
// in samkernels/ops/reference_vi.py).
// ---------------------------------------------------------------------------------------------
void check_ids(const char* op, at::IntArrayRef param_ids, TensorList params) {
  TORCH_CHECK(param_ids.size() == params.size(), op, ": param_ids has ", param_ids.size(),
              " entries but params has ", params.size());
}

void vi_noise_cuda(TensorList params, TensorList backups, TensorList variances,
                   at::IntArrayRef param_ids, int64_t seed, int64_t step, double sigma) {
  const char* op = "samkernels::vi_noise_";
  const bool learned = !variances.empty();  // MFVI: std = sqrt(Sigma); RandomSAM: std = sigma
  check_params(op, params);
  check_list(op, "backups", backups, params, false);
  if (learned) check_list(op, "variances", variances, params, true);
  check_ids(op, param_ids, params);
  check_writable(op, "params", params);
  check_writable(op, "backups", backups);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = current_stream();
  // element i of the row-major order gets Philox number i
  const auto w = learned ? dense_lists({params, backups, variances}, /*logical_order=*/true)
                         : dense_lists({params, backups}, /*logical_order=*/true);
  GroupSet gs;
  gs.build(params, {&w[0], &w[1], learned ? &w[2] : nullptr, nullptr, nullptr, nullptr},
           param_ids);
  for (const Group& grp : gs.groups)
    SK_CHECK_LAUNCH(launch_vi_noise(grp, static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                                    sigma, stream));
  copy_back(params, w[0]);
  copy_back(backups, w[1]);
}

void mfvi_update_cuda(TensorList params, TensorList grads, TensorList backups,
                      TensorList variances, TensorList momenta, at::IntArrayRef param_ids,
                      int64_t seed, int64_t step, double lr, double var_lr, double momentum,
                      double prior_var, double num_data, const std::optional<Tensor>& found_inf) {
  const char* op = "samkernels::mfvi_update_";
  const bool use_momentum = !momenta.empty();  // empty list: no momentum
  check_params(op, params);
  check_list(op, "grads", grads, params, false);
  check_list(op, "backups", backups, params, false);
  check_list(op, "variances", variances, params, true);
  check_ids(op, param_ids, params);
  check_writable(op, "params", params);
  check_writable(op, "variances", variances);
  if (use_momentum) {
    check_list(op, "momenta", momenta, params, true);
    check_writable(op, "momenta", momenta);
  }
  const float* skip = found_inf_ptr(op, found_inf, params);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = current_stream();
  // z is regenerated per element of the row-major order, as vi_noise_ drew it
  const auto w =
      use_momentum
          ? dense_lists({params, grads, backups, variances, momenta}, /*logical_order=*/true)
          : dense_lists({params, grads, backups, variances}, /*logical_order=*/true);
  GroupSet gs;
  gs.build(params, {&w[0], &w[1], &w[2], &w[3], use_momentum ? &w[4] : nullptr, nullptr},
           param_ids);
  for (const Group& grp : gs.groups)
    SK_CHECK_LAUNCH(launch_mfvi_update(grp, static_cast<uint64_t>(seed),
                                       static_cast<uint64_t>(step), lr, var_lr, momentum,
                                       prior_var, num_data, skip, stream));
  copy_back(params, w[0]);
  copy_back(variances, w[3]);
  if (use_momentum) copy_back(momenta, w[4]);
}

// Stage 1 of g^T Sigma g for every group of `gs`, whose lists `grads_list` / `vars_list` hold the
// grads and variances; returns the number of partials written.
int64_t vsam_partials(const GroupSet& gs, int grads_list, int vars_list, double* partials,
                      cudaStream_t stream) {
  int64_t first = 0;
  for (const Group& g : gs.groups) {
    SK_CHECK_LAUNCH(launch_vsam_sumsq_partials(remap_lists(g, {grads_list, vars_list}), partials,
                                               first, stream));
    first += count_chunks(g.numel, g.count);
  }
  return first;
}

Tensor vsam_sumsq_cuda(TensorList grads, TensorList variances) {
  const char* op = "samkernels::vsam_sumsq";
  check_params(op, grads);  // the grads decide the dtype groups
  check_list(op, "variances", variances, grads, true);
  if (grads.empty()) return at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(at::kCUDA));
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const cudaStream_t stream = current_stream();
  const auto w = dense_lists({grads, variances});
  GroupSet gs;
  gs.build(grads, {&w[0], &w[1], nullptr, nullptr, nullptr, nullptr});
  const int64_t n = total_chunks(gs);
  const auto f64 = grads[0].options().dtype(at::kDouble);
  Tensor partials = at::empty({n}, f64);
  Tensor out = at::empty({}, f64);  // float64 like reference_vi.vsam_sumsq
  vsam_partials(gs, 0, 1, partials.data_ptr<double>(), stream);
  SK_CHECK_LAUNCH(launch_reduce_partials(partials.data_ptr<double>(), n, /*take_sqrt=*/false,
                                         out.data_ptr<double>(), stream));
  return out;
}

Tensor vsam_perturb_cuda(TensorList params, TensorList grads, TensorList backups,
                         TensorList variances, const std::optional<Tensor>& sigma_norm,
                         double dim, double eps, double var_lr, double prior_var,
                         double num_data, bool log_step, double min_var,
                         const std::optional<Tensor>& found_inf) {
  const char* op = "samkernels::vsam_perturb_";
  check_params(op, params);
  check_list(op, "grads", grads, params, false);
  check_list(op, "backups", backups, params, false);
  check_list(op, "variances", variances, params, true);
  check_writable(op, "params", params);
  check_writable(op, "backups", backups);
  check_writable(op, "variances", variances);
  const float* skip = found_inf_ptr(op, found_inf, params);
  const bool given = sigma_norm.has_value() && sigma_norm->defined();
  if (params.empty()) {
    if (given) return given_norm(op, "sigma_norm", *sigma_norm, sigma_norm->device()).result;
    return at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(at::kCUDA));
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = current_stream();
  const auto w = dense_lists({params, grads, backups, variances});
  GroupSet gs;
  gs.build(params, {&w[0], &w[1], &w[2], &w[3], nullptr, nullptr});
  // sqrt(g^T Sigma g) over this list unless given; computed with the Sigma before the update
  const DeviceNorm norm =
      given ? given_norm(op, "sigma_norm", *sigma_norm, params[0].device())
            : reduce_norm(params[0], total_chunks(gs), stream,
                          [&](double* parts) { vsam_partials(gs, 1, 3, parts, stream); });
  const double* norm_ptr = norm.norm64.data_ptr<double>();
  for (const Group& grp : gs.groups)
    SK_CHECK_LAUNCH(launch_vsam_perturb(grp, norm_ptr, dim, eps, var_lr, prior_var, num_data,
                                        log_step, min_var, skip, stream));
  copy_back(params, w[0]);
  copy_back(backups, w[2]);
  copy_back(variances, w[3]);
  return norm.result;
}

Tensor ebisam_perturb_cuda(TensorList params, TensorList grads, TensorList backups,
                         at::IntArrayRef param_ids, const std::optional<Tensor>& grad_norm,
                         int64_t seed, int64_t step, double rho, double beta, double eps,
                         const std::optional<Tensor>& found_inf) {
  const char* op = "samkernels::ebisam_perturb_";
  check_params(op, params);
  check_list(op, "grads", grads, params, false);
  check_list(op, "backups", backups, params, false);
  check_ids(op, param_ids, params);
  check_writable(op, "params", params);
  check_writable(op, "backups", backups);
  TORCH_CHECK(beta >= 0.0 && beta < 1.0, op, ": beta must be in [0, 1), got ", beta);
  const float* skip = found_inf_ptr(op, found_inf, params);
  const bool given = grad_norm.has_value() && grad_norm->defined();
  if (params.empty()) {
    if (given) return given_norm(op, "grad_norm", *grad_norm, grad_norm->device()).result;
    return at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(at::kCUDA));
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = current_stream();
  // the mask of element i is Philox number i of the row-major order
  const auto w = dense_lists({params, grads, backups}, /*logical_order=*/true);
  GroupSet gs;
  gs.build(params, {&w[0], &w[1], &w[2], nullptr, nullptr, nullptr}, param_ids);
  // ||g|| over all coordinates, masked or not (grad_sumsq's stage 1: lists 0 params, 1 grads)
  const DeviceNorm norm =
      given ? given_norm(op, "grad_norm", *grad_norm, params[0].device())
            : reduce_norm(params[0], total_chunks(gs), stream, [&](double* parts) {
                sumsq_partials(gs, parts, /*adaptive=*/false, 0.0, stream);
              });
  const double* norm_ptr = norm.norm64.data_ptr<double>();
  for (const Group& grp : gs.groups)
    SK_CHECK_LAUNCH(launch_ebisam_perturb(grp, norm_ptr, static_cast<uint64_t>(seed),
                                        static_cast<uint64_t>(step), rho, beta, eps, skip, stream));
  copy_back(params, w[0]);
  copy_back(backups, w[2]);
  return norm.result;
}

}  // namespace

TORCH_LIBRARY_IMPL(samkernels, CUDA, m) {
  m.impl("grad_sumsq", &grad_sumsq_cuda);
  m.impl("sam_perturb_", &sam_perturb_cuda);
  m.impl("sam_restore_sgd_", &sam_restore_sgd_cuda);
  m.impl("sam_restore_adam_", &sam_restore_adam_cuda);
  m.impl("bsam_noise_", &bsam_noise_cuda);
  m.impl("bsam_perturb_", &bsam_perturb_cuda);
  m.impl("bsam_update_", &bsam_update_cuda);
  m.impl("vi_noise_", &vi_noise_cuda);
  m.impl("mfvi_update_", &mfvi_update_cuda);
  m.impl("vsam_sumsq", &vsam_sumsq_cuda);
  m.impl("vsam_perturb_", &vsam_perturb_cuda);
  m.impl("ebisam_perturb_", &ebisam_perturb_cuda);
}

}  // namespace cuda
}  // namespace samkernels
