"""The executable specification: every fused phase written in plain PyTorch.

Each function here is the contract the fused backends (C++ CPU, Triton, CUDA) implement: same
arguments, same in-place effects.  The ``@op`` row above each phase is its entry in the op table
(:mod:`samkernels.ops._spec`): the schema every backend registers, the roles of its lists, what
it writes and returns.  They are short on purpose and dtype-generic; the tests run them in
float64 and compare every fused backend against them.  Equation / line numbers refer to
``docs/spec.md``.  Papers: Foret et al. 2021 (SAM), Kwon et al. 2021 (ASAM), Möllenhoff & Khan 2022
(bSAM, Algorithm 1), Ujváry et al., "Rethinking SAM as Variational Inference" (RandomSAM Alg. 1,
MFVI Alg. 2, VSAM Alg. 3 / App. E) and Xie et al., "Improving SAM requires rethinking its
optimization formulation" (E-BiSAM Alg. 3).

Conventions shared by all phases:
  * ``params``, ``grads``, ``backups`` ... are equally long lists of tensors, one entry per parameter;
  * the maths runs in ``opmath(p)`` = float64 for float64 parameters, else float32 (bf16/fp16 params
    are upcast, their state is float32);
  * ``backups`` hold the mean weights while the parameters are perturbed: restoring is a *copy*,
    never a subtraction, so it is exact in every dtype;
  * noise comes from a Philox counter keyed by (seed, step, parameter id, element), never stored;
  * the phases that consume gradients take ``found_inf`` (None, or a one-element tensor on the
    parameters' device).  Nonzero means some gradient of this step was inf/NaN and the phase takes
    its *skip form*: a perturbation only writes the backups (w stays), an update only restores w
    from the backups; no optimizer state changes.  The spec reads the flag; the fused backends
    decide on the device, so the caller never syncs with the host (README "Non-finite gradients").

Parametrisation of the learned diagonal covariance (MFVI, VSAM): the state holds the variances
``Sigma`` themselves (opmath dtype); gradient steps are taken on ``u = log Sigma`` (chain rule
``dL/du = Sigma * dL/dSigma``), i.e. ``Sigma <- Sigma * exp(-lr * dL/du)``, so ``Sigma`` stays > 0
without clipping.  VSAM can instead take the plain step on ``Sigma`` of Alg. 3 line 7, clamped at
``min_var``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from samkernels._dtypes import opmath
from samkernels.ops._library import op
from samkernels.ops._spec import (BOOL, DEBIAS_STEP, DEVICE_STEP, FLOAT, FOUND_INF, IDS_SEED_STEP,
                                  INT, INT_LIST, NOISED, OPT_TENSOR, PERTURBED, SYMINT, TENSOR, UPDATED,
                                  Arg, L, floats)


def at_step(step: int, device_step: Optional[Tensor]) -> int:
    """The step an op uses: ``step``, plus the value of ``device_step`` when given (the device
    counter of a capturable optimizer; the compiled kernels read it on the device)."""
    return step if device_step is None else step + int(device_step.reshape(()).item())


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


def first_element(param_id: int) -> int:
    """Where a tensor's elements start in its parameter's noise stream (docs/spec.md "Noise"):
    4 x the id's high 32 bits (a part of a larger parameter starting at a whole Philox block, as
    the fused kernels take it), plus a ``ShardId``'s ``start`` (any element)."""
    return 4 * ((param_id >> 32) & _MASK32) + getattr(param_id, "start", 0)


def _philox_block(seed: int, step: int, param_id: int, numel: int, device):
    """(element index i, the four Philox words of i's block): counter (i // 4, param_id's low 32
    bits, step_lo, step_hi), key = seed (both 64-bit values split into 32-bit words); i counts
    from ``first_element(param_id)``: a part of a larger parameter draws that parameter's
    numbers."""
    start = first_element(param_id)
    i = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    q = (i >> 2) & _MASK32  # the counter word is 32 bits (philox.h casts the quad index)
    full = lambda v: torch.full_like(q, v)  # noqa: E731
    x = philox4x32(q, full(param_id & _MASK32), full(step & _MASK32), full((step >> 32) & _MASK32),
                   seed & _MASK32, (seed >> 32) & _MASK32)
    return i, x


class ShardId(int):
    """A ``param_ids`` entry (an int: the parameter's id) for a shard of a larger parameter (a
    DTensor's local part): ``start`` is the index, in the flattened parameter, of the shard's
    first element.  Its noise is then the whole parameter's numbers from there on, so a sharded
    run draws exactly what the unsharded one does.  The public wrappers pass a plain id with the
    start's block in its high 32 bits (``first_element``) when the start is a multiple of 4, to
    any backend, and a ``ShardId`` otherwise, to this backend only (the fused kernels start a
    tensor at a whole Philox block)."""

    start: int

    def __new__(cls, param_id: int, start: int):
        out = super().__new__(cls, param_id)
        out.start = start
        return out


