// Multi-tensor plumbing for the CPU kernels: one PhaseLists per op call checks its tensor lists by
// role, makes contiguous working copies (written back into non-contiguous originals), and runs a
// (tensor, chunk) work list with at::parallel_for, dispatching on the parameter dtype.  The maths
// of each phase lives in csrc/math/*.h, shared with the CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <array>
#include <cmath>
#include <utility>
#include <vector>

#include "math/sam.h"
#include "phase_checks.h"

namespace samkernels {
namespace cpu {

constexpr int64_t kChunk = 16384;           // elements per work item (multiple of 4: Philox quads)
constexpr int64_t kSerialBelow = 1 << 15;   // total elements under which threads cost more than they give

struct Chunk {
  int64_t tensor, begin, end;
};

// Runs f(chunk_index, chunk) over all chunks, in parallel when the work is large enough.
template <class F>
void for_each_chunk(const std::vector<Chunk>& chunks, int64_t total, F&& f) {
  const int64_t n = static_cast<int64_t>(chunks.size());
  if (total < kSerialBelow) {
    for (int64_t i = 0; i < n; ++i) f(i, chunks[i]);
    return;
  }
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(i, chunks[i]);
  });
}

// reference.py `opmath`: the dtype of the maths and of the optimizer state.
inline at::ScalarType opmath_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// One chunk of one tensor, typed: scalar_t the parameter dtype, opmath_t its maths/state dtype.
template <typename S>
struct ChunkView {
  using scalar_t = S;
  using opmath_t = at::opmath_type<S>;
  const std::vector<std::vector<void*>>* data;  // per list, per tensor: the working data
  int64_t tensor, begin, end;

  scalar_t* param(int l) const { return ptr<scalar_t>(l); }  // nullptr for an absent list
  opmath_t* state(int l) const { return ptr<opmath_t>(l); }

 private:
  template <typename T>
  T* ptr(int l) const {
    const auto& w = (*data)[l];
    return w.empty() ? nullptr : static_cast<T*>(w[tensor]);
  }
};

// Lists 0, 1, 2 of a gradient phase (the op table's PERTURBED / UPDATED lists: params, grads,
// backups) in a chunk view, typed: w[i], g[i], b[i].
template <typename S>
struct GradientLists {
  S* w;
  const S* g;
  S* b;
};

template <class V>
GradientLists<typename V::scalar_t> gradient_lists(const V& v) {
  return {v.param(0), v.param(1), v.param(2)};
}

// scalar_t and opmath_t of the ChunkView `v` (in the body of a PhaseLists::run; a body may use
// only one of them).
#define SK_CHUNK_TYPES(v)                                                               \
  using scalar_t [[maybe_unused]] = typename std::decay_t<decltype(v)>::scalar_t;       \
  using opmath_t [[maybe_unused]] = typename std::decay_t<decltype(v)>::opmath_t

// The step of an op that takes `device_step` (phase_checks.h): step + its value, which on the CPU
// is host memory.
inline int64_t at_step(const char* op, int64_t step,
                       const c10::optional<at::Tensor>& device_step, at::TensorList base) {
  check_device_step(op, device_step, base);
  return has_device_step(device_step) ? step + device_step->item<int64_t>() : step;
}

// The tensor lists of one phase call.  The base list (the first one present: params, or grads for
// the sums) decides the dtypes; every other present list must match it one to one (CPU, strided,
// same numel, dtype by role).  Working copies are made on first use (not at all when the skip
// form returns first); finish() copies the written ones back.
class PhaseLists {
 public:
  PhaseLists(const char* op, std::vector<ListArg> lists,
             const c10::optional<at::Tensor>& found_inf = c10::nullopt, at::IntArrayRef ids = {},
             bool takes_ids = false)
      : op_(op), args_(std::move(lists)), found_inf_(found_inf) {
    while (base_ + 1 < args_.size() && !present(base_)) ++base_;
    check();
    if (takes_ids) check_ids(op, ids, base().size());
  }

  at::TensorList base() const { return args_[base_].list; }

  // `found_inf` of the gradient-consuming ops (README "Non-finite gradients"): nonzero means the
  // op takes its skip form.  On the CPU the flag is ordinary host memory, so reading it is free.
  bool skip() const {
    if (!found_inf_.has_value()) return false;
    const at::Tensor& f = *found_inf_;
    TORCH_CHECK(f.numel() == 1, op_, ": found_inf must hold one element, got shape ", f.sizes());
    TORCH_CHECK(f.device().is_cpu(), op_, ": found_inf is on ", f.device(),
                " but the parameters are on the CPU");
    return f.item<double>() != 0.0;
  }

