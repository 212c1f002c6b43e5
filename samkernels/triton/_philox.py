"""Philox4x32-10 noise for the Triton kernels, bit for bit csrc/philox.h in its integer part
(docs/spec.md, "Noise").

Element i of parameter ``pid`` at noise step ``step`` is lane i & 3 of the Philox block with
counter (i >> 2, pid, step_lo, step_hi) and key (seed_lo, seed_hi); its uniform is
u = ((x >> 9) + 1/2) 2^-23 and its normal comes from Box-Muller over the block's two lane pairs.
A kernel computes one Philox block per *quad* of elements (a [BLOCK/4, 4] tile, ``quad_tile``),
not one per element, so the generator costs ~1/4 of the naive version.  bSAM's and the MFVI
family's normals (``normal_tile``) and E-BiSAM's uniforms (``philox_words`` + ``pick_lane``) are
the same stream.  ``step`` is the op's step plus its ``device_step`` (zero without one), added
once per program on the device (``step_words``), so a captured op replays with the counter's
current value.
"""
import math

import torch
import triton
import triton.language as tl

from samkernels.triton import _multi_tensor as mt
from samkernels.triton._multi_tensor import sqrt


@triton.jit
def philox_words(quad, pid, seed_lo, seed_hi, step_lo, step_hi):
    """The four Philox4x32-10 words of block ``quad`` (uint32 tensor) of parameter ``pid``.

    tl.philox splits its 64-bit seed into the key (lo, hi) = (k0, k1), as philox.h does; the
    32-bit word arguments arrive as int32 (or uint32, ``step_words``) and are reinterpreted
    here."""
    seed = ((seed_hi.to(tl.uint32, bitcast=True).to(tl.uint64) << 32)
            | seed_lo.to(tl.uint32, bitcast=True).to(tl.uint64))
    zero = quad * 0  # full-size counters, so every output word is a full tensor
    return tl.philox(seed, quad, zero + pid, zero + step_lo.to(tl.uint32, bitcast=True),
                     zero + step_hi.to(tl.uint32, bitcast=True))


@triton.jit
def step_words(step_lo, step_hi, device_step):
    """The Philox step words (lo, hi), uint32, of step + *device_step mod 2^64 (``at_step``):
    the counter words 2 and 3 of every block an op draws."""
    step = mt.at_step(step_lo, step_hi, device_step)
    return step.to(tl.uint32), (step >> 32).to(tl.uint32)


@triton.jit
def uniform(x, MATH: tl.constexpr):
    # ((x >> 9) + 1/2) 2^-23 in (0, 1): 24 significant bits, exact in fp32, never 0 or 1
    # (x is uint32: logical shift)
    return ((x >> 9).to(MATH) + 0.5) * 1.1920928955078125e-07


@triton.jit
def philox_normal4(quad, pid, seed_lo, seed_hi, step_lo, step_hi, MATH: tl.constexpr):
    """Box-Muller: (u0, u1) -> lanes 0, 1 and (u2, u3) -> lanes 2, 3 (philox.h, philox_normal4)."""
    x0, x1, x2, x3 = philox_words(quad, pid, seed_lo, seed_hi, step_lo, step_hi)
    two_pi = tl.full([], 6.283185307179586476925286766559, MATH)  # tl.full keeps fp64 exact
    r01 = sqrt(-2.0 * tl.log(uniform(x0, MATH)))
    r23 = sqrt(-2.0 * tl.log(uniform(x2, MATH)))
    # cos(2 pi u) = -cos(2 pi (u - 1/2)): u - 1/2 is exact and the argument stays in [-pi, pi],
    # where the GPU's fp32 sin/cos are most accurate
    t01 = two_pi * (uniform(x1, MATH) - 0.5)
    t23 = two_pi * (uniform(x3, MATH) - 0.5)
    return -r01 * tl.cos(t01), -r01 * tl.sin(t01), -r23 * tl.cos(t23), -r23 * tl.sin(t23)


@triton.jit
def quad_tile(base, key, QB: tl.constexpr):
    """Offsets [QB, 4] of elements base .. base + 4 QB - 1 (row = one Philox block: 4 contiguous
    elements), the lane of each column [1, 4] and the Philox counter word of each row [QB].
    ``base`` is a multiple of 4 (chunk starts are multiples of 16); ``key`` the tensor's int64
    param id (``param_key``), whose high word is its first block in its parameter's stream."""
    q = tl.arange(0, QB)
    lane = tl.arange(0, 4)[None, :]
    offs = base + 4 * q[:, None] + lane
    # element i -> counter word first + (i >> 2), truncated to 32 bits as philox.h's
    # static_cast<uint32_t> (uint32 additions wrap)
    first = (key >> 32).to(tl.uint32)
    quad = ((base >> 2) + q).to(tl.uint32) + first
    return offs, lane, quad


