"""Triton kernels for the bSAM phases (docs/spec.md "Bayesian SAM", Algorithm 1 lines 1-7; reference.py:
bsam_noise_, bsam_perturb_, bsam_update_).  One launch per dtype group and phase:

  bsam_noise_    line 1       reads w, s;            writes backup, w = omega + z / sqrt(N s)
  bsam_perturb_  lines 3 (+5) reads backup, g, s, [a]; writes w = omega + rho g / s, s or a
  bsam_update_   lines (5) 6-7 reads backup, g, s, gm, [a]; writes [s], gm, w

The noise z follows csrc/philox.h bit for bit in its integer part: element i of parameter `pid` at
noise step `step` is lane i & 3 of Philox4x32-10(counter (i >> 2, pid, step_lo, step_hi), key
(seed_lo, seed_hi)), u = ((x >> 9) + 1/2) 2^-23, then Box-Muller.  Each program computes one Philox
block per *quad* of elements (a [BLOCK/4, 4] tile), not one per element, so the generator costs
~1/4 of the naive version.

found_inf (the optimizer's non-finite-gradient flag, a one-element device tensor): when it is
nonzero, bsam_perturb_ and bsam_update_ only copy w <- backup (precisions, accums and momenta
untouched); each program reads the flag, the host never does.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from samkernels.triton import _multi_tensor as mt
from samkernels.triton._multi_tensor import (chunk_of, copy_chunk, div, fp_arg, load, load_flag,
                                                load_one, sqrt, store, tensor_ptr)


# --------------------------------------------------------------------------------------------
# Philox normals
# --------------------------------------------------------------------------------------------
@triton.jit
def philox_words(quad, pid, seed_lo, seed_hi, step_lo, step_hi):
    """The four Philox4x32-10 words of block ``quad`` (uint32 tensor) of parameter ``pid``.

    tl.philox splits its 64-bit seed into the key (lo, hi) = (k0, k1), as philox.h does; the
    32-bit word arguments arrive as int32 and are reinterpreted here."""
    seed = ((seed_hi.to(tl.uint32, bitcast=True).to(tl.uint64) << 32)
            | seed_lo.to(tl.uint32, bitcast=True).to(tl.uint64))
    zero = quad * 0  # full-size counters, so every output word is a full tensor
    return tl.philox(seed, quad, zero + pid, zero + step_lo.to(tl.uint32, bitcast=True),
                     zero + step_hi.to(tl.uint32, bitcast=True))


@triton.jit
def _uniform(x, MATH: tl.constexpr):
    # ((x >> 9) + 1/2) 2^-23 in (0, 1): 24 significant bits, exact in fp32, never 0 or 1
    # (x is uint32: logical shift)
    return ((x >> 9).to(MATH) + 0.5) * 1.1920928955078125e-07


@triton.jit
def philox_normal4(quad, pid, seed_lo, seed_hi, step_lo, step_hi, MATH: tl.constexpr):
    """Box-Muller: (u0, u1) -> lanes 0, 1 and (u2, u3) -> lanes 2, 3 (philox.h, philox_normal4)."""
    x0, x1, x2, x3 = philox_words(quad, pid, seed_lo, seed_hi, step_lo, step_hi)
    two_pi = tl.full([], 6.283185307179586476925286766559, MATH)  # tl.full keeps fp64 exact
    r01 = sqrt(-2.0 * tl.log(_uniform(x0, MATH)))
    r23 = sqrt(-2.0 * tl.log(_uniform(x2, MATH)))
    # cos(2 pi u) = -cos(2 pi (u - 1/2)): u - 1/2 is exact and the argument stays in [-pi, pi],
    # where the GPU's fp32 sin/cos are most accurate
    t01 = two_pi * (_uniform(x1, MATH) - 0.5)
    t23 = two_pi * (_uniform(x3, MATH) - 0.5)
    return -r01 * tl.cos(t01), -r01 * tl.sin(t01), -r23 * tl.cos(t23), -r23 * tl.sin(t23)


@triton.jit
def quad_tile(base, QB: tl.constexpr):
    """Offsets [QB, 4] of elements base .. base + 4 QB - 1 (row = one Philox block: 4 contiguous
    elements), the lane of each column [1, 4] and the Philox counter word of each row [QB].
    ``base`` is a multiple of 4 (chunk starts are multiples of 16)."""
    q = tl.arange(0, QB)
    lane = tl.arange(0, 4)[None, :]
    offs = base + 4 * q[:, None] + lane
    # element i -> counter word i >> 2, truncated to 32 bits as philox.h's static_cast<uint32_t>
    quad = ((base >> 2) + q).to(tl.uint32)
    return offs, lane, quad


@triton.jit
def pick_lane(lane, x0, x1, x2, x3):
    """[QB, 4] tile of the per-row values x0..x3 [QB]: column j takes x_j (element 4q + j)."""
    return tl.where(lane == 0, x0[:, None],
                    tl.where(lane == 1, x1[:, None], tl.where(lane == 2, x2[:, None], x3[:, None])))


@triton.jit
def normal_tile(base, pid, seed_lo, seed_hi, step_lo, step_hi, MATH: tl.constexpr,
                QB: tl.constexpr):
    """(offsets [QB, 4], z [QB, 4]): the Philox normals of elements base .. base + 4 QB - 1."""
    offs, lane, quad = quad_tile(base, QB)
    z0, z1, z2, z3 = philox_normal4(quad, pid, seed_lo, seed_hi, step_lo, step_hi, MATH)
    return offs, pick_lane(lane, z0, z1, z2, z3)


@triton.jit(do_not_specialize=["pid", "seed_lo", "seed_hi", "step_lo", "step_hi"])
def _philox_probe_kernel(words, normals, n_quads, pid: tl.int32, seed_lo: tl.int32,
                         seed_hi: tl.int32, step_lo: tl.int32, step_hi: tl.int32,
                         QB: tl.constexpr, MATH: tl.constexpr):
    """Test hook (one program): the words and normals of quads 0..n_quads-1 of one parameter,
    element-major like reference.philox_normal (element 4q + j = lane j of quad q)."""
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
                                   MATH=mt.math_dtype(dtype))
    return words.view(n_quads, 4), normals[:numel]


# --------------------------------------------------------------------------------------------
# bsam_noise_ (line 1): backup <- omega;  w <- omega + z / sqrt(N s)
# --------------------------------------------------------------------------------------------
@triton.jit
def _noise_block(base, n, p, b, s, pid, seed_lo, seed_hi, step_lo, step_hi, num_data,
                 MATH: tl.constexpr, QB: tl.constexpr, MASKED: tl.constexpr):
    offs, z = normal_tile(base, pid, seed_lo, seed_hi, step_lo, step_hi, MATH, QB)
    w_raw = load(p, offs, n, MASKED)
    store(b, offs, w_raw, n, MASKED)  # backup <- omega, bit-exact
    ss = load_one(s, offs, n, MASKED).to(MATH)
    store(p, offs, w_raw.to(MATH) + div(z, sqrt(num_data * ss)), n, MASKED)  # sigma2 = 1/(N s)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step_lo", "step_hi", "nd_bits"])
def _noise_kernel(work, numel, ids, p_tab, b_tab, s_tab, seed_lo: tl.int32, seed_hi: tl.int32,
                  step_lo: tl.int32, step_hi: tl.int32, nd_bits: tl.int64,
                  P_DT: tl.constexpr, B_DT: tl.constexpr, S_DT: tl.constexpr,
                  ALIGNED: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
                  CHUNK: tl.constexpr):
    t, start, n = chunk_of(work, numel)
    p = tensor_ptr(p_tab, t, P_DT, ALIGNED)
    b = tensor_ptr(b_tab, t, B_DT, ALIGNED)
    s = tensor_ptr(s_tab, t, S_DT, ALIGNED)
    pid = tl.load(ids + t).to(tl.uint32)  # the host stored param_id & 0xFFFFFFFF
    num_data = fp_arg(nd_bits, MATH)
    # plain (not unrolled) loops: the Philox + Box-Muller body is large, and unrolling it only
    # tripled the compile time (~14 s vs ~4 s for sm_90) without changing the memory accesses
    if start + CHUNK <= n:
        for k in range(CHUNK // BLOCK):
            _noise_block(start + k * BLOCK, n, p, b, s, pid, seed_lo, seed_hi, step_lo, step_hi,
                         num_data, MATH, BLOCK // 4, False)
    else:
        for k in range(CHUNK // BLOCK):
            _noise_block(start + k * BLOCK, n, p, b, s, pid, seed_lo, seed_hi, step_lo, step_hi,
                         num_data, MATH, BLOCK // 4, True)


def _bsam_noise(params: List[Tensor], backups: List[Tensor], precisions: List[Tensor],
                param_ids: List[int], seed: int, step: int, num_data: float) -> None:
    if not params:
        return
    if len(param_ids) != len(params):
        raise ValueError("bsam_noise_: one param_id per parameter")
    # element i's noise is defined in logical (row-major) order: copy, never flatten, strided views
    lists = [params, backups, precisions]
    with mt.device_guard(params[0].device), \
            mt.contiguous(lists, mutated=(0, 1), elementwise=False) as lists:
        plan = mt.plan_for(lists, ids=[int(i) for i in param_ids])
        for grp in plan.groups:
            for grid, work, _ in grp.launches():
                _noise_kernel[grid](work, grp.numel, grp.ids, grp.tab(0), grp.tab(1), grp.tab(2),
                                    *mt.u32_words(seed), *mt.u32_words(step),
                                    mt.f64_bits(num_data),
                                    P_DT=grp.tl_dtypes[0], B_DT=grp.tl_dtypes[1],
                                    S_DT=grp.tl_dtypes[2], **mt.launch_args(grp))


# --------------------------------------------------------------------------------------------
# bsam_perturb_ (line 3, and line 5 unless deferred): w <- omega + rho g / s
# --------------------------------------------------------------------------------------------
@triton.jit
def _perturb_block(offs, n, p, g, b, s, a, rho, beta2, omb2, delta, gamma, ACCUM: tl.constexpr,
                   MATH: tl.constexpr, MASKED: tl.constexpr):
    omega = load(b, offs, n, MASKED).to(MATH)
    gg = load(g, offs, n, MASKED).to(MATH)
    ss = load_one(s, offs, n, MASKED).to(MATH)  # s before line 5
    store(p, offs, omega + div(rho * gg, ss), n, MASKED)  # line 3: eps = rho g / s
    h = sqrt(ss) * tl.abs(gg)
    if ACCUM:  # m-sharpness / released order: line 5 waits for bsam_update_
        store(a, offs, load(a, offs, n, MASKED).to(MATH) + h, n, MASKED)
    else:  # line 5: s <- beta2 s + (1 - beta2)(sqrt(s)|g| + delta + gamma)
        store(s, offs, beta2 * ss + omb2 * ((h + delta) + gamma), n, MASKED)


@triton.jit(do_not_specialize=["rho_bits", "b2_bits", "omb2_bits", "delta_bits", "gamma_bits"])
def _perturb_kernel(work, numel, p_tab, g_tab, b_tab, s_tab, a_tab, flag, rho_bits: tl.int64,
                    b2_bits: tl.int64, omb2_bits: tl.int64, delta_bits: tl.int64,
                    gamma_bits: tl.int64,
                    P_DT: tl.constexpr, G_DT: tl.constexpr, B_DT: tl.constexpr,
                    S_DT: tl.constexpr, A_DT: tl.constexpr, ACCUM: tl.constexpr,
                    HAS_FLAG: tl.constexpr, ALIGNED: tl.constexpr, MATH: tl.constexpr,
                    BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, n = chunk_of(work, numel)
    p = tensor_ptr(p_tab, t, P_DT, ALIGNED)
    g = tensor_ptr(g_tab, t, G_DT, ALIGNED)
    b = tensor_ptr(b_tab, t, B_DT, ALIGNED)
    s = tensor_ptr(s_tab, t, S_DT, ALIGNED)
    a = tensor_ptr(a_tab, t, A_DT, ALIGNED)
    rho = fp_arg(rho_bits, MATH)
    beta2 = fp_arg(b2_bits, MATH)
    omb2 = fp_arg(omb2_bits, MATH)
    delta = fp_arg(delta_bits, MATH)
    gamma = fp_arg(gamma_bits, MATH)
    if load_flag(flag, HAS_FLAG):  # found_inf: w <- omega, s and accums stay
        copy_chunk(b, p, start, n, BLOCK, CHUNK)
    elif start + CHUNK <= n:
        for k in tl.static_range(CHUNK // BLOCK):
            _perturb_block(start + k * BLOCK + tl.arange(0, BLOCK), n, p, g, b, s, a, rho, beta2,
                           omb2, delta, gamma, ACCUM, MATH, False)
    else:
        for k in tl.static_range(CHUNK // BLOCK):
            _perturb_block(start + k * BLOCK + tl.arange(0, BLOCK), n, p, g, b, s, a, rho, beta2,
                           omb2, delta, gamma, ACCUM, MATH, True)


def _bsam_perturb(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                  precisions: List[Tensor], accums: List[Tensor], rho: float, beta2: float,
                  delta: float, gamma: float, found_inf: Optional[Tensor] = None) -> None:
    if not params:
        return
    accum = len(accums) > 0
    lists = [params, grads, backups, precisions] + ([accums] if accum else [])
    with mt.device_guard(params[0].device), mt.contiguous(lists, mutated=(0, 3, 4)) as lists:
        plan = mt.plan_for(lists)
        flag, has_flag = mt.flag_arg(found_inf, plan)
        a = 4 if accum else 3  # without accums the kernel never touches this table
        for grp in plan.groups:
            for grid, work, _ in grp.launches():
                _perturb_kernel[grid](work, grp.numel, *[grp.tab(j) for j in range(4)], grp.tab(a),
                                      flag, mt.f64_bits(rho), mt.f64_bits(beta2),
                                      mt.f64_bits(1 - beta2),
                                      mt.f64_bits(delta), mt.f64_bits(gamma),
                                      P_DT=grp.tl_dtypes[0], G_DT=grp.tl_dtypes[1],
                                      B_DT=grp.tl_dtypes[2], S_DT=grp.tl_dtypes[3],
                                      A_DT=grp.tl_dtypes[a], ACCUM=accum, HAS_FLAG=has_flag,
                                      **mt.launch_args(grp))


# --------------------------------------------------------------------------------------------
# bsam_update_ (lines 5-7): [s <- ...]; gm <- beta1 gm + (1-beta1)(g_eps + delta omega);
#                           w <- omega - lr gm / s
# --------------------------------------------------------------------------------------------
@triton.jit
def _update_block(offs, n, p, g, b, s, gm, a, lr, beta1, omb1, beta2, omb2, delta, gamma,
                  accum_scale, ACCUM: tl.constexpr, RELEASED: tl.constexpr, MATH: tl.constexpr,
                  MASKED: tl.constexpr):
    omega = load(b, offs, n, MASKED).to(MATH)
    ge = load(g, offs, n, MASKED).to(MATH)
    s_old = load_one(s, offs, n, MASKED).to(MATH)
    s_new = s_old
    if ACCUM:  # line 5 with h = accum * accum_scale (the m-sharpness average)
        h = load(a, offs, n, MASKED).to(MATH) * accum_scale
        s_new = beta2 * s_old + omb2 * ((h + delta) + gamma)
        store(s, offs, s_new, n, MASKED)
    m = beta1 * load(gm, offs, n, MASKED).to(MATH) + omb1 * (ge + delta * omega)  # line 6
    store(gm, offs, m, n, MASKED)
    if RELEASED:  # the authors' JAX code: omega moves with the s from before line 5
        denom = s_old
    else:  # Algorithm 1 line 7: s from line 5
        denom = s_new
    store(p, offs, omega - div(lr * m, denom), n, MASKED)


@triton.jit(do_not_specialize=["lr_bits", "b1_bits", "omb1_bits", "b2_bits", "omb2_bits",
                               "delta_bits", "gamma_bits", "as_bits"])
def _update_kernel(work, numel, p_tab, g_tab, b_tab, s_tab, gm_tab, a_tab, flag,
                   lr_bits: tl.int64, b1_bits: tl.int64, omb1_bits: tl.int64, b2_bits: tl.int64,
                   omb2_bits: tl.int64, delta_bits: tl.int64, gamma_bits: tl.int64,
                   as_bits: tl.int64,
                   P_DT: tl.constexpr, G_DT: tl.constexpr, B_DT: tl.constexpr,
                   S_DT: tl.constexpr, GM_DT: tl.constexpr, A_DT: tl.constexpr,
                   ACCUM: tl.constexpr, RELEASED: tl.constexpr, HAS_FLAG: tl.constexpr,
                   ALIGNED: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
                   CHUNK: tl.constexpr):
    t, start, n = chunk_of(work, numel)
    p = tensor_ptr(p_tab, t, P_DT, ALIGNED)
    g = tensor_ptr(g_tab, t, G_DT, ALIGNED)
    b = tensor_ptr(b_tab, t, B_DT, ALIGNED)
    s = tensor_ptr(s_tab, t, S_DT, ALIGNED)
    gm = tensor_ptr(gm_tab, t, GM_DT, ALIGNED)
    a = tensor_ptr(a_tab, t, A_DT, ALIGNED)
    lr = fp_arg(lr_bits, MATH)
    beta1 = fp_arg(b1_bits, MATH)
    omb1 = fp_arg(omb1_bits, MATH)
    beta2 = fp_arg(b2_bits, MATH)
    omb2 = fp_arg(omb2_bits, MATH)
    delta = fp_arg(delta_bits, MATH)
    gamma = fp_arg(gamma_bits, MATH)
    accum_scale = fp_arg(as_bits, MATH)
    if load_flag(flag, HAS_FLAG):  # found_inf: w <- omega, s and gm stay
        copy_chunk(b, p, start, n, BLOCK, CHUNK)
    elif start + CHUNK <= n:
        for k in tl.static_range(CHUNK // BLOCK):
            _update_block(start + k * BLOCK + tl.arange(0, BLOCK), n, p, g, b, s, gm, a, lr, beta1,
                          omb1, beta2, omb2, delta, gamma, accum_scale, ACCUM, RELEASED, MATH,
                          False)
    else:
        for k in tl.static_range(CHUNK // BLOCK):
            _update_block(start + k * BLOCK + tl.arange(0, BLOCK), n, p, g, b, s, gm, a, lr, beta1,
                          omb1, beta2, omb2, delta, gamma, accum_scale, ACCUM, RELEASED, MATH,
                          True)


def _bsam_update(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                 precisions: List[Tensor], momenta: List[Tensor], accums: List[Tensor], lr: float,
                 beta1: float, beta2: float, delta: float, gamma: float, accum_scale: float,
                 released_order: bool, found_inf: Optional[Tensor] = None) -> None:
    if not params:
        return
    accum = len(accums) > 0
    lists = [params, grads, backups, precisions, momenta] + ([accums] if accum else [])
    with mt.device_guard(params[0].device), mt.contiguous(lists, mutated=(0, 3, 4)) as lists:
        plan = mt.plan_for(lists)
        flag, has_flag = mt.flag_arg(found_inf, plan)
        a = 5 if accum else 4  # without accums the kernel never touches this table
        for grp in plan.groups:
            for grid, work, _ in grp.launches():
                _update_kernel[grid](work, grp.numel, *[grp.tab(j) for j in range(5)], grp.tab(a),
                                     flag, mt.f64_bits(lr), mt.f64_bits(beta1),
                                     mt.f64_bits(1 - beta1),
                                     mt.f64_bits(beta2), mt.f64_bits(1 - beta2),
                                     mt.f64_bits(delta), mt.f64_bits(gamma),
                                     mt.f64_bits(accum_scale),
                                     P_DT=grp.tl_dtypes[0], G_DT=grp.tl_dtypes[1],
                                     B_DT=grp.tl_dtypes[2], S_DT=grp.tl_dtypes[3],
                                     GM_DT=grp.tl_dtypes[4], A_DT=grp.tl_dtypes[a], ACCUM=accum,
                                     RELEASED=bool(released_order) and accum,
                                     HAS_FLAG=has_flag, **mt.launch_args(grp))
