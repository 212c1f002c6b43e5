"""Triton kernels for the SAM / ASAM phases (docs/spec.md "SAM", "ASAM"; reference.py:
grad_sumsq, sam_perturb_, sam_restore_sgd_, sam_restore_adam_), on the skeleton of
``_multi_tensor`` (each function here implements ``samkernels::triton_<name>``).

Launches per phase (G = number of dtype groups, usually 1):
  grad_sumsq          G partial-sum launches + one torch ``sum`` over the partials (no atomics);
                      float64 throughout, a 0-dim float64 result (as every backend)
  nonfinite_flag      G partial-count launches + the sum, compared with 0 (a float32 flag)
  sam_perturb_        grad_sumsq + sqrt when grad_norm is None, then G apply launches
  sam_restore_sgd_    G launches   (reads backup, g, [buf]; writes w, [buf])
  sam_restore_adam_   G launches   (reads backup, g, m, v; writes w, m, v)
Every element is read and written once per launch; maths in fp32 (fp64 for fp64 params).

found_inf (the optimizer's non-finite-gradient flag, a one-element device tensor): each program
loads it and, when it is nonzero, runs the *skip form* instead -- sam_perturb_ only copies
backup <- w (w untouched), the restores only copy w <- backup (state untouched).  The decision is
taken on the device: the host never reads the flag.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from samkernels.ops._spec import OPS
from samkernels.triton import _multi_tensor as mt
from samkernels.triton._multi_tensor import (at_step, chunk_apply, chunk_ptrs, chunk_sum, div,
                                             fp_arg, fp_args, load, load_flag, sqrt, store)


# --------------------------------------------------------------------------------------------
# grad_sumsq: sum ||T g||^2, T = |w| + eta (ASAM) or 1 (SAM)
# --------------------------------------------------------------------------------------------
@triton.jit
def _sumsq_body(base, n, ptrs, args, OPT: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
                MASKED: tl.constexpr):
    p, g = ptrs
    eta, = args
    ADAPTIVE: tl.constexpr = OPT[0]
    offs = base + tl.arange(0, BLOCK)
    tg = load(g, offs, n, MASKED).to(MATH)  # masked lanes load 0 and add 0
    if ADAPTIVE:
        tg = tg * (tl.abs(load(p, offs, n, MASKED).to(MATH)) + eta)
    return tg * tg


@triton.jit(do_not_specialize=["eta_bits"])
def _sumsq_kernel(work, numel, p_tab, g_tab, partials, eta_bits: tl.int64,
                  P_DT: tl.constexpr, G_DT: tl.constexpr, ADAPTIVE: tl.constexpr,
                  ALIGNED: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
                  CHUNK: tl.constexpr):
    _, start, n, ptrs = chunk_ptrs(work, numel, (p_tab, g_tab), (P_DT, G_DT), ALIGNED)
    # float64 whatever the dtypes (MATH, the update maths of the group, is not used): squares of
    # fp32 values are exact there and cannot overflow, as in the reference and the C++/CUDA
    # kernels, and the partial is a float64 slot
    eta = fp_arg(eta_bits, tl.float64)
    tl.store(partials + tl.program_id(0),
             chunk_sum(_sumsq_body, start, n, ptrs, (eta,), (ADAPTIVE,), BLOCK, CHUNK))


def grad_sumsq(params: List[Tensor], grads: List[Tensor], adaptive: bool, eta: float) -> Tensor:
    """The norm contract of every backend: squares and sums in float64 (an fp32 accumulator
    overflows for |g| > 1.8e19 and loses digits on large models) and a 0-dim float64 result."""
    # params are only read for ASAM (ADAPTIVE), but checked against the grads for both
    return mt.launch(OPS["grad_sumsq"], _sumsq_kernel, [params, grads], bits=(eta,), sums=True,
                     ADAPTIVE=bool(adaptive))


# --------------------------------------------------------------------------------------------
# nonfinite_flag: 1.0 if some gradient element is inf or NaN
# --------------------------------------------------------------------------------------------
@triton.jit
def _nonfinite_body(base, n, ptrs, args, OPT: tl.constexpr, MATH: tl.constexpr,
                    BLOCK: tl.constexpr, MASKED: tl.constexpr):
    g, = ptrs
    # widened (exactly: MATH is float64 here) before comparing: the interpreter compares bf16
    # by its bits, where a NaN equals itself; masked lanes load 0, a finite value
    x = load(g, tl.arange(0, BLOCK) + base, n, MASKED).to(MATH)
    bad = (x != x) | (tl.abs(x) == float("inf"))
    return tl.where(bad, 1.0, 0.0).to(MATH)


@triton.jit
def _nonfinite_kernel(work, numel, g_tab, partials, G_DT: tl.constexpr, ALIGNED: tl.constexpr,
                      MATH: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    _, start, n, ptrs = chunk_ptrs(work, numel, (g_tab,), (G_DT,), ALIGNED)
    # the partial counts the chunk's non-finite elements (exact in float64)
    tl.store(partials + tl.program_id(0), chunk_sum(_nonfinite_body, start, n, ptrs, (), (),
                                                    BLOCK, CHUNK))


def nonfinite_flag(grads: List[Tensor]) -> Tensor:
    """A 0-dim float32 1.0 / 0.0: the count of non-finite elements (partials summed in float64)
    compared with 0."""
    count = mt.launch(OPS["nonfinite_flag"], _nonfinite_kernel, [grads], sums=True)
    return (count > 0).to(torch.float32)


# --------------------------------------------------------------------------------------------
# sam_perturb_: backup <- w;  w <- w + e,  e = rho g / (||g|| + eps)  or  rho T^2 g / (||Tg|| + eps)
# --------------------------------------------------------------------------------------------
@triton.jit
def _perturb_body(base, n, ptrs, args, OPT: tl.constexpr, MATH: tl.constexpr,
                  BLOCK: tl.constexpr, MASKED: tl.constexpr):
    p, g, b = ptrs
    scale, eta = args
    ADAPTIVE: tl.constexpr = OPT[0]
    offs = base + tl.arange(0, BLOCK)
    w_raw = load(p, offs, n, MASKED)
    store(b, offs, w_raw, n, MASKED)  # the mean weights, bit-exact (restore is a copy)
    w = w_raw.to(MATH)
    gg = load(g, offs, n, MASKED).to(MATH)
    if ADAPTIVE:
        tw = tl.abs(w) + eta
        e = gg * (tw * tw) * scale  # ASAM: T^2 g, T = |w| + eta
    else:
        e = gg * scale
    store(p, offs, w + e, n, MASKED)


@triton.jit(do_not_specialize=["rho_bits", "eps_bits", "eta_bits"])
def _perturb_kernel(work, numel, flag, p_tab, g_tab, b_tab, norm, rho_bits: tl.int64,
                    eps_bits: tl.int64, eta_bits: tl.int64,
                    P_DT: tl.constexpr, G_DT: tl.constexpr, B_DT: tl.constexpr,
                    ADAPTIVE: tl.constexpr, HAS_FLAG: tl.constexpr, ALIGNED: tl.constexpr,
                    MATH: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    _, start, n, ptrs = chunk_ptrs(work, numel, (p_tab, g_tab, b_tab), (P_DT, G_DT, B_DT),
                                   ALIGNED)
    rho, eps, eta = fp_args((rho_bits, eps_bits, eta_bits), MATH)
    # the norm stays on the device: read it here instead of syncing for a host scalar
    scale = div(rho, tl.load(norm).to(MATH) + eps)
    # found_inf: backup <- w only, w stays unperturbed
    chunk_apply(_perturb_body, start, n, ptrs, (scale, eta), (ADAPTIVE,),
                load_flag(flag, HAS_FLAG), (0, 2), MATH, BLOCK, CHUNK, True)


def sam_perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                 grad_norm: Optional[Tensor], rho: float, eps: float, adaptive: bool, eta: float,
                 found_inf: Optional[Tensor] = None) -> Tensor:
    # no norm given: it stays on the device (partial sums -> sum -> sqrt, float64), no sync
    norm = grad_sumsq(params, grads, adaptive, eta).sqrt() if grad_norm is None else grad_norm
    mt.launch(OPS["sam_perturb_"], _perturb_kernel, [params, grads, backups],
              bits=(rho, eps, eta), found_inf=found_inf, norm=norm, ADAPTIVE=bool(adaptive))
    return mt.norm_result(norm, grad_norm)


# --------------------------------------------------------------------------------------------
# sam_restore_sgd_: w <- backup, then torch.optim.SGD with g_e
# --------------------------------------------------------------------------------------------
@triton.jit
def sgd_step(w, d, buf, offs, n, lr, wd, momentum, one_minus_damp, WD: tl.constexpr,
             MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, FIRST: tl.constexpr,
             MATH: tl.constexpr, MASKED: tl.constexpr):
    """torch.optim.SGD's step from w with gradient d, the momentum buffer ``buf`` written: the
    new w (also the base step of the SAM variants, triton/samv.py)."""
    if WD:
        d = d + wd * w
    if MOMENTUM:
        if FIRST:  # torch.optim.SGD: an uninitialised buffer takes d, nothing to read
            new = d
        else:
            new = load(buf, offs, n, MASKED).to(MATH) * momentum + one_minus_damp * d
        store(buf, offs, new, n, MASKED)
        if NESTEROV:
            d = d + momentum * new
        else:
            d = new
    return w - lr * d


@triton.jit
def _sgd_body(base, n, ptrs, args, OPT: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
              MASKED: tl.constexpr):
    p, g, b, buf = ptrs
    lr, wd, momentum, one_minus_damp = args
    WD: tl.constexpr = OPT[0]
    MOMENTUM: tl.constexpr = OPT[1]
    NESTEROV: tl.constexpr = OPT[2]
    FIRST: tl.constexpr = OPT[3]
    offs = base + tl.arange(0, BLOCK)
    w = load(b, offs, n, MASKED).to(MATH)  # restore: w is the backup, the perturbed p is not read
    d = load(g, offs, n, MASKED).to(MATH)
    store(p, offs, sgd_step(w, d, buf, offs, n, lr, wd, momentum, one_minus_damp, WD, MOMENTUM,
                            NESTEROV, FIRST, MATH, MASKED), n, MASKED)


@triton.jit(do_not_specialize=["lr_bits", "wd_bits", "mom_bits", "omd_bits"])
def _sgd_kernel(work, numel, flag, p_tab, g_tab, b_tab, m_tab, lr_bits: tl.int64,
                wd_bits: tl.int64, mom_bits: tl.int64, omd_bits: tl.int64,
                P_DT: tl.constexpr, G_DT: tl.constexpr, B_DT: tl.constexpr, M_DT: tl.constexpr,
                WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                FIRST: tl.constexpr, HAS_FLAG: tl.constexpr, ALIGNED: tl.constexpr,
                MATH: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    _, start, n, ptrs = chunk_ptrs(work, numel, (p_tab, g_tab, b_tab, m_tab),
                                   (P_DT, G_DT, B_DT, M_DT), ALIGNED)
    # found_inf: w <- backup, the buffers stay
    chunk_apply(_sgd_body, start, n, ptrs, fp_args((lr_bits, wd_bits, mom_bits, omd_bits), MATH),
                (WD, MOMENTUM, NESTEROV, FIRST), load_flag(flag, HAS_FLAG), (2, 0), MATH, BLOCK,
                CHUNK, True)


def sam_restore_sgd_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                     momentum_bufs: List[Tensor], lr: float, momentum: float, dampening: float,
                     nesterov: bool, weight_decay: float, first: bool,
                     found_inf: Optional[Tensor] = None) -> None:
    use_buf = momentum != 0
    mt.launch(OPS["sam_restore_sgd_"], _sgd_kernel,
              [params, grads, backups, momentum_bufs if use_buf else None],
              bits=(lr, weight_decay, momentum, 1 - dampening), found_inf=found_inf,
              WD=weight_decay != 0, MOMENTUM=use_buf, NESTEROV=bool(nesterov) and use_buf,
              FIRST=bool(first))


# --------------------------------------------------------------------------------------------
# sam_restore_adam_: w <- backup, then Adam (L2) / AdamW (decoupled) with g_e
# --------------------------------------------------------------------------------------------
@triton.jit
def adam_step(w, d, m, v, offs, n, step_size, beta1, one_minus_b1, beta2, one_minus_b2, sqrt_bc2,
              eps, wd, decay, WD: tl.constexpr, DECOUPLED: tl.constexpr, MATH: tl.constexpr,
              MASKED: tl.constexpr):
    """Adam's (AdamW's with DECOUPLED) step from w with gradient d, the moments m, v written:
    the new w (also the base step of the SAM variants, triton/samv.py)."""
    if WD:
        if DECOUPLED:
            w = w * decay  # AdamW: w (1 - lr wd)
        else:
            d = d + wd * w
    m_new = beta1 * load(m, offs, n, MASKED).to(MATH) + one_minus_b1 * d
    v_new = beta2 * load(v, offs, n, MASKED).to(MATH) + one_minus_b2 * d * d
    store(m, offs, m_new, n, MASKED)
    store(v, offs, v_new, n, MASKED)
    denom = div(sqrt(v_new), sqrt_bc2) + eps
    return w - div(step_size * m_new, denom)


@triton.jit
def adam_scalars(lr_bits, b1_bits, b2_bits, step_lo, step_hi, device_step, MATH: tl.constexpr):
    """(lr / (1 - beta1^t), sqrt(1 - beta2^t)) at t = step + *device_step (``at_step``), in
    double and then rounded to MATH, as the reference forms them on the host."""
    t = at_step(step_lo, step_hi, device_step).to(tl.int64, bitcast=True)
    lr, beta1, beta2 = fp_args((lr_bits, b1_bits, b2_bits), tl.float64)
    step_size = lr / mt.bias_correction(beta1, t)  # fp64 `/` and sqrt: IEEE-rounded
    return step_size.to(MATH), sqrt(mt.bias_correction(beta2, t)).to(MATH)


@triton.jit
def _adam_body(base, n, ptrs, args, OPT: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
               MASKED: tl.constexpr):
    p, g, b, m, v = ptrs
    step_size, beta1, one_minus_b1, beta2, one_minus_b2, sqrt_bc2, eps, wd, decay = args
    WD: tl.constexpr = OPT[0]
    DECOUPLED: tl.constexpr = OPT[1]
    offs = base + tl.arange(0, BLOCK)
    w = load(b, offs, n, MASKED).to(MATH)
    d = load(g, offs, n, MASKED).to(MATH)
    store(p, offs, adam_step(w, d, m, v, offs, n, step_size, beta1, one_minus_b1, beta2,
                             one_minus_b2, sqrt_bc2, eps, wd, decay, WD, DECOUPLED, MATH, MASKED),
          n, MASKED)


@triton.jit(do_not_specialize=["step_lo", "step_hi", "lr_bits", "b1_bits", "omb1_bits",
                               "b2_bits", "omb2_bits", "eps_bits", "wd_bits", "decay_bits"],
            do_not_specialize_on_alignment=["device_step"])
def _adam_kernel(work, numel, flag, device_step, p_tab, g_tab, b_tab, m_tab, v_tab,
                 step_lo: tl.int32, step_hi: tl.int32, lr_bits: tl.int64, b1_bits: tl.int64,
                 omb1_bits: tl.int64, b2_bits: tl.int64, omb2_bits: tl.int64,
                 eps_bits: tl.int64, wd_bits: tl.int64, decay_bits: tl.int64,
                 P_DT: tl.constexpr, G_DT: tl.constexpr, B_DT: tl.constexpr, M_DT: tl.constexpr,
                 V_DT: tl.constexpr, WD: tl.constexpr, DECOUPLED: tl.constexpr,
                 HAS_FLAG: tl.constexpr, ALIGNED: tl.constexpr, MATH: tl.constexpr,
                 BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    _, start, n, ptrs = chunk_ptrs(work, numel, (p_tab, g_tab, b_tab, m_tab, v_tab),
                                   (P_DT, G_DT, B_DT, M_DT, V_DT), ALIGNED)
    step_size, sqrt_bc2 = adam_scalars(lr_bits, b1_bits, b2_bits, step_lo, step_hi, device_step,
                                       MATH)
    b1, omb1, b2, omb2, eps, wd, decay = fp_args((b1_bits, omb1_bits, b2_bits, omb2_bits,
                                                  eps_bits, wd_bits, decay_bits), MATH)
    args = (step_size, b1, omb1, b2, omb2, sqrt_bc2, eps, wd, decay)
    # found_inf: w <- backup, the moments stay
    chunk_apply(_adam_body, start, n, ptrs, args, (WD, DECOUPLED), load_flag(flag, HAS_FLAG),
                (2, 0), MATH, BLOCK, CHUNK, True)


def sam_restore_adam_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                      exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], step: int, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float,
                      decoupled: bool, found_inf: Optional[Tensor] = None,
                      device_step: Optional[Tensor] = None) -> None:
    # the bias corrections depend on the step, which may live on the device: adam_scalars
    mt.launch(OPS["sam_restore_adam_"], _adam_kernel,
              [params, grads, backups, exp_avgs, exp_avg_sqs], words=mt.u32_words(step),
              bits=(lr, beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay,
                    1 - lr * weight_decay),
              found_inf=found_inf, steps=(device_step,), WD=weight_decay != 0,
              DECOUPLED=bool(decoupled))
