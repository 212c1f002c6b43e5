"""Multi-tensor launch machinery shared by the Triton phases.

One launch covers a whole list of tensors (apex ``multi_tensor_apply`` style, but with the tensor
addresses in *device tables* instead of the kernel-argument struct, so there is no 4 KB limit):

* per list (params, grads, backups, state ...) an int64 table of data addresses, one per tensor;
* a numel table and, for the noise, a param-id table (one entry per tensor);
* a work table of (tensor index, chunk start) pairs, one per ``CHUNK`` elements; grid = #chunks.

A kernel reads its pair, loads the tensor's addresses from the tables and casts them to typed
pointers (``tl.load(tab + t).to(tl.pointer_type(DT))``).  Tensors are grouped by the dtypes of
all their lists (e.g. fp32 params + fp32 state, bf16 params + fp32 state, fp64 ...): one launch per
group, with the element types as constexprs, so a mixed-precision model costs a fixed small number
of launches.  The tables depend only on (address, numel, dtype) of every tensor, so they are built
once and cached (bounded LRU) while the optimizer's storages stay put: a step with the same
parameters does no host->device traffic at all, and nothing in a phase syncs with the host.

Every multi-tensor kernel is written on one skeleton; a phase module supplies only its per-element
maths (a *body*) and the scalars it derives on the device.  The kernel template:

    @triton.jit(do_not_specialize=[<every word and bits argument>],
                [do_not_specialize_on_alignment=[<every step tensor>]])
    def _x_kernel(work, numel, [ids,] [flag,] [<step tensors>,] <one table per list>,
                  [norm | partials,] <int32 words ...>, <int64 float bits ...>,
                  <one X_DT per list>, <options ...>, [HAS_FLAG,] ALIGNED, MATH, BLOCK, CHUNK):
        t, start, n, ptrs = chunk_ptrs(work, numel, (<tables>), (<X_DTs>), ALIGNED)
        <scalars: fp_arg(bits, MATH), the norm read on the device, the parameter id ...>
        chunk_apply(_x_body, start, n, ptrs, (<scalars>), (<options>),
                    load_flag(flag, HAS_FLAG), (<copy from>, <copy to>), MATH, BLOCK, CHUNK, UNROLL)

The host side is ``launch(op, kernel, lists, ...)``, which passes exactly that argument list: the
lists in the op table's order (:mod:`samkernels.ops._spec`), ``ids`` where the op takes parameter
ids, ``flag`` / ``HAS_FLAG`` where it takes ``found_inf`` and a pointer for each step tensor it
takes (``OpSpec.step_tensors``: ``device_step``, which the kernel adds to the host step,
``at_step``; ``ivon_update_``'s ``debias_step``), given or not (``step_arg``).
``body(base, n, ptrs, args, OPT, MATH, BLOCK, MASKED)`` handles the BLOCK elements from ``base``
(``MASKED``: of the last, partial chunk of a tensor); it reads its options as ``X: tl.constexpr =
OPT[i]`` (an unpacking ``X, = OPT`` would make them run-time values, and a branch on them a
run-time branch).  A phase without ``found_inf`` passes ``False, None`` as skip and copy; the
Philox phases pass ``UNROLL=False``; the norm kernels use ``chunk_sum`` instead, whose bodies return
the float64 terms to add, and store its result in their ``partials`` slot.
"""
from __future__ import annotations

import contextlib
import operator
import os
import struct
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from samkernels.ops._spec import OpSpec

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Elements per program (CHUNK) and per inner step (BLOCK); CHUNK is a multiple of BLOCK and both
# are powers of two >= 16, so chunk starts are 16-element aligned.  GPU: 1024 x fp32 per step with
# 4 warps = two 16-byte vectors per thread per operand; 4096 per program keeps the work table at
# 1/4096 of the parameter count (a 1M-parameter model still gets ~2 programs per H100 SM).
# The interpreter pays ~12 ms per program instance whatever the size: use few, large programs.
BLOCK = 8192 if INTERPRET else 1024
CHUNK = 8192 if INTERPRET else 4096
NUM_WARPS = 4
# Compile options of every launch (the multi-tensor kernels, the BiSAM loss, the Philox probe): no
# multiply-add contraction, so every product and sum rounds as written, as on the CPU and in the
# interpreter (a contracted ``p + e`` in ``_dd_mul`` counts the product's error twice; the
# default also changes between Triton versions).  tests/test_triton_aot.py checks the PTX.
FP_OPTIONS = {"enable_fp_fusion": False}
# Most chunks per launch: bigger plans are split into several launches over slices of the work
# table (keeps grid and int32 program ids far from their limits; tests lower it).
MAX_CHUNKS_PER_LAUNCH = 1 << 20
# Plans kept in the LRU cache (one per distinct set of tensor lists: a few per optimizer).
CACHE_SIZE = 64

