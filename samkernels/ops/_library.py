"""The ``samkernels`` torch.library namespace, defined from the op table (:mod:`._spec`).

Every schema is defined here, once; the compiled kernels (``csrc/cpu``, ``csrc/cuda``) only
register implementations for them (``TORCH_LIBRARY_IMPL``), and the Triton backend registers its
own ops ``samkernels::triton_<name>`` with the same schemas.  Registering a kernel before its
schema is defined is allowed by the dispatcher, so the import order of ``samkernels._C`` and of
this module does not matter.

Each multi-tensor op also gets one generic fake (FakeTensor) implementation, for torch.compile:
the in-place phases return nothing (their schemas say which lists they write, which is all the
functionalisation of a traced graph needs), the norm ops a 0-dim float64 on the parameters'
device (the norm contract: float64 on every backend).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from samkernels.ops._spec import OPS, OpSpec

NAMESPACE = "samkernels"
LIB = torch.library.Library(NAMESPACE, "DEF")
_CPU = torch.device("cpu")


def _one_device(op: str, args) -> torch.device:
    """The device of an op's tensors (CPU for an empty call).  The fake also serves as the Meta
    kernel, and the dispatcher picks Meta whenever one argument is on the meta device: tensors
    mixing meta with real devices must fail, not return garbage."""
    devices = {t.device for a in args for t in (a if isinstance(a, (list, tuple)) else [a])
               if isinstance(t, Tensor)}
    if len(devices) > 1:
        raise RuntimeError(f"samkernels::{op}: all tensors must be on one device, got "
                           f"{sorted(str(d) for d in devices)}")
    return devices.pop() if devices else _CPU


def generic_fake(op: OpSpec, name: str) -> Callable:
    def fake(*args, **kwargs):
        device = _one_device(name, args + tuple(kwargs.values()))
        if op.result == "norm":
            return torch.empty((), dtype=torch.float64, device=device)
        return None
    fake.__name__ = f"fake_{name}"
    return fake


def define(op: OpSpec, name: str) -> None:
    """Define ``samkernels::<name>`` with ``op``'s schema (and its generic fake for a phase)."""
    LIB.define(op.schema(name))
    if op.multi_tensor:
        torch.library.register_fake(f"{NAMESPACE}::{name}", generic_fake(op, name), lib=LIB)


for _op in OPS.values():
    define(_op, _op.name)
