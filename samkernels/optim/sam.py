"""SAM and ASAM (Foret et al. 2021; Kwon et al. 2021) with SGD, Adam or AdamW as base optimizer.

Two passes per step.  ``first_step`` perturbs the weights to w + e (one fused op per parameter
group: global gradient norm, backup, perturbation); ``second_step`` restores w from the backup and
applies the base optimizer's update with the gradient taken at w + e (one fused op per group).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from samkernels import ops
from samkernels._dtypes import opmath
from samkernels.optim._base import (TwoPassOptimizer, check_betas, check_choice, check_nonneg,
                                    check_positive, foreach_copy_, warn_sgd_ranges)

_BASES = ("sgd", "adam", "adamw")
# the hyper-parameters each base optimizer reads (and the only ones its groups carry)
_BASE_KEYS = {"sgd": ("momentum", "dampening", "nesterov"),
              "adam": ("betas", "adam_eps"), "adamw": ("betas", "adam_eps")}

# the keyword defaults (a copied/unpickled optimizer has no _base_spare: torch.optim's
# __getstate__ keeps only defaults, state and param_groups)
_SPARE_DEFAULTS = dict(momentum=0.0, dampening=0.0, nesterov=False, betas=(0.9, 0.999),
                       adam_eps=1e-8)


def _check_base_keys(d: dict) -> None:
    """Check the base-optimizer hyper-parameters present in ``d`` (a group or the keywords)."""
    for key in ("momentum", "dampening"):
        if key in d:
            check_nonneg(key, d[key])
    warn_sgd_ranges(d)  # torch.optim.SGD accepts momentum=1.5 too: warn only
    if "adam_eps" in d:
        check_positive("adam_eps", d["adam_eps"])  # 0: 0/0 where a gradient is 0
    if "betas" in d:
        d["betas"] = check_betas(d["betas"])
    if d.get("nesterov") and (d.get("momentum", 0) <= 0 or d.get("dampening", 0) != 0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")


def _sam_norm(work, over_shards) -> torch.Tensor:
    """||T g|| over every (group, params, grads) of ``work`` (T = |w| + eta with ASAM, else 1)
    and every rank's shards (``over_shards``: the optimizer's ``_over_shards``), on the first
    parameter's device.  One group, unsharded: the very norm ``sam_perturb_`` would take (same
    dtype, so the same rounding)."""
    dev = work[0][1][0].device
    sq = over_shards([ops.grad_sumsq(ps, gs, g["adaptive"], g["eta"] if g["adaptive"] else 0.0)
                      .to(dev) for g, ps, gs in work])
    return sq[0].sqrt() if len(sq) == 1 else torch.stack([s.double() for s in sq]).sum().sqrt()


def _new_adam_states(state: dict, ps: List[torch.Tensor]) -> None:
    """Adam's entries for parameters ``ps`` that have none.  Each step count is a 0-dim float32 CPU
    tensor, as in torch.optim, and those created together are the elements of one row, so that a
    step counts them all with one add (``_one_row``) instead of an add per tensor."""
    row = torch.zeros(len(ps))
    for i, p in enumerate(ps):
        st = state[p]
        st["step"] = row[i]
        st["exp_avg"] = torch.zeros_like(p, dtype=opmath(p))
        st["exp_avg_sq"] = torch.zeros_like(p, dtype=opmath(p))


def _one_row(steps: List[torch.Tensor]) -> torch.Tensor:
    """A 1-D float32 CPU tensor whose elements are ``steps`` in order (the same memory), when they
    are consecutive elements of one storage (``_new_adam_states``; a loaded checkpoint keeps the
    sharing); else an empty tensor (each count is then added on its own)."""
    t0 = steps[0]
    if not all(type(t) is torch.Tensor and t.dim() == 0 and t.dtype == torch.float32 and
               t.device.type == "cpu" for t in steps):
        return torch.empty(0)
    storage, base = t0.untyped_storage(), t0.storage_offset()
    if any(t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != base + i
           for i, t in enumerate(steps)):
        return torch.empty(0)
    return t0.as_strided((len(steps),), (1,), base)


def _adam_state(state: dict, p: torch.Tensor) -> dict:
    """``state[p]`` with Adam's entries, created where missing (the step count a CPU scalar, as in
    torch.optim)."""
    if "step" not in state[p]:
        _new_adam_states(state, [p])
    return state[p]


class SAM(TwoPassOptimizer):
    r"""Sharpness-aware minimisation.

    Args:
        params: parameters or parameter groups.
        lr: learning rate of the base optimizer.
        rho: neighbourhood radius (docs/spec.md: ``e = rho g / (||g|| + eps)``); ``rho = 0`` is exactly the
            base optimizer.
        base: ``"sgd"`` (momentum, dampening, nesterov, weight_decay as ``torch.optim.SGD``),
            ``"adam"`` (L2 weight decay) or ``"adamw"`` (decoupled weight decay).  Groups hold
            only their base's keys (``momentum``, ``dampening``, ``nesterov`` or ``betas``,
            ``adam_eps``), so ``OneCycleLR``/``CyclicLR`` with ``cycle_momentum`` cycle the one
            in use, as on ``torch.optim.SGD``/``Adam``.
        adaptive: ASAM: ``e = rho T^2 g / (||T g|| + eps)`` with ``T = |w| + eta``.
        perturb_eps: added to the gradient norm in the perturbation; ``adam_eps``: Adam's epsilon.
        freeze_bn: the model; when given, BatchNorm running statistics are not updated during the
            second (perturbed) pass of ``step(closure)`` (see ``samkernels.optim.bn_frozen``).
        rho_schedule: ``callable(group) -> rho`` evaluated at every first step (e.g.
            ``rho_proportional_to_lr(...)``, GSAM's schedule); LR schedulers work unchanged.
            ``group["rho"]`` then shows the value in effect (as ``lr`` under an LR scheduler);
            the given one is kept as ``group["initial_rho"]`` and is what the schedule sees
            as ``group["rho"]`` (see ``TwoPassOptimizer._rho``).
        nonfinite: what a pass with inf/NaN gradients does: ``"skip"`` (default) skips the whole
            step — weights and state stay exactly as they were, ``step_skipped`` is True; the
            flag is read on the host once per pass (free on the CPU, a sync on a GPU);
            ``"skip_on_device"`` (the fast path on a GPU) never reads it: every pass runs and the
            fused ops take their skip form on the device, so weights and all tensor state stay as
            they were, but host counters advance (Adam's bias-correction step, the noise
            counter), a skipped first step leaves zero momentum buffers (the next step's buffer
            is ``(1 - dampening) d``, torch's ``d`` when dampening = 0) and ``step_skipped``
            reads the flag only when asked;
            ``"raise"`` raises ``NonFiniteGradientError`` with the weights at the mean;
            ``"unchecked"`` does not look (no extra pass over the gradients, no device read; for
            benchmarks and runs known to be finite).  With a GradScaler the scaler decides.
        ddp_model: the ``DistributedDataParallel`` model: the ascent pass of ``step(closure)``
            runs under ``no_sync()``, each rank perturbing with its own gradient — m-sharpness
            with m = world size (see ``TwoPassOptimizer``).  None (default): both passes
            all-reduce, SAM on the global batch.
        capturable: keep the counters the kernels read on the parameters' device, advanced there
            (Adam's per-parameter step, a float32 tensor as in torch.optim's capturable Adam;
            the noise / mask counters of BSAM, RandomSAM, MFVI, EBiSAM, IVON), so that a whole
            step (``first_step()`` + ``second_step()``) can be captured once in a CUDA graph and
            replayed.  The same steps as ``capturable=False``, bit for bit.  Needs
            ``nonfinite="skip_on_device"`` or ``"unchecked"``, no GradScaler, every parameter on
            one device and, with an Adam base, a gradient for every parameter of a group at
            every step (README "CUDA graphs").

    The norm ``||g||`` is taken over all parameters of all groups, on the device.

    Use either ``step(closure)`` — ``closure()`` runs forward and backward and returns the loss; it
    is called twice — or the explicit phases::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    ``second_step`` without ``first_step`` raises.  A plain base-optimizer step without the
    perturbation (SAM every k steps): ``loss_fn(model(x), y).backward(); opt.base_step()``.
    Momentum >= 1 or dampening > 1 (accepted by ``torch.optim.SGD`` too) warn, naming them.

    Mixed precision: the closure calls ``scaler.scale(loss).backward()``, then
    ``opt.step(closure, scaler=scaler); scaler.update()`` (or pass ``scaler=`` to both phases).
    Each pass's gradients are unscaled before use (the first before the norm); inf/NaN in either
    pass skips the step.  Do not call ``scaler.step(opt)`` or ``scaler.unscale_(opt)`` yourself.
    """

    def __init__(self, params, lr: float, rho: float = 0.05, base: str = "sgd", *,
                 momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, betas: Tuple[float, float] = (0.9, 0.999),
                 adam_eps: float = 1e-8, adaptive: bool = False, eta: float = 0.01,
                 perturb_eps: float = 1e-12, freeze_bn: Optional[torch.nn.Module] = None,
                 rho_schedule: Optional[Callable[[dict], float]] = None, nonfinite: str = "skip",
                 ddp_model: Optional[torch.nn.Module] = None, capturable: bool = False):
        # Only the chosen base's keys go into defaults and groups: torch's OneCycleLR/CyclicLR
        # cycle betas[0] whenever "betas" is in defaults, so an SGD-based optimizer carrying an
        # unused betas would have its momentum cycling silently do nothing.  The other base's
        # values are kept aside for a group that picks that base (add_param_group, base=...).
        spare = dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
                     betas=betas, adam_eps=adam_eps)
        _check_base_keys(spare)  # every keyword is checked, used by the default base or not
        self._base_spare = spare  # set before super().__init__: _check_group reads it
        defaults = dict(lr=lr, rho=rho, base=base, weight_decay=weight_decay, adaptive=adaptive,
                        eta=eta, perturb_eps=perturb_eps)
        defaults.update({k: spare[k] for k in _BASE_KEYS.get(base, ())})
        super().__init__(params, defaults)
        self._configure(freeze_bn, rho_schedule, nonfinite, ddp_model, capturable)

    def _check_group(self, group: dict) -> None:
        for key in ("lr", "rho", "weight_decay", "eta"):
            check_nonneg(key, group[key])
        check_positive("perturb_eps", group["perturb_eps"])  # 0: e = 0/0 for a zero gradient
        check_choice("base", group["base"], _BASES)
        # a group whose base differs from the default one: its base's keys from the keywords,
        # the default base's (inherited from defaults, never read) dropped
        for key in set(_SPARE_DEFAULTS) - set(_BASE_KEYS[group["base"]]):
            group.pop(key, None)
        for key in _BASE_KEYS[group["base"]]:
            group.setdefault(key, getattr(self, "_base_spare", _SPARE_DEFAULTS)[key])
        _check_base_keys(group)

    # -- phases ----------------------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler=None) -> Optional[torch.Tensor]:
        """w <- w + e with the gradients now in ``.grad``.  Returns the global norm ||T g||, or None
        when the gradients are not finite and the step is skipped (``skip_pending``)."""
        self._require_unperturbed("first_step")
        work = [(g, ps, self._grads(ps)) for g, ps in self._grouped()]
        self._skip_state["pending"] = False
        self._begin_step()
        # the norm spans every group (one reduction op per group); it is also the inf/NaN check
        ok, norm = self._checked_norm(self._flat(work), scaler,
                                      lambda: _sam_norm(work, self._over_shards),
                                      len(work) > 1 or self._sharded)
        if not ok:
            self._skip_first_pass()
            work = []
        for group, ps, gs in work:
            backups = self._backups_for(ps)
            n = ops.sam_perturb_(ps, gs, backups, None if norm is None else norm.to(ps[0].device),
                                 self._rho(group), group["perturb_eps"], group["adaptive"],
                                 group["eta"] if group["adaptive"] else 0.0,
                                 self._found_inf(ps[0].device))
            self._mark_perturbed(ps, backups)
            norm = n if norm is None else norm
        if zero_grad:
            self.zero_grad()
        return norm

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler=None) -> None:
        """Restore w from the backup and take the base optimizer's step with the gradient at w + e.
        A skipped step (inf/NaN in either pass) only restores w.  Without a preceding
        ``first_step`` it raises RuntimeError: use ``base_step()`` for a step without the
        perturbation."""
        self._require_begun("first_step")
        grouped = self._grouped()
        if self.skip_pending or not self._descent_ok(grouped, scaler):
            self._abandon_step()
            if zero_grad:
                self.zero_grad()
            return
        if self._skip_state["found"] is not None:
            self._rollback_on_device(self._skip_state["found"])
        moved = list(self._perturbed)  # cleared at the end: an error before leaves restore() work
        if self._moved_are_grouped(moved, grouped):  # the usual step: no set work
            for group, ps in grouped:
                self._base_update(group, ps)
        else:
            perturbed = {p for ps, _ in moved for p in ps}
            # FSDP2 shards: DTensor has no _foreach_copy_ rule (inline: torch.compile)
            copy = foreach_copy_ if self._sharded else torch._foreach_copy_
            for group, ps in grouped:
                # a gradient only in this pass: its backup is itself (every one in a step without
                # a first pass, LookSAM's reuse_step and base_step: one copy, not one per tensor)
                fresh = [p for p in ps if p not in perturbed] if perturbed else ps
                if fresh:
                    copy(self._backups_for(fresh), fresh)
                self._base_update(group, ps)
                if perturbed:  # a set: torch.compile compares items with ==
                    perturbed.difference_update(set(ps))
            # parameters perturbed in the first pass but without a gradient now: just restore them
            for ps, bs in moved:
                rest = [(p, b) for p, b in zip(ps, bs) if p in perturbed]
                if rest:
                    copy([p for p, _ in rest], [b for _, b in rest])
        self._perturbed.clear()
        self._finish_step(skipped=False)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def base_step(self, zero_grad: bool = False, *, scaler=None) -> None:
        """A plain base-optimizer step (SGD/Adam/AdamW as configured, same state, same fused op)
        with the gradient now in ``.grad``, taken at the current weights: no perturbation, one
        forward/backward.  For schedules that perturb only on some iterations (SAM every k
        steps, LookSAM-style)::

            loss_fn(model(x), y).backward()
            if it % k == 0:  # a SAM step
                opt.first_step(zero_grad=True); loss_fn(model(x), y).backward(); opt.second_step()
            else:            # a plain step
                opt.base_step()

        Equal, bit for bit, to the step ``rho = 0`` gives.  inf/NaN gradients, ``nonfinite`` and
        ``scaler=`` (``scaler.update()`` after) behave as in ``second_step``; LR schedulers see a
        step.  A step in progress (after ``first_step``) must be finished first."""
        self._require_idle("base_step")
        self._start_base_step()
        self._skip_state["pending"] = False
        self._begin_step()
        self.second_step(zero_grad, scaler=scaler)

    def _start_base_step(self) -> None:
        """Subclasses: forget per-step bookkeeping a base step must not act on."""

    def _base_update(self, group: dict, ps) -> None:
        grads = self._grads(ps)
        backups = self._backups_for(ps)
        found_inf = self._found_inf(ps[0].device)
        if group["base"] == "sgd":
            if group["momentum"] == 0:
                self._restore_sgd(ps, grads, backups, [], group["lr"], 0.0, group["dampening"],
                                     group["nesterov"], group["weight_decay"], False, found_inf)
                return
            have = self._state_lists(ps, "momentum_buffer")
            if have is not None:  # every buffer exists (all steps after the first): one op
                self._restore_sgd(ps, grads, backups, have[0], group["lr"], group["momentum"],
                                     group["dampening"], group["nesterov"], group["weight_decay"],
                                     False, found_inf)
                return
            # parameters whose momentum buffer does not exist yet take d as the buffer (first=True).
            # Zeros, not empty: under nonfinite="skip_on_device" a first step skipped on the device
            # leaves the buffer as allocated and the next step reads it (first=False); from zeros
            # that step gives buf = (1 - dampening) d, which is torch's buf = d when dampening = 0.
            for first in (False, True):
                idx = [i for i, p in enumerate(ps) if ("momentum_buffer" in self.state[p]) != first]
                if not idx:
                    continue
                sel = [ps[i] for i in idx]
                for p in sel:
                    if first:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p, dtype=opmath(p))
                bufs = [self.state[p]["momentum_buffer"] for p in sel]
                self._restore_sgd(sel, [grads[i] for i in idx], [backups[i] for i in idx], bufs,
                                     group["lr"], group["momentum"], group["dampening"],
                                     group["nesterov"], group["weight_decay"], first, found_inf)
            return
        # Adam / AdamW: one op per distinct step count (normally exactly one)
        beta1, beta2 = group["betas"]
        if self.capturable:
            return self._capturable_adam(group, ps, grads, backups, found_inf)
        have = None if torch.compiler.is_compiling() else \
            self._state_lists(ps, "step", "exp_avg", "exp_avg_sq")
        if have is not None:  # all state exists (eager): count the steps in one op
            steps, exp_avgs, exp_avg_sqs = have
            row = self._memo("adam_step_row", ps, lambda: _one_row(steps))
            if len(row):  # the counts are one row's elements: one add
                row.add_(1.0)
                counts = row
            else:
                torch._foreach_add_(steps, 1.0)
                counts = torch.stack(steps)
            # all at the same count, the usual step (CPU scalars, as in torch.optim: no device sync)
            if torch.equal(counts, counts[0].expand(len(steps))):
                self._restore_adam(ps, grads, backups, exp_avgs, exp_avg_sqs,
                                   int(steps[0].item()),
                                   group["lr"], beta1, beta2, group["adam_eps"],
                                   group["weight_decay"], group["base"] == "adamw", found_inf)
                return
            torch._foreach_add_(steps, -1.0)  # mixed step counts: the general path below
        by_step = {}
        missing = [p for p in ps if "step" not in self.state[p]]
        if missing:  # a first step: state for all of them (one row of counts)
            _new_adam_states(self.state, missing)
        for i, p in enumerate(ps):
            st = self.state[p]
            st["step"] += 1
            by_step.setdefault(int(st["step"].item()), []).append(i)  # CPU scalar: no device sync
        beta1, beta2 = group["betas"]
        for step, idx in by_step.items():
            sel = [ps[i] for i in idx]
            self._restore_adam(sel, [grads[i] for i in idx], [backups[i] for i in idx],
                                  [self.state[p]["exp_avg"] for p in sel],
                                  [self.state[p]["exp_avg_sq"] for p in sel], step, group["lr"],
                                  beta1, beta2, group["adam_eps"], group["weight_decay"],
                                  group["base"] == "adamw", found_inf)

    def _capturable_adam(self, group: dict, ps, grads, backups, found_inf) -> None:
        """Adam / AdamW with ``capturable=True``: each parameter's step count is a float32 tensor
        on its device (as in torch.optim's capturable Adam), advanced there; the op adds the
        first one on the device (``device_step``), so the parameters of a group step together."""
        if len(ps) != len(group["params"]):
            raise RuntimeError(
                f"{type(self).__name__}: with capturable=True and an Adam base every parameter of "
                f"a group needs a gradient at every step (their step counts advance together on "
                f"the device); {len(group['params']) - len(ps)} of this group's parameters have "
                "none now")
        have = self._state_lists(ps, "step", "exp_avg", "exp_avg_sq")
        if have is None or have[0][0].device != ps[0].device:
            for p in ps:
                st = _adam_state(self.state, p)
                st["step"] = st["step"].to(p.device, torch.float32)  # loaded on the CPU
            self._memos.clear()
            have = self._state_lists(ps, "step", "exp_avg", "exp_avg_sq")
        steps, exp_avgs, exp_avg_sqs = have
        torch._foreach_add_(steps, 1.0)
        beta1, beta2 = group["betas"]
        self._restore_adam(ps, grads, backups, exp_avgs, exp_avg_sqs, 0, group["lr"], beta1,
                           beta2, group["adam_eps"], group["weight_decay"],
                           group["base"] == "adamw", found_inf, steps[0].to(torch.int64))

    # the fused restore + base step of _base_update (the SAM variants add their lists here)
    def _restore_sgd(self, *args) -> None:
        ops.sam_restore_sgd_(*args)

    def _restore_adam(self, *args) -> None:
        ops.sam_restore_adam_(*args)

    # -- closure API -----------------------------------------------------------------------------
    def step(self, closure: Optional[Callable] = None, m: int = 1, *, scaler=None):
        """One SAM step.  ``closure()`` must run forward + backward and return the loss; it is
        called twice (at w, then at w + e).  ``closure(ascent)`` is told which pass it is (True for
        the pass whose gradient builds e) and may use a different loss there.  Gradients are
        cleared between the passes.  Returns the loss of the first pass.  An exception anywhere
        restores w before propagating.

        m-sharpness (``m > 1``): the closure is called as ``closure(i)`` / ``closure(i, ascent)``
        for micro-batch ``i`` in ``range(m)``; each micro-batch gets its own perturbation, and the
        base update uses the average of the m second-pass gradients.  Returns the mean first loss.

        ``scaler``: a ``torch.amp.GradScaler`` whose ``scale(loss).backward()`` the closure calls;
        call ``scaler.update()`` after the step.  A step whose first pass is not finite does not
        run the second pass.
        """
        if closure is None:
            return self._step_without_closure(" (it evaluates the loss twice)",
                                              "first_step() / second_step()")
        if self._check_m(m) == 1:
            return self._two_passes(closure, scaler)
        return self._micro_batch_passes(
            closure, m, scaler, lambda i: self.first_step(zero_grad=True, scaler=scaler))


class ASAM(SAM):
    """Adaptive SAM (Kwon et al. 2021): ``SAM(..., adaptive=True)``; rho defaults to 0.5."""

    def __init__(self, params, lr: float, rho: float = 0.5, base: str = "sgd", **kwargs):
        kwargs.setdefault("adaptive", True)
        super().__init__(params, lr, rho, base, **kwargs)