# per-tensor reads for the plan key, as C methods (``map`` runs them without Python bytecode)
_DATA_PTR, _NUMEL = torch.Tensor.data_ptr, torch.Tensor.numel
_CONTIGUOUS = torch.Tensor.is_contiguous
_DEVICE_INDEX = torch.Tensor.get_device  # -1 on the CPU
_DTYPE = operator.attrgetter("dtype")

TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64,
            torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# --------------------------------------------------------------------------------------------
# Host-side helpers for scalar arguments
# --------------------------------------------------------------------------------------------
def f64_bits(x: float) -> int:
    """A float hyper-parameter as the int64 bit pattern of its double.

    Triton passes Python floats as fp32 (on the GPU and in the interpreter); fp64 parameter groups
    need the exact double, so every float travels as int64 bits and ``fp_arg`` rebuilds it."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def u32_words(x: int) -> Tuple[int, int]:
    """(lo, hi) 32-bit words of a 64-bit integer, each as a *signed* int32 value so the argument
    type is always i32 (no recompiles as the value changes); the kernel bitcasts to uint32."""
    lo, hi = x & 0xFFFFFFFF, (x >> 32) & 0xFFFFFFFF
    return (lo - (1 << 32) if lo >= 1 << 31 else lo), (hi - (1 << 32) if hi >= 1 << 31 else hi)


def math_dtype(dt: torch.dtype):
    """opmath of reference.py: fp64 for fp64 parameters, fp32 otherwise."""
    return tl.float64 if dt == torch.float64 else tl.float32


_NO_GUARD = contextlib.nullcontext()


def device_guard(device: torch.device):
    """Context for the launches of one op on tensors of ``device``: the CUDA device made current.

    Triton launches on the *current* device and its current stream, whatever device the pointers
    belong to: tensors on cuda:1 while cuda:0 is current would run on the wrong device/stream.
    Every Triton launch of this package runs inside this guard.  CPU tensors (the interpreter):
    a shared no-op context, nothing is touched."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return _NO_GUARD


# --------------------------------------------------------------------------------------------
# Device-side helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def fp_arg(bits, MATH: tl.constexpr):
    """Inverse of ``f64_bits`` (the interpreter hands small ints over as int32: widen first)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(MATH)


@triton.jit
def fp_args(bits, MATH: tl.constexpr):
    """``fp_arg`` of each element of the tuple ``bits``, as a tuple."""
    out = ()
    for j in tl.static_range(len(bits)):
        out = out + (fp_arg(bits[j], MATH),)
    return out


@triton.jit
def _tensor_ptr(tab, t, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed pointer to tensor ``t`` of a list.  Integer->pointer casts lose Triton's 16-byte
    alignment specialisation; the host checked every address of the group, so restore it."""
    p = tl.load(tab + t).to(tl.pointer_type(DT))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def chunk_ptrs(work, numel, tabs, DTS: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's (tensor index, first element, tensor numel, typed pointers): one pointer
    per table of ``tabs``, to elements of type ``DTS[j]``."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(work + 2 * pid)
    start = tl.multiple_of(tl.load(work + 2 * pid + 1), 16)  # starts are multiples of CHUNK
    n = tl.load(numel + t)
    ptrs = ()
    for j in tl.static_range(len(tabs)):
        ptrs = ptrs + (_tensor_ptr(tabs[j], t, DTS[j], ALIGNED),)
    return t, start, n, ptrs


@triton.jit
def load_or(ptr, offs, n, other, MASKED: tl.constexpr):
    # Full chunks are unmasked: `offs < n` with n from a table has unknown divisibility and would
    # stop the compiler from vectorising the accesses.  Masked lanes read ``other``.
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < n, other=other)
    else:
        x = tl.load(ptr + offs)
    return x


