"""The executable specification: every fused phase written in plain PyTorch.

Each function here is the contract the fused backends (C++ CPU, Triton, CUDA) implement: same
arguments, same in-place effects.  They are short on purpose and dtype-generic; the tests run them in
float64 and compare every fused backend against them.  Equation / line numbers refer to
``docs/spec.md`` (bSAM: Algorithm 1 of Möllenhoff & Khan 2022).

Conventions shared by all phases:
  * ``params``, ``grads``, ``backups`` ... are equally long lists of tensors, one entry per parameter;
  * the maths runs in ``opmath(p)`` = float64 for float64 parameters, else float32 (bf16/fp16 params
    are upcast, their state is float32);
  * ``backups`` hold the mean weights while the parameters are perturbed: restoring is a *copy*,
    never a subtraction, so it is exact in every dtype;
  * the phases that consume gradients take ``found_inf`` (None, or a one-element tensor on the
    parameters' device).  Nonzero means some gradient of this step was inf/NaN and the phase takes
    its *skip form*: a perturbation only writes the backups (w stays), an update only restores w
    from the backups; no optimizer state changes.  The spec reads the flag; the fused backends
    decide on the device, so the caller never syncs with the host (README "Non-finite gradients").
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Counter-based noise: Philox4x32-10 (Salmon et al. 2011), the generator every backend shares.
# ---------------------------------------------------------------------------------------------
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(a: Tensor, b: int):
    """(hi, lo) 32-bit words of a*b for uint32 values held in int64, without int64 overflow."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo  # each < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 words; returns the four output words."""
    for _ in range(rounds):
        hi0, lo0 = _mul_hi_lo(c0, _M0)
        hi1, lo1 = _mul_hi_lo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def philox_normal(seed: int, step: int, param_id: int, numel: int, device=None,
                  dtype=torch.float64) -> Tensor:
    """Standard normals for elements 0..numel-1 of parameter ``param_id`` at noise step ``step``.

    Element i uses Philox block (counter = (i // 4, param_id, step_lo, step_hi), key = seed) and
    lane i % 4 of it; the four words become uniforms u = (x >> 9 + 1/2) / 2**23 in (0, 1) (23 bits so
    that float32 holds u exactly on every backend; |z| <= 5.8) and two
    Box-Muller pairs: (u0, u1) -> lanes 0, 1 and (u2, u3) -> lanes 2, 3.  Nothing is stored: the
    same (seed, step, param_id, i) always gives the same number, on every backend.
    """
    i = torch.arange(numel, dtype=torch.int64, device=device)
    q = i >> 2
    lane = i & 3
    full = lambda v: torch.full_like(q, v)  # noqa: E731
    x = philox4x32(q, full(param_id & _MASK32), full(step & _MASK32), full((step >> 32) & _MASK32),
                   seed & _MASK32, (seed >> 32) & _MASK32)
    u = [((w >> 9).to(dtype) + 0.5) * 2.0 ** -23 for w in x]
    r01 = torch.sqrt(-2.0 * torch.log(u[0]))
    r23 = torch.sqrt(-2.0 * torch.log(u[2]))
    t01, t23 = 2.0 * math.pi * u[1], 2.0 * math.pi * u[3]
    lanes = torch.stack([r01 * torch.cos(t01), r01 * torch.sin(t01),
                         r23 * torch.cos(t23), r23 * torch.sin(t23)])
    return lanes.gather(0, lane.unsqueeze(0)).squeeze(0)


def opmath(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def skipped(found_inf: Optional[Tensor]) -> bool:
    return found_inf is not None and bool(found_inf.reshape(-1)[0] != 0)


def copy_all_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    for d, s in zip(dst, src):
        d.copy_(s)


# ---------------------------------------------------------------------------------------------
# SAM / ASAM (Foret et al. 2021; Kwon et al. 2021)
# ---------------------------------------------------------------------------------------------
def grad_sumsq(params: Sequence[Tensor], grads: Sequence[Tensor], adaptive: bool, eta: float) -> Tensor:
    """sum ||T g||^2 over all tensors, T = |w| + eta for ASAM, T = 1 for SAM."""
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else None)
    for p, g in zip(params, grads):
        tg = g.double() * (p.double().abs() + eta) if adaptive else g.double()
        total = total + tg.square().sum()
    return total


def sam_perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                 grad_norm: Optional[Tensor], rho: float, eps: float, adaptive: bool, eta: float,
                 found_inf: Optional[Tensor] = None) -> Tensor:
    """docs/spec.md SAM row: e = rho g / (||g|| + eps); ASAM: e = rho T^2 g / (||T g|| + eps).  w <- w + e.

    ``grad_norm`` is the global norm when the optimizer has several groups; None computes it here.
    Returns the norm.
    """
    if grad_norm is None:
        grad_norm = grad_sumsq(params, grads, adaptive, eta).sqrt()
    if skipped(found_inf):
        copy_all_(backups, params)
        return grad_norm
    for p, g, b in zip(params, grads, backups):
        b.copy_(p)
        w, gg = p.to(opmath(p)), g.to(opmath(p))
        scale = rho / (grad_norm.to(w.dtype) + eps)
        e = gg * (w.abs() + eta).square() * scale if adaptive else gg * scale
        p.copy_(w + e)
    return grad_norm


