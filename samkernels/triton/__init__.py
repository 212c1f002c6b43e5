"""Triton backend: every SAM / bSAM / MFVI-family / E-BiSAM phase of :mod:`samkernels.ops.reference`
(and :mod:`samkernels.ops.reference_vi`) as multi-tensor Triton kernels (one launch per dtype group
and phase, see ``_multi_tensor``).

The public functions have exactly the reference's names, signatures and in-place effects.  They run
on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported.

Each phase is a ``torch.library.custom_op`` in the ``samkernels_triton`` namespace (with a fake
implementation), so ``torch.compile`` traces through it as one opaque, functionalised node
instead of failing on the raw pointer tables.  Two things stay in thin Python wrappers around the
ops:
  * ``sam_perturb_`` (likewise ``ebisam_perturb_``, ``vsam_perturb_``) may return its norm argument,
    and a custom op may not return an alias of an input: the wrapper computes the norm
    (``grad_sumsq`` / ``vsam_sumsq`` op + sqrt, on the device) when it is None and returns it, the
    perturbation op itself returns nothing;
  * ``seed`` / ``step`` / ``param_ids`` are arbitrary Python ints in the reference but ``int``
    (int64) in an op schema: the wrapper maps them to the signed int64 with the same low 64 bits,
    which is all the Philox counter and key use.

``found_inf`` (the gradient-consuming phases' optional last argument): a one-element tensor on the
parameters' device; nonzero selects the op's skip form *in the kernels* (see sam_step / bsam_step /
vi_step), so passing it never syncs with the host.
"""
from typing import List, Optional

import torch
from torch import Tensor

from samkernels.triton import bsam_step, sam_step, vi_step
from samkernels.triton.bsam_step import philox_probe

__all__ = ["grad_sumsq", "sam_perturb_", "sam_restore_sgd_", "sam_restore_adam_", "bsam_noise_",
           "bsam_perturb_", "bsam_update_", "vi_noise_", "mfvi_update_", "vsam_sumsq",
           "vsam_perturb_", "ebisam_perturb_", "philox_probe"]

_NS = "samkernels_triton"


def _i64(x):
    """The signed int64 with the same low 64 bits as ``x``.  In-range values (and SymInts under
    torch.compile) pass through untouched, so a changing ``step`` is not specialised on."""
    if isinstance(x, int) and not -(1 << 63) <= x < (1 << 63):
        x &= (1 << 64) - 1
        return x - (1 << 64) if x >= 1 << 63 else x
    return x


# --- SAM / ASAM ------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::grad_sumsq", mutates_args=())
def _grad_sumsq_op(params: List[Tensor], grads: List[Tensor], adaptive: bool, eta: float) -> Tensor:
    return sam_step._grad_sumsq(params, grads, adaptive, eta)


@_grad_sumsq_op.register_fake
def _(params, grads, adaptive, eta):
    return torch.empty((), dtype=torch.float64,  # the norm contract: float64 on every backend
                       device=grads[0].device if grads else torch.device("cpu"))


@torch.library.custom_op(f"{_NS}::sam_perturb_", mutates_args=("params", "backups"))
def _sam_perturb_op(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                    grad_norm: Tensor, rho: float, eps: float, adaptive: bool, eta: float,
                    found_inf: Optional[Tensor]) -> None:
    sam_step._sam_perturb_apply(params, grads, backups, grad_norm, rho, eps, adaptive, eta,
                                found_inf)


@_sam_perturb_op.register_fake
def _(params, grads, backups, grad_norm, rho, eps, adaptive, eta, found_inf):
    return None


@torch.library.custom_op(f"{_NS}::sam_restore_sgd_", mutates_args=("params", "momentum_bufs"))
def _sam_restore_sgd_op(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                        momentum_bufs: List[Tensor], lr: float, momentum: float, dampening: float,
                        nesterov: bool, weight_decay: float, first: bool,
                        found_inf: Optional[Tensor]) -> None:
    sam_step._sam_restore_sgd(params, grads, backups, momentum_bufs, lr, momentum, dampening,
                              nesterov, weight_decay, first, found_inf)


@_sam_restore_sgd_op.register_fake
def _(params, grads, backups, momentum_bufs, lr, momentum, dampening, nesterov, weight_decay,
      first, found_inf):
    return None


@torch.library.custom_op(f"{_NS}::sam_restore_adam_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def _sam_restore_adam_op(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                         exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], step: int, lr: float,
                         beta1: float, beta2: float, eps: float, weight_decay: float,
                         decoupled: bool, found_inf: Optional[Tensor]) -> None:
    sam_step._sam_restore_adam(params, grads, backups, exp_avgs, exp_avg_sqs, step, lr, beta1,
                               beta2, eps, weight_decay, decoupled, found_inf)


@_sam_restore_adam_op.register_fake
def _(params, grads, backups, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
      decoupled, found_inf):
    return None


# --- bSAM ------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::bsam_noise_", mutates_args=("params", "backups"))
def _bsam_noise_op(params: List[Tensor], backups: List[Tensor], precisions: List[Tensor],
                   param_ids: List[int], seed: int, step: int, num_data: float) -> None:
    bsam_step._bsam_noise(params, backups, precisions, param_ids, seed, step, num_data)


