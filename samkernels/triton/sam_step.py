"""Triton kernels for the SAM / ASAM phases (docs/spec.md "SAM family"; reference.py: grad_sumsq,
sam_perturb_, sam_restore_sgd_, sam_restore_adam_).

Launches per phase (G = number of dtype groups, usually 1):
  grad_sumsq          G partial-sum launches + one torch ``sum`` over the partials (no atomics);
                      float64 throughout, a 0-dim float64 result (as every backend)
  sam_perturb_        grad_sumsq + sqrt when grad_norm is None, then G apply launches
  sam_restore_sgd_    G launches   (reads backup, g, [buf]; writes w, [buf])
  sam_restore_adam_   G launches   (reads backup, g, m, v; writes w, m, v)
Every element is read and written once per launch; maths in fp32 (fp64 for fp64 params).

found_inf (the optimizer's non-finite-gradient flag, a one-element device tensor): each program
loads it and, when it is nonzero, runs the *skip form* instead -- sam_perturb_ only copies
backup <- w (w untouched), the restores only copy w <- backup (state untouched).  The decision is
taken on the device: the host never reads the flag.
"""
import math
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from samkernels.triton import _multi_tensor as mt
from samkernels.triton._multi_tensor import (chunk_of, copy_chunk, div, fp_arg, load, load_flag,
                                                sqrt, store, tensor_ptr)


# --------------------------------------------------------------------------------------------
# grad_sumsq: sum ||T g||^2, T = |w| + eta (ASAM) or 1 (SAM)
# --------------------------------------------------------------------------------------------
@triton.jit
def _sumsq_block(offs, n, p, g, eta, ADAPTIVE: tl.constexpr, MATH: tl.constexpr,
                 MASKED: tl.constexpr):
    tg = load(g, offs, n, MASKED).to(MATH)  # masked lanes load 0 and add 0
    if ADAPTIVE:
        tg = tg * (tl.abs(load(p, offs, n, MASKED).to(MATH)) + eta)
    return tg * tg


