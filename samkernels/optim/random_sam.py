"""RandomSAM (Ujváry et al., "Rethinking SAM as Variational Inference", Alg. 1: variational
optimisation; docs/spec.md "MFVI family").

One forward/backward per step, at a Gaussian perturbation of fixed scale:
  ``noise_step``   Alg. 1 lines 2-3: w <- mu + sigma0 z   (Philox noise from seed + counter)
  ``second_step``  Alg. 1 line 4:    restore mu from the backup and take the base optimizer's step
                   with g = grad L_B(mu + sigma0 z)  (the fused SAM restore ops: SGD, Adam, AdamW;
                   or, unfused, any ``torch.optim.Optimizer`` subclass's own ``step()``)
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

from samkernels import ops
from samkernels.optim._base import (TwoPassOptimizer, check_beta, check_choice, check_nonneg,
                                    mean_loss, warn_sgd_ranges)
from samkernels.optim.utils import SeedLike
from samkernels.optim.sam import SAM

PAPER_SIGMA = 5e-5  # App. D: the noise scale the paper settled on

# The fused bases and the hyper-parameters each one reads.  Only these go into defaults and param
# groups: torch's OneCycleLR/CyclicLR (cycle_momentum=True) cycle betas[0] whenever "betas" is in
# ``optimizer.defaults`` and group["momentum"] otherwise, so an SGD-based optimizer carrying an
# unused ``betas`` would have its momentum cycling silently do nothing.
FUSED_BASES = ("sgd", "adam", "adamw")
BASE_KEYS = {"sgd": ("momentum", "dampening", "nesterov", "weight_decay"),
             "adam": ("weight_decay", "betas", "adam_eps"),
             "adamw": ("weight_decay", "betas", "adam_eps")}
BASE_DEFAULTS = dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                     betas=(0.9, 0.999), adam_eps=1e-8)


def check_base_keywords(d: dict) -> None:
    """Check the fused base optimizer's hyper-parameters present in ``d`` (keywords or a group);
    ``weight_decay=None`` is let through (VSAM: eq. 42's value, filled in later)."""
    for key in ("momentum", "dampening", "adam_eps"):
        if key in d:
            check_nonneg(key, d[key])
    warn_sgd_ranges(d)  # torch.optim.SGD accepts momentum=1.5 too: warn only
    if d.get("weight_decay") is not None:
        check_nonneg("weight_decay", d["weight_decay"])
    if "betas" in d:
        betas = d["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        check_beta("betas[0]", betas[0])
        check_beta("betas[1]", betas[1])
        d["betas"] = tuple(betas)
    if d.get("nesterov") and (d.get("momentum", 0) <= 0 or d.get("dampening", 0) != 0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")


def fill_base_keys(group: dict, spare: Dict[str, object]) -> None:
    """A group of a fused base gets the keys of *its* base (it may override ``base``) from the
    constructor's keywords ``spare``, drops the other bases' (inherited from the defaults, unread),
    then is checked."""
    check_choice("base", group["base"], FUSED_BASES)
    for key in set(BASE_DEFAULTS) - set(BASE_KEYS[group["base"]]):
        group.pop(key, None)
    for key in BASE_KEYS[group["base"]]:
        group.setdefault(key, spare.get(key, BASE_DEFAULTS[key]))
    check_base_keywords(group)


class RandomSAM(TwoPassOptimizer):
    r"""RandomSAM: a base optimizer on gradients taken at randomly perturbed weights.

    Args:
        params: parameters or parameter groups.
        lr: learning rate of the base optimizer.
        sigma: standard deviation ``sigma0`` of the perturbation (default 5e-5, the paper's value).
        rho: alternative to ``sigma``: ``Sigma = rho^2/p I``, i.e. ``sigma0 = rho / sqrt(p)`` with
            ``p`` the parameter count over all groups (a perturbation of norm about rho, like SAM's).
            Give ``sigma`` or ``rho``, not both.  ``sigma = 0`` is exactly the base optimizer.
        base: ``"sgd"`` (default), ``"adam"`` or ``"adamw"``: the fused restore-and-update ops of
            :class:`samkernels.SAM` (the paper: SGD, momentum 0.9, weight decay 5e-4).  Or any
            ``torch.optim.Optimizer`` subclass (e.g. ``torch.optim.RMSprop``), run unfused: the
            noise phase stays fused; ``second_step`` copies mu back from the backups and calls
            the inner optimizer's ``step()`` (without a closure) on the gradient at the perturbed
            point.  The inner optimizer shares this optimizer's param-group dicts, so LR
            schedulers (and ``cycle_momentum``) reach it; its state rides in ``state_dict()``
            under ``"base_optimizer"``.  Its hyper-parameters: ``base_kwargs`` and/or extra
            keywords, plus whichever of ``momentum, dampening, nesterov, weight_decay, betas``
            are given (they are forwarded under their own names).
        momentum, dampening, nesterov, weight_decay, betas, adam_eps: the fused base's
            hyper-parameters, as in :class:`samkernels.SAM`; ``None`` (not given) takes 0, 0,
            False, 0, (0.9, 0.999), 1e-8.  Each param group holds only its base's keys (SGD:
            momentum, dampening, nesterov, weight_decay; Adam/AdamW: weight_decay, betas,
            adam_eps), so ``OneCycleLR``/``CyclicLR`` with ``cycle_momentum=True`` cycle
            ``momentum`` for SGD and ``betas[0]`` for Adam, as on ``torch.optim.SGD``/``Adam``.
        seed: int, torch.Generator or None — the key of the counter-based noise.
        freeze_bn: the model; with ``freeze_bn_noisy=True`` BatchNorm running statistics are not
            updated in the (noisy) pass.
        rho_schedule: ``callable(group) -> rho`` evaluated at every noise draw (e.g.
            ``rho_proportional_to_lr(...)``), as SAM's rho: the noise scale is then
            ``sigma0 = rho_t / sqrt(p)`` (norm about rho_t), in place of the group's ``sigma`` or
            ``rho``.
        nonfinite: ``"skip"`` (default), ``"skip_on_device"`` (fused bases only: an arbitrary
            ``torch.optim`` step cannot be skipped on the device), ``"raise"`` or
            ``"unchecked"``, as for ``SAM``.  A skipped step leaves weights, state and the noise
            counter as they were.
        capturable: the noise counter (and a fused Adam base's step) on the device, as for
            ``SAM``; a ``torch.optim`` base must be made capturable itself (``base_kwargs``).
        base_kwargs: keyword arguments of a ``torch.optim`` base (not allowed with a fused one).

    ``step(closure)`` calls the closure once, at mu + sigma0 z (a closure that takes an argument
    gets ``ascent=True``, as the step's first pass: a SAM-style closure that computes a separate
    ascent loss when told ``ascent`` would train RandomSAM on that loss), and returns its loss.  Explicit phases::

        opt.noise_step(); loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)

    ``second_step`` without ``noise_step`` raises; ``base_step()`` is the plain base step (no noise).

    m-sharpness (``step(closure, m)``, docs/spec.md "split the batch into m micro-batches, each with its
    own perturbation; average the m second-pass gradients, one update"): micro-batch ``i``
    (``closure(i)`` or ``closure(i, ascent)``) gets its own noise draw, counter ``c + i`` for a
    step that starts at counter ``c`` (which then ends at ``c + m``, as BSAM's); the m gradients
    are averaged and the base optimizer takes one step.  Returns the mean loss.
    """

    _base_update = SAM._base_update  # the fused restore-and-update phase is SAM's
    _restore_sgd, _restore_adam = SAM._restore_sgd, SAM._restore_adam
    _capturable_adam = SAM._capturable_adam

    def __init__(self, params, lr: float, sigma: Optional[float] = None,
                 rho: Optional[float] = None, base="sgd", *, momentum: Optional[float] = None,
                 dampening: Optional[float] = None, nesterov: Optional[bool] = None,
                 weight_decay: Optional[float] = None,
                 betas: Optional[Tuple[float, float]] = None, adam_eps: Optional[float] = None,
                 seed: SeedLike = None, freeze_bn: Optional[torch.nn.Module] = None,
                 freeze_bn_noisy: bool = False,
                 rho_schedule: Optional[Callable[[dict], float]] = None, nonfinite: str = "skip",
                 capturable: bool = False, base_kwargs: Optional[dict] = None, **kwargs):
        if sigma is not None and rho is not None:
            raise ValueError("give sigma or rho, not both (sigma = rho / sqrt(p))")
        if sigma is None and rho is None:
            sigma = PAPER_SIGMA
        check_nonneg("lr", lr)
        given = {k: v for k, v in dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
                                       weight_decay=weight_decay, betas=betas,
                                       adam_eps=adam_eps).items() if v is not None}
        unfused = isinstance(base, type)
        if unfused:
            if not issubclass(base, torch.optim.Optimizer) or issubclass(base, TwoPassOptimizer):
                raise ValueError("base must be 'sgd', 'adam', 'adamw' or a torch.optim.Optimizer "
                                 f"subclass (not a samkernels optimizer), got {base!r}")
            if "adam_eps" in given:
                raise ValueError("adam_eps belongs to the fused Adam base; pass the torch.optim "
                                 "base's own keyword (eps=...) instead")
            if nonfinite == "skip_on_device":
                raise ValueError("nonfinite='skip_on_device' needs a fused base ('sgd', 'adam', "
                                 "'adamw'): a torch.optim step cannot be skipped on the device")
            inner_kw = dict(given)
            for k, v in {**(base_kwargs or {}), **kwargs}.items():
                if k in inner_kw or k == "lr":
                    raise ValueError(f"{k} is given twice (as a keyword of RandomSAM and in "
                                     "base_kwargs / the extra keywords)")
                inner_kw[k] = v
        else:
            if base_kwargs is not None or kwargs:
                extra = sorted(set(base_kwargs or {}) | set(kwargs))
                raise TypeError(f"RandomSAM got unexpected keyword arguments {extra}: base_kwargs "
                                "and extra keywords are for a torch.optim base class")
            check_choice("base", base, FUSED_BASES)
            check_base_keywords(given)  # every keyword given is checked, used by this base or not
        # set before super().__init__: _check_group (called from it) reads them
        self._unfused = unfused
        self._base_spare = given
        self._inner: Optional[torch.optim.Optimizer] = None
        defaults = dict(lr=lr, sigma=sigma, rho=rho)
        if not unfused:
            defaults["base"] = base
            defaults.update({k: given.get(k, BASE_DEFAULTS[k]) for k in BASE_KEYS[base]})
        super().__init__(params, defaults)
        self._configure(freeze_bn, rho_schedule, nonfinite, capturable=capturable)
        self.freeze_bn_noisy = bool(freeze_bn_noisy)
        self._extra_state.update(seed=self._shared_seed(seed), noise_step=0)
        if unfused:
            # The inner optimizer is built on our group dicts and then shares our list of them:
            # torch's add_param_group fills its defaults into the dicts in place, an LR scheduler
            # writing our groups' lr (or momentum) writes the inner optimizer's, and a group added
            # later (add_param_group) is seen by both.
            inner = base(self.param_groups, lr=lr, **inner_kw)
            inner.param_groups = self.param_groups
            for k, v in inner.defaults.items():
                self.defaults.setdefault(k, v)  # schedulers look for momentum/betas in defaults
            self._inner = inner

    def _check_group(self, group: dict) -> None:
        check_nonneg("lr", group["lr"])
        if group["sigma"] is not None and group["rho"] is not None:
            raise ValueError("give sigma or rho, not both (sigma = rho / sqrt(p)); a group that "
                             "sets one must set the other to None")
        if group["sigma"] is None and group["rho"] is None:
            raise ValueError("give sigma or rho (the noise scale)")
        check_nonneg("sigma" if group["sigma"] is not None else "rho",
                     group["sigma"] if group["sigma"] is not None else group["rho"])
        if getattr(self, "_unfused", False):
            if "base" in group:
                raise ValueError("with a torch.optim base class, base cannot be set per group")
            return
        fill_base_keys(group, getattr(self, "_base_spare", {}))

    def noise_scale(self, group: dict) -> float:
        """sigma0 of ``group``: ``rho_schedule(group) / sqrt(p)`` with a schedule, else its
        ``sigma``, else ``rho / sqrt(p)`` (p over all groups)."""
        if self.rho_schedule is None and group["sigma"] is not None:
            return group["sigma"]
        rho = self._rho(group) if self.rho_schedule is not None else group["rho"]
        # Sigma = rho^2/p I (docs/spec.md, the paper's RandomSAM): sigma0 = rho / sqrt(p)
        return rho / math.sqrt(sum(p.numel() for g in self.param_groups for p in g["params"]))

    @torch.no_grad()
    def noise_step(self, *, _micro: Optional[int] = None, _m: int = 1) -> None:
        """Alg. 1 lines 2-3: w <- mu + sigma0 z (mu kept in a backup).

        Noise draw ``c + i`` of the Philox counter for micro-batch ``i`` of ``m`` (``_micro``,
        ``_m``: m-sharpness, as BSAM's) of a step that starts at counter ``c``; the counter moves
        to ``c + m`` with the last micro-batch's draw (``c + 1`` without m-sharpness)."""
        self._require_unperturbed("noise_step")
        micro = _micro or 0
        if micro == 0:
            self._mark_counter("noise_step")
        self._begin_step()
        seed = self._extra_state["seed"]
        step, at = self._counter_args("noise_step", micro)
        for group, ps in self._grouped(with_grad=False):
            backups = self._backups_for(ps)
            ops.vi_noise_(ps, backups, [], self._param_ids_for(ps), seed, step,
                          self.noise_scale(group), at)
            self._mark_perturbed(ps, backups)
        if micro == _m - 1:
            self._advance_counter("noise_step", _m)

    def _rollback_skipped_step(self) -> None:  # the next step draws the skipped step's noise
        self._rewind_counter("noise_step")

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler=None) -> None:
        """Alg. 1 line 4: restore mu and take the base optimizer's step with the gradient at the
        perturbed point now in ``.grad``.  inf/NaN gradients skip the step (only mu is restored).
        Without a preceding ``noise_step`` it raises RuntimeError: use ``base_step()`` for a step
        without the noise."""
        self._require_begun("noise_step")
        if self._inner is None:
            return SAM.second_step(self, zero_grad, scaler=scaler)
        grouped = self._grouped()
        if self.skip_pending or not self._grads_ok(False, self._flat(grouped),
                                                   scaler):
            self._abandon_step()
        else:
            # unfused: mu back exactly (a copy from the backups), then the torch optimizer's own
            # update with the gradient that was taken at mu + sigma0 z (Alg. 1 line 4)
            self._restore_weights()
            self._inner.step()
            self._finish_step(skipped=False)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def base_step(self, zero_grad: bool = False, *, scaler=None) -> None:
        """A plain base-optimizer step (fused SGD/Adam/AdamW, or the torch.optim base) with the
        gradient now in ``.grad``, taken at mu itself: no noise is drawn and the noise counter
        does not move (the next ``noise_step`` draws what it would have drawn).  Bit for bit the
        step ``sigma = 0`` gives.  inf/NaN gradients, ``nonfinite`` and ``scaler=`` behave as in
        ``second_step``.  A step in progress (after ``noise_step``) must be finished first."""
        SAM.base_step(self, zero_grad, scaler=scaler)

    def _start_base_step(self) -> None:  # no noise drawn: a skip rolls the counter back to here
        self._mark_counter("noise_step")

    def step(self, closure: Optional[Callable] = None, m: int = 1, *, scaler=None):
        """One RandomSAM step: the closure runs once at mu + sigma0 z; returns its loss.
        ``m > 1``: m-sharpness (see the class docstring), the closure is called as ``closure(i)``
        or ``closure(i, ascent)``; returns the mean loss.  ``scaler``: a GradScaler whose
        ``scale(loss).backward()`` the closure calls (one unscale of the averaged gradient)."""
        if closure is None:
            return self._step_without_closure(" (forward + backward at the perturbed weights)",
                                              "noise_step() / second_step()")
        if self._check_m(m) == 1:
            self.noise_step()
            with self._restore_on_error():
                loss = self._run_pass(closure, ascent=True)
                self.second_step(scaler=scaler)
            return loss
        losses = []
        with self._restore_on_error():
            for i in range(m):
                self.noise_step(_micro=i, _m=m)  # micro-batch i's own draw z_i
                losses.append(self._run_pass(closure, True, micro=i))
                self._accumulate_grads(first=i == 0)
                self._restore_weights()  # back to mu for the next draw
            # the mean of the m gradients, then one base-optimizer update (docs/spec.md m-sharpness)
            self._load_accumulated_grads(1.0 / m)
            self.second_step(scaler=scaler)
        return mean_loss(losses)

    # -- state_dict: the inner torch optimizer's state rides along ------------------------------
    def state_dict(self):
        sd = super().state_dict()
        if self._inner is not None:
            sd["base_optimizer"] = self._inner.state_dict()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        inner_sd = state_dict.pop("base_optimizer", None)
        if (inner_sd is None) != (self._inner is None):
            raise ValueError("this state_dict was saved by a RandomSAM with "
                             f"{'a fused' if inner_sd is None else 'a torch.optim'} base, this one "
                             f"has {'a fused' if self._inner is None else 'a torch.optim'} base")
        super().load_state_dict(state_dict)
        if self._inner is not None:
            self._inner.load_state_dict(inner_sd)
            # torch's load_state_dict rebuilt both lists of group dicts: share ours again
            self._inner.param_groups = self.param_groups