@triton.jit
def load(ptr, offs, n, MASKED: tl.constexpr):
    return load_or(ptr, offs, n, 0, MASKED)


@triton.jit
def load_one(ptr, offs, n, MASKED: tl.constexpr):
    # for divisors (precisions): masked lanes read 1, so the discarded lanes stay finite
    return load_or(ptr, offs, n, 1, MASKED)


@triton.jit
def store(ptr, offs, x, n, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=offs < n)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty))


@triton.jit
def sqrt(x):
    # IEEE-rounded in fp32 like the C++/CUDA backends (tl.sqrt is the fast approximation there).
    if x.dtype == tl.float32:
        y = tl.sqrt_rn(x)
    else:
        y = tl.sqrt(x)
    return y


@triton.jit
def div(a, b):
    # IEEE-rounded fp32 division (Triton's `/` is div.full, ~2 ulp); fp64 `/` is already exact.
    if a.dtype == tl.float32:
        y = tl.div_rn(a, b)
    else:
        y = a / b
    return y


# --------------------------------------------------------------------------------------------
# found_inf: the skip form of the gradient-consuming phases, decided on the device
# --------------------------------------------------------------------------------------------
def flag_arg(found_inf: Optional[torch.Tensor], plan: "Plan"):
    """(pointer argument, HAS_FLAG) of a phase's ``found_inf`` for the launches of ``plan``.

    None: the kernels never read the flag (HAS_FLAG=False) and get the plan's int64 table as a
    placeholder pointer (one signature, no extra compiles).  Else a one-element float32 tensor on
    the plan's device (converted there if need be: no host sync, only the kernels read it)."""
    if found_inf is None:
        return plan.buffer, False
    if found_inf.numel() != 1:
        raise ValueError(f"found_inf must hold one element, got shape {tuple(found_inf.shape)}")
    flag = found_inf.reshape(1)
    if flag.dtype != torch.float32:
        flag = flag.float()
    if flag.device != plan.device:
        flag = flag.to(plan.device, non_blocking=True)
    return flag, True


def step_arg(op: OpSpec, name: str, t: Optional[torch.Tensor], plan: "Plan") -> torch.Tensor:
    """The pointer argument of a phase's step tensor ``name`` (``device_step``, ``debias_step``):
    the tensor ``t`` itself, or the plan's zero.

    Without a device counter the kernels still load one (a zero in the plan's device buffer, built
    with it, never inside a capture): one kernel variant for both, so the host step and the device
    step run the same code and give the same bits.  The kernels read 8 bytes there, so the
    tensor is checked even if the shared wrapper did."""
    if t is None:
        return plan.zero
    if t.dtype != torch.int64 or t.numel() != 1 or t.device != plan.device:
        raise ValueError(f"{op.name}: {name} must be a one-element int64 tensor on "
                         f"{plan.device}, got {t.dtype} of shape {list(t.shape)} on {t.device}")
    return t


@triton.jit
def at_step(step_lo, step_hi, device_step):
    """The step an op uses: the host's 64-bit ``step`` (its two 32-bit words, ``u32_words``) plus
    the int64 at ``device_step``, as a uint64 that wraps mod 2^64 (the low 64 bits of the
    reference's integer sum; the Philox words and Adam's step come from it)."""
    host = ((step_hi.to(tl.uint32, bitcast=True).to(tl.uint64) << 32)
            | step_lo.to(tl.uint32, bitcast=True).to(tl.uint64))
    return host + tl.load(device_step).to(tl.uint64, bitcast=True)


@triton.jit
def _dd_mul(h, l, bh, bl):
    """(h, l) (bh, bl) in double-double: Dekker's product by fma, renormalised so that h is the
    double nearest h + l."""
    p = h * bh
    e = tl.fma(h, bh, -p) + (h * bl + l * bh)  # h bh = p + fma(h, bh, -p) exactly
    hi = p + e
    return hi, e - (hi - p)


