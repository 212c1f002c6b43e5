"""Triton kernel for BiSAM's ascent loss Q (eq. 11/14) and its gradient, one program per row.

Semantics: :func:`samkernels.ops.bisam_loss.bisam_loss_reference`.  ``K <= BLOCK``: the row is read
once and stays in registers.  ``K > BLOCK``: a first loop over BLOCK-wide chunks accumulates the
softmax sums, a second loop re-reads the row to write the gradient (inherent to streaming softmax,
as in Liger-Kernel's fused cross-entropy).  Because both phi are <= 1 (eq. 17, 18), mu*phi <= mu,
and F_y = 0 puts a term exp(0) = 1 in every sum: for mu <= 50 the sums are shifted by 0, with no
running max and no rescaling (they stay in [1, K e^50], far below float32's limit); larger mu
uses the usual online max.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (no libdevice there, hence
tanh and softplus written with exp/log).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from samkernels.triton import _multi_tensor as mt
from samkernels.triton._multi_tensor import div, fp_arg

GAMMA = tl.constexpr(math.log(math.e - 1.0))  # phi_neglog(0) = 0 (eq. 18)
MAX_BLOCK = 8192  # widest chunk; larger rows take the two-loop path (tests lower it)
FIXED_SHIFT_MAX_MU = 50.0  # K e^mu must stay finite in float32 (K < 2^31); 500 for float64


@triton.jit
def _phi(F, alpha, PHI: tl.constexpr):
    """phi(F) and phi'(F) with exp of non-positive arguments only (no overflow at any |F|)."""
    if PHI == 0:  # eq. 18: 1 - softplus(v), v = gamma - F; phi' = sigmoid(v)
        v = GAMMA - F
        a = tl.exp(-tl.abs(v))
        ph = 1.0 - (tl.maximum(v, 0.0) + tl.log(1.0 + a))
        dph = div(tl.where(v >= 0.0, 1.0, a), 1.0 + a)
    else:  # eq. 17: tanh(t) = (1 - a)/(1 + a), a = exp(-2|t|); tanh' = 4a/(1 + a)^2
        t = alpha * F
        a = tl.exp(-2.0 * tl.abs(t))
        th = div(1.0 - a, 1.0 + a)
        ph = tl.where(t < 0.0, -th, th)
        dph = div(alpha * 4.0 * a, (1.0 + a) * (1.0 + a))
    return ph, dph


@triton.jit
def _row_phi(x_row, offs, K, xy, alpha, PHI: tl.constexpr, ACC: tl.constexpr):
    """(mask, phi, phi') at the columns ``offs`` of one row, F = x - x_y (masked columns read 0,
    the caller discards them)."""
    mask = offs < K
    x = tl.load(x_row + offs, mask=mask, other=0.0).to(ACC)
    ph, dph = _phi(x - xy, alpha, PHI)
    return mask, ph, dph