  // The chunks of the base list; chunk starts are multiples of kChunk (so of 4: Philox quads).
  const std::vector<Chunk>& chunks() {
    densify();
    return chunks_;
  }

  // f(view) for every chunk, view a ChunkView of the chunk's parameter dtype.
  template <class F>
  void run(F&& f) {
    const auto& cs = chunks();
    for_each_chunk(cs, total_, [&](int64_t, const Chunk& c) { dispatch(c, f); });
  }

  // Fixed-order sum of f(view) over the chunks: the result does not depend on the thread count.
  template <class F>
  double sum(F&& f) {
    const auto& cs = chunks();
    std::vector<double> partial(cs.size(), 0.0);
    for_each_chunk(cs, total_, [&](int64_t i, const Chunk& c) {
      dispatch(c, [&](const auto& v) { partial[i] = f(v); });
    });
    double total = 0.0;
    for (double v : partial) total += v;
    return total;
  }

  // K fixed-order sums at once (f returns a std::array<double, K> per chunk): one read of the
  // lists for several reductions (samv_dots).
  template <size_t K, class F>
  std::array<double, K> sums(F&& f) {
    const auto& cs = chunks();
    std::vector<std::array<double, K>> partial(cs.size());
    for_each_chunk(cs, total_, [&](int64_t i, const Chunk& c) {
      dispatch(c, [&](const auto& v) { partial[i] = f(v); });
    });
    std::array<double, K> total{};
    for (const auto& p : partial)
      for (size_t k = 0; k < K; ++k) total[k] += p[k];
    return total;
  }

  void finish() {
    for (const Copy& c : copies_)
      if (args_[c.list].written) args_[c.list].list[c.tensor].copy_(c.dense);
  }

 private:
  bool present(size_t l) const { return !(args_[l].optional && args_[l].list.empty()); }

  template <class F>
  void dispatch(const Chunk& c, F&& f) const {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtypes_[c.tensor],
                                    "samkernels_cpu_phase", [&] {
                                      f(ChunkView<scalar_t>{&data_, c.tensor, c.begin, c.end});
                                    });
  }

  void check() const {
    const ListArg& b = args_[base_];
    for (size_t i = 0; i < b.list.size(); ++i) {
      const at::Tensor& p = b.list[i];
      TORCH_CHECK(p.device().is_cpu(), op_, ": ", b.name, "[", i, "] is on ", p.device(),
                  ", the cpu backend needs CPU tensors");
      TORCH_CHECK(at::isFloatingType(p.scalar_type()), op_, ": ", b.name, "[", i, "] has dtype ",
                  p.scalar_type(), ", expected a floating dtype");
    }
    for (size_t l = 0; l < args_.size(); ++l) {
      const ListArg& a = args_[l];
      if (l == base_ || !present(l)) continue;
      TORCH_CHECK(a.list.size() == b.list.size(), op_, ": ", a.name, " has ", a.list.size(),
                  " tensors but ", b.name, " has ", b.list.size());
      for (size_t i = 0; i < a.list.size(); ++i) {
        const at::Tensor& p = b.list[i];
        const at::Tensor& t = a.list[i];
        TORCH_CHECK(t.device().is_cpu(), op_, ": ", a.name, "[", i, "] is on ", t.device());
        TORCH_CHECK(t.layout() == at::kStrided, op_, ": ", a.name, "[", i,
                    "] is sparse; not supported");
        TORCH_CHECK(t.numel() == p.numel(), op_, ": ", a.name, "[", i, "] has ", t.numel(),
                    " elements but ", b.name, "[", i, "] has ", p.numel());
        const auto want =
            a.role == Role::kState ? opmath_dtype(p.scalar_type()) : p.scalar_type();
        TORCH_CHECK(t.scalar_type() == want, op_, ": ", a.name, "[", i, "] has dtype ",
                    t.scalar_type(), ", expected ", want);
      }
    }
  }

  // The working data of every tensor: its own, or (strided) a contiguous copy that finish()
  // writes back.  Raw addresses, read once per tensor: no tensor handle per chunk and list (on
  // thousands of tiny tensors the per-tensor bookkeeping is the whole cost of a phase).
  void densify() {
    if (densified_) return;
    densified_ = true;
    data_.resize(args_.size());
    for (size_t l = 0; l < args_.size(); ++l) {
      if (!present(l)) continue;
      const at::TensorList list = args_[l].list;
      auto& d = data_[l];
      d.resize(list.size());
      for (size_t i = 0; i < list.size(); ++i) {
        if (list[i].is_contiguous()) {
          d[i] = list[i].data_ptr();
        } else {
          copies_.push_back({l, i, list[i].contiguous()});
          d[i] = copies_.back().dense.data_ptr();
        }
      }
    }
    const at::TensorList ref = args_[base_].list;
    dtypes_.resize(ref.size());
    chunks_.reserve(ref.size());
    for (int64_t t = 0; t < static_cast<int64_t>(ref.size()); ++t) {
      const int64_t n = ref[t].numel();
      dtypes_[t] = ref[t].scalar_type();
      total_ += n;
      for (int64_t b = 0; b < n; b += kChunk) chunks_.push_back({t, b, std::min(n, b + kChunk)});
    }
  }

  struct Copy {  // a contiguous working copy of args_[list].list[tensor]
    size_t list, tensor;
    at::Tensor dense;
  };

  const char* op_;
  std::vector<ListArg> args_;
  c10::optional<at::Tensor> found_inf_;
  size_t base_ = 0;
  bool densified_ = false;
  std::vector<std::vector<void*>> data_;  // per list; empty for an absent list
  std::vector<Copy> copies_;              // the strided tensors' working copies
  std::vector<at::ScalarType> dtypes_;    // per tensor of the base list
  std::vector<Chunk> chunks_;
  int64_t total_ = 0;
};