@_bsam_noise_op.register_fake
def _(params, backups, precisions, param_ids, seed, step, num_data):
    return None


@torch.library.custom_op(f"{_NS}::bsam_perturb_", mutates_args=("params", "precisions", "accums"))
def _bsam_perturb_op(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                     precisions: List[Tensor], accums: List[Tensor], rho: float, beta2: float,
                     delta: float, gamma: float, found_inf: Optional[Tensor]) -> None:
    bsam_step._bsam_perturb(params, grads, backups, precisions, accums, rho, beta2, delta, gamma,
                            found_inf)


@_bsam_perturb_op.register_fake
def _(params, grads, backups, precisions, accums, rho, beta2, delta, gamma, found_inf):
    return None


@torch.library.custom_op(f"{_NS}::bsam_update_", mutates_args=("params", "precisions", "momenta"))
def _bsam_update_op(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                    precisions: List[Tensor], momenta: List[Tensor], accums: List[Tensor],
                    lr: float, beta1: float, beta2: float, delta: float, gamma: float,
                    accum_scale: float, released_order: bool, found_inf: Optional[Tensor]) -> None:
    bsam_step._bsam_update(params, grads, backups, precisions, momenta, accums, lr, beta1, beta2,
                           delta, gamma, accum_scale, released_order, found_inf)


@_bsam_update_op.register_fake
def _(params, grads, backups, precisions, momenta, accums, lr, beta1, beta2, delta, gamma,
      accum_scale, released_order, found_inf):
    return None


# --- MFVI family (RandomSAM, MFVI, VariationalSAM) and E-BiSAM -------------------------------
@torch.library.custom_op(f"{_NS}::vi_noise_", mutates_args=("params", "backups"))
def _vi_noise_op(params: List[Tensor], backups: List[Tensor], variances: List[Tensor],
                 param_ids: List[int], seed: int, step: int, sigma: float) -> None:
    vi_step._vi_noise(params, backups, variances, param_ids, seed, step, sigma)


@_vi_noise_op.register_fake
def _(params, backups, variances, param_ids, seed, step, sigma):
    return None


@torch.library.custom_op(f"{_NS}::mfvi_update_", mutates_args=("params", "variances", "momenta"))
def _mfvi_update_op(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                    variances: List[Tensor], momenta: List[Tensor], param_ids: List[int],
                    seed: int, step: int, lr: float, var_lr: float, momentum: float,
                    prior_var: float, num_data: float, found_inf: Optional[Tensor]) -> None:
    vi_step._mfvi_update(params, grads, backups, variances, momenta, param_ids, seed, step, lr,
                         var_lr, momentum, prior_var, num_data, found_inf)


@_mfvi_update_op.register_fake
def _(params, grads, backups, variances, momenta, param_ids, seed, step, lr, var_lr, momentum,
      prior_var, num_data, found_inf):
    return None


@torch.library.custom_op(f"{_NS}::vsam_sumsq", mutates_args=())
def _vsam_sumsq_op(grads: List[Tensor], variances: List[Tensor]) -> Tensor:
    return vi_step._vsam_sumsq(grads, variances)


@_vsam_sumsq_op.register_fake
def _(grads, variances):
    return torch.empty((), dtype=torch.float64,
                       device=grads[0].device if grads else torch.device("cpu"))


@torch.library.custom_op(f"{_NS}::vsam_perturb_",
                         mutates_args=("params", "backups", "variances"))
def _vsam_perturb_op(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                     variances: List[Tensor], sigma_norm: Tensor, dim: float, eps: float,
                     var_lr: float, prior_var: float, num_data: float, log_step: bool,
                     min_var: float, found_inf: Optional[Tensor]) -> None:
    vi_step._vsam_perturb_apply(params, grads, backups, variances, sigma_norm, dim, eps, var_lr,
                                prior_var, num_data, log_step, min_var, found_inf)


@_vsam_perturb_op.register_fake
def _(params, grads, backups, variances, sigma_norm, dim, eps, var_lr, prior_var, num_data,
      log_step, min_var, found_inf):
    return None


@torch.library.custom_op(f"{_NS}::ebisam_perturb_", mutates_args=("params", "backups"))
def _ebisam_perturb_op(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                     param_ids: List[int], grad_norm: Tensor, seed: int, step: int, rho: float,
                     beta: float, eps: float, found_inf: Optional[Tensor]) -> None:
    vi_step._ebisam_perturb_apply(params, grads, backups, param_ids, grad_norm, seed, step, rho,
                                beta, eps, found_inf)


@_ebisam_perturb_op.register_fake
def _(params, grads, backups, param_ids, grad_norm, seed, step, rho, beta, eps, found_inf):
    return None


# --- the public phases (reference.py signatures) ----------------------------------------------
def grad_sumsq(params: List[Tensor], grads: List[Tensor], adaptive: bool, eta: float) -> Tensor:
    """sum ||T g||^2 (reference.grad_sumsq): accumulated in float64, a 0-dim float64 tensor."""
    return _grad_sumsq_op(list(params), list(grads), adaptive, eta)