@triton.jit
def one_minus_power(beta, t):
    """1 - beta^t in double for a float64 ``beta`` and an int64 step ``t`` >= 0 (a step counts
    from 1; a negative one is taken as 0), beta^t the power rounded to double: Python's
    ``1 - beta ** t`` wherever libm's pow is correctly rounded (glibc's is within 0.52 ulp).

    By squaring in double-double (relative error below about t 2^-104 before the one rounding),
    as the CUDA backend (csrc/cuda/bias_correction.cuh): a GPU's pow is only within 2 ulp."""
    e = t.to(tl.float64)  # the exponent the host's pow gets
    n = tl.where(e >= 0.0, e, 0.0).to(tl.uint64)
    zero = beta * 0.0
    rh, rl, bh, bl = zero + 1.0, zero, beta, zero  # the result; beta^(2^k)
    while n != 0:
        if (n & 1) != 0:
            rh, rl = _dd_mul(rh, rl, bh, bl)
        n = n >> 1
        bh, bl = _dd_mul(bh, bl, bh, bl)
    return 1.0 - rh


def _libm_one_minus_power(beta, t):
    """``bias_correction`` under the interpreter: 1 - libm's pow (numpy's scalar power), i.e.
    Python's ``1 - beta ** t`` bit for bit, so the ops keep the host path's bits there."""
    import numpy as np
    from triton.runtime.interpreter import TensorHandle
    b, n = np.broadcast_arrays(beta.handle.data, t.handle.data)
    out = np.array([1.0 - np.float64(u) ** np.float64(v) for u, v in zip(b.flat, n.flat)],
                   dtype=np.float64).reshape(b.shape)
    return tl.core.tensor(TensorHandle(out, tl.float64),
                          beta.type if beta.handle.data.shape == b.shape else t.type)


# 1 - beta^t (float64 beta, int64 t) for the bias corrections the kernels form from a step: on a
# GPU ``one_minus_power`` (correctly rounded, as the CUDA backend); the interpreter has the host's
# libm at hand and uses it, so that the host path keeps its bits where libm misrounds (glibc's pow,
# on about 1 step in 2000), and tests run ``one_minus_power`` itself (tests/test_triton_plans.py)
bias_correction = _libm_one_minus_power if INTERPRET else one_minus_power


@triton.jit
def load_flag(flag, HAS_FLAG: tl.constexpr):
    """found_inf != 0 (NaN counts as set).  Without a flag a constant false: the compiler drops
    the skip branch."""
    if HAS_FLAG:
        skip = tl.load(flag) != 0
    else:
        skip = tl.full([], 0, tl.int1)
    return skip


