"""BiSAM, A-BiSAM and E-BiSAM (Xie et al., "Improving SAM requires rethinking its optimization
formulation", Alg. 1-3; docs/spec.md "BiSAM").

BiSAM is SAM whose two passes use different losses: the perturbation is built from the gradient of
the ascent loss Q (eq. 14, ``samkernels.ops.bisam_loss.bisam_loss``), the update from the gradient
of the training loss at w + e.  The fused phases are SAM's (``sam_perturb_``, ``sam_restore_*``);
E-BiSAM's masked perturbation is ``ebisam_perturb_``.

How the two losses reach the optimizer.  A samkernels closure that takes one argument is told which
pass it runs (``ascent=True`` for the perturbation pass), so the general form is::

    def closure(ascent):
        opt.zero_grad()
        logits = model(x)
        loss = opt.ascent_loss(logits, y) if ascent else F.cross_entropy(logits, y)
        loss.backward()
        return loss

    opt.step(closure)

and the common case is one line, ``opt.step(model=model, inputs=x, target=y)`` (or
``opt.step(opt.closure(model, x, y, loss_fn))``), which builds that closure with ``loss_fn``
(default ``F.cross_entropy``; the paper uses ``label_smoothing=0.1``).  With m-sharpness
(``step(..., m=m)``) the closure takes ``(i, ascent)`` and the built one splits the batch into m
micro-batches.  ``freeze_bn=model`` keeps BatchNorm statistics out of the perturbed pass.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from samkernels import ops
from samkernels.optim._base import _n_positional, check_beta, check_positive
from samkernels.optim.utils import SeedLike
from samkernels.optim.sam import SAM, _sam_norm

_PHIS = ("neglog", "tanh")
_DEFAULT_MU = {"neglog": 1.5, "tanh": 10.0}  # the paper's CIFAR settings (Sec. 4.1)


def _bisam_loss():
    from samkernels.ops.bisam_loss import bisam_loss  # the ascent loss Q (eq. 14)
    return bisam_loss


class BiSAM(SAM):
    r"""Bilevel SAM (Alg. 1); ``adaptive=True`` gives A-BiSAM (Alg. 2).

    Args:
        params: parameters or parameter groups.
        lr: learning rate of the base optimizer (the paper: SGD, momentum 0.9, wd 5e-4).
        rho: neighbourhood radius: ``e = rho grad Q / ||grad Q||`` (Alg. 1 line 4).
        phi: lower bound of the 0-1 loss in Q: ``"neglog"`` (eq. 18, recommended) or ``"tanh"``
            (eq. 17).
        mu: the log-sum-exp temperature of Q; None takes 1.5 (neglog) or 10 (tanh).
        alpha: slope of ``phi_tanh(x) = tanh(alpha x)`` (0.1).
        adaptive: A-BiSAM: ``e = rho T^2 grad Q / ||T grad Q||`` with ``T = |w|`` (eq. 19: no eta;
            pass ``eta=`` to add one as ASAM does).
        base: ``"sgd"``, ``"adam"`` or ``"adamw"``; the other keywords (momentum, weight_decay,
            freeze_bn, rho_schedule, nonfinite, ddp_model, ...) as :class:`samkernels.SAM`.

    ``step(closure)`` needs a closure that takes the ``ascent`` flag (see the module docstring);
    ``step(model=, inputs=, target=, loss_fn=)`` builds it.  Returns the first pass's result: with
    the built closure, the training loss at w (computed from the ascent pass's logits).
    Explicit phases::

        opt.ascent_loss(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    """

    def __init__(self, params, lr: float, rho: float = 0.05, phi: str = "neglog",
                 mu: Optional[float] = None, alpha: float = 0.1, adaptive: bool = False,
                 base: str = "sgd", *, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0,
                 betas: Tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 eta: float = 0.0, perturb_eps: float = 1e-12,
                 freeze_bn: Optional[torch.nn.Module] = None,
                 rho_schedule: Optional[Callable[[dict], float]] = None, nonfinite: str = "skip",
                 ddp_model: Optional[torch.nn.Module] = None, capturable: bool = False):
        if not isinstance(phi, str) or phi.lower() not in _PHIS:
            raise ValueError(f"phi must be one of {list(_PHIS)}, got {phi!r}")
        phi = phi.lower()
        mu = _DEFAULT_MU[phi] if mu is None else mu
        check_positive("mu", mu)
        check_positive("alpha", alpha)
        # eta = 0: A-BiSAM's T = |w| (eq. 19)
        super().__init__(params, lr, rho, base, momentum=momentum, dampening=dampening,
                         nesterov=nesterov, weight_decay=weight_decay, betas=betas,
                         adam_eps=adam_eps, adaptive=adaptive, eta=eta, perturb_eps=perturb_eps,
                         freeze_bn=freeze_bn, rho_schedule=rho_schedule, nonfinite=nonfinite,
                         ddp_model=ddp_model, capturable=capturable)
        self.phi, self.mu, self.alpha = phi, float(mu), float(alpha)

    # -- the two losses --------------------------------------------------------------------------
    def ascent_loss(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """Q of eq. 14 with this optimizer's phi, mu, alpha (``samkernels.bisam_loss``)."""
        return _bisam_loss()(logits, target, mu=self.mu, phi=self.phi, alpha=self.alpha,
                             reduction=reduction)

    def closure(self, model: torch.nn.Module, inputs, target: Tensor,
                loss_fn: Optional[Callable] = None, m: int = 1,
                scaler=None) -> Callable[..., Tensor]:
        """The two-pass closure: Q on the ascent pass (Alg. 1 line 3), ``loss_fn`` (default
        ``F.cross_entropy``) at w + e (line 5).  The ascent pass returns ``loss_fn`` at w, detached,
        for logging.  Called as ``closure(ascent)``, or ``closure(i, ascent)`` on micro-batch i of
        ``m`` (m-sharpness).  With a GradScaler it backpropagates ``scaler.scale(loss)``."""
        loss_fn = F.cross_entropy if loss_fn is None else loss_fn
        batches = _micro_batches(inputs, target, m)
        backward = _backward(scaler)

        def two_pass(*args) -> Tensor:
            ascent = args[-1]
            x, y = _pick(batches, args)
            self.zero_grad()
            logits = model(x)
            if ascent:
                backward(self.ascent_loss(logits, y))
                with torch.no_grad():
                    return loss_fn(logits.detach(), y)
            loss = loss_fn(logits, y)
            backward(loss)
            return loss.detach()

        return two_pass

    def step(self, closure: Optional[Callable] = None, m: int = 1, *, scaler=None,
             model: Optional[torch.nn.Module] = None, inputs=None, target: Optional[Tensor] = None,
             loss_fn: Optional[Callable] = None):
        """One BiSAM step from ``closure(ascent)`` (``closure(i, ascent)`` with ``m > 1``) or from
        ``model``, ``inputs``, ``target``.  ``m``, ``scaler``: as :meth:`samkernels.SAM.step`."""
        if model is not None:
            if closure is not None:
                raise ValueError("give either closure or model/inputs/target, not both")
            if inputs is None or target is None:
                raise ValueError("step(model=...) also needs inputs= and target=")
            closure = self.closure(model, inputs, target, loss_fn, self._check_m(m), scaler)
        elif closure is not None and _n_positional(closure) < (2 if m != 1 else 1):
            raise ValueError(f"{type(self).__name__}.step: the closure must take the pass flag "
                             "(closure(ascent), or closure(i, ascent) with m > 1: ascent loss Q "
                             "when ascent is True, training loss otherwise; a defaulted "
                             "parameter gets it only if it is named ascent); without it this "
                             "would be plain SAM")
        return super().step(closure, m, scaler=scaler)


class EBiSAM(BiSAM):
    r"""Efficient BiSAM (Alg. 3): BiSAM with ESAM's stochastic weight perturbation (SWP) and
    sharpness-sensitive data selection (SDS).

    Args (besides BiSAM's, without ``adaptive``):
        beta: SWP: each coordinate is perturbed with probability ``beta`` and the perturbation is
            scaled by ``1/(1 - beta)`` (Alg. 3 lines 4-5 and docs/spec.md agree).  The mask comes from the
            Philox counter (seed + step) and is never stored.
        gamma: SDS: the fraction of the batch kept for the second pass.
        normalize: ``True`` (default) perturbs by ``rho/(1-beta) grad_i Q / ||grad Q||`` (BiSAM's
            Alg. 1 line 4 with the mask; ``||grad Q||`` over all coordinates, masked or not).  Alg. 3
            line 5 prints ``rho/(1-beta) grad_i Q`` without the norm; ``False`` follows it literally.
        seed: int, torch.Generator or None — the key of the mask noise.

    Note (docs/spec.md vs paper): both say "chosen with probability beta, scaled by 1/(1-beta)"; that makes
    E[e] = beta/(1-beta) e_BiSAM, unbiased only at the paper's beta = 0.5 (a dropout-style mask
    would keep with probability 1-beta).  We follow the Algorithm box.

    The training loop (what ``step(model=, inputs=, target=)`` does)::

        logits = model(x)
        q_before = opt.ascent_loss(logits, y, reduction="none")      # per-example Q at w
        q_before.mean().backward()
        opt.first_step(zero_grad=True)                                # w + e, masked (SWP)
        with torch.no_grad():
            q_after = opt.ascent_loss(model(x), y, reduction="none")  # per-example Q at w + e
        keep = opt.select(q_before, q_after)                          # SDS: top gamma by rise
        loss_fn(model(x[keep]), y[keep]).backward()                   # second pass on B+ only
        opt.second_step(zero_grad=True)
    """

    def __init__(self, params, lr: float, rho: float = 0.05, phi: str = "neglog",
                 mu: Optional[float] = None, alpha: float = 0.1, base: str = "sgd", *,
                 beta: float = 0.5, gamma: float = 0.5, normalize: bool = True,
                 seed: SeedLike = None, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0,
                 betas: Tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 perturb_eps: float = 1e-12, freeze_bn: Optional[torch.nn.Module] = None,
                 rho_schedule: Optional[Callable[[dict], float]] = None, nonfinite: str = "skip",
                 ddp_model: Optional[torch.nn.Module] = None, adaptive: bool = False,
                 capturable: bool = False):
        if adaptive:  # SWP masks SAM's e; the paper's Alg. 3 has no adaptive variant
            raise ValueError("adaptive=True is not supported by EBiSAM (use BiSAM(adaptive=True))")
        check_beta("beta", beta)
        if not isinstance(gamma, (int, float)) or not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
        super().__init__(params, lr, rho, phi, mu, alpha, False, base, momentum=momentum,
                         dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                         betas=betas, adam_eps=adam_eps, perturb_eps=perturb_eps,
                         freeze_bn=freeze_bn, rho_schedule=rho_schedule, nonfinite=nonfinite,
                         ddp_model=ddp_model, capturable=capturable)
        self.defaults["beta"] = beta
        for g in self.param_groups:
            g.setdefault("beta", beta)
        self.gamma, self.normalize = float(gamma), bool(normalize)
        self._extra_state.update(seed=self._shared_seed(seed), noise_step=0)
        # whether a step's masks are being drawn (the counter is marked at its first; a dict: set
        # in place)
        self._mask = {"open": False}

    def _rollback_skipped_step(self) -> None:  # the next step draws the skipped step's masks
        self._rewind_counter("noise_step")
        self._mask["open"] = False

    def _start_base_step(self) -> None:  # no mask drawn: a skipped base step leaves the counter
        self._mark_counter("noise_step")
        self._mask["open"] = False

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler=None) -> Optional[Tensor]:
        """Alg. 3 lines 3-7: w <- w + e with e masked coordinate-wise (probability beta) and
        scaled by 1/(1-beta).  Returns ||grad Q|| (1 with ``normalize=False``), or None when the
        gradients are not finite and the step is skipped (``skip_pending``).  Each call draws a
        new mask (counter + 1; with m-sharpness one per micro-batch)."""
        self._require_unperturbed("first_step")
        work = [(g, ps, self._grads(ps)) for g, ps in self._grouped()]
        if not self._mask["open"]:
            self._mark_counter("noise_step")
            self._mask["open"] = True
        self._skip_state["pending"] = False
        self._begin_step()
        # ||grad Q|| spans every group, as SAM's norm, and is the inf/NaN check (_checked_norm);
        # Alg. 3 line 5 as printed (normalize=False) takes no norm: the check reads g itself
        ok, norm = self._checked_norm(self._flat(work), scaler,
                                      (lambda: _sam_norm(work, self._over_shards))
                                      if self.normalize else None, len(work) > 1 or self._sharded)
        if not ok:
            self._skip_first_pass()
            work = []
        seed = self._extra_state["seed"]
        step, at = self._counter_args("noise_step")
        eps = None
        if work and not self.normalize:  # Alg. 3 line 5 as printed: no normalisation
            norm, eps = torch.ones((), dtype=torch.float64, device=work[0][1][0].device), 0.0
        for group, ps, gs in work:
            backups = self._backups_for(ps)
            n = ops.ebisam_perturb_(ps, gs, backups, self._param_ids_for(ps),
                                    None if norm is None else norm.to(ps[0].device), seed, step,
                                    self._rho(group), group["beta"],
                                    group["perturb_eps"] if eps is None else eps,
                                    self._found_inf(ps[0].device), at)
            self._mark_perturbed(ps, backups)
            norm = n if norm is None else norm
        if work:
            self._advance_counter("noise_step", 1)
        if zero_grad:
            self.zero_grad()
        return norm

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler=None) -> None:
        """SAM's restore and base update with the gradient of the selected examples at w + e."""
        try:
            super().second_step(zero_grad, scaler=scaler)
        finally:
            self._mask["open"] = False

    def select(self, q_before: Tensor, q_after: Tensor, gamma: Optional[float] = None) -> Tensor:
        """SDS (Alg. 3 line 8): indices (ascending) of the ``ceil(gamma B)`` examples whose ascent
        loss rose most from w to w + e, i.e. B+ = {i : Q_i(w+e) - Q_i(w) > a}."""
        gamma = self.gamma if gamma is None else gamma
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
        if q_before.dim() != 1 or q_before.shape != q_after.shape:
            raise ValueError(f"q_before and q_after must be per-example vectors of one shape, got "
                             f"{tuple(q_before.shape)} and {tuple(q_after.shape)}")
        rise = q_after.detach() - q_before.detach()
        k = max(1, math.ceil(gamma * rise.numel() - 1e-9))  # 1e-9: 0.3 * 10 must keep 3
        return rise.topk(k).indices.sort().values

    def closure(self, model: torch.nn.Module, inputs, target: Tensor,
                loss_fn: Optional[Callable] = None, m: int = 1,
                scaler=None) -> Callable[..., Tensor]:
        """The E-BiSAM two-pass closure (see the class docstring): the second pass runs a no-grad
        forward at w + e for Q, selects B+, and runs forward + backward on B+ only.  Called as
        ``closure(ascent)`` or ``closure(i, ascent)`` (micro-batch i of m, each selected alone)."""
        loss_fn = F.cross_entropy if loss_fn is None else loss_fn
        batches = _micro_batches(inputs, target, m)
        backward = _backward(scaler)
        remembered = {}

        def two_pass(*args) -> Tensor:
            ascent, i = args[-1], (args[0] if len(args) == 2 else 0)
            x, y = _pick(batches, args)
            self.zero_grad()
            if ascent:
                logits = model(x)
                q = self.ascent_loss(logits, y, reduction="none")
                remembered[i] = q.detach()
                backward(q.mean())
                with torch.no_grad():
                    return loss_fn(logits.detach(), y)
            with torch.no_grad():
                q_after = self.ascent_loss(model(x), y, reduction="none")
            keep = self.select(remembered.pop(i), q_after)
            loss = loss_fn(model(x[keep]), y[keep])
            backward(loss)
            return loss.detach()

        return two_pass


def _micro_batches(inputs, target: Tensor, m: int):
    """(inputs, target) split into m micro-batches along dim 0 (m-sharpness)."""
    if m == 1:
        return [(inputs, target)]
    xs, ys = inputs.chunk(m), target.chunk(m)
    if len(xs) != m or len(ys) != m:
        raise ValueError(f"a batch of {target.shape[0]} cannot be split into m={m} micro-batches")
    return list(zip(xs, ys))


def _backward(scaler) -> Callable[[Tensor], None]:
    if scaler is None:
        return lambda loss: loss.backward()
    return lambda loss: scaler.scale(loss).backward()


def _pick(batches, args):
    """The micro-batch a closure call ``(ascent)`` or ``(i, ascent)`` is about."""
    i = args[0] if len(args) == 2 else 0
    if not 0 <= i < len(batches):
        raise ValueError(f"micro-batch {i} asked of a closure built for m={len(batches)}; build it "
                         "with opt.closure(..., m=m) for step(closure, m=m)")
    return batches[i]


E_BiSAM = EBiSAM
