"""Triton kernels for the SAM-variant phases (GSAM, WSAM, LookSAM, FriendlySAM; docs/spec.md
"SAM variants"; reference.py: samv_dots, samv_perturb_, samv_restore_sgd_, samv_restore_adam_),
on the skeleton of ``_multi_tensor``.

Launches per phase (G = number of dtype groups, usually 1):
  samv_dots           G launches writing 3 float64 partials per program + one torch ``sum``
  samv_perturb_       G launches   (reads w, g, [m]; writes backup, w, [saved], [m])
  samv_restore_sgd_   G launches   (reads backup, g, s, [buf]; writes w, [buf], [out])
  samv_restore_adam_  G launches   (reads backup, g, s, m, v; writes w, m, v, [out])
The norm and the six restore coefficients are device tensors read by every program: no host
sync.  found_inf selects the skip form on the device, as in ``sam``.
"""
from typing import List, Optional


import triton
import triton.language as tl
from torch import Tensor
import torch

from samkernels.ops._spec import OPS
from samkernels.triton import _multi_tensor as mt
from samkernels.triton.sam import adam_scalars, adam_step, sgd_step
from samkernels.triton._multi_tensor import (chunk_apply, chunk_ptrs, div, fp_arg, fp_args, load,
                                             load_flag, store)


# --------------------------------------------------------------------------------------------
# samv_dots: [<u,u>, <u,b>, <b,b>], u = a - shift b, float64
# --------------------------------------------------------------------------------------------
@triton.jit
def _dots_block(base, n, a, b, shift, SHIFT: tl.constexpr, BLOCK: tl.constexpr,
                MASKED: tl.constexpr):
    offs = base + tl.arange(0, BLOCK)
    y = load(b, offs, n, MASKED).to(tl.float64)  # masked lanes load 0 and add 0
    u = load(a, offs, n, MASKED).to(tl.float64)
    if SHIFT:
        u = u - shift * y
    return u * u, u * y, y * y


