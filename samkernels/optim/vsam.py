"""VariationalSAM (Ujváry et al., "Rethinking SAM as Variational Inference", Alg. 3 and App. E;
SPEC "MFVI family").

SAM's worst-case perturbation inside the ellipsoid of a learned diagonal covariance Sigma:
  ``first_step``   Alg. 3 lines 2-3, 6-7: e = sqrt(p) Sigma g / sqrt(g^T Sigma g) (eq. 2; the
                   reduction g^T Sigma g spans all groups, on the device), w <- mu + e, then the
                   gradient step of eq. 42 on Sigma with the same g (one fused op per group)
  ``second_step``  Alg. 3 lines 4-5: restore mu, base-optimizer step with grad L_B(mu + e)

Sigma is stepped before mu (the paper alternates the two; the Sigma step only needs g from the
first pass, so it runs in the perturbation op and the second pass is not delayed).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from samkernels.ops import vi_ops
from samkernels.optim._base import (TwoPassOptimizer, check_beta, check_choice, check_nonneg,
                                    check_positive)
from samkernels.ops.reference import opmath
from samkernels.optim.mfvi import GaussianPosterior
from samkernels.optim.sam import SAM


class VariationalSAM(GaussianPosterior, TwoPassOptimizer):
    r"""VSAM: SAM with a learned diagonal perturbation covariance.

    Args:
        params: parameters or parameter groups.
        lr: learning rate of the base optimizer on mu (Alg. 3's eta_1).
        num_data: data-set size ``N`` (eq. 42's KL terms are divided by it).
        rho: Sigma starts at ``rho^2/p I`` (p = parameter count over all groups), so the first
            perturbations have norm about rho (App. D: "around 0.05").  ``rho = 0`` keeps Sigma = 0:
            exactly the base optimizer.
        base, momentum, dampening, nesterov, betas, adam_eps: the base optimizer, as in
            :class:`samkernels.SAM`.  Alg. 3 line 5 is plain SGD (the default, momentum 0); App. D
            trained with SGD momentum 0.9.
        weight_decay: ``None`` (default) takes eq. 42's ``||mu||^2 / (2 N prior_var)``, i.e. weight
            decay ``1/(N prior_var)``; a number overrides it (App. D used 5e-4).
        var_lr: learning rate on Sigma (0.01, App. D).
        prior_var: ``sigma_0^2`` of the prior in eq. 42.
        var_step: how the eq. 42 step on Sigma is kept positive.  ``"log"`` (default): the step is
            taken on log Sigma, ``Sigma <- Sigma exp(-var_lr Sigma dL/dSigma)``; Sigma stays > 0
            by construction.  ``"linear"``: Alg. 3 line 7 as printed, ``Sigma <- Sigma - var_lr
            dL/dSigma``, clamped at ``min_var``.  Note that at Sigma = rho^2/p the linear step's
            ``-1/(2 N Sigma)`` term is huge (p/(2 N rho^2)): it inflates Sigma by orders of
            magnitude in one step unless var_lr is tiny (the paper reports Sigma growing until
            the Taylor approximation breaks).
        min_var: the clamp of ``var_step="linear"``.
        perturb_eps: added to sqrt(g^T Sigma g) in eq. 2.
        freeze_bn: the model; BatchNorm running statistics are not updated in the perturbed pass.
        nonfinite: ``"skip"`` (default), ``"skip_on_device"``, ``"raise"`` or ``"unchecked"``,
            as for ``SAM``.  A skipped
            step leaves weights, Sigma and the base optimizer's state as they were (while checking,
            Sigma is copied before its step, to be put back if the second pass is skipped).

    eq. 42 gives (diagonal Sigma, g from the first pass)::

        dL/dSigma = sqrt(p) g^2 / (2 sqrt(g^T Sigma g)) + 1/(2 N prior_var) - 1/(2 N Sigma)

    ``step(closure)``: closure at mu (``ascent=True``) then at mu + e; returns the first loss.
    Explicit phases: ``backward; first_step(zero_grad=True); backward; second_step()``.  An
    exception in the second pass restores mu; Sigma has then already taken its step (as bSAM's
    precision).  m-sharpness is not supported: Sigma would step once per micro-batch.
    """

    second_step = SAM.second_step  # restore mu, base-optimizer step with the gradient at mu + e
    _base_update = SAM._base_update

    def __init__(self, params, lr: float, num_data: float, rho: float = 0.05, base: str = "sgd", *,
                 momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: Optional[float] = None, betas: Tuple[float, float] = (0.9, 0.999),
                 adam_eps: float = 1e-8, var_lr: float = 0.01, prior_var: float = 1.0,
                 var_step: str = "log", min_var: float = 1e-12, perturb_eps: float = 1e-12,
                 freeze_bn: Optional[torch.nn.Module] = None, nonfinite: str = "skip"):
        check_nonneg("lr", lr)
        check_positive("num_data", num_data)
        check_choice("var_step", var_step, ("log", "linear"))
        (check_positive if var_step == "linear" else check_nonneg)("rho", rho)
        check_choice("base", base, ("sgd", "adam", "adamw"))
        check_nonneg("momentum", momentum)
        check_nonneg("dampening", dampening)
        if weight_decay is not None:
            check_nonneg("weight_decay", weight_decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        check_beta("betas[0]", betas[0])
        check_beta("betas[1]", betas[1])
        check_nonneg("adam_eps", adam_eps)
        check_nonneg("var_lr", var_lr)
        check_positive("prior_var", prior_var)
        check_positive("min_var", min_var)
        check_positive("perturb_eps", perturb_eps)  # 0 would give e = 0/0 for a zero gradient
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, num_data=float(num_data), rho=rho, base=base, momentum=momentum,
                        dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                        betas=tuple(betas), adam_eps=adam_eps, var_lr=var_lr, prior_var=prior_var,
                        var_step=var_step, min_var=min_var, perturb_eps=perturb_eps)
        super().__init__(params, defaults)
        self._configure(freeze_bn, None, nonfinite)
        self._var_saved = {"on": False}  # Sigma copied before its step (see _rollback_skipped_step)
        self._var_copies: Dict[Tensor, Tensor] = {}  # transient buffers, reused across steps
        self._var_now: List[Tensor] = []  # the parameters whose Sigma this step copied

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        if g["weight_decay"] is None:  # eq. 42: ||mu||^2 / (2 N sigma_0^2)
            g["weight_decay"] = 1.0 / (g["num_data"] * g["prior_var"])

    def _variances(self, group: dict, ps: List[Tensor]) -> List[Tensor]:
        out = []
        for p in ps:
            st = self.state[p]
            if "variance" not in st:  # Sigma_0 = rho^2/p I (SPEC; perturbation norm ~ rho)
                st["variance"] = torch.full_like(p, group["rho"] ** 2 / self._total_numel(),
                                                 dtype=opmath(p))
            out.append(st["variance"])
        return out

    def _rollback_skipped_step(self) -> None:
        """The second pass was skipped: Sigma goes back to its value before this step's update."""
        if self._var_saved["on"]:
            for p in self._var_now:
                self.state[p]["variance"].copy_(self._var_copies[p])
            self._var_saved["on"] = False

    def _rollback_on_device(self, found: Tensor) -> None:
        """skip_on_device: where ``found`` is set, Sigma goes back to its copy, decided on the
        device (the first pass's Sigma step ran before the second pass's flag existed)."""
        if self._var_saved["on"]:
            skip = found.reshape(()) != 0
            for p in self._var_now:
                v = self.state[p]["variance"]
                v.copy_(torch.where(skip.to(v.device), self._var_copies[p], v))
            self._var_saved["on"] = False

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler=None) -> Optional[Tensor]:
        """w <- mu + e (eq. 2) and the Sigma step of eq. 42, with the gradients now in ``.grad``.
        Returns sqrt(g^T Sigma g) (Sigma before its step), or None when the gradients are not
        finite and the step is skipped (``skip_pending``)."""
        self._require_unperturbed("first_step")
        work = [(g, ps, [p.grad for p in ps], self._variances(g, ps)) for g, ps in self._grouped()]
        self._skip_state["pending"] = False
        self._var_saved["on"] = False
        if not self._grads_ok(True, [p for _, ps, _, _ in work for p in ps], scaler):
            self._skip_first_pass()
            work = []
        if work and (scaler is not None or self.nonfinite != "unchecked"):
            self._var_now.clear()  # a skip in the second pass must find Sigma as it was
            for _, ps, _, vs in work:
                for p, v in zip(ps, vs):
                    c = self._var_copies.get(p)
                    if c is None or c.shape != v.shape or c.dtype != v.dtype:
                        self._var_copies[p] = v.clone()
                    else:
                        c.copy_(v)
                    self._var_now.append(p)
            self._var_saved["on"] = True
        dim = float(self._total_numel())
        norm = None
        if len(work) > 1:  # eq. 2's g^T Sigma g spans every group: one reduction per group, summed
            dev = work[0][1][0].device
            sq = [vi_ops.vsam_sumsq(gs, vs).to(dev) for _, _, gs, vs in work]
            norm = torch.stack(sq).sum().sqrt()
        for group, ps, gs, vs in work:
            backups = [self._backup(p) for p in ps]
            n = vi_ops.vsam_perturb_(ps, gs, backups, vs,
                                     None if norm is None else norm.to(ps[0].device), dim,
                                     group["perturb_eps"], group["var_lr"], group["prior_var"],
                                     group["num_data"], group["var_step"] == "log",
                                     group["min_var"], self._found_inf(ps[0].device))
            self._mark_perturbed(ps, backups)
            norm = n if norm is None else norm
        if zero_grad:
            self.zero_grad()
        return norm

    def step(self, closure: Optional[Callable] = None, *, scaler=None):
        """One VSAM step: closure at mu, then at mu + e.  Returns the first loss.  ``scaler``: a
        GradScaler whose ``scale(loss).backward()`` the closure calls (``scaler.update()`` after)."""
        if closure is None:
            raise RuntimeError("VariationalSAM.step needs a closure (it evaluates the loss twice); "
                               "or call first_step() / second_step() yourself")
        with self._restore_on_error():
            loss = self._run_pass(closure, ascent=True)
            self.first_step(zero_grad=True, scaler=scaler)
            if not self.skip_pending:
                self._run_pass(closure, ascent=False)
            self.second_step(scaler=scaler)
        return loss


VSAM = VariationalSAM
