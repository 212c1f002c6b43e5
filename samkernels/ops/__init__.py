"""Multi-tensor ops, one per optimizer phase.  Each call covers a whole list of tensors.

These functions only pick the backend (``samkernels._dispatch``) and forward the arguments; the
semantics are those of the same-named function in :mod:`samkernels.ops.reference`.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from samkernels import _dispatch
from samkernels.ops import _library  # noqa: F401  (the schemas and fakes, from the op table)
from samkernels.ops import reference  # noqa: F401  (the executable spec)

__all__ = ["grad_sumsq", "sam_perturb_", "sam_restore_sgd_", "sam_restore_adam_",
           "bsam_noise_", "bsam_perturb_", "bsam_update_"]


def _device(tensors: List[Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


def _impl(name: str, tensors: List[Tensor], backend: Optional[str]):
    return _dispatch.implementation(name, _device(tensors), backend)


def grad_sumsq(params: List[Tensor], grads: List[Tensor], adaptive: bool = False, eta: float = 0.0,
               *, backend: Optional[str] = None) -> Tensor:
    return _impl("grad_sumsq", grads, backend)(params, grads, adaptive, eta)


def sam_perturb_(params, grads, backups, grad_norm, rho, eps, adaptive, eta, found_inf=None, *,
                 backend=None) -> Tensor:
    return _impl("sam_perturb_", params, backend)(params, grads, backups, grad_norm, rho, eps,
                                                 adaptive, eta, found_inf=found_inf)


def sam_restore_sgd_(params, grads, backups, momentum_bufs, lr, momentum, dampening, nesterov,
                     weight_decay, first, found_inf=None, *, backend=None) -> None:
    _impl("sam_restore_sgd_", params, backend)(params, grads, backups, momentum_bufs, lr, momentum,
                                               dampening, nesterov, weight_decay, first,
                                               found_inf=found_inf)


def sam_restore_adam_(params, grads, backups, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                      weight_decay, decoupled, found_inf=None, *, backend=None) -> None:
    _impl("sam_restore_adam_", params, backend)(params, grads, backups, exp_avgs, exp_avg_sqs, step,
                                                lr, beta1, beta2, eps, weight_decay, decoupled,
                                                found_inf=found_inf)


def bsam_noise_(params, backups, precisions, param_ids, seed, step, num_data, *, backend=None) -> None:
    _impl("bsam_noise_", params, backend)(params, backups, precisions, param_ids, seed, step, num_data)


def bsam_perturb_(params, grads, backups, precisions, accums, rho, beta2, delta, gamma,
                  found_inf=None, *, backend=None) -> None:
    _impl("bsam_perturb_", params, backend)(params, grads, backups, precisions, accums, rho, beta2,
                                            delta, gamma, found_inf=found_inf)


def bsam_update_(params, grads, backups, precisions, momenta, accums, lr, beta1, beta2, delta, gamma,
                 accum_scale, released_order, found_inf=None, *, backend=None) -> None:
    if released_order and not accums:  # every backend: s before line 5 is gone without accums
        raise ValueError("bsam_update_: released_order=True needs accums (line 5 must wait for the update to keep the old s)")
    _impl("bsam_update_", params, backend)(params, grads, backups, precisions, momenta, accums, lr,
                                           beta1, beta2, delta, gamma, accum_scale, released_order,
                                           found_inf=found_inf)