@triton.jit(do_not_specialize=["shift_bits"])
def _dots_kernel(work, numel, a_tab, b_tab, partials, shift_bits: tl.int64,
                 A_DT: tl.constexpr, B_DT: tl.constexpr, SHIFT: tl.constexpr,
                 ALIGNED: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
                 CHUNK: tl.constexpr):
    _, start, n, ptrs = chunk_ptrs(work, numel, (a_tab, b_tab), (A_DT, B_DT), ALIGNED)
    a, b = ptrs
    shift = fp_arg(shift_bits, tl.float64)
    uu = tl.zeros([BLOCK], tl.float64)
    ub = tl.zeros([BLOCK], tl.float64)
    bb = tl.zeros([BLOCK], tl.float64)
    if start + CHUNK <= n:
        for k in tl.static_range(CHUNK // BLOCK):
            x, y, z = _dots_block(start + k * BLOCK, n, a, b, shift, SHIFT, BLOCK, False)
            uu += x
            ub += y
            bb += z
    else:
        for k in tl.static_range(CHUNK // BLOCK):
            x, y, z = _dots_block(start + k * BLOCK, n, a, b, shift, SHIFT, BLOCK, True)
            uu += x
            ub += y
            bb += z
    slot = partials + 3 * tl.program_id(0).to(tl.int64)
    tl.store(slot, tl.sum(uu, axis=0))
    tl.store(slot + 1, tl.sum(ub, axis=0))
    tl.store(slot + 2, tl.sum(bb, axis=0))


def samv_dots(lhs: List[Tensor], rhs: List[Tensor], shift: float) -> Tensor:
    return mt.launch(OPS["samv_dots"], _dots_kernel, [lhs, rhs], bits=(shift,), sums=3,
                     SHIFT=shift != 0)


# --------------------------------------------------------------------------------------------
# samv_perturb_: backup <- w, [s <- g], [FriendlySAM m], w <- w + rho T^2 u / (norm + eps)
# --------------------------------------------------------------------------------------------
@triton.jit
def _perturb_body(base, n, ptrs, args, OPT: tl.constexpr, MATH: tl.constexpr,
                  BLOCK: tl.constexpr, MASKED: tl.constexpr):
    p, g, b, s, m = ptrs
    scale, eta, sigma, lmbda, one_minus_lmbda = args
    ADAPTIVE: tl.constexpr = OPT[0]
    HAS_S: tl.constexpr = OPT[1]
    HAS_M: tl.constexpr = OPT[2]
    FIRST: tl.constexpr = OPT[3]
    offs = base + tl.arange(0, BLOCK)
    w_raw = load(p, offs, n, MASKED)
    store(b, offs, w_raw, n, MASKED)  # the mean weights, bit-exact
    w = w_raw.to(MATH)
    u = load(g, offs, n, MASKED).to(MATH)
    if HAS_S:
        store(s, offs, u, n, MASKED)
    if HAS_M:
        if FIRST:
            store(m, offs, u, n, MASKED)
        else:
            mm = load(m, offs, n, MASKED).to(MATH)
            store(m, offs, lmbda * mm + one_minus_lmbda * u, n, MASKED)
            u = u - sigma * mm
    if ADAPTIVE:
        tw = tl.abs(w) + eta
        u = u * (tw * tw)
    store(p, offs, w + u * scale, n, MASKED)


@triton.jit(do_not_specialize=["rho_bits", "eps_bits", "eta_bits", "sigma_bits", "lmbda_bits",
                               "oml_bits"])
def _perturb_kernel(work, numel, flag, p_tab, g_tab, b_tab, s_tab, m_tab, norm,
                    rho_bits: tl.int64, eps_bits: tl.int64, eta_bits: tl.int64,
                    sigma_bits: tl.int64, lmbda_bits: tl.int64, oml_bits: tl.int64,
                    P_DT: tl.constexpr, G_DT: tl.constexpr, B_DT: tl.constexpr,
                    S_DT: tl.constexpr, M_DT: tl.constexpr, ADAPTIVE: tl.constexpr,
                    HAS_S: tl.constexpr, HAS_M: tl.constexpr, FIRST: tl.constexpr,
                    HAS_FLAG: tl.constexpr, ALIGNED: tl.constexpr, MATH: tl.constexpr,
                    BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    _, start, n, ptrs = chunk_ptrs(work, numel, (p_tab, g_tab, b_tab, s_tab, m_tab),
                                   (P_DT, G_DT, B_DT, S_DT, M_DT), ALIGNED)
    rho, eps, eta, sigma, lmbda, oml = fp_args(
        (rho_bits, eps_bits, eta_bits, sigma_bits, lmbda_bits, oml_bits), MATH)
    scale = div(rho, tl.load(norm).to(MATH) + eps)  # the norm read on the device
    # found_inf: backup <- w only, w and the state stay
    chunk_apply(_perturb_body, start, n, ptrs, (scale, eta, sigma, lmbda, oml),
                (ADAPTIVE, HAS_S, HAS_M, FIRST), load_flag(flag, HAS_FLAG), (0, 2), MATH, BLOCK,
                CHUNK, True)


def samv_perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                  saved: List[Tensor], momenta: List[Tensor], norm: Tensor, rho: float,
                  eps: float, adaptive: bool, eta: float, sigma: float, lmbda: float,
                  first: bool, found_inf: Optional[Tensor] = None) -> None:
    _check_one("samv_perturb_", "norm", norm, params)
    mt.launch(OPS["samv_perturb_"], _perturb_kernel,
              [params, grads, backups, saved or None, momenta or None],
              bits=(rho, eps, eta, sigma, lmbda, 1.0 - lmbda), found_inf=found_inf, norm=norm,
              ADAPTIVE=bool(adaptive), HAS_S=bool(saved), HAS_M=bool(momenta),
              FIRST=bool(first))


def _check_one(op: str, name: str, t: Tensor, params: List[Tensor], numel: int = 1) -> None:
    if t.numel() != numel:
        raise ValueError(f"{op}: {name} must hold {numel} value{'s' if numel > 1 else ''}, got "
                         f"shape {list(t.shape)}")
    if params and t.device != params[0].device:
        raise ValueError(f"{op}: {name} is on {t.device} but the parameters are on "
                         f"{params[0].device}")


def _coeffs(op: str, coeffs: Tensor, params: List[Tensor]) -> Tensor:
    _check_one(op, "coeffs", coeffs, params, 6)
    return coeffs.to(torch.float64)


@triton.jit
def _mix(c, j: tl.constexpr, g, s):
    return c[j] * g + c[j + 1] * s


@triton.jit
def _load_coeffs(coef, MATH: tl.constexpr):
    return (tl.load(coef).to(MATH), tl.load(coef + 1).to(MATH), tl.load(coef + 2).to(MATH),
            tl.load(coef + 3).to(MATH), tl.load(coef + 4).to(MATH), tl.load(coef + 5).to(MATH))


@triton.jit
def _restore_inputs(base, b, g, s, n, MATH: tl.constexpr, BLOCK: tl.constexpr,
                    MASKED: tl.constexpr):
    """What both restores start from: the offsets, the mean weights and the mix's g and saved."""
    offs = base + tl.arange(0, BLOCK)
    w = load(b, offs, n, MASKED).to(MATH)
    return offs, w, load(g, offs, n, MASKED).to(MATH), load(s, offs, n, MASKED).to(MATH)


@triton.jit
def _restore_outputs(p, out, w, c, gg, ss, offs, n, HAS_OUT: tl.constexpr, MASKED: tl.constexpr):
    """How both restores end, after the base step w: w + c2 g + c3 s, [out = c4 g + c5 s]."""
    if HAS_OUT:
        store(out, offs, _mix(c, 4, gg, ss), n, MASKED)
    store(p, offs, w + _mix(c, 2, gg, ss), n, MASKED)


# --------------------------------------------------------------------------------------------
# samv_restore_sgd_: w <- backup, SGD with d = c0 g + c1 s, w += c2 g + c3 s, out = c4 g + c5 s
# --------------------------------------------------------------------------------------------
@triton.jit
def _sgd_body(base, n, ptrs, args, OPT: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
              MASKED: tl.constexpr):
    p, g, b, s, buf, out = ptrs
    lr, wd, momentum, one_minus_damp, c = args
    WD: tl.constexpr = OPT[0]
    MOMENTUM: tl.constexpr = OPT[1]
    NESTEROV: tl.constexpr = OPT[2]
    FIRST: tl.constexpr = OPT[3]
    HAS_OUT: tl.constexpr = OPT[4]
    offs, w, gg, ss = _restore_inputs(base, b, g, s, n, MATH, BLOCK, MASKED)
    w = sgd_step(w, _mix(c, 0, gg, ss), buf, offs, n, lr, wd, momentum, one_minus_damp, WD,
                 MOMENTUM, NESTEROV, FIRST, MATH, MASKED)  # triton/sam.py, d = c0 g + c1 s
    _restore_outputs(p, out, w, c, gg, ss, offs, n, HAS_OUT, MASKED)


@triton.jit(do_not_specialize=["lr_bits", "wd_bits", "mom_bits", "omd_bits"])
def _sgd_kernel(work, numel, flag, p_tab, g_tab, b_tab, s_tab, m_tab, o_tab, coef,
                lr_bits: tl.int64, wd_bits: tl.int64, mom_bits: tl.int64, omd_bits: tl.int64,
                P_DT: tl.constexpr, G_DT: tl.constexpr, B_DT: tl.constexpr, S_DT: tl.constexpr,
                M_DT: tl.constexpr, O_DT: tl.constexpr, WD: tl.constexpr,
                MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, FIRST: tl.constexpr,
                HAS_OUT: tl.constexpr, HAS_FLAG: tl.constexpr, ALIGNED: tl.constexpr,
                MATH: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    _, start, n, ptrs = chunk_ptrs(work, numel, (p_tab, g_tab, b_tab, s_tab, m_tab, o_tab),
                                   (P_DT, G_DT, B_DT, S_DT, M_DT, O_DT), ALIGNED)
    lr, wd, mom, omd = fp_args((lr_bits, wd_bits, mom_bits, omd_bits), MATH)
    # found_inf: w <- backup, the buffers and outs stay
    chunk_apply(_sgd_body, start, n, ptrs, (lr, wd, mom, omd, _load_coeffs(coef, MATH)),
                (WD, MOMENTUM, NESTEROV, FIRST, HAS_OUT), load_flag(flag, HAS_FLAG), (2, 0),
                MATH, BLOCK, CHUNK, True)


def samv_restore_sgd_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                      saved: List[Tensor], momentum_bufs: List[Tensor], outs: List[Tensor],
                      coeffs: Tensor, lr: float, momentum: float, dampening: float,
                      nesterov: bool, weight_decay: float, first: bool,
                      found_inf: Optional[Tensor] = None) -> None:
    use_buf = momentum != 0
    mt.launch(OPS["samv_restore_sgd_"], _sgd_kernel,
              [params, grads, backups, saved, momentum_bufs if use_buf else None, outs or None],
              bits=(lr, weight_decay, momentum, 1 - dampening), found_inf=found_inf,
              norm=_coeffs("samv_restore_sgd_", coeffs, params), WD=weight_decay != 0,
              MOMENTUM=use_buf, NESTEROV=bool(nesterov) and use_buf, FIRST=bool(first),
              HAS_OUT=bool(outs))


# --------------------------------------------------------------------------------------------
# samv_restore_adam_: w <- backup, Adam / AdamW with d = c0 g + c1 s, then as the SGD one
# --------------------------------------------------------------------------------------------
@triton.jit
def _adam_body(base, n, ptrs, args, OPT: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
               MASKED: tl.constexpr):
    p, g, b, s, m, v, out = ptrs
    step_size, beta1, one_minus_b1, beta2, one_minus_b2, sqrt_bc2, eps, wd, decay, c = args
    WD: tl.constexpr = OPT[0]
    DECOUPLED: tl.constexpr = OPT[1]
    HAS_OUT: tl.constexpr = OPT[2]
    offs, w, gg, ss = _restore_inputs(base, b, g, s, n, MATH, BLOCK, MASKED)
    w = adam_step(w, _mix(c, 0, gg, ss), m, v, offs, n, step_size, beta1, one_minus_b1, beta2,
                  one_minus_b2, sqrt_bc2, eps, wd, decay, WD, DECOUPLED, MATH,
                  MASKED)  # triton/sam.py, d = c0 g + c1 s
    _restore_outputs(p, out, w, c, gg, ss, offs, n, HAS_OUT, MASKED)


@triton.jit(do_not_specialize=["step_lo", "step_hi", "lr_bits", "b1_bits", "omb1_bits",
                               "b2_bits", "omb2_bits", "eps_bits", "wd_bits", "decay_bits"],
            do_not_specialize_on_alignment=["device_step"])
def _adam_kernel(work, numel, flag, device_step, p_tab, g_tab, b_tab, s_tab, m_tab, v_tab, o_tab,
                 coef, step_lo: tl.int32, step_hi: tl.int32, lr_bits: tl.int64,
                 b1_bits: tl.int64, omb1_bits: tl.int64, b2_bits: tl.int64, omb2_bits: tl.int64,
                 eps_bits: tl.int64, wd_bits: tl.int64, decay_bits: tl.int64,
                 P_DT: tl.constexpr, G_DT: tl.constexpr, B_DT: tl.constexpr, S_DT: tl.constexpr,
                 M_DT: tl.constexpr, V_DT: tl.constexpr, O_DT: tl.constexpr, WD: tl.constexpr,
                 DECOUPLED: tl.constexpr, HAS_OUT: tl.constexpr, HAS_FLAG: tl.constexpr,
                 ALIGNED: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
                 CHUNK: tl.constexpr):
    _, start, n, ptrs = chunk_ptrs(work, numel, (p_tab, g_tab, b_tab, s_tab, m_tab, v_tab, o_tab),
                                   (P_DT, G_DT, B_DT, S_DT, M_DT, V_DT, O_DT), ALIGNED)
    step_size, sqrt_bc2 = adam_scalars(lr_bits, b1_bits, b2_bits, step_lo, step_hi, device_step,
                                       MATH)
    b1, omb1, b2, omb2, eps, wd, decay = fp_args((b1_bits, omb1_bits, b2_bits, omb2_bits,
                                                  eps_bits, wd_bits, decay_bits), MATH)
    args = (step_size, b1, omb1, b2, omb2, sqrt_bc2, eps, wd, decay, _load_coeffs(coef, MATH))
    # found_inf: w <- backup, the moments and outs stay
    chunk_apply(_adam_body, start, n, ptrs, args, (WD, DECOUPLED, HAS_OUT),
                load_flag(flag, HAS_FLAG), (2, 0), MATH, BLOCK, CHUNK, True)


def samv_restore_adam_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                       saved: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                       outs: List[Tensor], coeffs: Tensor, step: int, lr: float, beta1: float,
                       beta2: float, eps: float, weight_decay: float, decoupled: bool,
                       found_inf: Optional[Tensor] = None,
                       device_step: Optional[Tensor] = None) -> None:
    # a step on the device cannot be checked here: the capturable optimizers count from 1
    if step < 1 and device_step is None:
        raise ValueError(f"samv_restore_adam_: step counts from 1, got {step}")
    mt.launch(OPS["samv_restore_adam_"], _adam_kernel,
              [params, grads, backups, saved, exp_avgs, exp_avg_sqs, outs or None],
              words=mt.u32_words(step),
              bits=(lr, beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay,
                    1 - lr * weight_decay),
              found_inf=found_inf, steps=(device_step,),
              norm=_coeffs("samv_restore_adam_", coeffs, params), WD=weight_decay != 0,
              DECOUPLED=bool(decoupled), HAS_OUT=bool(outs))
