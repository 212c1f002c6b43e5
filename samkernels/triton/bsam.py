"""Triton kernels for the bSAM phases (docs/spec.md "Bayesian SAM (bSAM)", Algorithm 1 lines 1-7;
reference.py: bsam_noise_, bsam_perturb_, bsam_update_), on the skeleton of ``_multi_tensor``.
One launch per dtype group and phase:

  bsam_noise_    line 1       reads w, s;            writes backup, w = omega + z / sqrt(N s)
  bsam_perturb_  lines 3 (+5) reads backup, g, s, [a]; writes w = omega + rho g / s, s or a
  bsam_update_   lines (5) 6-7 reads backup, g, s, gm, [a]; writes [s], gm, w

The noise z is the Philox normal stream of ``_philox`` (csrc/philox.h bit for bit in its
integer part), keyed by (seed, step, parameter id, element).

found_inf (the optimizer's non-finite-gradient flag, a one-element device tensor): when it is
nonzero, bsam_perturb_ and bsam_update_ only copy w <- backup (precisions, accums and momenta
untouched); each program reads the flag, the host never does.
"""
from typing import List, Optional

import triton
import triton.language as tl
from torch import Tensor

from samkernels.ops._spec import OPS
from samkernels.triton import _multi_tensor as mt
from samkernels.triton._multi_tensor import (chunk_apply, chunk_ptrs, div, fp_arg, fp_args, load,
                                             load_flag, load_one, sqrt, store)
from samkernels.triton._philox import normal_tile, param_key, step_words


# --------------------------------------------------------------------------------------------
# bsam_noise_ (line 1): backup <- omega;  w <- omega + z / sqrt(N s)
# --------------------------------------------------------------------------------------------
@triton.jit
def _noise_body(base, n, ptrs, args, OPT: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
                MASKED: tl.constexpr):
    p, b, s = ptrs
    key, seed_lo, seed_hi, step_lo, step_hi, num_data = args
    offs, z = normal_tile(base, key, seed_lo, seed_hi, step_lo, step_hi, MATH, BLOCK // 4)
    w_raw = load(p, offs, n, MASKED)
    store(b, offs, w_raw, n, MASKED)  # backup <- omega, bit-exact
    ss = load_one(s, offs, n, MASKED).to(MATH)
    store(p, offs, w_raw.to(MATH) + div(z, sqrt(num_data * ss)), n, MASKED)  # sigma2 = 1/(N s)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step_lo", "step_hi", "nd_bits"],
            do_not_specialize_on_alignment=["device_step"])
def _noise_kernel(work, numel, ids, device_step, p_tab, b_tab, s_tab, seed_lo: tl.int32,
                  seed_hi: tl.int32, step_lo: tl.int32, step_hi: tl.int32, nd_bits: tl.int64,
                  P_DT: tl.constexpr, B_DT: tl.constexpr, S_DT: tl.constexpr,
                  ALIGNED: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
                  CHUNK: tl.constexpr):
    t, start, n, ptrs = chunk_ptrs(work, numel, (p_tab, b_tab, s_tab), (P_DT, B_DT, S_DT),
                                   ALIGNED)
    args = (param_key(ids, t), seed_lo, seed_hi) + step_words(step_lo, step_hi, device_step) + (
        fp_arg(nd_bits, MATH),)
    chunk_apply(_noise_body, start, n, ptrs, args, (), False, None, MATH, BLOCK, CHUNK, False)


def bsam_noise_(params: List[Tensor], backups: List[Tensor], precisions: List[Tensor],
                param_ids: List[int], seed: int, step: int, num_data: float,
                device_step: Optional[Tensor] = None) -> None:
    # element i's noise is defined in logical (row-major) order: copy, never flatten, strided views
    mt.launch(OPS["bsam_noise_"], _noise_kernel, [params, backups, precisions], ids=param_ids,
              words=(*mt.u32_words(seed), *mt.u32_words(step)), bits=(num_data,),
              steps=(device_step,), elementwise=False)


