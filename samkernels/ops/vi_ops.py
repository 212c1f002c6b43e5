"""Multi-tensor ops of the MFVI family (RandomSAM, MFVI, VariationalSAM) and E-BiSAM.

Like :mod:`samkernels.ops`, these only pick the backend and forward the arguments; semantics are
those of the same-named functions in :mod:`samkernels.ops.reference_vi` (re-exported by
:mod:`samkernels.ops.reference`, where the dispatcher looks them up).  CPU kernels:
``csrc/cpu/vi_step.cpp`` and ``csrc/cpu/esam_step.cpp``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from samkernels import _dispatch
from samkernels.ops import _impl

__all__ = ["vi_noise_", "mfvi_update_", "vsam_sumsq", "vsam_perturb_", "esam_perturb_"]


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


def esam_perturb_(params, grads, backups, param_ids, grad_norm, seed, step, rho, beta, eps,
                  found_inf=None, *, backend=None) -> Tensor:
    return _impl("esam_perturb_", params, backend)(params, grads, backups, param_ids, grad_norm,
                                                   seed, step, rho, beta, eps, found_inf=found_inf)


# --- fakes for torch.compile (FakeTensor) tracing of the C++ ops (see samkernels.ops._fake) -----
def _norm_dtype(params: List[Tensor]) -> torch.dtype:  # as the kernels: the norm contract, a
    return torch.float64  # norm is float64 on every backend, whatever the params' dtypes


def _fake_vsam_sumsq(grads, variances):
    return torch.empty((), dtype=torch.float64,
                       device=grads[0].device if grads else torch.device("cpu"))


def _fake_vsam_perturb(params, grads, backups, variances, sigma_norm, dim, eps, var_lr, prior_var,
                       num_data, log_step, min_var, found_inf=None):
    return torch.empty((), dtype=_norm_dtype(params),
                       device=params[0].device if params else torch.device("cpu"))


def _fake_esam_perturb(params, grads, backups, param_ids, grad_norm, seed, step, rho, beta, eps,
                       found_inf=None):
    return torch.empty((), dtype=_norm_dtype(params),
                       device=params[0].device if params else torch.device("cpu"))


def _fake_nothing(*args, **kwargs) -> None:  # in-place phases: the schemas say which lists they mutate
    return None


if _dispatch.extension() is not None:
    for _name, _fake in (("vsam_sumsq", _fake_vsam_sumsq), ("vsam_perturb_", _fake_vsam_perturb),
                         ("esam_perturb_", _fake_esam_perturb), ("vi_noise_", _fake_nothing),
                         ("mfvi_update_", _fake_nothing)):
        if hasattr(torch.ops.samkernels, _name):  # absent in an extension built before these ops
            torch.library.register_fake(f"samkernels::{_name}")(_fake)