def _uniform(word: Tensor, dtype: torch.dtype) -> Tensor:
    """u = ((x >> 9) + 1/2) / 2**23 in (0, 1): 23 bits, exact in float32 on every backend."""
    return ((word >> 9).to(dtype) + 0.5) * 2.0 ** -23


def philox_normal(seed: int, step: int, param_id: int, numel: int, device=None,
                  dtype=torch.float64) -> Tensor:
    """Standard normals for elements 0..numel-1 of parameter ``param_id`` at noise step ``step``.

    Element i uses Philox block (counter = (i // 4, param_id, step_lo, step_hi), key = seed) and
    lane i % 4 of it; the four words become uniforms u = (x >> 9 + 1/2) / 2**23 in (0, 1) (23 bits so
    that float32 holds u exactly on every backend; |z| <= 5.8) and two
    Box-Muller pairs: (u0, u1) -> lanes 0, 1 and (u2, u3) -> lanes 2, 3.  Nothing is stored: the
    same (seed, step, param_id, i) always gives the same number, on every backend.
    """
    i, x = _philox_block(seed, step, param_id, numel, device)
    u = [_uniform(w, dtype) for w in x]
    r01 = torch.sqrt(-2.0 * torch.log(u[0]))
    r23 = torch.sqrt(-2.0 * torch.log(u[2]))
    t01, t23 = 2.0 * math.pi * u[1], 2.0 * math.pi * u[3]
    lanes = torch.stack([r01 * torch.cos(t01), r01 * torch.sin(t01),
                         r23 * torch.cos(t23), r23 * torch.sin(t23)])
    return lanes.gather(0, (i & 3).unsqueeze(0)).squeeze(0)


def philox_uniform(seed: int, step: int, param_id: int, numel: int, device=None,
                   dtype=torch.float64) -> Tensor:
    """Uniforms in (0, 1) for elements 0..numel-1: element i takes word i % 4 of the Philox block
    philox_normal uses for it, u = ((x >> 9) + 1/2) / 2**23 (exact in float32)."""
    i, x = _philox_block(seed, step, param_id, numel, device)
    return _uniform(torch.stack(x).gather(0, (i & 3).unsqueeze(0)).squeeze(0), dtype)


def skipped(found_inf: Optional[Tensor]) -> bool:
    return found_inf is not None and bool(found_inf.reshape(-1)[0] != 0)


def copy_all_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    for d, s in zip(dst, src):
        d.copy_(s)


# ---------------------------------------------------------------------------------------------
# SAM / ASAM (Foret et al. 2021; Kwon et al. 2021)
# ---------------------------------------------------------------------------------------------
@op("sam", L("params", "param"), L("grads", "grad"), Arg("adaptive", BOOL, default="False"),
    Arg("eta", FLOAT, default="0.0"), returns="Tensor", result="norm")
def grad_sumsq(params: Sequence[Tensor], grads: Sequence[Tensor], adaptive: bool, eta: float) -> Tensor:
    """sum ||T g||^2 over all tensors, T = |w| + eta for ASAM, T = 1 for SAM."""
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else None)
    for p, g in zip(params, grads):
        tg = g.double() * (p.double().abs() + eta) if adaptive else g.double()
        total = total + tg.square().sum()
    return total


@op("sam", L("grads", "grad"), returns="Tensor", result="flag")
def nonfinite_flag(grads: Sequence[Tensor]) -> Tensor:
    """1.0 if some element of ``grads`` is inf or NaN, else 0.0 (also for no tensors): a 0-dim
    float32 tensor on their device, the ``found_inf`` flag the gradient phases take.  The inf/NaN
    check of the optimizers' passes that take no norm (README "Non-finite gradients"): one read of
    the gradients in their own dtype, where ``grad_sumsq`` squares them in float64."""
    flag = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else None)
    for g in grads:
        if not bool(torch.isfinite(g).all()):
            flag.fill_(1.0)
    return flag


@op("sam", PERTURBED, Arg("grad_norm", OPT_TENSOR), floats("rho", "eps"), Arg("adaptive", BOOL),
    Arg("eta", FLOAT), FOUND_INF, returns="Tensor", result="norm")
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


