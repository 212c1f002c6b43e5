"""The ``samkernels`` torch.library namespace, defined from the op table (:mod:`._spec`).

``op`` declares a row of the table on its reference function and defines the op: every schema
is defined here, once; the compiled kernels (``csrc/ops``, ``csrc/cuda``) only
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

import inspect
from typing import Callable, Tuple, Union

import torch
from torch import Tensor

from samkernels.ops._spec import OPS, PHASES, Arg, OpSpec

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
        if op.result == "dots":
            return torch.empty(3, dtype=torch.float64, device=device)
        if op.result == "flag":
            return torch.empty((), dtype=torch.float32, device=device)
        return None
    fake.__name__ = f"fake_{name}"
    return fake


def define(op: OpSpec, name: str) -> None:
    """Define ``samkernels::<name>`` with ``op``'s schema (and its generic fake for a phase)."""
    LIB.define(op.schema(name))
    if op.multi_tensor:
        torch.library.register_fake(f"{NAMESPACE}::{name}", generic_fake(op, name), lib=LIB)



def declare(spec: OpSpec) -> OpSpec:
    """Add ``spec`` to the table and define its op (once: a name is never redefined)."""
    if spec.name in OPS:
        raise RuntimeError(f"samkernels op {spec.name!r} is declared twice")
    OPS[spec.name] = spec
    if spec.multi_tensor:
        PHASES[spec.name] = spec
    define(spec, spec.name)
    return spec


def _summary(fn: Callable) -> str:
    """The first paragraph of ``fn``'s docstring, on one line."""
    first = (fn.__doc__ or fn.__name__).strip().split("\n\n")[0]
    return " ".join(first.split()).rstrip(".")


def op(family: str, *args: Union[Arg, Tuple[Arg, ...]], returns: str = "()", result=None,
       requires=()) -> Callable:
    """The row of the op named like the decorated function, which is its float64 reference.

    ``args`` are the schema's arguments in order (tuples of them are spliced in); the reference
    must take exactly these parameters, in this order, so the two cannot drift apart.  The first
    paragraph of the reference's docstring describes the op.
    """
    flat = tuple(a for x in args for a in (x if isinstance(x, tuple) else (x,)))

    def row(fn: Callable) -> Callable:
        names = tuple(inspect.signature(fn).parameters)
        spec = OpSpec(fn.__name__, family, flat, returns, f"{fn.__module__}:{fn.__name__}",
                      result=result, doc=_summary(fn),
                      requires=requires)
        if names != spec.arg_names:
            raise TypeError(f"reference {fn.__name__}{names} does not take the row's arguments "
                            f"{spec.arg_names}")
        declare(spec)
        return fn
    return row
