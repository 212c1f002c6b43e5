"""The op table: every fused op of samkernels defined once.

An op is declared where its float64 reference (its executable specification) is written: a row
``@op(family, *args, returns=..., result=...)`` on the reference function in
:mod:`samkernels.ops.reference` (the BiSAM loss ops: :mod:`samkernels.ops.bisam_loss`).  The row
says what every backend must honour: the arguments in order (the role of each tensor list, which
lists it writes), what the op returns, whether it takes parameter ids and the ``found_inf`` skip
flag.  :func:`samkernels.ops._library.op` records the row here (``OPS``, ``PHASES``) and defines
the op; everything else is derived from the row and written nowhere else:

  * the ``torch.library`` schema in the ``samkernels`` namespace (``OpSpec.schema()``; the C++
    and CUDA kernels only register implementations) and one generic fake, for ``torch.compile``;
  * the public ``samkernels.ops.<name>`` wrappers and their shared argument checks;
  * the Triton ops (``samkernels::triton_<name>``), same schema;
  * the contract test (``tests/test_contract.py``), which runs every op of the table on every
    backend against its reference.

This module is plain data: it imports nothing from the rest of the package.  The table fills when
:mod:`samkernels.ops` is imported (importing ``samkernels`` does it).

Roles of a tensor list (every list is as long as ``params``, one entry per parameter):
  ``param``  the parameters themselves (bf16 / fp16 / fp32 / fp64, mixed within one list);
  ``grad``   gradients, in their parameter's dtype;
  ``backup`` the mean weights while the parameters are perturbed, in the parameter's dtype;
  ``state``  optimizer state in the op-math dtype (float32 for bf16/fp16/fp32, float64 for fp64);
  ``state?`` as ``state``, but the list may be empty (the op then skips what it would do with it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

# the schema types an argument may have
TENSOR_LIST, OPT_TENSOR, INT_LIST = "Tensor[]", "Tensor?", "int[]"
INT, FLOAT, BOOL, TENSOR = "int", "float", "bool", "Tensor"
# a counter that changes every step (Philox noise step, Adam step, IVON's sample count): torch.compile
# traces a SymInt argument symbolically, where an ``int`` is specialised, so a compiled step
# recompiled for every new value until dynamo's recompile limit sent it back to eager mode
SYMINT = "SymInt"


def i64(x):
    """The signed int64 with the same low 64 bits as ``x``, the value an int64 schema argument
    takes (a SymInt argument refuses a Python int outside the int64 range).  In-range values, and
    SymInts under torch.compile, pass through untouched: a changing ``step`` is not specialised
    on."""
    if isinstance(x, int) and not -(1 << 63) <= x < (1 << 63):
        x &= (1 << 64) - 1
        return x - (1 << 64) if x >= 1 << 63 else x
    return x


@dataclass(frozen=True)
class Arg:
    name: str
    type: str
    role: Optional[str] = None   # tensor lists: param | grad | backup | state | state?
    written: bool = False        # the op writes this list in place
    default: Optional[str] = None  # schema default ("None" for found_inf), also the wrapper's


@dataclass(frozen=True)
class OpSpec:
    name: str
    family: str                  # sam | bsam | vi | ebisam | samv | ivon | loss
    args: Tuple[Arg, ...]
    returns: str                 # "()" or a schema return type
    reference: str               # "module:function" of the float64 executable spec (the
                                 # function the row is declared on)
    # "norm": a 0-dim float64 norm (returned as given when passed in: sam_perturb_ & co.);
    # "dots": a float64 tensor of 3 dot products (samv_dots); "flag": a 0-dim float32 0.0 / 1.0
    # (nonfinite_flag)
    result: Optional[str] = None
    doc: str = ""
    notes: Tuple[str, ...] = field(default_factory=tuple)
    # (flag, list, why): the flag set to True needs the (optional) list non-empty; checked by the
    # public wrapper for every backend
    requires: Tuple[Tuple[str, str, str], ...] = ()

    # --- derived ----------------------------------------------------------------------------
    @property
    def arg_names(self) -> Tuple[str, ...]:
        return tuple(a.name for a in self.args)

    @property
    def lists(self) -> Tuple[Arg, ...]:
        return tuple(a for a in self.args if a.type == TENSOR_LIST)

    @property
    def written(self) -> Tuple[str, ...]:
        return tuple(a.name for a in self.args if a.written)

    @property
    def takes_ids(self) -> bool:
        return "param_ids" in self.arg_names

    @property
    def takes_found_inf(self) -> bool:
        return "found_inf" in self.arg_names

    @property
    def takes_device_step(self) -> bool:
        return "device_step" in self.arg_names

    @property
    def step_tensors(self) -> Tuple[str, ...]:
        """The step tensors this op takes (``device_step``, ``debias_step``), in order."""
        return tuple(n for n in self.arg_names if n in ("device_step", "debias_step"))

    @property
    def multi_tensor(self) -> bool:
        return self.family != "loss"

    def schema(self, name: Optional[str] = None) -> str:
        """The torch.library schema, e.g. ``sam_perturb_(Tensor(a!)[] params, ...) -> Tensor``."""
        parts, alias = [], iter("abcdefgh")
        for a in self.args:
            t = a.type
            if a.written:  # mutated lists carry an alias annotation
                t = f"Tensor({next(alias)}!)[]"
            s = f"{t} {a.name}"
            if a.default is not None:
                s += f"={a.default}"
            parts.append(s)
        return f"{name or self.name}({', '.join(parts)}) -> {self.returns}"


# --- the table, filled by the rows (samkernels.ops._library.op) --------------------------------
OPS: Dict[str, OpSpec] = {}
# the multi-tensor optimizer phases (what the contract test runs on every backend)
PHASES: Dict[str, OpSpec] = {}


# --- building blocks of the rows -----------------------------------------------------------------
def L(name: str, role: str, written: bool = False) -> Arg:
    """A tensor list with its role."""
    return Arg(name, TENSOR_LIST, role, written)


def floats(*names: str) -> Tuple[Arg, ...]:
    return tuple(Arg(n, FLOAT) for n in names)


FOUND_INF = Arg("found_inf", OPT_TENSOR, default="None")
# the lists the noise phases start with: the weights get the noise, the backups keep the mean
NOISED = (L("params", "param", True), L("backups", "backup", True))
# the lists a gradient phase starts with: perturbing writes the backups, updating reads them
PERTURBED = (L("params", "param", True), L("grads", "grad"), L("backups", "backup", True))
UPDATED = (L("params", "param", True), L("grads", "grad"), L("backups", "backup"))
IDS_SEED_STEP = (Arg("param_ids", INT_LIST), Arg("seed", INT), Arg("step", SYMINT))
# Every op that takes a ``step`` (a Philox noise counter, or Adam's step) also takes the last
# argument ``device_step``: None, or a one-element int64 tensor on the parameters' device.  The op
# then uses step + device_step, read by the kernel on the device (no host sync): the capturable
# optimizers keep their counters there, so a step captured in a CUDA graph replays with the
# counter's current value (the host ``step`` carries what is fixed per call, e.g. the micro-batch).
DEVICE_STEP = Arg("device_step", OPT_TENSOR, default="None")
# ivon_update_'s step count t for its bias correction, on the device in the same way: when given,
# bias_correction = 1 - beta1^t is formed by the kernel from it (capturable IVON with debias).
DEBIAS_STEP = Arg("debias_step", OPT_TENSOR, default="None")
# the int64 step tensors an op may take (each None or one int64 element on the params' device)
STEP_TENSORS = ("device_step", "debias_step")