def _sgd_step_(w: Tensor, d: Tensor, bufs: List[Tensor], i: int, lr: float, momentum: float,
               dampening: float, nesterov: bool, weight_decay: float, first: bool) -> Tensor:
    """torch.optim.SGD's step on w (in place, returned) with gradient d, in SGD's own calls (so
    that rho = 0 matches it bit for bit); ``bufs[i]``, the momentum buffer, is written."""
    if weight_decay != 0:
        d = d.add(w, alpha=weight_decay)
    if momentum != 0:
        buf = bufs[i].to(d.dtype, copy=True)
        buf = d.clone() if first else buf.mul_(momentum).add_(d, alpha=1 - dampening)
        bufs[i].copy_(buf)
        d = d.add(buf, alpha=momentum) if nesterov else buf
    return w.add_(d, alpha=-lr)


def _adam_step_(w: Tensor, d: Tensor, m: Tensor, v: Tensor, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float, decoupled: bool, step: int) -> Tensor:
    """torch.optim.Adam's (AdamW's when ``decoupled``) step on w (in place, returned) with gradient
    d, in their single-tensor calls (so that rho = 0 matches them bit for bit); m, v written."""
    bc1, bc2_sqrt = 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5
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
    return w.addcdiv_(m_new, denom, value=-(lr / bc1))


@op("sam", UPDATED, L("momentum_bufs", "state?", True), floats("lr", "momentum", "dampening"),
    Arg("nesterov", BOOL), Arg("weight_decay", FLOAT), Arg("first", BOOL), FOUND_INF)
def sam_restore_sgd_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                     momentum_bufs: List[Tensor], lr: float, momentum: float, dampening: float,
                     nesterov: bool, weight_decay: float, first: bool,
                     found_inf: Optional[Tensor] = None) -> None:
    """w <- backup, then torch.optim.SGD's update with the perturbed gradient g_e.

    ``first``: the momentum buffers are uninitialised and take d (as torch.optim.SGD does)."""
    if skipped(found_inf):
        return copy_all_(params, backups)
    for i, (p, g, b) in enumerate(zip(params, grads, backups)):
        w, d = b.to(opmath(p), copy=True), g.to(opmath(p))
        p.copy_(_sgd_step_(w, d, momentum_bufs, i, lr, momentum, dampening, nesterov,
                           weight_decay, first))


@op("sam", UPDATED, L("exp_avgs", "state", True), L("exp_avg_sqs", "state", True), Arg("step", SYMINT),
    floats("lr", "beta1", "beta2", "eps", "weight_decay"), Arg("decoupled", BOOL), FOUND_INF,
    DEVICE_STEP)
def sam_restore_adam_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                      exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], step: int, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float,
                      decoupled: bool, found_inf: Optional[Tensor] = None,
                      device_step: Optional[Tensor] = None) -> None:
    """w <- backup, then Adam (L2 decay) or AdamW (decoupled decay) with g_e; ``step`` counts from 1."""
    step = at_step(step, device_step)
    if skipped(found_inf):
        return copy_all_(params, backups)
    for p, g, b, m, v in zip(params, grads, backups, exp_avgs, exp_avg_sqs):
        w, d = b.to(opmath(p), copy=True), g.to(opmath(p))
        p.copy_(_adam_step_(w, d, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step))


# ---------------------------------------------------------------------------------------------
# bSAM (Algorithm 1; docs/spec.md lines 1-7)
# ---------------------------------------------------------------------------------------------
@op("bsam", NOISED, L("precisions", "state"), IDS_SEED_STEP, Arg("num_data", FLOAT), DEVICE_STEP)
def bsam_noise_(params: List[Tensor], backups: List[Tensor], precisions: List[Tensor],
                param_ids: List[int], seed: int, step: int, num_data: float,
                device_step: Optional[Tensor] = None) -> None:
    """Line 1: backup <- omega;  w <- theta = omega + z / sqrt(N s),  z = philox_normal(...)."""
    step = at_step(step, device_step)
    for p, b, s, pid in zip(params, backups, precisions, param_ids):
        b.copy_(p)
        w = p.to(opmath(p))
        z = philox_normal(seed, step, pid, p.numel(), p.device, w.dtype).view(p.shape)
        p.copy_(w + z / torch.sqrt(num_data * s.to(w.dtype)))


@op("bsam", UPDATED, L("precisions", "state", True), L("accums", "state?", True),
    floats("rho", "beta2", "delta", "gamma"), FOUND_INF)
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


@op("bsam", UPDATED, L("precisions", "state", True), L("momenta", "state", True),
    L("accums", "state?"), floats("lr", "beta1", "beta2", "delta", "gamma", "accum_scale"),
    Arg("released_order", BOOL), FOUND_INF,
    requires=(("released_order", "accums", "line 5 must wait for the update to keep the old s"),))
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



