// Multi-tensor plumbing for the CPU kernels: argument checks, contiguous working copies, and a
// (tensor, chunk) work list run with at::parallel_for.  One op call covers a whole tensor list.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <string>
#include <vector>

namespace samkernels {
namespace cpu {

constexpr int64_t kChunk = 16384;           // elements per work item (multiple of 4: Philox quads)
constexpr int64_t kSerialBelow = 1 << 15;   // total elements under which threads cost more than they give

struct Chunk {
  int64_t tensor, begin, end;
};

inline std::vector<Chunk> make_chunks(at::TensorList ref) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(ref.size()); ++t) {
    const int64_t n = ref[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
  return chunks;
}

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

inline int64_t total_numel(at::TensorList l) {
  int64_t n = 0;
  for (const auto& t : l) n += t.numel();
  return n;
}

// Contiguous working copies of a list; write_back() copies results into non-contiguous originals.
struct Contig {
  std::vector<at::Tensor> orig, work;
  explicit Contig(at::TensorList l) {
    orig.assign(l.begin(), l.end());
    work.reserve(l.size());
    for (const auto& t : l) work.push_back(t.is_contiguous() ? t : t.contiguous());
  }
  void write_back() {
    for (size_t i = 0; i < orig.size(); ++i)
      if (!work[i].is_same(orig[i])) orig[i].copy_(work[i]);
  }
  at::TensorList list() const { return work; }
  const at::Tensor& operator[](int64_t i) const { return work[i]; }
};

inline at::ScalarType opmath_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_ids(const char* op, at::IntArrayRef ids, at::TensorList params) {
  TORCH_CHECK(ids.size() == params.size(), op, ": param_ids has ", ids.size(),
              " entries but params has ", params.size());
}

// Checks shared by every op: lists of equal length, CPU floating tensors, matching shapes; a list
// named as "like param" must have the param's dtype, a "state" list the param's opmath dtype.
inline void check_lists(const char* op, at::TensorList params,
                        std::initializer_list<std::pair<const char*, at::TensorList>> like_param,
                        std::initializer_list<std::pair<const char*, at::TensorList>> state) {
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), op, ": params[", i, "] is on ", p.device(),
                ", the cpu backend needs CPU tensors");
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), op, ": params[", i, "] has dtype ",
                p.scalar_type(), ", expected a floating dtype");
  }
  auto check = [&](const char* name, at::TensorList l, bool is_state) {
    TORCH_CHECK(l.size() == params.size(), op, ": ", name, " has ", l.size(), " tensors but params has ",
                params.size());
    for (size_t i = 0; i < l.size(); ++i) {
      const auto& p = params[i];
      const auto& t = l[i];
      TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", i, "] is on ", t.device());
      TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", i, "] is sparse; not supported");
      TORCH_CHECK(t.numel() == p.numel(), op, ": ", name, "[", i, "] has ", t.numel(),
                  " elements but params[", i, "] has ", p.numel());
      const auto want = is_state ? opmath_dtype(p.scalar_type()) : p.scalar_type();
      TORCH_CHECK(t.scalar_type() == want, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                  ", expected ", want);
    }
  };
  for (const auto& kv : like_param) check(kv.first, kv.second, false);
  for (const auto& kv : state) check(kv.first, kv.second, true);
}

// `found_inf` of the gradient-consuming ops (README "Non-finite gradients"): nonzero means the op
// takes its skip form.  On the CPU the flag is ordinary host memory, so reading it is free.
inline bool skip_requested(const char* op, const c10::optional<at::Tensor>& found_inf) {
  if (!found_inf.has_value()) return false;
  const at::Tensor& f = *found_inf;
  TORCH_CHECK(f.numel() == 1, op, ": found_inf must hold one element, got shape ", f.sizes());
  TORCH_CHECK(f.device().is_cpu(), op, ": found_inf is on ", f.device(),
              " but the parameters are on the CPU");
  return f.item<double>() != 0.0;
}

// dst[i] <- src[i], bit for bit (the skip forms: backups <- params, or params <- backups).
inline void copy_lists(at::TensorList dst, at::TensorList src) {
  for (size_t i = 0; i < dst.size(); ++i) dst[i].copy_(src[i]);
}

}  // namespace cpu
}  // namespace samkernels

// Dispatch on a parameter's dtype: scalar_t = parameter type, opmath_t = float (double for double).
#define SK_DISPATCH_PARAM(TYPE, NAME, ...)                                       \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, [&] {    \
    using opmath_t = at::opmath_type<scalar_t>;                                  \
    __VA_ARGS__();                                                               \
  })

namespace samkernels {
namespace cpu {

// sum over all tensors of (T g)^2, T = |w| + eta (ASAM) or 1 (SAM); fixed-order sum of per-chunk
// partials, so the result does not depend on the number of threads.
inline double sumsq(const Contig& p, const Contig& g, bool adaptive, double eta) {
  const auto chunks = make_chunks(g.list());
  std::vector<double> partial(chunks.size(), 0.0);
  for_each_chunk(chunks, total_numel(g.list()), [&](int64_t ci, const Chunk& c) {
    SK_DISPATCH_PARAM(g[c.tensor].scalar_type(), "grad_sumsq", [&] {
      const scalar_t* gp = g[c.tensor].data_ptr<scalar_t>();
      double acc = 0.0;
      if (adaptive) {
        const scalar_t* wp = p[c.tensor].data_ptr<scalar_t>();
        _Pragma("omp simd reduction(+ : acc)")
        for (int64_t i = c.begin; i < c.end; ++i) {
          const double tg = static_cast<double>(gp[i]) * (std::abs(static_cast<double>(wp[i])) + eta);
          acc += tg * tg;
        }
      } else {
        _Pragma("omp simd reduction(+ : acc)")
        for (int64_t i = c.begin; i < c.end; ++i) {
          const double v = static_cast<double>(gp[i]);
          acc += v * v;
        }
      }
      partial[ci] = acc;
    });
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

}  // namespace cpu
}  // namespace samkernels
