"""Fake (meta) implementations of the C++ ops of the ``samkernels`` namespace, for torch.compile.

Tracing (dynamo + AOTAutograd) runs every op on FakeTensors that carry only shape, dtype and
device; an op without a fake implementation stops the trace.  The in-place phases return nothing,
so their fakes only state that; the two ops that return a tensor say which 0-d tensor the real
kernel returns (csrc/cpu/sam_step.cpp, csrc/cuda/ops_cuda.cpp).  The schemas declare which lists
each op mutates, so the functionalisation of the traced graph is right without more help.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from samkernels import _dispatch

_CPU = torch.device("cpu")


def _one_device(op: str, args) -> None:
    """The fake also serves as the Meta kernel, and the dispatcher picks Meta whenever one argument
    is on the meta device: tensors mixing meta with real devices must fail, not return garbage."""
    devices = {t.device for a in args for t in (a if isinstance(a, (list, tuple)) else [a])
               if isinstance(t, Tensor)}
    if len(devices) > 1:
        raise RuntimeError(f"samkernels::{op}: all tensors must be on one device, got "
                           f"{sorted(str(d) for d in devices)}")


def _norm_dtype(params: List[Tensor]) -> torch.dtype:
    return torch.float64  # the norm contract: a computed norm is float64 on every backend


def grad_sumsq(params, grads, adaptive, eta):
    _one_device("grad_sumsq", (params, grads))
    # float64 on every backend, like reference.grad_sumsq
    return torch.empty((), dtype=torch.float64, device=grads[0].device if grads else _CPU)


def sam_perturb_(params, grads, backups, grad_norm: Optional[Tensor], rho, eps, adaptive, eta,
                 found_inf: Optional[Tensor] = None):
    _one_device("sam_perturb_", (params, grads, backups, found_inf))
    if not params:
        return torch.empty((), dtype=torch.float64, device=_CPU)
    if grad_norm is not None and params[0].device.type == "cuda":
        return torch.empty_like(grad_norm)  # the CUDA kernel returns a copy of the given norm
    return torch.empty((), dtype=_norm_dtype(params), device=params[0].device)


def _nothing(name: str):
    def fake(*args, **kwargs) -> None:
        _one_device(name, args + tuple(kwargs.values()))
    return fake


_RETURNS_NOTHING = ("sam_restore_sgd_", "sam_restore_adam_", "bsam_noise_", "bsam_perturb_",
                    "bsam_update_")


def register() -> None:
    """Register the fakes once the extension (which defines the ops) is loaded."""
    if _dispatch.extension() is None:
        return
    torch.library.register_fake("samkernels::grad_sumsq")(grad_sumsq)
    torch.library.register_fake("samkernels::sam_perturb_")(sam_perturb_)
    for name in _RETURNS_NOTHING:
        torch.library.register_fake(f"samkernels::{name}")(_nothing(name))


register()