# ---------------------------------------------------------------------------------------------
# RandomSAM (Alg. 1) and MFVI (Alg. 2)
# ---------------------------------------------------------------------------------------------
@op("vi", NOISED, L("variances", "state?"), IDS_SEED_STEP, Arg("sigma", FLOAT), DEVICE_STEP)
def vi_noise_(params: List[Tensor], backups: List[Tensor], variances: List[Tensor],
              param_ids: List[int], seed: int, step: int, sigma: float,
              device_step: Optional[Tensor] = None) -> None:
    """backup <- mu;  w <- mu + std * z,  z = philox_normal(seed, step, param_id).

    std = sqrt(Sigma) with ``variances`` (MFVI, Alg. 2 line 3), else the fixed ``sigma``
    (RandomSAM, Alg. 1 line 3: sigma0)."""
    step = at_step(step, device_step)
    for i, (p, b, pid) in enumerate(zip(params, backups, param_ids)):
        b.copy_(p)
        w = p.to(opmath(p))
        z = philox_normal(seed, step, pid, p.numel(), p.device, w.dtype).view(p.shape)
        std = variances[i].to(w.dtype).sqrt() if variances else sigma
        p.copy_(w + std * z)


@op("vi", UPDATED, L("variances", "state", True), L("momenta", "state?", True), IDS_SEED_STEP,
    floats("lr", "var_lr", "momentum", "prior_var", "num_data"), FOUND_INF, DEVICE_STEP)
def mfvi_update_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                 variances: List[Tensor], momenta: List[Tensor], param_ids: List[int], seed: int,
                 step: int, lr: float, var_lr: float, momentum: float, prior_var: float,
                 num_data: float, found_inf: Optional[Tensor] = None,
                 device_step: Optional[Tensor] = None) -> None:
    """Alg. 2 lines 4-5 with g = grads taken at theta = mu + sqrt(Sigma) z (z regenerated from
    (seed, step), the counter of the ``vi_noise_`` call), loss E L + KL[q || N(0, prior_var I)] / N:

      d   = g + mu / (N prior_var)                                 (eq. 7; KL/N of eq. 39)
      buf = momentum * buf + d  (only with ``momenta``);  mu <- mu - lr * buf
      dL/du = g z sqrt(Sigma) / 2 + (Sigma / prior_var - 1) / (2N)  (u = log Sigma; eq. 39)
      Sigma <- Sigma * exp(-var_lr * dL/du);  w <- mu.
    """
    step = at_step(step, device_step)
    if skipped(found_inf):
        return copy_all_(params, backups)
    for i, (p, g, b, v, pid) in enumerate(zip(params, grads, backups, variances, param_ids)):
        mu, gg, var = b.to(opmath(p)), g.to(opmath(p)), v.to(opmath(p))
        z = philox_normal(seed, step, pid, p.numel(), p.device, mu.dtype).view(p.shape)
        d = gg + mu / (num_data * prior_var)
        if momenta:
            d = momentum * momenta[i].to(d.dtype) + d
            momenta[i].copy_(d)
        du = 0.5 * gg * z * var.sqrt() + (var / prior_var - 1.0) / (2.0 * num_data)
        v.copy_(var * torch.exp(-var_lr * du))
        p.copy_(mu - lr * d)


# ---------------------------------------------------------------------------------------------
# VariationalSAM (Alg. 3, App. E)
# ---------------------------------------------------------------------------------------------
@op("vi", L("grads", "grad"), L("variances", "state"), returns="Tensor", result="norm")
def vsam_sumsq(grads: Sequence[Tensor], variances: Sequence[Tensor]) -> Tensor:
    """g^T Sigma g = sum Sigma g^2 over all tensors (eq. 2's normaliser), float64."""
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else None)
    for g, v in zip(grads, variances):
        total = total + (v.double() * g.double().square()).sum()
    return total


@op("vi", PERTURBED, L("variances", "state", True), Arg("sigma_norm", OPT_TENSOR),
    floats("dim", "eps", "var_lr", "prior_var", "num_data"), Arg("log_step", BOOL),
    Arg("min_var", FLOAT), FOUND_INF, returns="Tensor", result="norm")
