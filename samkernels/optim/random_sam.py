"""RandomSAM (Ujváry et al., "Rethinking SAM as Variational Inference", Alg. 1: variational
optimisation; SPEC "MFVI family").

One forward/backward per step, at a Gaussian perturbation of fixed scale:
  ``noise_step``   Alg. 1 lines 2-3: w <- mu + sigma0 z   (Philox noise from seed + counter)
  ``second_step``  Alg. 1 line 4:    restore mu from the backup and take the base optimizer's step
                   with g = grad L_B(mu + sigma0 z)  (the fused SAM restore ops: SGD, Adam, AdamW)
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from samkernels.ops import vi_ops
from samkernels.optim._base import (SeedLike, TwoPassOptimizer, check_beta, check_choice,
                                    check_nonneg, draw_seed)
from samkernels.optim.sam import SAM

PAPER_SIGMA = 5e-5  # App. D: the noise scale the paper settled on


class RandomSAM(TwoPassOptimizer):
    r"""RandomSAM: SGD/Adam on gradients taken at randomly perturbed weights.

    Args:
        params: parameters or parameter groups.
        lr: learning rate of the base optimizer.
        sigma: standard deviation ``sigma0`` of the perturbation (default 5e-5, the paper's value).
        rho: alternative to ``sigma``: ``Sigma = rho^2/p I``, i.e. ``sigma0 = rho / sqrt(p)`` with
            ``p`` the parameter count over all groups (a perturbation of norm about rho, like SAM's).
            Give ``sigma`` or ``rho``, not both.  ``sigma = 0`` is exactly the base optimizer.
        base, momentum, dampening, nesterov, weight_decay, betas, adam_eps: the base optimizer, as
            in :class:`samkernels.SAM` (the paper: SGD, momentum 0.9, weight decay 5e-4).
        seed: int, torch.Generator or None — the key of the counter-based noise.
        freeze_bn: the model; with ``freeze_bn_noisy=True`` BatchNorm running statistics are not
            updated in the (noisy) pass.
        nonfinite: ``"skip"`` (default), ``"skip_on_device"``, ``"raise"`` or ``"unchecked"``,
            as for ``SAM``.  A skipped
            step leaves weights, state and the noise counter as they were.

    ``step(closure)`` calls the closure once, at mu + sigma0 z (a closure that takes an argument
    gets ``ascent=True``, as the step's first pass), and returns its loss.  Explicit phases::

        opt.noise_step(); loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)
    """

    # the restore-and-update phase is SAM's (backup -> w, base optimizer step with .grad)
    second_step = SAM.second_step
    _base_update = SAM._base_update

    def __init__(self, params, lr: float, sigma: Optional[float] = None,
                 rho: Optional[float] = None, base: str = "sgd", *, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 betas: Tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 seed: SeedLike = None, freeze_bn: Optional[torch.nn.Module] = None,
                 freeze_bn_noisy: bool = False, nonfinite: str = "skip"):
        if sigma is not None and rho is not None:
            raise ValueError("give sigma or rho, not both (sigma = rho / sqrt(p))")
        if sigma is None and rho is None:
            sigma = PAPER_SIGMA
        check_nonneg("lr", lr)
        if sigma is not None:
            check_nonneg("sigma", sigma)
        if rho is not None:
            check_nonneg("rho", rho)
        check_choice("base", base, ("sgd", "adam", "adamw"))
        check_nonneg("momentum", momentum)
        check_nonneg("dampening", dampening)
        check_nonneg("weight_decay", weight_decay)
        check_nonneg("adam_eps", adam_eps)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        check_beta("betas[0]", betas[0])
        check_beta("betas[1]", betas[1])
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, sigma=sigma, rho=rho, base=base, momentum=momentum,
                        dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                        betas=tuple(betas), adam_eps=adam_eps)
        super().__init__(params, defaults)
        self._configure(freeze_bn, None, nonfinite)
        self.freeze_bn_noisy = bool(freeze_bn_noisy)
        self._extra_state.update(seed=draw_seed(seed), noise_step=0)
        self._noise = {"at": 0}  # counter of the noise now in the weights (a dict: set in place)

    def noise_scale(self, group: dict) -> float:
        """sigma0 of ``group``: its ``sigma``, else ``rho / sqrt(p)`` (p over all groups)."""
        if group["sigma"] is not None:
            return group["sigma"]
        return group["rho"] / math.sqrt(sum(p.numel() for g in self.param_groups
                                            for p in g["params"]))

    @torch.no_grad()
    def noise_step(self) -> None:
        """Alg. 1 lines 2-3: w <- mu + sigma0 z (mu kept in a backup)."""
        self._require_unperturbed("noise_step")
        seed, step = self._extra_state["seed"], self._extra_state["noise_step"]
        for group, ps in self._grouped(with_grad=False):
            backups = [self._backup(p) for p in ps]
            vi_ops.vi_noise_(ps, backups, [], [self._param_id(p) for p in ps], seed, step,
                             self.noise_scale(group))
            self._mark_perturbed(ps, backups)
        self._noise["at"] = step
        self._extra_state["noise_step"] = step + 1

    def _rollback_skipped_step(self) -> None:  # the next step draws the skipped step's noise
        self._extra_state["noise_step"] = self._noise["at"]

    def step(self, closure: Optional[Callable] = None, *, scaler=None):
        """One RandomSAM step: the closure runs once at mu + sigma0 z; returns its loss.
        ``scaler``: a GradScaler whose ``scale(loss).backward()`` the closure calls."""
        if closure is None:
            raise RuntimeError("RandomSAM.step needs a closure (forward + backward at the "
                               "perturbed weights); or call noise_step() / second_step() yourself")
        self.noise_step()
        with self._restore_on_error():
            loss = self._run_pass(closure, ascent=True)
            self.second_step(scaler=scaler)
        return loss