@triton.jit
def pick_lane(lane, x0, x1, x2, x3):
    """[QB, 4] tile of the per-row values x0..x3 [QB]: column j takes x_j (element 4q + j)."""
    return tl.where(lane == 0, x0[:, None],
                    tl.where(lane == 1, x1[:, None], tl.where(lane == 2, x2[:, None], x3[:, None])))


@triton.jit
def normal_tile(base, key, seed_lo, seed_hi, step_lo, step_hi, MATH: tl.constexpr,
                QB: tl.constexpr):
    """(offsets [QB, 4], z [QB, 4]): the Philox normals of elements base .. base + 4 QB - 1 of
    the tensor keyed ``key`` (``param_key``)."""
    offs, lane, quad = quad_tile(base, key, QB)
    z0, z1, z2, z3 = philox_normal4(quad, key_word(key), seed_lo, seed_hi, step_lo, step_hi, MATH)
    return offs, pick_lane(lane, z0, z1, z2, z3)


@triton.jit
def param_key(ids, t):
    """Tensor ``t``'s 64-bit param id (docs/spec.md "Noise"): low word the parameter's Philox
    counter word (``key_word``), high word the tensor's first block (``quad_tile``)."""
    return tl.load(ids + t)


@triton.jit
def key_word(key):
    """The Philox counter word of a ``param_key``: its low 32 bits."""
    return (key & 0xFFFFFFFF).to(tl.uint32)


def uniforms_below(beta: float) -> int:
    """How many of the 2^23 uniforms u_k = (k + 1/2) 2^-23 are < beta: then u_k < beta (compared
    in float64, as the reference does) iff k < uniforms_below(beta), an exact integer test on
    x >> 9.  beta 2^23 is exact in double, and so is beta 2^23 - 1/2 for beta < 1."""
    b = float(beta) * 8388608.0
    if not b > 0.5:  # also NaN
        return 0
    return min(1 << 23, math.ceil(b - 0.5))


# --- test hook ----------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["pid", "seed_lo", "seed_hi", "step_lo", "step_hi"])
def _philox_probe_kernel(words, normals, n_quads, pid: tl.int32, seed_lo: tl.int32,
                         seed_hi: tl.int32, step_lo: tl.int32, step_hi: tl.int32,
                         QB: tl.constexpr, MATH: tl.constexpr):
    """One program: the words and normals of quads 0..n_quads-1 of one parameter, element-major
    like reference.philox_normal (element 4q + j = lane j of quad q)."""
    q = tl.arange(0, QB)
    quad = q.to(tl.uint32)
    pid32 = pid.to(tl.uint32, bitcast=True)
    x0, x1, x2, x3 = philox_words(quad, pid32, seed_lo, seed_hi, step_lo, step_hi)
    z0, z1, z2, z3 = philox_normal4(quad, pid32, seed_lo, seed_hi, step_lo, step_hi, MATH)
    m = q < n_quads
    tl.store(words + 4 * q + 0, x0.to(tl.int64), mask=m)
    tl.store(words + 4 * q + 1, x1.to(tl.int64), mask=m)
    tl.store(words + 4 * q + 2, x2.to(tl.int64), mask=m)
    tl.store(words + 4 * q + 3, x3.to(tl.int64), mask=m)
    tl.store(normals + 4 * q + 0, z0, mask=m)
    tl.store(normals + 4 * q + 1, z1, mask=m)
    tl.store(normals + 4 * q + 2, z2, mask=m)
    tl.store(normals + 4 * q + 3, z3, mask=m)


def philox_probe(seed: int, step: int, param_id: int, numel: int, dtype=torch.float32,
                 device="cpu"):
    """(words, normals) from the Triton generator for elements 0..numel-1 of one parameter:
    ``words`` is int64 [ceil(numel/4), 4] (the raw uint32 Philox outputs), ``normals`` [numel].
    For tests against reference.philox4x32 / philox_normal; one program, so keep numel small."""
    n_quads = (numel + 3) // 4
    qb = max(16, triton.next_power_of_2(n_quads))
    words = torch.zeros(4 * n_quads, dtype=torch.int64, device=device)
    normals = torch.zeros(4 * n_quads, dtype=dtype, device=device)
    with mt.device_guard(words.device):
        _philox_probe_kernel[(1,)](words, normals, n_quads, mt.u32_words(param_id)[0],
                                   *mt.u32_words(seed), *mt.u32_words(step), QB=qb,
                                   MATH=mt.math_dtype(dtype), **mt.FP_OPTIONS)
    return words.view(n_quads, 4), normals[:numel]