def vsam_perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                  variances: List[Tensor], sigma_norm: Optional[Tensor], dim: float, eps: float,
                  var_lr: float, prior_var: float, num_data: float, log_step: bool,
                  min_var: float, found_inf: Optional[Tensor] = None) -> Tensor:
    """Alg. 3 line 3, eq. 2: e = sqrt(p) Sigma g / (sqrt(g^T Sigma g) + eps); backup <- mu, w <- mu + e.
    Then lines 6-7 with the same g and the Sigma used for e, eq. 42:

      dL/dSigma = sqrt(p) g^2 / (2 sqrt(g^T Sigma g)) + 1 / (2 N prior_var) - 1 / (2 N Sigma)
      log_step:  Sigma <- Sigma * exp(-var_lr * Sigma dL/dSigma)     (a step on log Sigma)
      else:      Sigma <- max(Sigma - var_lr * dL/dSigma, min_var)   (Alg. 3 line 7 as printed)

    ``dim`` = p, the parameter count over all groups; ``sigma_norm`` = sqrt(g^T Sigma g) over all
    groups (None computes it from this list).  Returns sigma_norm."""
    if sigma_norm is None:
        sigma_norm = vsam_sumsq(grads, variances).sqrt()
    if skipped(found_inf):
        copy_all_(backups, params)
        return sigma_norm
    sq = math.sqrt(dim)
    for p, g, b, v in zip(params, grads, backups, variances):
        b.copy_(p)
        w, gg, var = p.to(opmath(p)), g.to(opmath(p)), v.to(opmath(p))
        inv = 1.0 / (sigma_norm.to(w.dtype) + eps)
        p.copy_(w + sq * var * gg * inv)
        if log_step:  # Sigma * dL/dSigma written out: no 1/Sigma, so Sigma = 0 stays 0
            du = 0.5 * sq * var * gg * gg * inv + var / (2.0 * num_data * prior_var) \
                - 0.5 / num_data
            v.copy_(var * torch.exp(-var_lr * du))
        else:
            dv = 0.5 * sq * gg * gg * inv + 0.5 / (num_data * prior_var) - 0.5 / (num_data * var)
            v.copy_(torch.clamp(var - var_lr * dv, min=min_var))
    return sigma_norm


# ---------------------------------------------------------------------------------------------
# E-BiSAM (Alg. 3 of the BiSAM paper): stochastic weight perturbation
# ---------------------------------------------------------------------------------------------
@op("ebisam", PERTURBED, Arg("param_ids", INT_LIST), Arg("grad_norm", OPT_TENSOR), Arg("seed", INT),
    Arg("step", SYMINT), floats("rho", "beta", "eps"), FOUND_INF, DEVICE_STEP, returns="Tensor",
    result="norm")
def ebisam_perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                  param_ids: List[int], grad_norm: Optional[Tensor], seed: int, step: int,
                  rho: float, beta: float, eps: float, found_inf: Optional[Tensor] = None,
                  device_step: Optional[Tensor] = None) -> Tensor:
    """Alg. 3 lines 3-7: coordinate i is perturbed iff u_i < beta (u = philox_uniform(seed, step,
    param_id), the mask is never stored): e_i = rho / (1 - beta) * g_i / (||g|| + eps), else 0.
    backup <- w, w <- w + e.  ``||g||`` is over all coordinates, masked or not (None computes it
    from this list; the optimizer passes 1 with eps = 0 for the unnormalised e of Alg. 3 line 5).
    Returns the norm."""
    step = at_step(step, device_step)
    if grad_norm is None:
        grad_norm = torch.stack([g.double().square().sum() for g in grads]).sum().sqrt() \
            if grads else torch.zeros((), dtype=torch.float64)
    if skipped(found_inf):
        copy_all_(backups, params)
        return grad_norm
    for p, g, b, pid in zip(params, grads, backups, param_ids):
        b.copy_(p)
        w, gg = p.to(opmath(p)), g.to(opmath(p))
        chosen = philox_uniform(seed, step, pid, p.numel(), p.device).view(p.shape) < beta
        scale = rho / (1.0 - beta) / (grad_norm.to(w.dtype) + eps)
        p.copy_(torch.where(chosen, w + gg * scale, w))
    return grad_norm


# ---------------------------------------------------------------------------------------------
# SAM variants: GSAM (Zhuang et al. 2022), WSAM (Yue et al. 2023), LookSAM (Liu et al. 2022),
# FriendlySAM (Li et al. 2024).  Three ops serve all four (docs/spec.md "SAM variants"):
# samv_perturb_ (SAM's ascent that also keeps g0, or FriendlySAM's ascent on g0 - sigma m),
# samv_dots (the three global dot products a direction needs, on the device) and
# samv_restore_{sgd,adam}_ (restore + base step with d = c0 g + c1 s, the coefficients a
# device tensor, plus a decoupled correction and an optional written combination).
# ---------------------------------------------------------------------------------------------
@op("samv", L("lhs", "grad"), L("rhs", "state"), Arg("shift", FLOAT), returns="Tensor",
    result="dots")
