"""Multi-tensor ops of the MFVI family (RandomSAM, MFVI, VariationalSAM) and E-BiSAM.

Like :mod:`samkernels.ops`, these only pick the backend and forward the arguments; semantics are
those of the same-named functions in :mod:`samkernels.ops.reference_vi` (re-exported by
:mod:`samkernels.ops.reference`, where the dispatcher looks them up).  CPU kernels:
``csrc/cpu/vi_step.cpp`` and ``csrc/cpu/ebisam_step.cpp``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from samkernels import _dispatch
from samkernels.ops import _impl

__all__ = ["vi_noise_", "mfvi_update_", "vsam_sumsq", "vsam_perturb_", "ebisam_perturb_"]


def vi_noise_(params, backups, variances, param_ids, seed, step, sigma, *, backend=None) -> None:
    _impl("vi_noise_", params, backend)(params, backups, variances, param_ids, seed, step, sigma)


def mfvi_update_(params, grads, backups, variances, momenta, param_ids, seed, step, lr, var_lr,
                 momentum, prior_var, num_data, found_inf=None, *, backend=None) -> None:
    _impl("mfvi_update_", params, backend)(params, grads, backups, variances, momenta, param_ids,
                                           seed, step, lr, var_lr, momentum, prior_var, num_data,
                                           found_inf=found_inf)


def vsam_sumsq(grads: List[Tensor], variances: List[Tensor], *,
               backend: Optional[str] = None) -> Tensor:
    return _impl("vsam_sumsq", grads, backend)(grads, variances)


def vsam_perturb_(params, grads, backups, variances, sigma_norm, dim, eps, var_lr, prior_var,
                  num_data, log_step, min_var, found_inf=None, *, backend=None) -> Tensor:
    return _impl("vsam_perturb_", params, backend)(params, grads, backups, variances, sigma_norm,
                                                   dim, eps, var_lr, prior_var, num_data,
                                                   log_step, min_var, found_inf=found_inf)


def ebisam_perturb_(params, grads, backups, param_ids, grad_norm, seed, step, rho, beta, eps,
                  found_inf=None, *, backend=None) -> Tensor:
    return _impl("ebisam_perturb_", params, backend)(params, grads, backups, param_ids, grad_norm,
                                                   seed, step, rho, beta, eps, found_inf=found_inf)