def sam_perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                 grad_norm: Optional[Tensor], rho: float, eps: float, adaptive: bool,
                 eta: float, found_inf: Optional[Tensor] = None) -> Tensor:
    if grad_norm is None:  # stays on the device: partial sums -> sum -> sqrt (float64), no sync
        grad_norm = grad_sumsq(params, grads, adaptive, eta).sqrt()
    _sam_perturb_op(list(params), list(grads), list(backups), grad_norm, rho, eps, adaptive, eta,
                    found_inf)
    return grad_norm


def sam_restore_sgd_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                     momentum_bufs: List[Tensor], lr: float, momentum: float, dampening: float,
                     nesterov: bool, weight_decay: float, first: bool,
                     found_inf: Optional[Tensor] = None) -> None:
    _sam_restore_sgd_op(list(params), list(grads), list(backups), list(momentum_bufs), lr,
                        momentum, dampening, nesterov, weight_decay, first, found_inf)


def sam_restore_adam_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                      exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], step: int, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float,
                      decoupled: bool, found_inf: Optional[Tensor] = None) -> None:
    _sam_restore_adam_op(list(params), list(grads), list(backups), list(exp_avgs),
                         list(exp_avg_sqs), step, lr, beta1, beta2, eps, weight_decay,
                         decoupled, found_inf)


def bsam_noise_(params: List[Tensor], backups: List[Tensor], precisions: List[Tensor],
                param_ids: List[int], seed: int, step: int, num_data: float) -> None:
    _bsam_noise_op(list(params), list(backups), list(precisions), [_i64(i) for i in param_ids],
                   _i64(seed), _i64(step), num_data)


def bsam_perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                  precisions: List[Tensor], accums: List[Tensor], rho: float, beta2: float,
                  delta: float, gamma: float, found_inf: Optional[Tensor] = None) -> None:
    _bsam_perturb_op(list(params), list(grads), list(backups), list(precisions), list(accums),
                     rho, beta2, delta, gamma, found_inf)


def bsam_update_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                 precisions: List[Tensor], momenta: List[Tensor], accums: List[Tensor], lr: float,
                 beta1: float, beta2: float, delta: float, gamma: float, accum_scale: float,
                 released_order: bool, found_inf: Optional[Tensor] = None) -> None:
    _bsam_update_op(list(params), list(grads), list(backups), list(precisions), list(momenta),
                    list(accums), lr, beta1, beta2, delta, gamma, accum_scale, released_order,
                    found_inf)


def vi_noise_(params: List[Tensor], backups: List[Tensor], variances: List[Tensor],
              param_ids: List[int], seed: int, step: int, sigma: float) -> None:
    """backup <- mu; w <- mu + std z (reference_vi.vi_noise_; std = sqrt(Sigma), or ``sigma``
    when ``variances`` is empty)."""
    _vi_noise_op(list(params), list(backups), list(variances), [_i64(i) for i in param_ids],
                 _i64(seed), _i64(step), sigma)


def mfvi_update_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                 variances: List[Tensor], momenta: List[Tensor], param_ids: List[int], seed: int,
                 step: int, lr: float, var_lr: float, momentum: float, prior_var: float,
                 num_data: float, found_inf: Optional[Tensor] = None) -> None:
    _mfvi_update_op(list(params), list(grads), list(backups), list(variances), list(momenta),
                    [_i64(i) for i in param_ids], _i64(seed), _i64(step), lr, var_lr, momentum,
                    prior_var, num_data, found_inf)


def vsam_sumsq(grads: List[Tensor], variances: List[Tensor]) -> Tensor:
    """g^T Sigma g (reference_vi.vsam_sumsq), a float64 0-d tensor on the grads' device."""
    return _vsam_sumsq_op(list(grads), list(variances))


def vsam_perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                  variances: List[Tensor], sigma_norm: Optional[Tensor], dim: float, eps: float,
                  var_lr: float, prior_var: float, num_data: float, log_step: bool,
                  min_var: float, found_inf: Optional[Tensor] = None) -> Tensor:
    if sigma_norm is None:  # stays on the device: partial sums -> sum -> sqrt (float64)
        sigma_norm = vsam_sumsq(grads, variances).sqrt()
    _vsam_perturb_op(list(params), list(grads), list(backups), list(variances), sigma_norm, dim,
                     eps, var_lr, prior_var, num_data, log_step, min_var, found_inf)
    return sigma_norm


def ebisam_perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                  param_ids: List[int], grad_norm: Optional[Tensor], seed: int, step: int,
                  rho: float, beta: float, eps: float,
                  found_inf: Optional[Tensor] = None) -> Tensor:
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"ebisam_perturb_: beta must be in [0, 1), got {beta}")
    if grad_norm is None:  # ||g|| on the device, float64
        grad_norm = grad_sumsq(grads, grads, False, 0.0).sqrt()
    _ebisam_perturb_op(list(params), list(grads), list(backups), [_i64(i) for i in param_ids],
                     grad_norm, _i64(seed), _i64(step), rho, beta, eps, found_inf)
    return grad_norm