def samv_dots(lhs: Sequence[Tensor], rhs: Sequence[Tensor], shift: float) -> Tensor:
    """[<u,u>, <u,b>, <b,b>] over all tensors, u = a - shift b (a = lhs, b = rhs): a float64
    tensor of 3 on the lists' device, every product and sum in float64."""
    total = torch.zeros(3, dtype=torch.float64, device=lhs[0].device if lhs else None)
    for a, b in zip(lhs, rhs):
        bb = b.double()
        u = a.double() - shift * bb if shift != 0 else a.double()
        total = total + torch.stack([(u * u).sum(), (u * bb).sum(), (bb * bb).sum()])
    return total


@op("samv", PERTURBED, L("saved", "state?", True), L("momenta", "state?", True),
    Arg("norm", TENSOR), floats("rho", "eps"), Arg("adaptive", BOOL), floats("eta", "sigma", "lmbda"),
    Arg("first", BOOL), FOUND_INF)
def samv_perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                  saved: List[Tensor], momenta: List[Tensor], norm: Tensor, rho: float,
                  eps: float, adaptive: bool, eta: float, sigma: float, lmbda: float,
                  first: bool, found_inf: Optional[Tensor] = None) -> None:
    """backup <- w;  w <- w + rho T^2 u / (norm + eps)  (T = |w| + eta with ``adaptive``, else 1).

    u = g, and ``saved`` (when given) keeps g0 = g for the update (GSAM, WSAM, LookSAM).  With
    ``momenta`` (FriendlySAM): u = g - sigma m and m <- lmbda m + (1 - lmbda) g, except on the
    ``first`` step, where u = g and m <- g.  ``norm`` is ||T u|| over all groups (a 0-dim tensor
    read on the device)."""
    if skipped(found_inf):
        return copy_all_(backups, params)
    for i, (p, g, b) in enumerate(zip(params, grads, backups)):
        b.copy_(p)
        w, gg = p.to(opmath(p)), g.to(opmath(p))
        u = gg
        if saved:
            saved[i].copy_(gg)
        if momenta:
            m = momenta[i].to(w.dtype)
            if first:
                momenta[i].copy_(gg)
            else:
                u = gg - sigma * m
                momenta[i].copy_(lmbda * m + (1.0 - lmbda) * gg)
        scale = rho / (norm.to(w.dtype) + eps)
        if adaptive:
            t = w.abs() + eta
            u = u * (t * t)
        p.copy_(w + u * scale)


def _samv_mix(c: Tensor, g: Tensor, s: Tensor, j: int) -> Tensor:
    return c[j] * g + c[j + 1] * s


@op("samv", UPDATED, L("saved", "state"), L("momentum_bufs", "state?", True),
    L("outs", "state?", True), Arg("coeffs", TENSOR), floats("lr", "momentum", "dampening"),
    Arg("nesterov", BOOL), Arg("weight_decay", FLOAT), Arg("first", BOOL), FOUND_INF)
def samv_restore_sgd_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                      saved: List[Tensor], momentum_bufs: List[Tensor], outs: List[Tensor],
                      coeffs: Tensor, lr: float, momentum: float, dampening: float,
                      nesterov: bool, weight_decay: float, first: bool,
                      found_inf: Optional[Tensor] = None) -> None:
    """w <- backup, then torch.optim.SGD's step with d = c0 g + c1 s (g = grads, s = saved), then
    w <- w + (c2 g + c3 s); ``outs`` (when given) <- c4 g + c5 s.

    ``coeffs`` = (c0, ..., c5), a float64 tensor of 6 on the parameters' device (computed there
    from ``samv_dots``: no host sync), each rounded to the op-math dtype.  ``first`` as in
    ``sam_restore_sgd_``."""
    if skipped(found_inf):
        return copy_all_(params, backups)
    # The base step in torch.optim.SGD's calls (as sam_restore_sgd_): with d = g (c = 1, 0, 0,
    # 0, ...) it is that step bit for bit.
    for i, (p, g, b, s) in enumerate(zip(params, grads, backups, saved)):
        c = coeffs.to(opmath(p))
        w, gg, ss = b.to(opmath(p), copy=True), g.to(opmath(p)), s.to(opmath(p))
        w = _sgd_step_(w, _samv_mix(c, gg, ss, 0), momentum_bufs, i, lr, momentum, dampening,
                       nesterov, weight_decay, first)
        if outs:
            outs[i].copy_(_samv_mix(c, gg, ss, 4))
        p.copy_(w.add_(_samv_mix(c, gg, ss, 2)))


@op("samv", UPDATED, L("saved", "state"), L("exp_avgs", "state", True),
    L("exp_avg_sqs", "state", True), L("outs", "state?", True), Arg("coeffs", TENSOR),
    Arg("step", SYMINT), floats("lr", "beta1", "beta2", "eps", "weight_decay"), Arg("decoupled", BOOL),
    FOUND_INF, DEVICE_STEP)
