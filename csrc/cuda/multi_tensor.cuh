// Multi-tensor apply: one launch covers a whole list of tensors (the apex multi_tensor_apply /
// ATen MultiTensorApply.cuh design: addresses in the kernel-argument struct, fixed-size chunks).  Free of torch headers (see launch.h).
//
//  * Tensor addresses, sizes and per-tensor tags travel in the kernel-argument struct `Table`
//    (no device table, no host->device copy, CUDA-graph friendly).  4 KB of arguments, or 32 KB
//    where both the toolkit (CUDA >= 12.1) and the driver (>= 12.1) allow it, picked at run time
//    as ATen does; a new launch only when a table is full, so launches per phase stay bounded.
//  * One block of 512 threads per 65,536-element chunk.  Instead of a block->chunk table the
//    table holds each tensor's first block index and a block finds its tensor by binary search,
//    so the number of blocks per launch is not capped.
//  * Each thread handles groups of K consecutive elements (K = one 16-byte vector of the
//    parameter dtype, at least 4: the ILP).  A group is loaded with 16-byte vector accesses when
//    every list's base address is 16-byte aligned (chunk starts are multiples of 65,536 elements,
//    so alignment carries over) and the group is full; else element by element.
//  * Maths in opmath: float, double for double parameters (reference.py `opmath`).
//  * Skip form (`found_inf`): a phase may pass a SkipCopy naming a one-element float flag in
//    device memory.  Every block reads it before touching its chunk; when it is nonzero the block
//    only copies one parameter-dtype list onto another (bit for bit: params -> backups for the
//    perturb phases, backups -> params for the restore/update phases) and writes nothing else.
//    The host never reads the flag (no sync; CUDA-graph friendly).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cuda/dtypes.cuh"
#include "cuda/launch.h"
#include "math/common.h"
#include "philox.h"

// --- 32 KB kernel arguments: CUDA >= 12.1 toolkit, Volta or newer (checked here on the lowest
// compiled architecture), and a >= 12.1 driver (checked at run time in large_args_usable()).
#define SK_ARCH_HEAD_IMPL(a, ...) a
#define SK_ARCH_HEAD(...) SK_ARCH_HEAD_IMPL(__VA_ARGS__)
#if defined(__CUDA_ARCH_LIST__)
#if SK_ARCH_HEAD(__CUDA_ARCH_LIST__) >= 700
#define SK_GRID_CONSTANT __grid_constant__
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
#define SK_LARGE_ARGS 1
#endif
#endif
#endif
#ifndef SK_GRID_CONSTANT
#define SK_GRID_CONSTANT
#endif
#ifndef SK_LARGE_ARGS
#define SK_LARGE_ARGS 0
#endif

