"""BiSAM's ascent loss ``Q`` (Xie et al., "Improving SAM requires rethinking its optimization
formulation", eq. 11/14; ``docs/spec.md`` section "BiSAM"), fused forward + gradient.

For logits ``f`` (B x K) and labels ``y``, with ``F_ij = f_ij - f_{i,y_i}`` (so ``F_{i,y_i} = 0``)::

    Q_i = (1/mu) logsumexp_j( mu * phi(F_ij) ) - log(K)/mu
    phi = "neglog": phi(x) = -log(1 + exp(gamma - x)) + 1, gamma = log(e - 1)   (eq. 18; mu = 1.5)
    phi = "tanh":   phi(x) = tanh(alpha x)                                   (eq. 17; mu = 10)

Conventions (chosen to match ``F.cross_entropy``):
  * ``-log(K)/mu`` is part of every row, so ``reduction="none"`` rows carry it too and a mean over
    the rows equals ``reduction="mean"``.
  * ``target == ignore_index`` rows give 0 and a zero gradient; ``"mean"`` divides by the number of
    other rows, so with every row ignored the mean is NaN (the gradient is then all zeros).
  * Loss in the logits' dtype; the maths runs in float32 (float64 for float64 logits).
  * A target outside ``[0, K)`` that is not ``ignore_index``: on CPU a ``TargetOutOfRangeError``
    (an ``IndexError`` and a ``ValueError``) naming the row.  On CUDA, and under torch.compile, the
    check is ``torch._assert_async`` (no host sync; it fails like ``F.cross_entropy``'s device-side
    assert), and the kernels write NaN for such rows instead of reading outside the row.

Backends: :func:`bisam_loss` asks the dispatcher (``samkernels._dispatch``) for op
``bisam_loss`` (the table's schema, with ``phi`` and ``reduction`` as integer codes), whose
implementations are registered below.  ``reference`` is :func:`bisam_loss_reference` with autograd
(the naive baseline).  ``cpu`` in eager mode is one call of ``torch.ops.samkernels.bisam_loss``
(csrc/ops/bisam_loss.cpp): the kernel checks the labels (its ``IndexError`` becomes
``TargetOutOfRangeError`` here), counts the rows, reads the logits once, reduces, and saves
``d loss / d logits`` (the mean's ``1/count`` folded in) for a C++ autograd node whose backward
returns that buffer as is when ``grad_output`` is 1 (``loss.backward()``) and scales it otherwise;
no Python runs in the backward.  ``cuda``, ``triton`` and ``cpu`` under torch.compile call the fused
row forward ``torch.ops.samkernels.bisam_loss_fwd`` (``samkernels::bisam_loss_fwd_triton`` for
triton), which writes the per-row loss and the gradient buffer ``d row_i / d f_i`` (skipped when
the logits need no gradient); its autograd formula, registered on the op, scales each buffer row
by the row's incoming gradient.  The label check and the reduction run here in plain PyTorch.  For
fp16/bf16 logits the gradient is thus rounded to the logits' dtype before the scaling.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samkernels import _dispatch
from samkernels._dtypes import opmath
from samkernels.ops import _library
from samkernels.ops._spec import BOOL, FLOAT, INT, TENSOR, Arg, OpSpec

__all__ = ["bisam_loss", "BiSAMLoss", "bisam_loss_reference", "TargetOutOfRangeError",
           "DEFAULT_MU", "GAMMA"]

GAMMA = math.log(math.e - 1.0)  # phi_neglog(0) = 0 (eq. 18)
PHI_CODES = {"neglog": 0, "tanh": 1}  # the kernels' ``phi`` argument
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}  # bisam_loss / bisam_loss_fwd_reduced's codes
_PHI_NAMES = {code: name for name, code in PHI_CODES.items()}
_REDUCTION_NAMES = {code: name for name, code in REDUCTION_CODES.items()}
DEFAULT_MU = {"neglog": 1.5, "tanh": 10.0}  # the paper's CIFAR settings (Sec. 4.1)
_PHI_ALIASES = {"neglog": "neglog", "-log": "neglog", "tanh": "tanh"}
_REDUCTIONS = ("mean", "sum", "none")
_LOGIT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class TargetOutOfRangeError(IndexError, ValueError):
    """A target that is neither a class in ``[0, K)`` nor ``ignore_index``.

    An ``IndexError`` like ``F.cross_entropy``'s, and a ``ValueError`` since it is a bad argument.
    """


# --- argument checks ---------------------------------------------------------------------------
def _check_args(logits, target, mu, phi, alpha, reduction,
                ignore_index) -> Tuple[str, float, float]:
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError("bisam_loss: logits and target must be tensors")
    if logits.dim() != 2:
        raise ValueError(f"bisam_loss: logits must be 2-D (batch, classes), got shape "
                         f"{tuple(logits.shape)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"bisam_loss: logits must be float32/float64/float16/bfloat16, got "
                        f"{logits.dtype}")
    if target.dtype != torch.int64:
        raise TypeError(f"bisam_loss: target must hold int64 class indices, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"bisam_loss: target must have shape ({logits.shape[0]},) to match logits "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"bisam_loss: target is on {target.device} but logits on {logits.device}")
    if logits.shape[1] < 1:
        raise ValueError("bisam_loss: logits need at least one class (K >= 1)")
    if not isinstance(phi, str) or phi.lower() not in _PHI_ALIASES:
        raise ValueError(f"bisam_loss: unknown phi {phi!r}; expected 'neglog' (eq. 18) or 'tanh' "
                         "(eq. 17)")
    phi = _PHI_ALIASES[phi.lower()]
    mu = DEFAULT_MU[phi] if mu is None else float(mu)
    if not (mu > 0 and math.isfinite(mu)):
        raise ValueError(f"bisam_loss: mu must be a positive finite number, got {mu}")
    alpha = float(alpha)
    if phi == "tanh" and not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"bisam_loss: alpha must be a positive finite number for phi='tanh', "
                         f"got {alpha}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"bisam_loss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"bisam_loss: ignore_index must be an int, got {ignore_index!r}")
    return phi, mu, alpha


def _check_targets(target: Tensor, num_classes: int, ignore_index: int) -> None:
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if target.device.type != "cpu" or torch.compiler.is_compiling():
        # No host sync: a bad label fails asynchronously, as F.cross_entropy's does on CUDA.
        torch._assert_async(~bad.any(), f"bisam_loss: a target is out of range for {num_classes} "
                                        f"classes and is not ignore_index = {ignore_index}")
        return
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise TargetOutOfRangeError(
            f"bisam_loss: target[{i}] = {int(target[i])} is out of range for {num_classes} classes "
            f"(and is not ignore_index = {ignore_index})")


# --- the specification -------------------------------------------------------------------------
def bisam_loss_reference(logits: Tensor, target: Tensor, mu: Optional[float] = None,
                         phi: str = "neglog", alpha: float = 0.1, reduction: str = "mean",
                         ignore_index: int = -100) -> Tensor:
    """Q in plain PyTorch (float64 stays float64, fp16/bf16 run in float32); autograd: dQ/df."""
    phi, mu, alpha = _check_args(logits, target, mu, phi, alpha, reduction, ignore_index)
    _check_targets(target, logits.shape[1], ignore_index)
    f = logits.to(opmath(logits))
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    Fm = f - f.gather(1, y[:, None])  # F_ij = f_ij - f_{i,y_i}
    if phi == "tanh":
        ph = torch.tanh(alpha * Fm)  # eq. 17
    else:
        ph = 1.0 - F.softplus(GAMMA - Fm)  # eq. 18: -log(1 + exp(gamma - x)) + 1
    rows = torch.logsumexp(mu * ph, dim=1) / mu - math.log(logits.shape[1]) / mu  # eq. 11
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / valid.sum()
    return out.to(logits.dtype)


# --- fused ops: their rows of the op table (samkernels.ops._spec), reference above ---------------
_INPUTS = (Arg("logits", TENSOR), Arg("target", TENSOR), Arg("mu", FLOAT), Arg("phi", INT),
           Arg("alpha", FLOAT))
_REFERENCE = f"{__name__}:bisam_loss_reference"
for _spec in (
        OpSpec("bisam_loss_fwd", "loss",
               (*_INPUTS, Arg("ignore_index", INT), Arg("grad_scale", FLOAT),
                Arg("compute_grad", BOOL)), "(Tensor loss_rows, Tensor grad)", _REFERENCE,
               doc="per-row loss (0 for ignored rows) and grad_scale * d loss_row / d logits"),
        OpSpec("bisam_loss_fwd_reduced", "loss",
               (*_INPUTS, Arg("reduction", INT), Arg("ignore_index", INT),
                Arg("compute_grad", BOOL)), "(Tensor loss, Tensor grad)", _REFERENCE,
               doc="the reduced loss and its gradient; checks the labels itself (CPU)"),
        OpSpec("bisam_loss", "loss", (*_INPUTS, Arg("reduction", INT), Arg("ignore_index", INT)),
               "Tensor", _REFERENCE, doc="the differentiable loss, autograd in C++ (eager CPU)")):
    _library.declare(_spec)


def _fake_fwd(logits, target, mu, phi, alpha, ignore_index, grad_scale, compute_grad):
    loss_rows = logits.new_empty((logits.shape[0],), dtype=opmath(logits))
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
    return loss_rows, grad


def _fake_fwd_reduced(logits, target, mu, phi, alpha, reduction, ignore_index, compute_grad):
    loss = logits.new_empty((logits.shape[0],) if reduction == 0 else ())
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
    return loss, grad


def _fake_loss(logits, target, mu, phi, alpha, reduction, ignore_index):
    return logits.new_empty((logits.shape[0],) if reduction == 0 else ())


# shapes for torch.compile (FakeTensor) tracing
torch.library.register_fake("samkernels::bisam_loss_fwd", _fake_fwd, lib=_library.LIB)
torch.library.register_fake("samkernels::bisam_loss_fwd_reduced", _fake_fwd_reduced,
                            lib=_library.LIB)
torch.library.register_fake("samkernels::bisam_loss", _fake_loss, lib=_library.LIB)


def _rows_backward(ctx, grad_rows, _grad_of_buffer):
    """d loss_rows / d logits: the kernel's buffer holds d row_i / d f_i per row, so the chain rule
    only scales each row.  The reduction (mean, sum) in front of it is plain autograd."""
    (buf,) = ctx.saved_tensors
    return (buf * grad_rows.to(buf.dtype)[:, None],) + (None,) * 7


def _rows_setup(ctx, inputs, output):
    if not inputs[7]:  # compute_grad=False: no buffer, and autograd must not ask for one
        raise RuntimeError("bisam_loss: the fused forward ran without its gradient buffer")
    ctx.save_for_backward(output[1])


_with_autograd: set = set()


def attach_autograd(name: str) -> None:
    """Register the per-row autograd formula on fused forward op ``name`` (once).

    Autograd is attached to the op itself (``torch.library.register_autograd``), not wrapped in an
    ``autograd.Function``: torch.compile then traces the backward from the registered formula
    with the real tangent (on torch 2.11, dynamo's speculation of an autograd.Function around
    this op replaced ``grad_output`` by zeros: an all-zero gradient).  Called at import time, since
    torch.compile cannot trace a registration."""
    if name not in _with_autograd:
        torch.library.register_autograd(name, _rows_backward, setup_context=_rows_setup)
        _with_autograd.add(name)


attach_autograd("samkernels::bisam_loss_fwd")


def _fused_loss(fwd, logits, target, mu, phi, alpha, reduction, ignore_index):
    """The label check, the per-row loss (and, when autograd needs it, the gradient buffer) from
    the fused forward ``fwd``, then the reduction in plain PyTorch: no host sync (the mean divides
    by a device count)."""
    _check_targets(target, logits.shape[1], ignore_index)
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    loss_rows, _ = fwd(logits, target, mu, phi, alpha, ignore_index, 1.0, compute_grad)
    if reduction == REDUCTION_CODES["none"]:
        out = loss_rows
    elif reduction == REDUCTION_CODES["sum"]:
        out = loss_rows.sum()
    else:  # NaN when every row is ignored, with a zero gradient: like F.cross_entropy
        count = (target != ignore_index).sum()
        out = torch.where(count > 0, loss_rows.sum() / count.clamp(min=1),
                          torch.full_like(loss_rows[:0].sum(), float("nan")))
    return out.to(logits.dtype)


# --- the implementations of op ``bisam_loss`` per backend (arguments: the op table's schema) ----
@_dispatch.register("bisam_loss", "reference")
def _loss_reference(logits, target, mu, phi, alpha, reduction, ignore_index):
    return bisam_loss_reference(logits, target, mu, _PHI_NAMES[phi], alpha,
                                _REDUCTION_NAMES[reduction], ignore_index)


@_dispatch.register("bisam_loss", "cpu")
def _loss_cpu(logits, target, mu, phi, alpha, reduction, ignore_index):
    if torch.compiler.is_compiling():  # the C++ autograd node cannot be traced: the fused rows
        return _fused_loss(torch.ops.samkernels.bisam_loss_fwd, logits, target, mu, phi, alpha,
                           reduction, ignore_index)
    # One op call; its autograd node is C++.  The kernel checks the labels before any work.
    try:
        return torch.ops.samkernels.bisam_loss.default(logits, target, mu, phi, alpha, reduction,
                                                       ignore_index)
    except IndexError as exc:
        if not str(exc).startswith("bisam_loss: target["):
            raise
        raise TargetOutOfRangeError(str(exc)) from None


@_dispatch.register("bisam_loss", "cuda")
def _loss_cuda(logits, target, mu, phi, alpha, reduction, ignore_index):
    return _fused_loss(torch.ops.samkernels.bisam_loss_fwd, logits, target, mu, phi, alpha,
                       reduction, ignore_index)


@_dispatch.register("bisam_loss", "triton")
def _loss_triton(logits, target, mu, phi, alpha, reduction, ignore_index):
    from samkernels.triton.bisam_loss import bisam_loss_fwd_triton  # attaches autograd at import
    return _fused_loss(bisam_loss_fwd_triton, logits, target, mu, phi, alpha, reduction,
                       ignore_index)


def bisam_loss(logits: Tensor, target: Tensor, mu: Optional[float] = None, phi: str = "neglog",
               alpha: float = 0.1, reduction: str = "mean", ignore_index: int = -100) -> Tensor:
    """BiSAM's ascent loss Q (eq. 14) of ``logits`` (B x K) for int64 labels ``target`` (B,).

    ``phi``: ``"neglog"`` (eq. 18, the paper's recommendation) or ``"tanh"`` (eq. 17, slope
    ``alpha``); ``mu=None`` takes 1.5 for neglog and 10 for tanh.  ``reduction`` and
    ``ignore_index`` behave as in ``F.cross_entropy`` (see the module docstring).
    """
    phi, mu, alpha = _check_args(logits, target, mu, phi, alpha, reduction, ignore_index)
    loss = _dispatch.implementation("bisam_loss", logits.device)
    return loss(logits, target, mu, PHI_CODES[phi], alpha, REDUCTION_CODES[reduction],
                ignore_index)


class BiSAMLoss(nn.Module):
    """``nn.Module`` form of :func:`bisam_loss` (the perturbation loss of BiSAM, Alg. 1)."""

    def __init__(self, phi: str = "neglog", mu: Optional[float] = None, alpha: float = 0.1,
                 reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        # validate once, on a dummy input, so a bad setting fails at construction
        _check_args(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), mu, phi, alpha, reduction,
                    ignore_index)
        self.phi, self.alpha = phi, alpha
        self.reduction, self.ignore_index = reduction, ignore_index
        self.mu = DEFAULT_MU[_PHI_ALIASES[phi.lower()]] if mu is None else float(mu)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return bisam_loss(logits, target, self.mu, self.phi, self.alpha, self.reduction,
                          self.ignore_index)

    def extra_repr(self) -> str:
        return (f"phi={self.phi!r}, mu={self.mu}, alpha={self.alpha}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}")
