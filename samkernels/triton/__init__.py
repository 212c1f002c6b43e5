"""Triton backend: every multi-tensor phase of the op table (:mod:`samkernels.ops._spec`) as
multi-tensor Triton kernels (one launch per dtype group and phase, see ``_multi_tensor``).

The public functions have exactly the reference's names, signatures and in-place effects.  They run
on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported.

Each phase ``<name>`` is the op ``samkernels::triton_<name>``, defined from the table with the
phase's own schema and generic fake (:mod:`samkernels.ops._library`), its implementation (CUDA,
and CPU under the interpreter) the function ``<name>`` of the family's module (``sam``, ``bsam``,
``vi``, ``ebisam``, ``ivon``).  So ``torch.compile`` traces through a phase as one opaque,
functionalised node instead of failing on the raw pointer tables.  Two things stay in the thin public function around
the op, both derived from the table:
  * a phase returning its norm argument (``result == "norm"``: sam_perturb_, vsam_perturb_,
    ebisam_perturb_) returns the tensor it was given, as the reference does; an op may not return
    an alias of an input, so the op itself returns the norm it computed (when given None) or a
    copy;
  * ``int`` and ``int[]`` arguments (seed, step, param_ids) are arbitrary Python ints in the
    reference but int64 in an op schema: they are mapped to the signed int64 with the same low 64
    bits, which is all the Philox counter and key use.

``found_inf`` (the gradient-consuming phases' optional last argument): a one-element tensor on the
parameters' device; nonzero selects the op's skip form *in the kernels* (see sam / bsam / vi /
ebisam / ivon), so passing it never syncs with the host.

``device_step`` (the last argument of the phases with a ``step``): None or a one-element int64
tensor on the parameters' device.  Every program loads it and uses step + its value (mod 2^64:
the Philox words, Adam's bias corrections), so a captured step replays with the counter's current
value; without it the kernels load a zero of the launch plan (``_multi_tensor.step_arg``): the
same kernels, hence the same bits, for a host step and a device step.
"""
import ast
import importlib
import inspect
from typing import Callable

import torch

from samkernels.ops import _library
from samkernels.ops._spec import INT, INT_LIST, OPT_TENSOR, PHASES, SYMINT, TENSOR_LIST, OpSpec, i64
from samkernels.triton._philox import philox_probe, uniforms_below

__all__ = list(PHASES) + ["philox_probe", "uniforms_below"]


# how each schema type reaches the op (None: as given)
_CONVERT = {TENSOR_LIST: list, INT: i64, SYMINT: i64, INT_LIST: lambda ids: [i64(i) for i in ids]}


def _defaults(op: OpSpec):
    return [None if a.default is None else ast.literal_eval(a.default) for a in op.args]


def _completed(op: OpSpec, kernel: Callable) -> Callable:
    """``kernel`` as the dispatcher may call it: a Python kernel is not handed the trailing
    arguments that equal their schema default, so they are put back from the table."""
    defaults = _defaults(op)

    def complete(*args):
        return kernel(*args, *defaults[len(args):])
    complete.__name__ = kernel.__name__
    return complete


def _public(op: OpSpec, impl) -> Callable:
    """The public function of phase ``op``: the reference's signature, calling ``impl`` (the
    op ``samkernels::triton_<name>``)."""
    sig = inspect.Signature([inspect.Parameter(
        a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=inspect.Parameter.empty if a.default is None else d)
        for a, d in zip(op.args, _defaults(op))])
    convert = [_CONVERT.get(a.type) for a in op.args]
    # the norm argument a norm-returning phase hands back (sam_perturb_'s grad_norm ...)
    given = next((i for i, a in enumerate(op.args)
                  if op.result == "norm" and a.type == OPT_TENSOR and a.name != "found_inf"), None)

    def phase(*args, **kwargs):
        if kwargs or len(args) != len(convert):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            args = tuple(bound.arguments.values())
        out = impl(*[v if f is None else f(v) for f, v in zip(convert, args)])
        if given is not None and args[given] is not None:
            return args[given]
        return out

    phase.__name__ = phase.__qualname__ = op.name
    phase.__doc__ = op.doc
    phase.__signature__ = sig
    return phase


for _name, _op in PHASES.items():
    _library.define(_op, "triton_" + _name)
    _kernel = getattr(importlib.import_module(f"samkernels.triton.{_op.family}"), _name)
    # one kernel for every device (CUDA; CPU under TRITON_INTERPRET=1), and for calls whose
    # lists are all empty: no tensor, so no device key to dispatch on
    _library.LIB.impl("triton_" + _name, _completed(_op, _kernel), "CompositeExplicitAutograd")
    globals()[_name] = _public(_op, getattr(torch.ops.samkernels, "triton_" + _name).default)