def samv_restore_adam_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                       saved: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                       outs: List[Tensor], coeffs: Tensor, step: int, lr: float, beta1: float,
                       beta2: float, eps: float, weight_decay: float, decoupled: bool,
                       found_inf: Optional[Tensor] = None,
                       device_step: Optional[Tensor] = None) -> None:
    """w <- backup, then Adam (L2) / AdamW (decoupled decay) with d = c0 g + c1 s, then
    w <- w + (c2 g + c3 s); ``outs`` (when given) <- c4 g + c5 s (see ``samv_restore_sgd_``);
    ``step`` counts from 1."""
    step = at_step(step, device_step)
    if skipped(found_inf):
        return copy_all_(params, backups)
    for i, (p, g, b, s, m, v) in enumerate(zip(params, grads, backups, saved, exp_avgs,
                                               exp_avg_sqs)):
        c = coeffs.to(opmath(p))
        w, gg, ss = b.to(opmath(p), copy=True), g.to(opmath(p)), s.to(opmath(p))
        w = _adam_step_(w, _samv_mix(c, gg, ss, 0), m, v, lr, beta1, beta2, eps, weight_decay,
                        decoupled, step)
        if outs:
            outs[i].copy_(_samv_mix(c, gg, ss, 4))
        p.copy_(w.add_(_samv_mix(c, gg, ss, 2)))
# IVON (Shen et al. 2024, "Variational Learning is Effective for Large Deep Networks", Alg. 1;
# docs/spec.md "IVON")
# ---------------------------------------------------------------------------------------------
def _ivon_noise(h: Tensor, z: Tensor, ess: float, weight_decay: float) -> Tensor:
    """sigma z = z / sqrt(lambda (h + delta)): the noise of the posterior q = N(m, 1 / (lambda (h
    + delta)))."""
    return z / torch.sqrt(ess * (h + weight_decay))


def check_ivon_count(op_name: str, count: int, has_means: bool = True) -> None:
    """``count`` numbers the samples of a step from 1; from the second on, the running means of
    the earlier ones are needed (``has_means``: given, or no parameters at all).  Also the Triton
    backend's check (the C++ one: csrc/phase_checks.h)."""
    if count < 1:
        raise ValueError(f"{op_name}: count numbers the samples of a step from 1, got {count}")
    if count > 1 and not has_means:
        raise ValueError(f"{op_name}: count={count} needs avg_grads and avg_nxgs (the running "
                         "means of the earlier samples)")


def check_ivon_update(params: List[Tensor], avg_grads: List[Tensor], avg_nxgs: List[Tensor],
                      count: int) -> None:
    """ivon_update_'s checks: ``count`` as above, the two running means given together."""
    check_ivon_count("ivon_update_", count, bool(avg_grads) or not params)
    if len(avg_grads) != len(avg_nxgs):
        raise ValueError(f"ivon_update_: avg_grads has {len(avg_grads)} tensors but avg_nxgs has "
                         f"{len(avg_nxgs)}")


@op("ivon", NOISED, L("hessians", "state"), IDS_SEED_STEP, floats("ess", "weight_decay"),
    DEVICE_STEP)
def ivon_noise_(params: List[Tensor], backups: List[Tensor], hessians: List[Tensor],
                param_ids: List[int], seed: int, step: int, ess: float,
                weight_decay: float, device_step: Optional[Tensor] = None) -> None:
    """Alg. 1 line 2: backup <- m;  w <- theta = m + z / sqrt(lambda (h + delta)),
    z = philox_normal(seed, step, param_id)."""
    step = at_step(step, device_step)
    for p, b, h, pid in zip(params, backups, hessians, param_ids):
        b.copy_(p)
        m = p.to(opmath(p))
        z = philox_normal(seed, step, pid, p.numel(), p.device, m.dtype).view(p.shape)
        p.copy_(m + _ivon_noise(h.to(m.dtype), z, ess, weight_decay))


@op("ivon", UPDATED, L("hessians", "state"), L("avg_grads", "state", True),
    L("avg_nxgs", "state", True), IDS_SEED_STEP, floats("ess", "weight_decay"),
    Arg("count", SYMINT), FOUND_INF, DEVICE_STEP)
