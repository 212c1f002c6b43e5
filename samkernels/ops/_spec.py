"""The op table: every fused op of samkernels defined once.

Each entry says, for one op, what every backend must honour: its arguments in order (the role of
each tensor list, which lists it writes), what it returns, whether it takes parameter ids and the
``found_inf`` skip flag, and which float64 reference function is its executable specification.
Everything else is derived from this table and written nowhere else:

  * the ``torch.library`` schemas of the ``samkernels`` namespace (``schema()``; defined in
    :mod:`samkernels.ops._library`; the C++ and CUDA kernels only register implementations);
  * one generic fake (FakeTensor) implementation per op, for ``torch.compile``;
  * the public ``samkernels.ops.<name>`` wrappers and their shared argument checks;
  * the Triton ops (``samkernels::triton_<name>``), same schema;
  * the contract test (``tests/test_contract.py``), which runs every op of this table on every
    backend against its reference.

This module is plain data: it imports nothing from the rest of the package.

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
    family: str                  # sam | bsam | vi | ebisam | loss
    args: Tuple[Arg, ...]
    returns: str                 # "()" or a schema return type
    reference: str               # "module:function" of the float64 executable spec
    # "norm": a 0-dim float64 norm (returned as given when passed in: sam_perturb_ & co.)
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


def _L(name: str, role: str, written: bool = False) -> Arg:
    return Arg(name, TENSOR_LIST, role, written)


def _f(*names: str) -> Tuple[Arg, ...]:
    return tuple(Arg(n, FLOAT) for n in names)


_FOUND_INF = Arg("found_inf", OPT_TENSOR, default="None")
# the lists the noise phases start with: the weights get the noise, the backups keep the mean
_NOISED = (_L("params", "param", True), _L("backups", "backup", True))
# the lists a gradient phase starts with: perturbing writes the backups, updating reads them
_PERTURBED = (_L("params", "param", True), _L("grads", "grad"), _L("backups", "backup", True))
_UPDATED = (_L("params", "param", True), _L("grads", "grad"), _L("backups", "backup"))
_IDS_SEED_STEP = (Arg("param_ids", INT_LIST), Arg("seed", INT), Arg("step", INT))
_REF = "samkernels.ops.reference"
_LOSS_INPUTS = (Arg("logits", TENSOR), Arg("target", TENSOR), Arg("mu", FLOAT), Arg("phi", INT),
                Arg("alpha", FLOAT))
_REF_LOSS = "samkernels.ops.bisam_loss"

_TABLE = (
    # --- SAM / ASAM (docs/spec.md, SAM and ASAM rows) -------------------------------------------
    OpSpec("grad_sumsq", "sam",
           (_L("params", "param"), _L("grads", "grad"), Arg("adaptive", BOOL, default="False"),
            Arg("eta", FLOAT, default="0.0")),
           "Tensor", f"{_REF}:grad_sumsq", result="norm",
           doc="sum ||T g||^2 over all tensors (T = |w| + eta for ASAM, 1 for SAM), float64"),
    OpSpec("sam_perturb_", "sam",
           (*_PERTURBED, Arg("grad_norm", OPT_TENSOR), *_f("rho", "eps"), Arg("adaptive", BOOL),
            Arg("eta", FLOAT), _FOUND_INF),
           "Tensor", f"{_REF}:sam_perturb_", result="norm",
           doc="backup <- w; w <- w + rho T^2 g / (||T g|| + eps); returns ||T g||"),
    OpSpec("sam_restore_sgd_", "sam",
           (*_UPDATED, _L("momentum_bufs", "state?", True), *_f("lr", "momentum", "dampening"),
            Arg("nesterov", BOOL), Arg("weight_decay", FLOAT), Arg("first", BOOL), _FOUND_INF),
           "()", f"{_REF}:sam_restore_sgd_",
           doc="w <- backup, then torch.optim.SGD's update with the perturbed gradient"),
    OpSpec("sam_restore_adam_", "sam",
           (*_UPDATED, _L("exp_avgs", "state", True), _L("exp_avg_sqs", "state", True),
            Arg("step", INT), *_f("lr", "beta1", "beta2", "eps", "weight_decay"),
            Arg("decoupled", BOOL), _FOUND_INF),
           "()", f"{_REF}:sam_restore_adam_",
           doc="w <- backup, then Adam (L2) or AdamW (decoupled) with the perturbed gradient"),
    # --- bSAM (Algorithm 1) ---------------------------------------------------------------------
    OpSpec("bsam_noise_", "bsam",
           (*_NOISED, _L("precisions", "state"), *_IDS_SEED_STEP, Arg("num_data", FLOAT)),
           "()", f"{_REF}:bsam_noise_",
           doc="line 1: backup <- omega; w <- omega + z / sqrt(N s)"),
    OpSpec("bsam_perturb_", "bsam",
           (*_UPDATED, _L("precisions", "state", True), _L("accums", "state?", True),
            *_f("rho", "beta2", "delta", "gamma"), _FOUND_INF),
           "()", f"{_REF}:bsam_perturb_",
           doc="line 3: w <- omega + rho g / s (and line 5 unless deferred to the update)"),
    OpSpec("bsam_update_", "bsam",
           (*_UPDATED, _L("precisions", "state", True), _L("momenta", "state", True),
            _L("accums", "state?"),
            *_f("lr", "beta1", "beta2", "delta", "gamma", "accum_scale"),
            Arg("released_order", BOOL), _FOUND_INF),
           "()", f"{_REF}:bsam_update_",
           doc="lines 5-7: momentum, precision, w <- omega - lr (gm + delta omega) / s",
           requires=(("released_order", "accums",
                      "line 5 must wait for the update to keep the old s"),)),
    # --- MFVI family: RandomSAM, MFVI, VariationalSAM --------------------------------------------
    OpSpec("vi_noise_", "vi",
           (*_NOISED, _L("variances", "state?"), *_IDS_SEED_STEP, Arg("sigma", FLOAT)),
           "()", f"{_REF}:vi_noise_",
           doc="backup <- mu; w <- mu + std z (std = sigma, or sqrt(Sigma) for MFVI)"),
    OpSpec("mfvi_update_", "vi",
           (*_UPDATED, _L("variances", "state", True), _L("momenta", "state?", True),
            *_IDS_SEED_STEP, *_f("lr", "var_lr", "momentum", "prior_var", "num_data"), _FOUND_INF),
           "()", f"{_REF}:mfvi_update_",
           doc="Alg. 2 lines 4-5: the reparameterised mean and variance gradients"),
    OpSpec("vsam_sumsq", "vi",
           (_L("grads", "grad"), _L("variances", "state")),
           "Tensor", f"{_REF}:vsam_sumsq", result="norm",
           doc="g^T Sigma g over all tensors, float64"),
    OpSpec("vsam_perturb_", "vi",
           (*_PERTURBED, _L("variances", "state", True), Arg("sigma_norm", OPT_TENSOR),
            *_f("dim", "eps", "var_lr", "prior_var", "num_data"), Arg("log_step", BOOL),
            Arg("min_var", FLOAT), _FOUND_INF),
           "Tensor", f"{_REF}:vsam_perturb_", result="norm",
           doc="Alg. 3 line 3, eq. 2: w <- mu + sqrt(p) Sigma g / (sqrt(g^T Sigma g) + eps)"),
    # --- E-BiSAM (Alg. 3 lines 3-7) --------------------------------------------------------------
    OpSpec("ebisam_perturb_", "ebisam",
           (*_PERTURBED, Arg("param_ids", INT_LIST), Arg("grad_norm", OPT_TENSOR), Arg("seed", INT),
            Arg("step", INT), *_f("rho", "beta", "eps"), _FOUND_INF),
           "Tensor", f"{_REF}:ebisam_perturb_", result="norm",
           doc="perturb coordinate i iff u_i < beta, by rho g_i / (beta ||g|| + eps)"),
    # --- the fused BiSAM ascent loss (eqs. 17-18); not multi-tensor ------------------------------
    OpSpec("bisam_loss_fwd", "loss",
           (*_LOSS_INPUTS, Arg("ignore_index", INT), Arg("grad_scale", FLOAT),
            Arg("compute_grad", BOOL)),
           "(Tensor loss_rows, Tensor grad)", f"{_REF_LOSS}:bisam_loss_reference",
           doc="per-row loss (0 for ignored rows) and grad_scale * d loss_row / d logits"),
    OpSpec("bisam_loss_fwd_reduced", "loss",
           (*_LOSS_INPUTS, Arg("reduction", INT), Arg("ignore_index", INT),
            Arg("compute_grad", BOOL)),
           "(Tensor loss, Tensor grad)", f"{_REF_LOSS}:bisam_loss_reference",
           doc="the reduced loss and its gradient; checks the labels itself (CPU)"),
    OpSpec("bisam_loss", "loss",
           (*_LOSS_INPUTS, Arg("reduction", INT), Arg("ignore_index", INT)),
           "Tensor", f"{_REF_LOSS}:bisam_loss_reference",
           doc="the differentiable loss, autograd in C++ (eager CPU)"),
)

OPS: Dict[str, OpSpec] = {op.name: op for op in _TABLE}
# the multi-tensor optimizer phases (what the contract test runs on every backend)
PHASES: Dict[str, OpSpec] = {n: op for n, op in OPS.items() if op.multi_tensor}