# --------------------------------------------------------------------------------------------
# The kernel skeleton: a body over every BLOCK of this program's chunk
# --------------------------------------------------------------------------------------------
@triton.jit
def _blocks(BODY: tl.constexpr, start, n, ptrs, args, OPT: tl.constexpr, MATH: tl.constexpr,
            BLOCK: tl.constexpr, CHUNK: tl.constexpr, UNROLL: tl.constexpr,
            MASKED: tl.constexpr):
    # Philox bodies are not unrolled: their generator is large, and unrolling it only tripled the
    # compile time (~14 s vs ~4 s for sm_90) without changing the memory accesses
    if UNROLL:
        for k in tl.static_range(CHUNK // BLOCK):
            BODY(start + k * BLOCK, n, ptrs, args, OPT, MATH, BLOCK, MASKED)
    else:
        for k in range(CHUNK // BLOCK):
            BODY(start + k * BLOCK, n, ptrs, args, OPT, MATH, BLOCK, MASKED)


@triton.jit
def _chunk(BODY: tl.constexpr, start, n, ptrs, args, OPT: tl.constexpr, MATH: tl.constexpr,
           BLOCK: tl.constexpr, CHUNK: tl.constexpr, UNROLL: tl.constexpr):
    if start + CHUNK <= n:  # a full chunk: unmasked, vectorisable accesses
        _blocks(BODY, start, n, ptrs, args, OPT, MATH, BLOCK, CHUNK, UNROLL, False)
    else:
        _blocks(BODY, start, n, ptrs, args, OPT, MATH, BLOCK, CHUNK, UNROLL, True)


@triton.jit
def _copy_body(base, n, ptrs, args, OPT: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
               MASKED: tl.constexpr):
    src, dst = ptrs
    offs = base + tl.arange(0, BLOCK)
    store(dst, offs, load(src, offs, n, MASKED), n, MASKED)  # bit for bit


@triton.jit
def chunk_apply(BODY: tl.constexpr, start, n, ptrs, args, OPT: tl.constexpr, skip,
                COPY: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                UNROLL: tl.constexpr):
    """``BODY`` over this program's chunk; when ``skip`` (found_inf set) only the skip form:
    ``ptrs[COPY[1]] <- ptrs[COPY[0]]`` (backup <- w after a perturbation, w <- backup after an
    update).  ``args`` are the body's run-time scalars, ``OPT`` its constexpr options."""
    if skip:
        _chunk(_copy_body, start, n, (ptrs[COPY[0]], ptrs[COPY[1]]), (), (), MATH, BLOCK, CHUNK,
               True)
    else:
        _chunk(BODY, start, n, ptrs, args, OPT, MATH, BLOCK, CHUNK, UNROLL)


@triton.jit
def chunk_sum(BODY: tl.constexpr, start, n, ptrs, args, OPT: tl.constexpr, BLOCK: tl.constexpr,
              CHUNK: tl.constexpr):
    """Sum over this program's chunk of ``BODY``'s float64 terms (masked lanes must give 0)."""
    acc = tl.zeros([BLOCK], tl.float64)
    if start + CHUNK <= n:
        for k in tl.static_range(CHUNK // BLOCK):
            acc += BODY(start + k * BLOCK, n, ptrs, args, OPT, tl.float64, BLOCK, False)
    else:
        for k in tl.static_range(CHUNK // BLOCK):
            acc += BODY(start + k * BLOCK, n, ptrs, args, OPT, tl.float64, BLOCK, True)
    return tl.sum(acc, axis=0)


# --------------------------------------------------------------------------------------------
# Plans: the cached device tables of one set of tensor lists
# --------------------------------------------------------------------------------------------
class Group:
    """The tensors of a plan that share one dtype signature: one launch (or a few, see
    MAX_CHUNKS_PER_LAUNCH) per phase."""

    __slots__ = ("dtypes", "tl_dtypes", "math", "aligned", "tabs", "numel", "ids", "work",
                 "n_chunks", "chunk_offset")

    def tab(self, j: int) -> torch.Tensor:
        return self.tabs[j]

    def launches(self):
        """(grid, work-table view, first chunk) of each launch of this group."""
        step = max(1, int(MAX_CHUNKS_PER_LAUNCH))
        for lo in range(0, self.n_chunks, step):
            hi = min(self.n_chunks, lo + step)
            yield (hi - lo,), self.work[2 * lo:], lo


class Plan:
    # host: the pinned host buffer the device tables were copied from (None off CUDA).
    # zero: a one-element int64 zero in the device buffer, the device step of calls without one.
    __slots__ = ("groups", "n_chunks", "device", "buffer", "host", "zero")


_cache: "OrderedDict[tuple, Plan]" = OrderedDict()
# Plans used while a CUDA graph was being captured.  The graph reads their device tables at every
# replay, so they must outlive the LRU cache: kept for the life of the process (a few KB each, once
# per captured phase).
_captured: Dict[int, Plan] = {}


def clear_cache() -> None:
    _cache.clear()


def _even(n: int) -> int:  # keeps every table view 16-byte aligned
    return n + (n & 1)


def _build(lists: Sequence[Sequence[torch.Tensor]], ids: Optional[Sequence[int]], chunk: int,
           device: torch.device) -> Plan:
    n_tensors = len(lists[0])
    signature: Dict[tuple, List[int]] = OrderedDict()
    for i in range(n_tensors):
        signature.setdefault(tuple(lst[i].dtype for lst in lists), []).append(i)

    # every table of every group in one int64 buffer (one copy to the device), after a zero
    # (Plan.zero) padded to two slots so that every table stays 16-byte aligned
    host: List[int] = [0, 0]
    layout = []
    total_chunks = 0
    for dtypes, members in signature.items():
        tp = _even(len(members))
        seg = {"addr": len(host)}
        aligned = True
        for lst in lists:
            addrs = [lst[i].data_ptr() for i in members]
            aligned = aligned and all(a % 16 == 0 for a in addrs)
            host += addrs + [0] * (tp - len(members))
        seg["numel"] = len(host)
        numels = [lists[0][i].numel() for i in members]
        host += numels + [0] * (tp - len(members))
        if ids is not None:
            seg["ids"] = len(host)
            # the whole int64 id: its high word is the tensor's first Philox block (_philox.py)
            host += [ids[i] for i in members] + [0] * (tp - len(members))
        seg["work"] = len(host)
        n_chunks = 0
        for t, n in enumerate(numels):  # empty tensors get no chunk
            for start in range(0, n, chunk):
                host += (t, start)
                n_chunks += 1
        host += [0] * (_even(len(host)) - len(host))
        layout.append((dtypes, tp, aligned, seg, n_chunks, total_chunks))
        total_chunks += n_chunks

    buf = torch.tensor(host, dtype=torch.int64)
    source = None
    if device.type == "cuda":
        # Pinned + non_blocking, so even a cache miss does not block the host (plans are never
        # built inside a graph capture: see plan_for).
        source = buf.pin_memory()
        buf = source.to(device, non_blocking=True)
    else:
        buf = buf.to(device)

    plan = Plan()
    plan.device, plan.buffer, plan.n_chunks, plan.groups = device, buf, total_chunks, []
    plan.zero = buf[:1]
    # The asynchronous copy reads `source` after this returns: the plan keeps it alive (and never
    # writes it), so the host allocator cannot hand the memory to anyone else while it may be read.
    plan.host = source
    for dtypes, tp, aligned, seg, n_chunks, offset in layout:
        if n_chunks == 0:
            continue
        g = Group()
        g.dtypes = dtypes
        g.tl_dtypes = tuple(TL_DTYPE[d] for d in dtypes)
        g.math = math_dtype(dtypes[0])
        g.aligned = aligned
        g.tabs = [buf[seg["addr"] + j * tp: seg["addr"] + (j + 1) * tp] for j in range(len(lists))]
        g.numel = buf[seg["numel"]: seg["numel"] + tp]
        g.ids = buf[seg["ids"]: seg["ids"] + tp] if "ids" in seg else None
        g.work = buf[seg["work"]: seg["work"] + 2 * n_chunks]
        g.n_chunks = n_chunks
        g.chunk_offset = offset
        plan.groups.append(g)
    return plan


def _check_tensors(lists: Sequence[Sequence[torch.Tensor]], op: OpSpec, roles) -> None:
    """Every tensor has its parameter's numel, and its dtype: the parameter's for a ``param`` /
    ``grad`` / ``backup`` list, the op-math dtype (float32, float64 for float64 parameters) for a
    state list -- the contract of every backend.  The kernels trust both."""
    for lst, role in zip(lists[1:], roles[1:]):
        for i, (p, t) in enumerate(zip(lists[0], lst)):
            want = (torch.float64 if p.dtype == torch.float64 else torch.float32) \
                if role.role.startswith("state") else p.dtype
            if t.numel() != p.numel():
                raise ValueError(f"{op.name}: {role.name}[{i}] has {t.numel()} elements but "
                                 f"{roles[0].name}[{i}] has {p.numel()}")
            if t.dtype != want:
                raise ValueError(f"{op.name}: {role.name}[{i}] has dtype {t.dtype}, expected "
                                 f"{want}")


def plan_for(lists: Sequence[Sequence[torch.Tensor]], ids: Optional[Sequence[int]] = None,
             op: Optional[OpSpec] = None, roles=None) -> Plan:
    """The (cached) plan for equally long, contiguous tensor lists; ``lists[0]`` are the params,
    whose dtype decides the maths.  The key is every tensor's (address, numel, dtype, device
    index): the tables hold nothing else, so a hit is always valid even if a storage was freed
    and reused.  The key is read with maps of C methods, and the dtypes and devices are checked
    only when a plan is built: a Python loop over the tensors on every call was most of the host
    time of an op on thousands of tiny tensors.  With ``op`` and the lists' ``roles`` (its table
    entries), a new plan first checks the tensors (``_check_tensors``): a hit has the numels and
    dtypes of a plan that passed."""
    n = len(lists[0])
    for lst in lists:
        if len(lst) != n:
            raise ValueError(f"tensor lists of different lengths: {[len(x) for x in lists]}")
    device = lists[0][0].device
    if INTERPRET and device.type != "cpu":
        raise RuntimeError("TRITON_INTERPRET=1 runs on CPU tensors only (the interpreter cannot "
                           "follow a table of CUDA addresses)")
    chunk = int(CHUNK)
    flat = [t for lst in lists for t in lst]
    # the lists' count beside their flat contents: [[a, b], [c, d]] is not [[a], [b], [c], [d]]
    key = (device, chunk, len(lists), None if ids is None else tuple(ids),
           tuple(map(_DATA_PTR, flat)), tuple(map(_NUMEL, flat)), tuple(map(_DTYPE, flat)),
           tuple(map(_DEVICE_INDEX, flat)))
    plan = _cache.get(key)
    capturing = _capturing(device)
    if plan is None:
        for t in flat:
            if t.dtype not in TL_DTYPE:
                raise TypeError(f"samkernels.triton: unsupported dtype {t.dtype}")
            if t.device != device:
                raise ValueError(f"samkernels.triton: tensors on {device} and {t.device}")
        if capturing:
            # A plan's tables reach the device by a host-to-device copy.  Recorded in a graph,
            # that copy would re-read host memory at every replay (pinned memory cannot even be
            # allocated in a global-mode capture, pageable memory cannot be copied asynchronously):
            # refuse, clearly, instead of capturing a copy whose source may be gone at replay.
            raise RuntimeError(
                "samkernels.triton: these tensors have no kernel tables yet, and they cannot be "
                "built inside a CUDA graph capture; run the step (or op) once eagerly before "
                "capturing it (the usual CUDA-graph warm-up)")
        if op is not None:
            _check_tensors(lists, op, roles)
        plan = _build(lists, ids, chunk, device)
        _cache[key] = plan
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
        if capturing:
            _captured[id(plan)] = plan  # the graph keeps reading its tables (see _captured)
    return plan


def _capturing(device: torch.device) -> bool:
    """Is ``device``'s current stream capturing a CUDA graph?"""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _dense_layout(t: torch.Tensor):
    """The strides of ``t``'s non-trivial dims if its elements fill exactly ``numel`` consecutive
    slots of memory (a permutation of a contiguous tensor: transposed, channels_last ...), else
    None."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return None
        expected *= sz
    return tuple(st for st, sz in zip(t.stride(), t.shape) if sz > 1)


@contextlib.contextmanager
def contiguous(lists: Sequence[Sequence[torch.Tensor]], mutated: Sequence[int],
               elementwise: bool = True):
    """Yields the lists with every non-contiguous tensor made contiguous.

    ``elementwise`` phases (all but the noise, whose values depend on the logical element index)
    see the tensors of one parameter in *memory order* when they all share one dense layout (a
    channels_last weight with its channels_last grad and state): a flat view of the same memory, no
    copy, and the plan cache still hits.  Otherwise the tensor is copied, and on exit the copies
    in the lists at ``mutated`` positions are written back into the originals."""
    if all(all(map(_CONTIGUOUS, lst)) for lst in lists):
        yield lists
        return
    out = [list(lst) for lst in lists]
    back = []
    for i in range(len(lists[0])):
        ts = [lst[i] for lst in lists]
        if all(t.is_contiguous() for t in ts):
            continue
        layout = _dense_layout(ts[0]) if elementwise else None
        if layout is not None and all(t.shape == ts[0].shape and _dense_layout(t) == layout
                                      for t in ts):
            for j, t in enumerate(ts):
                out[j][i] = t.as_strided((t.numel(),), (1,))  # same memory, memory order
            continue
        for j, t in enumerate(ts):
            if not t.is_contiguous():
                out[j][i] = c = t.contiguous()
                if j in mutated:
                    back.append((t, c))
    yield out
    for t, c in back:
        t.copy_(c)


def _launch_args(group: Group):
    """Constexprs and compile options every kernel takes."""
    assert BLOCK % 16 == 0 and CHUNK % BLOCK == 0 and BLOCK & (BLOCK - 1) == 0, (BLOCK, CHUNK)
    return dict(ALIGNED=group.aligned, MATH=group.math, BLOCK=int(BLOCK), CHUNK=int(CHUNK),
                num_warps=NUM_WARPS, **FP_OPTIONS)


def launch(op: OpSpec, kernel, lists: Sequence[Optional[Sequence[torch.Tensor]]], *,
           words: Sequence[int] = (), bits: Sequence[float] = (),
           ids: Optional[Sequence[int]] = None, found_inf: Optional[torch.Tensor] = None,
           steps: Sequence[Optional[torch.Tensor]] = (), norm: Optional[torch.Tensor] = None,
           sums: bool = False, elementwise: bool = True, **options) -> Optional[torch.Tensor]:
    """Run ``kernel`` (see the kernel template above) over the tensor lists of phase ``op``.

    ``lists`` are the op's tensor lists in the table's order, None for one the call leaves out
    (an empty optional list): the kernel gets the first present list's table there and must not
    touch it.  ``words`` are int32 arguments (``u32_words`` of a 64-bit seed or step),
    ``bits`` floats passed as the int64 bits of their doubles, ``options`` the op's constexprs.
    ``steps``: the op's step tensors (``OpSpec.step_tensors``), each None or given.
    ``norm``: a 0-dim norm (or a short float64 tensor of coefficients) the kernel reads on the
    device.  ``sums``: the kernel writes one float64 partial per program; returns their sum, a
    0-dim float64 (zero for no elements); an int K > 1: K partials per program (slots
    K pid .. K pid + K - 1), returned as a float64 tensor of K sums.
    The lists the table marks as written are copied back when a strided tensor had to be copied
    (``contiguous``); ``elementwise=False`` for the phases whose values depend on the logical
    element index (the noise)."""
    present = [i for i, lst in enumerate(lists) if lst is not None]
    used = [list(lists[i]) for i in present]
    if not used[0]:
        if not sums:
            return None
        return torch.zeros((), dtype=torch.float64) if int(sums) == 1 else \
            torch.zeros(int(sums), dtype=torch.float64)
    if op.takes_ids and len(ids) != len(used[0]):
        raise ValueError(f"{op.name}: one param_id per parameter ({len(ids)} ids for "
                         f"{len(used[0])} parameters)")
    written = tuple(k for k, i in enumerate(present) if op.lists[i].written)
    slots = [present.index(i) if i in present else 0 for i in range(len(lists))]
    device = used[0][0].device
    scalars = list(words) + [f64_bits(x) for x in bits]
    with device_guard(device), contiguous(used, written, elementwise) as used:
        plan = plan_for(used, None if ids is None else [int(i) for i in ids], op,
                        [op.lists[i] for i in present])
        head = []  # the pointers between the work tables and the list tables
        if op.takes_found_inf:
            flag, options["HAS_FLAG"] = flag_arg(found_inf, plan)
            head.append(flag)
        assert len(steps) == len(op.step_tensors), (op.name, op.step_tensors)
        head += [step_arg(op, name, t, plan) for name, t in zip(op.step_tensors, steps)]
        if norm is not None:  # read on the device: no host sync
            norm = norm.reshape(-1).to(device, non_blocking=True)
        width = int(sums)  # sums per program (samv_dots: 3)
        if sums:  # width slots per program, summed below: deterministic, no atomics
            partials = torch.empty(max(plan.n_chunks, 1) * width, dtype=torch.float64,
                                   device=device)
            if plan.n_chunks == 0:
                partials.zero_()
        for grp in plan.groups:
            tabs = [grp.tab(j) for j in slots]
            dts = [grp.tl_dtypes[j] for j in slots]
            for grid, work, lo in grp.launches():
                ptrs = [work, grp.numel] + ([grp.ids] if op.takes_ids else []) + head + tabs
                if norm is not None:
                    ptrs.append(norm)
                if sums:
                    ptrs.append(partials[(grp.chunk_offset + lo) * width:])
                kernel[grid](*ptrs, *scalars, *dts, **options, **_launch_args(grp))
    # the second stage of a norm: torch's sum over the per-program partials, on the device and in
    # a fixed order for a given plan, so the norm is the same bits every call
    if not sums:
        return None
    return partials.sum() if width == 1 else partials.view(-1, width).sum(0)


def norm_result(norm: torch.Tensor, given: Optional[torch.Tensor]) -> torch.Tensor:
    """What a norm-returning phase's op returns: the norm it computed, or a float64 copy of the
    ``given`` one (an op may not return an alias of an input; the public function returns the
    given tensor itself, as the reference does)."""
    return norm if given is None else given.to(torch.float64, copy=True).reshape(())