# --------------------------------------------------------------------------------------------
# bsam_perturb_ (line 3, and line 5 unless deferred): w <- omega + rho g / s
# --------------------------------------------------------------------------------------------
@triton.jit
def _perturb_body(base, n, ptrs, args, OPT: tl.constexpr, MATH: tl.constexpr,
                  BLOCK: tl.constexpr, MASKED: tl.constexpr):
    p, g, b, s, a = ptrs
    rho, beta2, omb2, delta, gamma = args
    ACCUM: tl.constexpr = OPT[0]
    offs = base + tl.arange(0, BLOCK)
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
def _perturb_kernel(work, numel, flag, p_tab, g_tab, b_tab, s_tab, a_tab, rho_bits: tl.int64,
                    b2_bits: tl.int64, omb2_bits: tl.int64, delta_bits: tl.int64,
                    gamma_bits: tl.int64,
                    P_DT: tl.constexpr, G_DT: tl.constexpr, B_DT: tl.constexpr,
                    S_DT: tl.constexpr, A_DT: tl.constexpr, ACCUM: tl.constexpr,
                    HAS_FLAG: tl.constexpr, ALIGNED: tl.constexpr, MATH: tl.constexpr,
                    BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    _, start, n, ptrs = chunk_ptrs(work, numel, (p_tab, g_tab, b_tab, s_tab, a_tab),
                                   (P_DT, G_DT, B_DT, S_DT, A_DT), ALIGNED)
    args = fp_args((rho_bits, b2_bits, omb2_bits, delta_bits, gamma_bits), MATH)
    # found_inf: w <- omega, s and accums stay
    chunk_apply(_perturb_body, start, n, ptrs, args, (ACCUM,), load_flag(flag, HAS_FLAG), (2, 0),
                MATH, BLOCK, CHUNK, True)


def bsam_perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                  precisions: List[Tensor], accums: List[Tensor], rho: float, beta2: float,
                  delta: float, gamma: float, found_inf: Optional[Tensor] = None) -> None:
    mt.launch(OPS["bsam_perturb_"], _perturb_kernel,
              [params, grads, backups, precisions, accums or None],
              bits=(rho, beta2, 1 - beta2, delta, gamma), found_inf=found_inf,
              ACCUM=len(accums) > 0)


# --------------------------------------------------------------------------------------------
# bsam_update_ (lines 5-7): [s <- ...]; gm <- beta1 gm + (1-beta1)(g_eps + delta omega);
#                           w <- omega - lr gm / s
# --------------------------------------------------------------------------------------------
@triton.jit
def _update_body(base, n, ptrs, args, OPT: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
                 MASKED: tl.constexpr):
    p, g, b, s, gm, a = ptrs
    lr, beta1, omb1, beta2, omb2, delta, gamma, accum_scale = args
    ACCUM: tl.constexpr = OPT[0]
    RELEASED: tl.constexpr = OPT[1]
    offs = base + tl.arange(0, BLOCK)
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
def _update_kernel(work, numel, flag, p_tab, g_tab, b_tab, s_tab, gm_tab, a_tab,
                   lr_bits: tl.int64, b1_bits: tl.int64, omb1_bits: tl.int64, b2_bits: tl.int64,
                   omb2_bits: tl.int64, delta_bits: tl.int64, gamma_bits: tl.int64,
                   as_bits: tl.int64,
                   P_DT: tl.constexpr, G_DT: tl.constexpr, B_DT: tl.constexpr,
                   S_DT: tl.constexpr, GM_DT: tl.constexpr, A_DT: tl.constexpr,
                   ACCUM: tl.constexpr, RELEASED: tl.constexpr, HAS_FLAG: tl.constexpr,
                   ALIGNED: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
                   CHUNK: tl.constexpr):
    _, start, n, ptrs = chunk_ptrs(work, numel, (p_tab, g_tab, b_tab, s_tab, gm_tab, a_tab),
                                   (P_DT, G_DT, B_DT, S_DT, GM_DT, A_DT), ALIGNED)
    args = fp_args((lr_bits, b1_bits, omb1_bits, b2_bits, omb2_bits, delta_bits, gamma_bits,
                    as_bits), MATH)
    # found_inf: w <- omega, s and gm stay
    chunk_apply(_update_body, start, n, ptrs, args, (ACCUM, RELEASED), load_flag(flag, HAS_FLAG),
                (2, 0), MATH, BLOCK, CHUNK, True)


def bsam_update_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                 precisions: List[Tensor], momenta: List[Tensor], accums: List[Tensor], lr: float,
                 beta1: float, beta2: float, delta: float, gamma: float, accum_scale: float,
                 released_order: bool, found_inf: Optional[Tensor] = None) -> None:
    accum = len(accums) > 0  # the m-sharpness / released-order form
    mt.launch(OPS["bsam_update_"], _update_kernel,
              [params, grads, backups, precisions, momenta, accums or None],
              bits=(lr, beta1, 1 - beta1, beta2, 1 - beta2, delta, gamma, accum_scale),
              found_inf=found_inf, ACCUM=accum, RELEASED=bool(released_order) and accum)