namespace samkernels {
namespace cuda {

constexpr int kBlockSize = 512;
constexpr int kSmallArgBytes = 4096;   // classic kernel-parameter limit
constexpr int kLargeArgBytes = 32764;  // CUDA 12.1+ limit on Volta and newer
constexpr int kOpArgBytes = 256;       // kept beside the table for a phase's scalars

// ----------------------------------------------------------------------------------------------
// Types and conversions.  Only the explicit intrinsics: torch builds with __CUDA_NO_HALF_*.
// ----------------------------------------------------------------------------------------------
using math::sk_abs;  // the per-element maths' functions (math/common.h)
using math::sk_sqrt;

// Elements per thread and step: one 16-byte vector of the parameter dtype, at least 4 (ILP 4).
// (A variable template: usable in device code without --expt-relaxed-constexpr.)
template <typename P>
constexpr int group_size = 16 / int(sizeof(P)) < 4 ? 4 : 16 / int(sizeof(P));

template <typename S>
struct Cvt;
template <>
struct Cvt<float> {
  __device__ __forceinline__ static float in(float x) { return x; }
  __device__ __forceinline__ static float out(float x) { return x; }
};
template <>
struct Cvt<double> {
  __device__ __forceinline__ static double in(double x) { return x; }
  __device__ __forceinline__ static double out(double x) { return x; }
};
template <>
struct Cvt<__half> {
  __device__ __forceinline__ static float in(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half out(float x) { return __float2half_rn(x); }
};
template <>
struct Cvt<__nv_bfloat16> {
  __device__ __forceinline__ static float in(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 out(float x) { return __float2bfloat16_rn(x); }
};

// K elements moved as 16-byte vectors (sizes here are 16 or 32 bytes: 1 or 2 LDG.128 / STG.128).
template <typename S, int K>
struct alignas(16) Pack {
  S v[K];
};

// ----------------------------------------------------------------------------------------------
// The kernel-argument table.
// ----------------------------------------------------------------------------------------------
template <int D, int T>
struct Table {
  static constexpr int kDepth = D;
  static constexpr int kCapacity = T;
  void* addr[D][T];           // addr[list][tensor]; nullptr for an absent list
  int64_t numel[T];
  int64_t block_base;         // global index of this launch's block 0 (grad_sumsq partials)
  int32_t block_begin[T + 1]; // first block of each tensor; block_begin[count] = blocks
  uint64_t tag[T];            // per-tensor tag (the noise phases: the 64-bit param id)
  int32_t count;
};

// Tensors per launch for D lists and a given argument budget (4 KB: 105/86/73/63/56 for 2..6
// lists; 32 KB: about 8x more).
template <int D, int ArgBytes>
constexpr int table_capacity() {
  return (ArgBytes - kOpArgBytes - 32) / (8 * D + 8 + 4 + 8);
}

// Index of the tensor that owns `block`: the last t with block_begin[t] <= block.  Uniform across
// the block; reads stay in the constant/parameter bank.
template <class Tab>
__device__ __forceinline__ int find_tensor(const Tab& tab, int32_t block) {
  int lo = 0, hi = tab.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tab.block_begin[mid] <= block)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Loads K elements of storage type S starting at element idx into opmath registers; lanes past
// cnt read as 0 (their results are never stored).
template <typename S, int K, typename M>
__device__ __forceinline__ void load_group(const void* base, int64_t idx, int cnt, bool vec,
                                           M (&r)[K]) {
  const S* p = static_cast<const S*>(base) + idx;
  if (vec) {
    const Pack<S, K> x = *reinterpret_cast<const Pack<S, K>*>(p);
#pragma unroll
    for (int k = 0; k < K; ++k) r[k] = static_cast<M>(Cvt<S>::in(x.v[k]));
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) r[k] = k < cnt ? static_cast<M>(Cvt<S>::in(p[k])) : M(0);
  }
}

template <typename S, int K, typename M>
__device__ __forceinline__ void store_group(void* base, int64_t idx, int cnt, bool vec,
                                            const M (&r)[K]) {
  S* p = static_cast<S*>(base) + idx;
  if (vec) {
    Pack<S, K> x;
#pragma unroll
    for (int k = 0; k < K; ++k) x.v[k] = Cvt<S>::out(r[k]);
    *reinterpret_cast<Pack<S, K>*>(p) = x;
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (k < cnt) p[k] = Cvt<S>::out(r[k]);
  }
}

// Storage type of list L of op Op: the first Op::kParamLists lists hold the parameter dtype
// (params, grads, backups), the rest opmath state (momentum, exp_avg, precision, ...).
template <class Op, int L>
using storage_t =
    typename std::conditional<(L < Op::kParamLists), typename Op::P, typename Op::M>::type;

template <class Op, int L>
__device__ __forceinline__ void load_list(void* const* base, int64_t idx, int cnt, bool vec,
                                          unsigned mask, typename Op::M (&r)[Op::kGroup]) {
  if (mask >> L & 1u) {
    load_group<storage_t<Op, L>, Op::kGroup>(base[L], idx, cnt, vec, r);
  } else {
#pragma unroll
    for (int k = 0; k < Op::kGroup; ++k) r[k] = typename Op::M(0);
  }
}

template <class Op, int L>
__device__ __forceinline__ void store_list(void* const* base, int64_t idx, int cnt, bool vec,
                                           unsigned mask, const typename Op::M (&r)[Op::kGroup]) {
  if (mask >> L & 1u) store_group<storage_t<Op, L>, Op::kGroup>(base[L], idx, cnt, vec, r);
}

template <class Op, int... Ls>
__device__ __forceinline__ void load_lists(std::integer_sequence<int, Ls...>, void* const* base,
                                           int64_t idx, int cnt, bool vec, unsigned mask,
                                           typename Op::M (&r)[Op::kDepth][Op::kGroup]) {
  (load_list<Op, Ls>(base, idx, cnt, vec, mask, r[Ls]), ...);
}

template <class Op, int... Ls>
__device__ __forceinline__ void store_lists(std::integer_sequence<int, Ls...>, void* const* base,
                                            int64_t idx, int cnt, bool vec, unsigned mask,
                                            const typename Op::M (&r)[Op::kDepth][Op::kGroup]) {
  (store_list<Op, Ls>(base, idx, cnt, vec, mask, r[Ls]), ...);
}

// Per-chunk setup shared by all multi-tensor kernels.
struct ChunkInfo {
  int tensor;
  int64_t start;  // first element of the chunk inside its tensor
  int n;          // elements in this chunk (1 .. kChunkSize)
};

template <class Tab>
__device__ __forceinline__ ChunkInfo chunk_info(const Tab& tab) {
  ChunkInfo c;
  c.tensor = find_tensor(tab, static_cast<int32_t>(blockIdx.x));
  c.start = static_cast<int64_t>(static_cast<int32_t>(blockIdx.x) - tab.block_begin[c.tensor]) *
            kChunkSize;
  const int64_t rem = tab.numel[c.tensor] - c.start;
  c.n = rem < kChunkSize ? static_cast<int>(rem) : static_cast<int>(kChunkSize);
  return c;
}

// True when every list in `mask` of tensor t starts on a 16-byte boundary.
template <class Tab>
__device__ __forceinline__ bool lists_aligned(const Tab& tab, int t, unsigned mask) {
  bool ok = true;
#pragma unroll
  for (int l = 0; l < Tab::kDepth; ++l)
    if (mask >> l & 1u) ok = ok && (reinterpret_cast<uintptr_t>(tab.addr[l][t]) & 15u) == 0;
  return ok;
}

// Sum of v over the block (kBlockSize threads), valid in thread 0.  Fixed shuffle tree:
// deterministic.  For the norm partials (one float64 per chunk, no atomics).
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[kBlockSize / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kBlockSize / 32 ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// ----------------------------------------------------------------------------------------------
// The skip form: lists `src` -> `dst` (both of the parameter dtype) when *flag != 0.
// ----------------------------------------------------------------------------------------------
struct SkipCopy {
  const float* flag = nullptr;  // nullptr: no found_inf, the phase always runs
  int src = 0;
  int dst = 0;
};

// Copies the chunk's elements of storage type S from src to dst unchanged (no conversion: exact
// for every value, NaN payloads included), 16-byte vectors where both lists are aligned.
template <typename S, int K>
__device__ __forceinline__ void copy_chunk(const void* src, void* dst, const ChunkInfo& c) {
  const S* s = static_cast<const S*>(src);
  S* d = static_cast<S*>(dst);
  const bool aligned =
      ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) & 15u) == 0;
  for (int off = static_cast<int>(threadIdx.x) * K; off < c.n; off += kBlockSize * K) {
    const int cnt = c.n - off < K ? c.n - off : K;
    const int64_t idx = c.start + off;
    if (aligned && cnt == K) {
      *reinterpret_cast<Pack<S, K>*>(d + idx) = *reinterpret_cast<const Pack<S, K>*>(s + idx);
    } else {
      for (int k = 0; k < cnt; ++k) d[idx + k] = s[idx + k];
    }
  }
}

// Whether the skip form runs: the flag is set.  Uniform over the grid (one address).
__device__ __forceinline__ bool skip_requested(const SkipCopy& skip) {
  return skip.flag != nullptr && *skip.flag != 0.0f;  // NaN counts as set
}

// ----------------------------------------------------------------------------------------------
// The elementwise engine.  An Op provides
//   using P (parameter dtype), M (opmath); kDepth, kParamLists, kGroup;
//   unsigned read_mask, write_mask (bit l: list l is read / written; runtime so that absent or
//   unused lists cost no traffic);
//   __device__ Prepared prepare() const               (once per thread, e.g. a scale from device
//                                                       memory; keeps the load out of the loop)
//   __device__ void operator()(M (&r)[kDepth][kGroup], int cnt, int64_t idx, uint64_t tag,
//                              const Prepared& prepared) const
// which updates the registers of one group in place (idx = index of the group's first element in
// its tensor, a multiple of kGroup).  Each element of each list is read and written at most once.
// With `skip` set (see SkipCopy) the block copies list skip.src onto skip.dst instead.
// ----------------------------------------------------------------------------------------------
template <class Op, class Tab>
__global__ void __launch_bounds__(kBlockSize)
    apply_kernel(const SK_GRID_CONSTANT Tab tab, const SK_GRID_CONSTANT Op op,
                 const SkipCopy skip) {
  using M = typename Op::M;
  constexpr int D = Op::kDepth;
  constexpr int K = Op::kGroup;
  const ChunkInfo c = chunk_info(tab);
  if (skip_requested(skip)) {
    copy_chunk<typename Op::P, K>(tab.addr[skip.src][c.tensor], tab.addr[skip.dst][c.tensor], c);
    return;
  }
  const bool aligned = lists_aligned(tab, c.tensor, op.read_mask | op.write_mask);
  void* base[D];
#pragma unroll
  for (int l = 0; l < D; ++l) base[l] = tab.addr[l][c.tensor];
  const uint64_t tag = tab.tag[c.tensor];
  const auto prepared = op.prepare();
  for (int off = static_cast<int>(threadIdx.x) * K; off < c.n; off += kBlockSize * K) {
    const int cnt = c.n - off < K ? c.n - off : K;
    const bool vec = aligned && cnt == K;
    const int64_t idx = c.start + off;
    M r[D][K];
    load_lists<Op>(std::make_integer_sequence<int, D>{}, base, idx, cnt, vec, op.read_mask, r);
    op(r, cnt, idx, tag, prepared);
    store_lists<Op>(std::make_integer_sequence<int, D>{}, base, idx, cnt, vec, op.write_mask, r);
  }
}

// ----------------------------------------------------------------------------------------------
// Host side: fill tables from a Group and launch whenever one is full.
// ----------------------------------------------------------------------------------------------
// Calls launch(tab, blocks) for each full table and the last partial one; returns the first
// error.  Block numbering is global over the group, starting at block_base (count_chunks order).
template <class Tab, class Launch>
cudaError_t for_each_table(const Group& g, int64_t block_base, Launch&& launch) {
  constexpr int D = Tab::kDepth;
  constexpr int T = Tab::kCapacity;
  static_assert(D <= kMaxLists, "too many lists");
  Tab tab;
  std::memset(&tab, 0, sizeof(tab));  // unused slots are passed to the kernel too
  tab.block_base = block_base;
  int64_t blocks = 0;
  auto flush = [&]() -> cudaError_t {
    if (tab.count == 0) return cudaSuccess;
    tab.block_begin[tab.count] = static_cast<int32_t>(blocks);
    const cudaError_t err = launch(static_cast<const Tab&>(tab), static_cast<int>(blocks));
    tab.block_base += blocks;
    tab.count = 0;
    blocks = 0;
    return err;
  };
  for (int64_t i = 0; i < g.count; ++i) {
    const int64_t n = g.numel[i];
    if (n <= 0) continue;
    const int64_t chunks = (n + kChunkSize - 1) / kChunkSize;
    if (chunks > INT_MAX) return cudaErrorInvalidValue;  // > 1.4e14 elements
    if (tab.count == T || blocks + chunks > INT_MAX) {  // gridDim.x and block_begin are int32
      const cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    const int c = tab.count;
    for (int l = 0; l < D; ++l) tab.addr[l][c] = g.lists[l] != nullptr ? g.lists[l][i] : nullptr;
    tab.numel[c] = n;
    tab.tag[c] = g.tags != nullptr ? g.tags[i] : 0u;
    tab.block_begin[c] = static_cast<int32_t>(blocks);
    blocks += chunks;
    tab.count = c + 1;
  }
  return flush();
}

// Whether the 32 KB argument kernels may run: needs a driver for CUDA >= 12.1 (a binary built with
// a newer toolkit can run on an older driver through minor-version compatibility).
inline bool large_args_usable() {
#if SK_LARGE_ARGS
  static const bool ok = [] {
    int version = 0;
    return cudaDriverGetVersion(&version) == cudaSuccess && version >= 12010;
  }();
  return ok;
#else
  return false;
#endif
}

template <int ArgBytes, class Op>
cudaError_t apply_sized(const Group& g, const Op& op, const SkipCopy& skip, cudaStream_t stream) {
  using Tab = Table<Op::kDepth, table_capacity<Op::kDepth, ArgBytes>()>;
  static_assert(sizeof(Op) <= kOpArgBytes, "phase arguments too large");
  static_assert(sizeof(Tab) + sizeof(Op) + sizeof(SkipCopy) <= ArgBytes,
                "kernel arguments exceed the limit");
  return for_each_table<Tab>(g, 0, [&](const Tab& tab, int blocks) {
    apply_kernel<Op, Tab><<<blocks, kBlockSize, 0, stream>>>(tab, op, skip);
    return cudaGetLastError();
  });
}

// Runs op over the group; `skip` (default: none) gives the phase's found_inf skip form.  The skip
// lists must both hold the parameter dtype (index < Op::kParamLists) and be present.
template <class Op>
cudaError_t apply(const Group& g, const Op& op, cudaStream_t stream, const SkipCopy& skip = {}) {
  if (skip.flag != nullptr &&
      (skip.src < 0 || skip.src >= Op::kParamLists || skip.dst < 0 ||
       skip.dst >= Op::kParamLists || g.lists[skip.src] == nullptr || g.lists[skip.dst] == nullptr))
    return cudaErrorInvalidValue;
#if SK_LARGE_ARGS
  if (large_args_usable()) return apply_sized<kLargeArgBytes>(g, op, skip, stream);
#endif
  return apply_sized<kSmallArgBytes>(g, op, skip, stream);
}

// ----------------------------------------------------------------------------------------------
// One functor for every elementwise phase.  A phase is described by its `Lists<M>`, a ListsOf that
// holds the phase's per-element maths (math/*.h, coefficients in opmath M) and binds it to the
// lists with
//   __device__ void operator()(M (&x)[kLists], M scale, M noise) const
// which updates one element's values of every list in place (x[l]: list l; lists not read hold
// 0; lists not written are dropped).  `noise` is the element's Philox standard normal (kNormal)
// or uniform (kUniform) from philox.h, keyed by (seed, step, tag = param id, element index; the
// tag's high 32 bits are the tensor's first Philox block, docs/spec.md "Noise");
// `scale` is maths.scale(norm) for the Scaled phases, the norm read from device memory once per
// thread (no host sync).
// ----------------------------------------------------------------------------------------------
enum class Noise { kNone, kNormal, kUniform };

template <class Maths, int Lists, int ParamLists, Noise N = Noise::kNone, bool Scaled = false>
struct ListsOf {
  using maths_type = Maths;
  static constexpr int kLists = Lists, kParamLists = ParamLists;
  static constexpr Noise kNoise = N;
  static constexpr bool kScaled = Scaled;
  // Whether the phase takes a step (PhaseKeys::device_step may be given): the noise phases; the
  // Adam restores set it too, with an at_step that forms their coefficients at step t.
  static constexpr bool kStepped = N != Noise::kNone;
  Maths maths;

  // Host: whether the maths reads a counter of its own from device memory (ivon_update_'s
  // debias_step), which at_step then reads.
  bool reads_device() const { return false; }
  // Once per thread in the kernel that reads counters (PhaseOp<..., true>): the maths at step t.
  __device__ __forceinline__ void at_step(uint64_t) {}
};

// What a phase launch takes besides its maths: the Philox key of the noise phases, the norm of
// the Scaled ones, and the device counter of a capturable optimizer (nullptr: none), which the
// kernels add to `step` (its value is known on the device only: a CUDA graph replays it).
struct PhaseKeys {
  uint64_t seed = 0, step = 0;
  const double* norm = nullptr;
  const int64_t* device_step = nullptr;
};

// OnDevice: the kernel reads counters from device memory (*keys.device_step when given, and what
// the lists' at_step reads).  A separate kernel, so that a call without them keeps its code: a
// step held in registers rather than read from the parameter bank costs registers (ptxas, sm_90:
// bSAM's fp32 noise 32 -> 37, 4 -> 3 blocks per SM; its fp16 one spills).
template <typename P_, template <typename> class Lists, bool OnDevice = false>
struct PhaseOp {
  using P = P_;
  using M = opmath_t<P>;
  using L = Lists<M>;
  static constexpr int kDepth = L::kLists, kParamLists = L::kParamLists, kGroup = group_size<P>;
  static_assert(kGroup % 4 == 0, "a group must cover whole Philox blocks");
  unsigned read_mask, write_mask;
  PhaseKeys keys;
  L lists;

  // What a thread forms once, before its loop: the step (plus the device counter, read here),
  // the Scaled phases' scale, and the lists with their maths at that step (L::at_step).
  struct Prepared {
    L lists;
    M scale;
    uint64_t step;
  };
  __device__ __forceinline__ Prepared prepare() const {
    Prepared p{lists, M(0), keys.step};
    if constexpr (L::kScaled) p.scale = lists.maths.scale(*keys.norm);
    if constexpr (OnDevice) {
      if (keys.device_step != nullptr)  // int64 addition, two's complement
        p.step += static_cast<uint64_t>(*keys.device_step);
      p.lists.at_step(p.step);
    }
    return p;
  }

  // A group starts at a multiple of kGroup, so it covers kGroup / 4 whole Philox blocks: element
  // idx + 4q + j takes lane j of block first + (idx >> 2) + q, `first` the tensor's first block
  // (the tag's high word; the block counter wraps at 2^32 in philox_words).
  __device__ __forceinline__ void operator()(M (&r)[kDepth][kGroup], int, int64_t idx,
                                             uint64_t tag, const Prepared& p) const {
    const uint32_t pid = static_cast<uint32_t>(tag);
#pragma unroll
    for (int q = 0; q < kGroup / 4; ++q) {
      M noise[4] = {M(0), M(0), M(0), M(0)};
      const uint64_t quad = (tag >> 32) + static_cast<uint64_t>(idx >> 2) + q;
      if constexpr (L::kNoise == Noise::kNormal)
        philox_normal4<M>(keys.seed, p.step, pid, quad, noise);
      if constexpr (L::kNoise == Noise::kUniform)
        philox_uniform4<M>(keys.seed, p.step, pid, quad, noise);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        M x[kDepth];
#pragma unroll
        for (int l = 0; l < kDepth; ++l) x[l] = r[l][4 * q + j];
        // without a device step the lists are the kernel parameter's: no copy in registers
        (OnDevice ? p.lists : lists)(x, p.scale, noise[j]);
#pragma unroll
        for (int l = 0; l < kDepth; ++l) r[l][4 * q + j] = x[l];
      }
    }
  }
};

// Runs the phase `Lists` over the group, its maths made by make(args...) in the group's opmath
// type; read/write masks as in apply_kernel.
template <template <typename> class Lists, class... Args>
cudaError_t launch_phase(const Group& g, unsigned read_mask, unsigned write_mask,
                         const SkipCopy& skip, const PhaseKeys& keys, cudaStream_t stream,
                         const Args&... args) {
  return dispatch_param(g.param, [&](auto tag) {
    using P = typename decltype(tag)::type;
    using L = Lists<opmath_t<P>>;
    PhaseOp<P, Lists> op;
    op.read_mask = read_mask;
    op.write_mask = write_mask;
    op.keys = keys;
    op.lists.maths = L::maths_type::make(args...);
    if constexpr (L::kStepped) {
      if (keys.device_step != nullptr || op.lists.reads_device())
        return apply(g, PhaseOp<P, Lists, true>{read_mask, write_mask, keys, op.lists}, stream,
                     skip);
    } else if (keys.device_step != nullptr) {
      return cudaErrorInvalidValue;  // a phase without a step
    }
    return apply(g, op, stream, skip);
  });
}

// The noise phases (bsam_noise_ line 1, vi_noise_, ivon_noise_): w <- maths(w, state, z), z the
// element's Philox normal of (seed, step, tag, element), with the backup taken first.  Lists:
// 0 params, 1 backups, 2 the state the maths reads (absent: 0, unread; vi_noise_'s fixed sigma).
template <template <typename> class Maths>
struct NoisePhase {
  template <typename M>
  struct Lists : ListsOf<Maths<M>, 3, 2, Noise::kNormal> {
    __device__ __forceinline__ void operator()(M (&x)[3], M, M z) const {
      x[1] = x[0];  // exact copy of the mean
      x[0] = this->maths(x[0], x[2], z);
    }
  };
};

// Runs the noise phase of Maths<M>::make(args...) over the group, at step + *device_step
// (device_step nullptr: at step).
template <template <typename> class Maths, class... Args>
cudaError_t launch_noise(const Group& g, uint64_t seed, uint64_t step, const int64_t* device_step,
                         cudaStream_t stream, const Args&... args) {
  const unsigned read = 0x1u | (g.lists[2] != nullptr ? 0x4u : 0u);  // params, [state]
  return launch_phase<NoisePhase<Maths>::template Lists>(
      g, read, /*write: params, backups*/ 0x3u, SkipCopy{},
      PhaseKeys{seed, step, nullptr, device_step}, stream, args...);
}

// ----------------------------------------------------------------------------------------------
// Norm partials: one float64 partial of sum_i term(a_i, b_i) per chunk (no atomics: each block owns
// its slot; launch_reduce_partials then sums the slots in a fixed order).  Lists: 0 of storage
// Term::A (read only when bit 0 of term.mask is set), 1 of Term::B.  The terms are formed in
// Term::M, the K of one group summed in it and added in float64.  A norm's M is double: the
// norm contract squares and sums in float64 (as the CPU and the reference), where a float square
// would round in the 7th digit and overflow to inf for a finite |g| above ~1.8e19.
// ----------------------------------------------------------------------------------------------
// The base of every Term: its storage types A, B, its type M and `mask` (bit l: list l is read);
// the term adds a make(...) and __device__ M operator()(M a, M b) const.
template <typename P, typename A_, typename B_, typename M_ = opmath_t<P>>
struct TermOf {
  using M = M_;
  using A = A_;
  using B = B_;
  unsigned mask;
};

template <typename P, class Term, class Tab>
__global__ void __launch_bounds__(kBlockSize)
    partials_kernel(const SK_GRID_CONSTANT Tab tab, double* __restrict__ partials,
                    const Term term) {
  using M = typename Term::M;
  constexpr int K = group_size<P>;
  const ChunkInfo c = chunk_info(tab);
  const bool aligned = lists_aligned(tab, c.tensor, term.mask);
  const void* a_base = tab.addr[0][c.tensor];
  const void* b_base = tab.addr[1][c.tensor];
  double acc = 0.0;
  for (int off = static_cast<int>(threadIdx.x) * K; off < c.n; off += kBlockSize * K) {
    const int cnt = c.n - off < K ? c.n - off : K;
    const bool vec = aligned && cnt == K;
    const int64_t idx = c.start + off;
    M a[K] = {}, b[K];
    if (term.mask & 1u) load_group<typename Term::A, K>(a_base, idx, cnt, vec, a);
    load_group<typename Term::B, K>(b_base, idx, cnt, vec, b);
    M s = M(0);
#pragma unroll
    for (int k = 0; k < K; ++k) s += term(a[k], b[k]);  // lanes past cnt hold 0: a 0 term
    acc += static_cast<double>(s);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[tab.block_base + blockIdx.x] = acc;
}

template <typename P, int ArgBytes, class Term>
cudaError_t partials_sized(const Group& g, double* partials, int64_t first_block, const Term& term,
                           cudaStream_t stream) {
  using Tab = Table<2, table_capacity<2, ArgBytes>()>;
  static_assert(sizeof(Tab) + sizeof(Term) + 8 <= ArgBytes, "kernel arguments exceed the limit");
  return for_each_table<Tab>(g, first_block, [&](const Tab& tab, int blocks) {
    partials_kernel<P, Term, Tab><<<blocks, kBlockSize, 0, stream>>>(tab, partials, term);
    return cudaGetLastError();
  });
}

// Writes the group's partials of Term<P> (built by Term<P>::make(args...)) from first_block on.
template <template <typename> class Term, class... Args>
cudaError_t launch_partials(const Group& g, double* partials, int64_t first_block,
                            cudaStream_t stream, const Args&... args) {
  return dispatch_param(g.param, [&](auto tag) {
    using P = typename decltype(tag)::type;
    const auto term = Term<P>::make(args...);
#if SK_LARGE_ARGS
    if (large_args_usable())
      return partials_sized<P, kLargeArgBytes>(g, partials, first_block, term, stream);
#endif
    return partials_sized<P, kSmallArgBytes>(g, partials, first_block, term, stream);
  });
}

}  // namespace cuda
}  // namespace samkernels