// dst[i] <- src[i], bit for bit (the skip forms: backups <- params, or params <- backups).
inline void copy_lists(at::TensorList dst, at::TensorList src) {
  for (size_t i = 0; i < dst.size(); ++i) dst[i].copy_(src[i]);
}

// The norm contract of every backend: a returned norm is a 0-dim float64 tensor (the sums are
// float64 already), whatever the parameters' dtypes, as the reference returns it.
inline at::Tensor norm_tensor(double v) {
  return at::scalar_tensor(v, at::TensorOptions().dtype(at::kDouble));
}

// Sum of term(i) over [begin, end) in float64, in kSumLanes partial sums (lane j takes the i
// with (i - begin) % kSumLanes == j) added in a fixed order at the end.  One accumulator is a
// chain of dependent additions that keeps a reduction below memory bandwidth (~1.3x slower on
// 9.5M fp32 values, one thread); independent lanes overlap.  The order depends only on the
// chunk, so a sum still does not depend on the thread count.
constexpr int kSumLanes = 8;
template <class Term>
inline double lane_sum(int64_t begin, int64_t end, const Term& term) {
  double lane[kSumLanes] = {};
  int64_t i = begin;
  for (; i + kSumLanes <= end; i += kSumLanes) {
#pragma omp simd
    for (int j = 0; j < kSumLanes; ++j) lane[j] += term(i + j);
  }
  for (int j = 0; i < end; ++i, ++j) lane[j] += term(i);
  double acc = 0.0;
  for (int j = 0; j < kSumLanes; ++j) acc += lane[j];
  return acc;
}

// Sum over one chunk of (T g)^2 in float64, T = |w| + eta (ASAM) or 1 (SAM); lists w_list, g_list
// of the view.  The partial of grad_sumsq and of the norms the perturb phases take (and so the
// inf/NaN check of the passes whose norm is the check).
template <class V>
double chunk_sumsq(const V& v, int w_list, int g_list, bool adaptive, double eta) {
  using scalar_t = typename V::scalar_t;
  const scalar_t* gp = v.param(g_list);
  if (adaptive) {
    const scalar_t* wp = v.param(w_list);
    return lane_sum(v.begin, v.end, [&](int64_t i) {
      const double tg =
          math::asam_scaled(static_cast<double>(gp[i]), static_cast<double>(wp[i]), eta);
      return tg * tg;
    });
  }
  return lane_sum(v.begin, v.end, [&](int64_t i) {
    const double x = static_cast<double>(gp[i]);
    return x * x;
  });
}

// Sum over one chunk of list l of (x - x) in opmath lanes: +0 for every finite x, NaN for inf
// and NaN, so the partial is 0 iff the chunk is finite (nonfinite_flag).  One read in the
// storage's own width (16 float lanes for fp32/bf16/fp16): ~1.5x faster than chunk_sumsq's
// float64 squares on fp32 (the check of a pass that takes no norm).
template <class V>
double chunk_nonfinite(const V& v, int l) {
  using M = typename V::opmath_t;
  constexpr int kLanes = 64 / sizeof(M);
  const typename V::scalar_t* x = v.param(l);
  M lane[kLanes] = {};
  int64_t i = v.begin;
  for (; i + kLanes <= v.end; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const M y = static_cast<M>(x[i + j]);
      lane[j] += y - y;
    }
  }
  for (int j = 0; i < v.end; ++i, ++j) {
    const M y = static_cast<M>(x[i]);
    lane[j] += y - y;
  }
  M acc = M(0);
  for (int j = 0; j < kLanes; ++j) acc += lane[j];
  return static_cast<double>(acc);
}

}  // namespace cpu
}  // namespace samkernels