@triton.jit(do_not_specialize=["eta_bits"])
def _sumsq_kernel(work, numel, p_tab, g_tab, partials, eta_bits: tl.int64,
                  P_DT: tl.constexpr, G_DT: tl.constexpr, ADAPTIVE: tl.constexpr,
                  ALIGNED: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr,
                  CHUNK: tl.constexpr):
    t, start, n = chunk_of(work, numel)
    p = tensor_ptr(p_tab, t, P_DT, ALIGNED)
    g = tensor_ptr(g_tab, t, G_DT, ALIGNED)
    # float64 whatever the dtypes (MATH, the update maths of the group, is not used): squares of
    # fp32 values are exact there and cannot overflow, as in the reference and the C++/CUDA
    # kernels, and the partial is a float64 slot
    eta = fp_arg(eta_bits, tl.float64)
    acc = tl.zeros([BLOCK], tl.float64)
    if start + CHUNK <= n:
        for k in tl.static_range(CHUNK // BLOCK):
            acc += _sumsq_block(start + k * BLOCK + tl.arange(0, BLOCK), n, p, g, eta, ADAPTIVE,
                                tl.float64, False)
    else:
        for k in tl.static_range(CHUNK // BLOCK):
            acc += _sumsq_block(start + k * BLOCK + tl.arange(0, BLOCK), n, p, g, eta, ADAPTIVE,
                                tl.float64, True)
    # one slot per program, summed by the host-free second pass: deterministic, no atomics
    tl.store(partials + tl.program_id(0), tl.sum(acc, axis=0))


def _grad_sumsq(params: List[Tensor], grads: List[Tensor], adaptive: bool, eta: float) -> Tensor:
    """The norm contract of every backend: squares and sums in float64 (an fp32 accumulator
    overflows for |g| > 1.8e19 and loses digits on large models) and a 0-dim float64 result."""
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    # params are only read for ASAM; SAM's plan covers the grads alone
    lists = [params, grads] if adaptive else [grads, grads]
    with mt.device_guard(grads[0].device), mt.contiguous(lists, mutated=()) as lists:
        plan = mt.plan_for(lists)
        partials = torch.empty(max(plan.n_chunks, 1), dtype=torch.float64,
                               device=grads[0].device)
        if plan.n_chunks == 0:
            partials.zero_()
        for grp in plan.groups:
            for grid, work, lo in grp.launches():
                _sumsq_kernel[grid](work, grp.numel, grp.tab(0), grp.tab(1),
                                    partials[grp.chunk_offset + lo:], mt.f64_bits(eta),
                                    P_DT=grp.tl_dtypes[0], G_DT=grp.tl_dtypes[1],
                                    ADAPTIVE=bool(adaptive),
                                    **mt.launch_args(grp))
    # second stage: torch's sum over the per-program partials, on the device (no host sync) and
    # in a fixed order for a given plan (no atomics), so the norm is the same bits every call
    return partials.sum()


# --------------------------------------------------------------------------------------------
# sam_perturb_: backup <- w;  w <- w + e,  e = rho g / (||g|| + eps)  or  rho T^2 g / (||Tg|| + eps)
# --------------------------------------------------------------------------------------------
@triton.jit
def _perturb_block(offs, n, p, g, b, scale, eta, ADAPTIVE: tl.constexpr, MATH: tl.constexpr,
                   MASKED: tl.constexpr):
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
def _perturb_kernel(work, numel, p_tab, g_tab, b_tab, norm, flag, rho_bits: tl.int64,
                    eps_bits: tl.int64, eta_bits: tl.int64,
                    P_DT: tl.constexpr, G_DT: tl.constexpr, B_DT: tl.constexpr,
                    ADAPTIVE: tl.constexpr, HAS_FLAG: tl.constexpr, ALIGNED: tl.constexpr,
                    MATH: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, n = chunk_of(work, numel)
    p = tensor_ptr(p_tab, t, P_DT, ALIGNED)
    g = tensor_ptr(g_tab, t, G_DT, ALIGNED)
    b = tensor_ptr(b_tab, t, B_DT, ALIGNED)
    # the norm stays on the device: read it here instead of syncing for a host scalar
    scale = div(fp_arg(rho_bits, MATH), tl.load(norm).to(MATH) + fp_arg(eps_bits, MATH))
    eta = fp_arg(eta_bits, MATH)
    if load_flag(flag, HAS_FLAG):  # found_inf: backup <- w only, w stays unperturbed
        copy_chunk(p, b, start, n, BLOCK, CHUNK)
    elif start + CHUNK <= n:
        for k in tl.static_range(CHUNK // BLOCK):
            _perturb_block(start + k * BLOCK + tl.arange(0, BLOCK), n, p, g, b, scale, eta,
                           ADAPTIVE, MATH, False)
    else:
        for k in tl.static_range(CHUNK // BLOCK):
            _perturb_block(start + k * BLOCK + tl.arange(0, BLOCK), n, p, g, b, scale, eta,
                           ADAPTIVE, MATH, True)


def _sam_perturb_apply(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                       grad_norm: Tensor, rho: float, eps: float, adaptive: bool, eta: float,
                       found_inf: Optional[Tensor] = None) -> None:
    if not params:
        return
    norm = grad_norm.reshape(1)
    if norm.device != params[0].device:
        norm = norm.to(params[0].device, non_blocking=True)
    with mt.device_guard(params[0].device), \
            mt.contiguous([params, grads, backups], mutated=(0, 2)) as lists:
        plan = mt.plan_for(lists)
        flag, has_flag = mt.flag_arg(found_inf, plan)
        for grp in plan.groups:
            for grid, work, _ in grp.launches():
                _perturb_kernel[grid](work, grp.numel, grp.tab(0), grp.tab(1), grp.tab(2), norm,
                                      flag, mt.f64_bits(rho), mt.f64_bits(eps), mt.f64_bits(eta),
                                      P_DT=grp.tl_dtypes[0], G_DT=grp.tl_dtypes[1],
                                      B_DT=grp.tl_dtypes[2], ADAPTIVE=bool(adaptive),
                                      HAS_FLAG=has_flag, **mt.launch_args(grp))


# --------------------------------------------------------------------------------------------
# sam_restore_sgd_: w <- backup, then torch.optim.SGD with g_e
# --------------------------------------------------------------------------------------------
@triton.jit
def _sgd_block(offs, n, p, g, b, buf, lr, wd, momentum, one_minus_damp,
               WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               FIRST: tl.constexpr, MATH: tl.constexpr, MASKED: tl.constexpr):
    w = load(b, offs, n, MASKED).to(MATH)  # restore: w is the backup, the perturbed p is not read
    d = load(g, offs, n, MASKED).to(MATH)
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
    store(p, offs, w - lr * d, n, MASKED)


@triton.jit(do_not_specialize=["lr_bits", "wd_bits", "mom_bits", "omd_bits"])
def _sgd_kernel(work, numel, p_tab, g_tab, b_tab, m_tab, flag, lr_bits: tl.int64,
                wd_bits: tl.int64, mom_bits: tl.int64, omd_bits: tl.int64,
                P_DT: tl.constexpr, G_DT: tl.constexpr, B_DT: tl.constexpr, M_DT: tl.constexpr,
                WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                FIRST: tl.constexpr, HAS_FLAG: tl.constexpr, ALIGNED: tl.constexpr,
                MATH: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, n = chunk_of(work, numel)
    p = tensor_ptr(p_tab, t, P_DT, ALIGNED)
    g = tensor_ptr(g_tab, t, G_DT, ALIGNED)
    b = tensor_ptr(b_tab, t, B_DT, ALIGNED)
    buf = tensor_ptr(m_tab, t, M_DT, ALIGNED)
    lr = fp_arg(lr_bits, MATH)
    wd = fp_arg(wd_bits, MATH)
    momentum = fp_arg(mom_bits, MATH)
    omd = fp_arg(omd_bits, MATH)
    if load_flag(flag, HAS_FLAG):  # found_inf: w <- backup, the buffers stay
        copy_chunk(b, p, start, n, BLOCK, CHUNK)
    elif start + CHUNK <= n:
        for k in tl.static_range(CHUNK // BLOCK):
            _sgd_block(start + k * BLOCK + tl.arange(0, BLOCK), n, p, g, b, buf, lr, wd, momentum,
                       omd, WD, MOMENTUM, NESTEROV, FIRST, MATH, False)
    else:
        for k in tl.static_range(CHUNK // BLOCK):
            _sgd_block(start + k * BLOCK + tl.arange(0, BLOCK), n, p, g, b, buf, lr, wd, momentum,
                       omd, WD, MOMENTUM, NESTEROV, FIRST, MATH, True)


def _sam_restore_sgd(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                     momentum_bufs: List[Tensor], lr: float, momentum: float, dampening: float,
                     nesterov: bool, weight_decay: float, first: bool,
                     found_inf: Optional[Tensor] = None) -> None:
    if not params:
        return
    use_buf = momentum != 0
    lists = [params, grads, backups] + ([momentum_bufs] if use_buf else [])
    with mt.device_guard(params[0].device), mt.contiguous(lists, mutated=(0, 3)) as lists:
        plan = mt.plan_for(lists)
        flag, has_flag = mt.flag_arg(found_inf, plan)
        for grp in plan.groups:
            m = 3 if use_buf else 2  # no buffers: pass any table, the kernel never touches it
            for grid, work, _ in grp.launches():
                _sgd_kernel[grid](work, grp.numel, grp.tab(0), grp.tab(1), grp.tab(2), grp.tab(m),
                                  flag, mt.f64_bits(lr), mt.f64_bits(weight_decay),
                                  mt.f64_bits(momentum), mt.f64_bits(1 - dampening),
                                  P_DT=grp.tl_dtypes[0], G_DT=grp.tl_dtypes[1],
                                  B_DT=grp.tl_dtypes[2], M_DT=grp.tl_dtypes[m],
                                  WD=weight_decay != 0, MOMENTUM=use_buf,
                                  NESTEROV=bool(nesterov) and use_buf, FIRST=bool(first),
                                  HAS_FLAG=has_flag, **mt.launch_args(grp))


# --------------------------------------------------------------------------------------------
# sam_restore_adam_: w <- backup, then Adam (L2) / AdamW (decoupled) with g_e
# --------------------------------------------------------------------------------------------
@triton.jit
def _adam_block(offs, n, p, g, b, m, v, step_size, beta1, one_minus_b1, beta2, one_minus_b2,
                sqrt_bc2, eps, wd, decay, WD: tl.constexpr, DECOUPLED: tl.constexpr,
                MATH: tl.constexpr, MASKED: tl.constexpr):
    w = load(b, offs, n, MASKED).to(MATH)
    d = load(g, offs, n, MASKED).to(MATH)
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
    store(p, offs, w - div(step_size * m_new, denom), n, MASKED)


@triton.jit(do_not_specialize=["ss_bits", "b1_bits", "omb1_bits", "b2_bits", "omb2_bits",
                               "sbc2_bits", "eps_bits", "wd_bits", "decay_bits"])
def _adam_kernel(work, numel, p_tab, g_tab, b_tab, m_tab, v_tab, flag, ss_bits: tl.int64,
                 b1_bits: tl.int64, omb1_bits: tl.int64, b2_bits: tl.int64, omb2_bits: tl.int64,
                 sbc2_bits: tl.int64, eps_bits: tl.int64, wd_bits: tl.int64,
                 decay_bits: tl.int64,
                 P_DT: tl.constexpr, G_DT: tl.constexpr, B_DT: tl.constexpr, M_DT: tl.constexpr,
                 V_DT: tl.constexpr, WD: tl.constexpr, DECOUPLED: tl.constexpr,
                 HAS_FLAG: tl.constexpr, ALIGNED: tl.constexpr, MATH: tl.constexpr,
                 BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, n = chunk_of(work, numel)
    p = tensor_ptr(p_tab, t, P_DT, ALIGNED)
    g = tensor_ptr(g_tab, t, G_DT, ALIGNED)
    b = tensor_ptr(b_tab, t, B_DT, ALIGNED)
    m = tensor_ptr(m_tab, t, M_DT, ALIGNED)
    v = tensor_ptr(v_tab, t, V_DT, ALIGNED)
    step_size = fp_arg(ss_bits, MATH)
    beta1 = fp_arg(b1_bits, MATH)
    omb1 = fp_arg(omb1_bits, MATH)
    beta2 = fp_arg(b2_bits, MATH)
    omb2 = fp_arg(omb2_bits, MATH)
    sqrt_bc2 = fp_arg(sbc2_bits, MATH)
    eps = fp_arg(eps_bits, MATH)
    wd = fp_arg(wd_bits, MATH)
    decay = fp_arg(decay_bits, MATH)
    if load_flag(flag, HAS_FLAG):  # found_inf: w <- backup, the moments stay
        copy_chunk(b, p, start, n, BLOCK, CHUNK)
    elif start + CHUNK <= n:
        for k in tl.static_range(CHUNK // BLOCK):
            _adam_block(start + k * BLOCK + tl.arange(0, BLOCK), n, p, g, b, m, v, step_size,
                        beta1, omb1, beta2, omb2, sqrt_bc2, eps, wd, decay, WD, DECOUPLED, MATH,
                        False)
    else:
        for k in tl.static_range(CHUNK // BLOCK):
            _adam_block(start + k * BLOCK + tl.arange(0, BLOCK), n, p, g, b, m, v, step_size,
                        beta1, omb1, beta2, omb2, sqrt_bc2, eps, wd, decay, WD, DECOUPLED, MATH,
                        True)


def _sam_restore_adam(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                      exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], step: int, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float,
                      decoupled: bool, found_inf: Optional[Tensor] = None) -> None:
    if not params:
        return
    # host scalars in double, as reference.py computes them
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    scalars = [lr / bc1, beta1, 1 - beta1, beta2, 1 - beta2, math.sqrt(bc2), eps, weight_decay,
               1 - lr * weight_decay]
    lists = [params, grads, backups, exp_avgs, exp_avg_sqs]
    with mt.device_guard(params[0].device), mt.contiguous(lists, mutated=(0, 3, 4)) as lists:
        plan = mt.plan_for(lists)
        flag, has_flag = mt.flag_arg(found_inf, plan)
        for grp in plan.groups:
            for grid, work, _ in grp.launches():
                _adam_kernel[grid](work, grp.numel, *[grp.tab(j) for j in range(5)], flag,
                                   *[mt.f64_bits(x) for x in scalars],
                                   P_DT=grp.tl_dtypes[0], G_DT=grp.tl_dtypes[1],
                                   B_DT=grp.tl_dtypes[2], M_DT=grp.tl_dtypes[3],
                                   V_DT=grp.tl_dtypes[4], WD=weight_decay != 0,
                                   DECOUPLED=bool(decoupled), HAS_FLAG=has_flag,
                                   **mt.launch_args(grp))
