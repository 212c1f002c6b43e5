"""Accelerate: samkernels optimizers in a loop prepared by ``accelerate``.

``accelerator.prepare(model, opt, loader)`` wraps the optimizer in an ``AcceleratedOptimizer``.  Its
``step(closure)`` forwards the closure to samkernels (fp32 and bf16 work as they are) but returns
None, and with fp16 it calls ``GradScaler.step(opt, closure)``, which refuses closures.  Gradient
accumulation (``accelerator.accumulate``) assumes one backward per micro-batch, so the micro-batches
the second pass needs are gone by the time the optimizer steps.  This module supplies:

* :func:`prepare` (``accelerator.prepare`` plus :func:`wrap_optimizer`): ``opt.step(closure)`` then
  returns the loss and, with fp16, hands the accelerator's scaler to samkernels
  (``step(closure, scaler=...)``, then ``scaler.update()``) instead of ``GradScaler.step``;
  ``accelerator.optimizer_step_was_skipped`` reports a skipped (inf/NaN) step.
* :func:`sam_step` for ``accelerator.accumulate``: each micro-batch is recorded; when accelerate
  syncs gradients (the last micro-batch of a window, or the end of the data loader) one samkernels
  step runs on the whole window: the ascent gradient is the mean over its micro-batches
  (``loss_i / k`` summed), and the second pass recomputes every micro-batch at the perturbed
  weights.  It is SAM on the concatenated batch, the same as the core README's accumulation recipe
  (a closure looping over the k micro-batches).  No forward runs on the micro-batches before the
  sync, so a step costs 2k forwards and backwards, as in a plain loop.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from . import require

require("accelerate", "accelerate")

from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402

from ..optim._base import TwoPassOptimizer, closure_arity  # noqa: E402

__all__ = ["SAMAcceleratedOptimizer", "prepare", "wrap_optimizer", "sam_step"]


def _inner(opt) -> TwoPassOptimizer:
    inner = opt.optimizer if isinstance(opt, AcceleratedOptimizer) else opt
    if not isinstance(inner, TwoPassOptimizer):
        raise TypeError(f"expected a samkernels optimizer (or one prepared by accelerate), got "
                        f"{type(inner).__name__}")
    return inner


def _route(opt, closure: Callable, **kwargs):
    """One samkernels step with the prepared optimizer's scaler (if any) passed as ``scaler=``."""
    inner = _inner(opt)
    scaler = getattr(opt, "scaler", None)
    if scaler is not None:
        loss = inner.step(closure, scaler=scaler, **kwargs)
        scaler.update()
    else:
        loss = inner.step(closure, **kwargs)
    if isinstance(opt, AcceleratedOptimizer):
        # what accelerate's step_was_skipped / optimizer_step_was_skipped (and its scheduler) read
        opt._is_overflow = inner.step_skipped
    return loss


class SAMAcceleratedOptimizer(AcceleratedOptimizer):
    """An ``AcceleratedOptimizer`` whose ``step(closure)`` runs the samkernels step itself.

    The closure runs forward and ``accelerator.backward(loss)`` and returns the loss (it may zero
    the gradients with ``opt.zero_grad()``).  ``step`` returns the loss of the first pass.  With
    fp16 the accelerator's ``GradScaler`` goes to samkernels as ``scaler=`` and is updated after the
    step; a step with inf/NaN gradients is skipped (``opt.step_was_skipped``).  Gradient
    accumulation over accelerate micro-batches needs :func:`sam_step` (a closure here sees one
    micro-batch only), so ``step`` refuses ``gradient_accumulation_steps > 1``; accumulating
    inside the closure works.  ``m=`` (m-sharpness) is passed on.
    """

    def step(self, closure: Optional[Callable] = None, **kwargs):
        if closure is None:
            raise RuntimeError(f"{type(self.optimizer).__name__}.step needs a closure (two passes)")
        if self.gradient_state.num_steps > 1:
            raise ValueError("with gradient_accumulation_steps > 1 the second pass needs every "
                             "micro-batch of the window: use samkernels.integrations.accelerate."
                             "sam_step(accelerator, opt, loss_fn, *batch) inside "
                             "accelerator.accumulate(model)")
        if not self.gradient_state.sync_gradients:
            return None
        return _route(self, closure, **kwargs)


def wrap_optimizer(opt: AcceleratedOptimizer) -> SAMAcceleratedOptimizer:
    """Turn a prepared optimizer around a samkernels optimizer into a
    :class:`SAMAcceleratedOptimizer`, in place (the accelerator and schedulers prepared with it keep
    referring to the same object, so ``save_state``/``load_state`` are unchanged); returns it."""
    if not isinstance(opt, AcceleratedOptimizer):
        raise TypeError("wrap_optimizer expects the optimizer accelerator.prepare returned")
    _inner(opt)
    opt.__class__ = SAMAcceleratedOptimizer
    return opt


def prepare(accelerator, *objects, **kwargs):
    """``accelerator.prepare(*objects)`` with every samkernels optimizer among the results wrapped
    by :func:`wrap_optimizer`.  Returns what ``accelerator.prepare`` returns."""
    out = accelerator.prepare(*objects, **kwargs)
    for obj in out if isinstance(out, tuple) else (out,):
        if isinstance(obj, AcceleratedOptimizer) and isinstance(obj.optimizer, TwoPassOptimizer):
            wrap_optimizer(obj)
    return out


def _wants_ascent(loss_fn: Callable, n_batch: int) -> bool:
    """True when ``loss_fn`` takes a positional parameter after the batch (told ``ascent``), by the
    rule samkernels applies to its closures; a ``*args`` loss_fn gets the batch only."""
    n = closure_arity(loss_fn)
    return n is not None and n > n_batch


def sam_step(accelerator, opt, loss_fn: Callable, *batch: Any):
    """One micro-batch of a samkernels step under ``accelerator.accumulate(model)`` (or without it).

    ``loss_fn(*batch)`` runs the forward and returns the loss tensor (no backward, no zero_grad);
    ``loss_fn(*batch, ascent)`` is told which pass it runs, as a samkernels closure would be.  The
    batch is recorded; while ``accelerator.sync_gradients`` is False nothing else happens and None
    is returned.  On the sync micro-batch the recorded k micro-batches form one step: each pass
    zeroes the gradients and back-propagates ``loss_i / k`` for every micro-batch (through the
    accelerator's scaler with fp16), the scaler goes to samkernels as ``scaler=`` and is updated,
    and the mean loss of the first pass is returned.  A short last window (the data loader ended)
    is averaged over its own micro-batches.  Works on a plain ``accelerator.prepare`` result or a
    :class:`SAMAcceleratedOptimizer`.
    """
    inner = _inner(opt)
    pending = opt.__dict__.setdefault("_samkernels_pending", [])
    pending.append(batch)
    if not accelerator.sync_gradients:
        return None
    window = list(pending)
    pending.clear()
    k = len(window)
    ascent_arg = _wants_ascent(loss_fn, len(batch))
    scaler = getattr(opt, "scaler", None)

    def closure(ascent):
        inner.zero_grad(set_to_none=True)
        total = None
        for b in window:
            loss = loss_fn(*b, ascent) if ascent_arg else loss_fn(*b)
            part = loss / k if k > 1 else loss
            (scaler.scale(part) if scaler is not None else part).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total / k if k > 1 else total

    return _route(opt, closure)