def ivon_accumulate_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                     hessians: List[Tensor], avg_grads: List[Tensor], avg_nxgs: List[Tensor],
                     param_ids: List[int], seed: int, step: int, ess: float, weight_decay: float,
                     count: int, found_inf: Optional[Tensor] = None,
                     device_step: Optional[Tensor] = None) -> None:
    """Alg. 1 lines 2-3 for sample ``count`` of a step with more than one: with g the gradient at
    theta = m + sigma z (z regenerated from (seed, step), the counter of its ``ivon_noise_``),
    running means over the samples (Welford; ``count`` = 1 starts them):

      gbar <- gbar + (g - gbar) / count;   nxg <- nxg + (sigma z g - nxg) / count;   w <- m.
    """
    step = at_step(step, device_step)
    check_ivon_count("ivon_accumulate_", count)
    if skipped(found_inf):
        return copy_all_(params, backups)
    for p, g, b, h, ag, an, pid in zip(params, grads, backups, hessians, avg_grads, avg_nxgs,
                                       param_ids):
        gg = g.to(opmath(p))
        z = philox_normal(seed, step, pid, p.numel(), p.device, gg.dtype).view(p.shape)
        nxg = _ivon_noise(h.to(gg.dtype), z, ess, weight_decay) * gg
        if count == 1:
            ag.copy_(gg)
            an.copy_(nxg)
        else:
            a0, n0 = ag.to(gg.dtype), an.to(gg.dtype)
            ag.copy_(a0 + (gg - a0) / count)
            an.copy_(n0 + (nxg - n0) / count)
        p.copy_(b)


@op("ivon", UPDATED, L("hessians", "state", True), L("momenta", "state", True),
    L("avg_grads", "state?"), L("avg_nxgs", "state?"), IDS_SEED_STEP,
    floats("lr", "ess", "weight_decay", "beta1", "beta2", "clip_radius", "bias_correction"),
    Arg("count", SYMINT), FOUND_INF, DEVICE_STEP, DEBIAS_STEP)
def ivon_update_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                 hessians: List[Tensor], momenta: List[Tensor], avg_grads: List[Tensor],
                 avg_nxgs: List[Tensor], param_ids: List[int], seed: int, step: int, lr: float,
                 ess: float, weight_decay: float, beta1: float, beta2: float, clip_radius: float,
                 bias_correction: float, count: int,
                 found_inf: Optional[Tensor] = None, device_step: Optional[Tensor] = None,
                 debias_step: Optional[Tensor] = None) -> None:
    """Alg. 1 lines 2-8 with the last sample's gradient g at theta = m + sigma z (z regenerated
    from (seed, step)), averaged into the running means of the earlier ``count - 1`` samples
    (``avg_grads``, ``avg_nxgs``; empty for one sample a step, ``count`` = 1):

      gbar = mean of g;  nxg = mean of sigma z g
      gm <- beta1 gm + (1 - beta1) gbar
      f  = nxg (h + delta) lambda                         (= mean of g z / sigma)
      h  <- beta2 h + (1 - beta2) f + (1 - beta2)^2 / 2 (h - f)^2 / (h + delta)
      m  <- m - lr clip((gm / bias_correction + delta m) / (h + delta), -clip_radius, clip_radius)
      w  <- m.

    ``lr`` is the step size as taken (the optimizer's lr times h0 + delta when it rescales), and
    ``bias_correction`` = 1 - beta1^t (or 1); with ``debias_step`` (t on the device) the op
    forms 1 - beta1^t itself."""
    step = at_step(step, device_step)
    if debias_step is not None:
        bias_correction = 1.0 - math.pow(beta1, float(at_step(0, debias_step)))
    check_ivon_update(params, avg_grads, avg_nxgs, count)
    if skipped(found_inf):
        return copy_all_(params, backups)
    for i, (p, g, b, h, gm, pid) in enumerate(zip(params, grads, backups, hessians, momenta,
                                                  param_ids)):
        m, gg, hh = b.to(opmath(p)), g.to(opmath(p)), h.to(opmath(p))
        z = philox_normal(seed, step, pid, p.numel(), p.device, m.dtype).view(p.shape)
        nxg = _ivon_noise(hh, z, ess, weight_decay) * gg
        if avg_grads:
            a0, n0 = avg_grads[i].to(m.dtype), avg_nxgs[i].to(m.dtype)
            gg = a0 + (gg - a0) / count
            nxg = n0 + (nxg - n0) / count
        mom = beta1 * gm.to(m.dtype) + (1.0 - beta1) * gg
        f = nxg * (hh + weight_decay) * ess
        h_new = beta2 * hh + (1.0 - beta2) * f + \
            (0.5 * (1.0 - beta2) ** 2) * (hh - f).square() / (hh + weight_decay)
        step_ = torch.clamp((mom / bias_correction + weight_decay * m) / (h_new + weight_decay),
                            -clip_radius, clip_radius)
        gm.copy_(mom)
        h.copy_(h_new)
        p.copy_(m - lr * step_)
