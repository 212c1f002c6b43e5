"""The executable specification of the MFVI-family and E-BiSAM phases, in plain PyTorch.

Same conventions as :mod:`samkernels.ops.reference` (lists of tensors, one per parameter; maths in
``opmath``; backups are copies of the mean weights; noise from the shared Philox counter, never
stored).  Papers: Ujváry et al., "Rethinking SAM as Variational Inference" (RandomSAM Alg. 1, MFVI
Alg. 2, VSAM Alg. 3 / App. E) and Xie et al., "Improving SAM requires rethinking its optimization
formulation" (E-BiSAM Alg. 3).  ``docs/spec.md``: "MFVI", "VariationalSAM", "E-BiSAM".

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

from samkernels.ops.reference import (_MASK32, copy_all_, opmath, philox4x32, philox_normal,
                                      skipped)

__all__ = ["philox_uniform", "vi_noise_", "mfvi_update_", "vsam_sumsq", "vsam_perturb_",
           "ebisam_perturb_"]


def philox_uniform(seed: int, step: int, param_id: int, numel: int, device=None,
                   dtype=torch.float64) -> Tensor:
    """Uniforms in (0, 1) for elements 0..numel-1: element i takes word i % 4 of the Philox block
    philox_normal uses for it, u = ((x >> 9) + 1/2) / 2**23 (exact in float32)."""
    i = torch.arange(numel, dtype=torch.int64, device=device)
    q = i >> 2
    full = lambda v: torch.full_like(q, v)  # noqa: E731
    x = philox4x32(q, full(param_id & _MASK32), full(step & _MASK32), full((step >> 32) & _MASK32),
                   seed & _MASK32, (seed >> 32) & _MASK32)
    word = torch.stack(x).gather(0, (i & 3).unsqueeze(0)).squeeze(0)
    return ((word >> 9).to(dtype) + 0.5) * 2.0 ** -23


# ---------------------------------------------------------------------------------------------
# RandomSAM (Alg. 1) and MFVI (Alg. 2)
# ---------------------------------------------------------------------------------------------
def vi_noise_(params: List[Tensor], backups: List[Tensor], variances: List[Tensor],
              param_ids: List[int], seed: int, step: int, sigma: float) -> None:
    """backup <- mu;  w <- mu + std * z,  z = philox_normal(seed, step, param_id).

    std = sqrt(Sigma) with ``variances`` (MFVI, Alg. 2 line 3), else the fixed ``sigma``
    (RandomSAM, Alg. 1 line 3: sigma0)."""
    for i, (p, b, pid) in enumerate(zip(params, backups, param_ids)):
        b.copy_(p)
        w = p.to(opmath(p))
        z = philox_normal(seed, step, pid, p.numel(), p.device, w.dtype).view(p.shape)
        std = variances[i].to(w.dtype).sqrt() if variances else sigma
        p.copy_(w + std * z)


def mfvi_update_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                 variances: List[Tensor], momenta: List[Tensor], param_ids: List[int], seed: int,
                 step: int, lr: float, var_lr: float, momentum: float, prior_var: float,
                 num_data: float, found_inf: Optional[Tensor] = None) -> None:
    """Alg. 2 lines 4-5 with g = grads taken at theta = mu + sqrt(Sigma) z (z regenerated from
    (seed, step), the counter of the ``vi_noise_`` call), loss E L + KL[q || N(0, prior_var I)] / N:

      d   = g + mu / (N prior_var)                                 (eq. 7; KL/N of eq. 39)
      buf = momentum * buf + d  (only with ``momenta``);  mu <- mu - lr * buf
      dL/du = g z sqrt(Sigma) / 2 + (Sigma / prior_var - 1) / (2N)  (u = log Sigma; eq. 39)
      Sigma <- Sigma * exp(-var_lr * dL/du);  w <- mu.
    """
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
def vsam_sumsq(grads: Sequence[Tensor], variances: Sequence[Tensor]) -> Tensor:
    """g^T Sigma g = sum Sigma g^2 over all tensors (eq. 2's normaliser), float64."""
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else None)
    for g, v in zip(grads, variances):
        total = total + (v.double() * g.double().square()).sum()
    return total


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
def ebisam_perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                  param_ids: List[int], grad_norm: Optional[Tensor], seed: int, step: int,
                  rho: float, beta: float, eps: float, found_inf: Optional[Tensor] = None) -> Tensor:
    """Alg. 3 lines 3-7: coordinate i is perturbed iff u_i < beta (u = philox_uniform(seed, step,
    param_id), the mask is never stored): e_i = rho / (1 - beta) * g_i / (||g|| + eps), else 0.
    backup <- w, w <- w + e.  ``||g||`` is over all coordinates, masked or not (None computes it
    from this list; the optimizer passes 1 with eps = 0 for the unnormalised e of Alg. 3 line 5).
    Returns the norm."""
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