@triton.jit(do_not_specialize=["mu_bits", "log_k_bits", "alpha_bits", "scale_bits"])
def _bisam_loss_fwd_kernel(x_ptr, x_row_stride, t_ptr, loss_ptr, g_ptr, K, mu_bits: tl.int64,
                           log_k_bits: tl.int64, alpha_bits: tl.int64, scale_bits: tl.int64,
                           ignore_index, PHI: tl.constexpr, BLOCK: tl.constexpr,
                           ONE_BLOCK: tl.constexpr, FIXED_SHIFT: tl.constexpr,
                           COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr):
    # the float arguments arrive as f64 bit patterns: a Python float would be typed fp32 on a GPU
    mu = fp_arg(mu_bits, ACC)
    log_k = fp_arg(log_k_bits, ACC)
    alpha = fp_arg(alpha_bits, ACC)
    grad_scale = fp_arg(scale_bits, ACC)
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(t_ptr + row)
    x_row = x_ptr + row * x_row_stride
    g_row = g_ptr + row * K
    cols = tl.arange(0, BLOCK)
    # The loops over a row are `while` loops: a `for ... in range(0, K, BLOCK)` with the runtime K
    # as bound fails in Triton 3.6's interpreter (its tensor __index__ rejects the 1-element
    # array of a scalar argument), and on the GPU both compile to the same scf loop over chunks.
    if y == ignore_index:  # like F.cross_entropy: loss 0, gradient 0, the row is not read
        tl.store(loss_ptr + row, tl.zeros([], ACC))
        if COMPUTE_GRAD:
            start = 0
            while start < K:
                offs = start + cols
                zero = tl.zeros([BLOCK], dtype=g_ptr.dtype.element_ty)
                tl.store(g_row + offs, zero, mask=offs < K)
                start += BLOCK
    else:
        # A label outside [0, K) (the host asserts asynchronously) reads column 0 instead and
        # poisons its row with NaN.
        bad = (y < 0) | (y >= K)
        yv = tl.where(bad, 0, y)
        poison = tl.where(bad, float("nan"), 0.0).to(ACC)
        xy = tl.load(x_row + yv).to(ACC)
        if ONE_BLOCK:
            mask, ph, dph = _row_phi(x_row, cols, K, xy, alpha, PHI, ACC)
            z = tl.where(mask, mu * ph, float("-inf"))
            m = tl.max(z, axis=0)
            e = tl.exp(z - m)
            dph = tl.where(cols == yv, 0.0, dph)  # the sum for dQ/df_y runs over j != y
            s = tl.sum(e, axis=0)
            s1 = tl.sum(e * dph, axis=0)
            tl.store(loss_ptr + row, div(m + tl.log(s) - log_k, mu) + poison)
            if COMPUTE_GRAD:
                c = div(grad_scale, s)
                g = tl.where(cols == yv, -s1 * c, e * dph * c) + poison
                tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=mask)
        else:
            if FIXED_SHIFT:
                s_acc = tl.zeros([BLOCK], dtype=ACC)
                s1_acc = tl.zeros([BLOCK], dtype=ACC)
                start = 0
                while start < K:
                    offs = start + cols
                    mask, ph, dph = _row_phi(x_row, offs, K, xy, alpha, PHI, ACC)
                    e = tl.where(mask, tl.exp(mu * ph), 0.0)
                    s_acc += e
                    s1_acc += tl.where(offs == yv, 0.0, e * dph)
                    start += BLOCK
                m = tl.zeros([], dtype=ACC)
                s = tl.sum(s_acc, axis=0)
                s1 = tl.sum(s1_acc, axis=0)
            else:
                # online logsumexp; starting the max at 0 is safe since z_y = mu phi(0) = 0 is
                # in the row, and it keeps exp(m_old - m_new) free of inf - inf.
                m = tl.zeros([], dtype=ACC)
                s = tl.zeros([], dtype=ACC)
                s1 = tl.zeros([], dtype=ACC)
                start = 0
                while start < K:
                    offs = start + cols
                    mask, ph, dph = _row_phi(x_row, offs, K, xy, alpha, PHI, ACC)
                    z = tl.where(mask, mu * ph, float("-inf"))
                    m_new = tl.maximum(m, tl.max(z, axis=0))
                    e = tl.exp(z - m_new)
                    r = tl.exp(m - m_new)
                    s = s * r + tl.sum(e, axis=0)
                    s1 = s1 * r + tl.sum(tl.where(offs == yv, 0.0, e * dph), axis=0)
                    m = m_new
                    start += BLOCK
            tl.store(loss_ptr + row, div(m + tl.log(s) - log_k, mu) + poison)
            if COMPUTE_GRAD:
                c = div(grad_scale, s)
                start = 0
                while start < K:
                    offs = start + cols
                    mask, ph, dph = _row_phi(x_row, offs, K, xy, alpha, PHI, ACC)
                    g = tl.where(offs == yv, -s1 * c, tl.exp(mu * ph - m) * dph * c) + poison
                    tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
                    start += BLOCK


def _launch(logits: torch.Tensor, target: torch.Tensor, mu: float, phi: int, alpha: float,
            ignore_index: int, grad_scale: float, compute_grad: bool):
    if logits.dim() != 2 or target.shape != (logits.shape[0],) or target.dtype != torch.int64:
        raise ValueError("bisam_loss_fwd_triton: expects logits (B, K) and int64 target (B,)")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    target = target.contiguous()
    B, K = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss_rows = torch.empty(B, dtype=acc, device=logits.device)
    grad = (torch.empty((B, K), dtype=logits.dtype, device=logits.device) if compute_grad
            else torch.empty(0, dtype=logits.dtype, device=logits.device))
    if B == 0:
        return loss_rows, grad
    block = min(triton.next_power_of_2(K), MAX_BLOCK)
    num_warps = max(1, min(16, block // 512))
    with mt.device_guard(logits.device):  # launch on the logits' device and its current stream
        _bisam_loss_fwd_kernel[(B,)](
            logits, logits.stride(0), target, loss_rows, grad if compute_grad else loss_rows, K,
            mt.f64_bits(mu), mt.f64_bits(math.log(K)), mt.f64_bits(alpha),
            mt.f64_bits(grad_scale), int(ignore_index),
            PHI=int(phi), BLOCK=block, ONE_BLOCK=K <= block,
            FIXED_SHIFT=mu <= (500.0 if acc == torch.float64 else FIXED_SHIFT_MAX_MU),
            COMPUTE_GRAD=bool(compute_grad), ACC=tl.float64 if acc == torch.float64 else tl.float32,
            num_warps=num_warps, **mt.FP_OPTIONS)
    return loss_rows, grad


@torch.library.custom_op("samkernels::bisam_loss_fwd_triton", mutates_args=())
def bisam_loss_fwd_triton(logits: torch.Tensor, target: torch.Tensor, mu: float, phi: int,
                          alpha: float, ignore_index: int, grad_scale: float,
                          compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``torch.ops.samkernels.bisam_loss_fwd`` (csrc/ops/bisam_loss.cpp)."""
    return _launch(logits, target, mu, phi, alpha, ignore_index, grad_scale, compute_grad)


@bisam_loss_fwd_triton.register_fake
def _(logits, target, mu, phi, alpha, ignore_index, grad_scale, compute_grad):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss_rows = logits.new_empty((logits.shape[0],), dtype=acc)
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
    return loss_rows, grad


# autograd for the fused forward, registered on the op at import (torch.compile cannot trace it)
from samkernels.ops.bisam_loss import attach_autograd  # noqa: E402

attach_autograd("samkernels::bisam_loss_fwd_triton")