def sam_restore_sgd_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                     momentum_bufs: List[Tensor], lr: float, momentum: float, dampening: float,
                     nesterov: bool, weight_decay: float, first: bool,
                     found_inf: Optional[Tensor] = None) -> None:
    """w <- backup, then torch.optim.SGD's update with the perturbed gradient g_e.

    ``first``: the momentum buffers are uninitialised and take d (as torch.optim.SGD does)."""
    if skipped(found_inf):
        return copy_all_(params, backups)
    # Written with the same torch calls as torch.optim.SGD, so that rho = 0 matches it bit for bit.
    for i, (p, g, b) in enumerate(zip(params, grads, backups)):
        w, d = b.to(opmath(p), copy=True), g.to(opmath(p))
        if weight_decay != 0:
            d = d.add(w, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_bufs[i].to(d.dtype, copy=True)
            buf = d.clone() if first else buf.mul_(momentum).add_(d, alpha=1 - dampening)
            momentum_bufs[i].copy_(buf)
            d = d.add(buf, alpha=momentum) if nesterov else buf
        p.copy_(w.add_(d, alpha=-lr))


def sam_restore_adam_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                      exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], step: int, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float,
                      decoupled: bool, found_inf: Optional[Tensor] = None) -> None:
    """w <- backup, then Adam (L2 decay) or AdamW (decoupled decay) with g_e; ``step`` counts from 1."""
    if skipped(found_inf):
        return copy_all_(params, backups)
    # Written with the same torch calls as torch.optim.Adam/AdamW (single-tensor path), so that
    # rho = 0 matches them bit for bit.
    bc1, bc2_sqrt = 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5
    for p, g, b, m, v in zip(params, grads, backups, exp_avgs, exp_avg_sqs):
        w, d = b.to(opmath(p), copy=True), g.to(opmath(p))
        if weight_decay != 0:
            if decoupled:
                w.mul_(1 - lr * weight_decay)
            else:
                d = d.add(w, alpha=weight_decay)
        m_new = m.to(d.dtype, copy=True).lerp_(d, 1 - beta1)
        v_new = v.to(d.dtype, copy=True).mul_(beta2).addcmul_(d, d, value=1 - beta2)
        m.copy_(m_new)
        v.copy_(v_new)
        denom = (v_new.sqrt() / bc2_sqrt).add_(eps)
        p.copy_(w.addcdiv_(m_new, denom, value=-(lr / bc1)))


# ---------------------------------------------------------------------------------------------
# bSAM (Algorithm 1; docs/spec.md lines 1-7)
# ---------------------------------------------------------------------------------------------
def bsam_noise_(params: List[Tensor], backups: List[Tensor], precisions: List[Tensor],
                param_ids: List[int], seed: int, step: int, num_data: float) -> None:
    """Line 1: backup <- omega;  w <- theta = omega + z / sqrt(N s),  z = philox_normal(...)."""
    for p, b, s, pid in zip(params, backups, precisions, param_ids):
        b.copy_(p)
        w = p.to(opmath(p))
        z = philox_normal(seed, step, pid, p.numel(), p.device, w.dtype).view(p.shape)
        p.copy_(w + z / torch.sqrt(num_data * s.to(w.dtype)))


def bsam_perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                  precisions: List[Tensor], accums: List[Tensor], rho: float, beta2: float,
                  delta: float, gamma: float, found_inf: Optional[Tensor] = None) -> None:
    """Line 3: w <- omega + rho g / s (s before line 5).

    Line 5 (s <- beta2 s + (1-beta2)(sqrt(s)|g| + delta + gamma)) happens here in place when
    ``accums`` is empty; otherwise sqrt(s)|g| is added to ``accums`` and line 5 waits for
    ``bsam_update_`` (m-sharpness averages it over micro-batches; the released-code order needs the
    old s in line 7)."""
    if skipped(found_inf):
        return copy_all_(params, backups)
    for i, (p, g, b, s) in enumerate(zip(params, grads, backups, precisions)):
        omega, gg, ss = b.to(opmath(p)), g.to(opmath(p)), s.to(opmath(p))
        p.copy_(omega + rho * gg / ss)
        h = ss.sqrt() * gg.abs()
        if accums:
            accums[i].copy_(accums[i] + h)
        else:
            s.copy_(beta2 * ss + (1 - beta2) * (h + delta + gamma))


def bsam_update_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                 precisions: List[Tensor], momenta: List[Tensor], accums: List[Tensor], lr: float,
                 beta1: float, beta2: float, delta: float, gamma: float, accum_scale: float,
                 released_order: bool, found_inf: Optional[Tensor] = None) -> None:
    """Lines 5-7 with g_eps = grads:  gm <- beta1 gm + (1-beta1)(g_eps + delta omega);
    omega <- omega - lr gm / s;  w <- omega.

    With ``accums`` (see ``bsam_perturb_``) line 5 runs here with h = accum * accum_scale, and
    ``released_order`` uses the s from before line 5 in line 7 (the authors' JAX code)."""
    if released_order and not accums:
        raise ValueError("bsam_update_: released_order=True needs accums (line 5 must wait for the update to keep the old s)")
    if skipped(found_inf):
        return copy_all_(params, backups)
    for i, (p, g, b, s, gm) in enumerate(zip(params, grads, backups, precisions, momenta)):
        omega, ge, s_old = b.to(opmath(p)), g.to(opmath(p)), s.to(opmath(p), copy=True)
        s_new = s_old
        if accums:
            s_new = beta2 * s_old + (1 - beta2) * (accums[i].to(s_old.dtype) * accum_scale + delta + gamma)
            s.copy_(s_new)
        m = beta1 * gm.to(ge.dtype) + (1 - beta1) * (ge + delta * omega)
        gm.copy_(m)
        p.copy_(omega - lr * m / (s_old if released_order else s_new))


from samkernels.ops.reference_vi import *  # noqa
