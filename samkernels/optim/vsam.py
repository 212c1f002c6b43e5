"""VariationalSAM (Ujváry et al., "Rethinking SAM as Variational Inference", Alg. 3 and App. E;
docs/spec.md "MFVI family").

SAM's worst-case perturbation inside the ellipsoid of a learned diagonal covariance Sigma:
  ``first_step``   Alg. 3 lines 2-3, 6-7: e = sqrt(p) Sigma g / sqrt(g^T Sigma g) (eq. 2; the
                   reduction g^T Sigma g spans all groups, on the device), w <- mu + e, then the
                   gradient step of eq. 42 on Sigma with the same g (one fused op per group)
  ``second_step``  Alg. 3 lines 4-5: restore mu, base-optimizer step with grad L_B(mu + e)

Sigma is stepped before mu (the paper alternates the two; the Sigma step only needs g from the
first pass, so it runs in the perturbation op and the second pass is not delayed).

m-sharpness (``step(closure, m)``): see ``VariationalSAM.step``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from samkernels import ops
from samkernels._dtypes import opmath
from samkernels.optim._base import (TwoPassOptimizer, check_choice, check_nonneg, check_positive,
                                    foreach_copy_)
from samkernels.optim.mfvi import GaussianPosterior
from samkernels.optim.random_sam import (BASE_KEYS, FUSED_BASES, check_base_keywords,
                                         fill_base_keys)
from samkernels.optim.sam import SAM

# m-sharpness, log step: Sigma_i / max(Sigma, _TINY) is the micro-batch's step factor (0 where
# Sigma = 0); the float32 tiny is representable in every variance dtype
_TINY = torch.finfo(torch.float32).tiny


def _sigma_norm(work, over_shards) -> Tensor:
    """sqrt(g^T Sigma g) over every (group, params, grads, variances) of ``work`` and every
    rank's shards (``over_shards``), on the first parameter's device.  One group, unsharded: the
    very norm ``vsam_perturb_`` would take."""
    dev = work[0][1][0].device
    sq = over_shards([ops.vsam_sumsq(gs, vs).to(dev) for _, _, gs, vs in work])
    return sq[0].sqrt() if len(sq) == 1 else torch.stack(sq).sum().sqrt()


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
            trained with SGD momentum 0.9.  Each param group holds only its base's keys (SGD:
            momentum, dampening, nesterov; Adam/AdamW: betas, adam_eps), so ``OneCycleLR`` /
            ``CyclicLR`` with ``cycle_momentum=True`` cycle the one in use.
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
        capturable: a fused Adam base's step on the device, as for ``SAM``.

    eq. 42 gives (diagonal Sigma, g from the first pass)::

        dL/dSigma = sqrt(p) g^2 / (2 sqrt(g^T Sigma g)) + 1/(2 N prior_var) - 1/(2 N Sigma)

    ``step(closure)``: closure at mu (``ascent=True``) then at mu + e; returns the first loss.
    Explicit phases: ``backward; first_step(zero_grad=True); backward; second_step()``
    (``second_step`` without ``first_step`` raises; ``backward; base_step()`` is a plain base
    step of the mean, Sigma unchanged).  An
    exception in the second pass restores mu; Sigma has then already taken its step (as bSAM's
    precision).  m-sharpness: ``step(closure, m)`` (see there).
    """

    _base_update = SAM._base_update
    _restore_sgd, _restore_adam = SAM._restore_sgd, SAM._restore_adam
    _capturable_adam = SAM._capturable_adam
    base_step = SAM.base_step  # the mean takes the base step at mu; Sigma does not move

    def _start_base_step(self) -> None:
        """No Sigma step in a base step: nothing of an earlier step's Sigma copies is acted on."""
        self._var_saved["on"] = False
        self._var_now.clear()
        self._var_count.clear()

    def __init__(self, params, lr: float, num_data: float, rho: float = 0.05, base: str = "sgd", *,
                 momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: Optional[float] = None, betas: Tuple[float, float] = (0.9, 0.999),
                 adam_eps: float = 1e-8, var_lr: float = 0.01, prior_var: float = 1.0,
                 var_step: str = "log", min_var: float = 1e-12, perturb_eps: float = 1e-12,
                 freeze_bn: Optional[torch.nn.Module] = None, nonfinite: str = "skip",
                 capturable: bool = False):
        check_choice("base", base, FUSED_BASES)
        spare = dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
                     weight_decay=weight_decay, betas=betas, adam_eps=adam_eps)
        check_base_keywords(spare)  # every keyword is checked, used by this base or not
        # only the base's own keys go into defaults and groups (OneCycleLR/CyclicLR: see
        # random_sam.BASE_KEYS); the others wait in _base_spare for a group that picks their base
        self._base_spare = spare  # set before super().__init__: _check_group reads it
        defaults = dict(lr=lr, num_data=num_data, rho=rho, base=base,
                        var_lr=var_lr, prior_var=prior_var, var_step=var_step, min_var=min_var,
                        perturb_eps=perturb_eps)
        defaults.update({k: spare[k] for k in BASE_KEYS[base]})
        super().__init__(params, defaults)
        self._configure(freeze_bn, None, nonfinite, capturable=capturable)
        self._var_saved = {"on": False}  # Sigma copied before its step (see _rollback_skipped_step)
        self._var_copies: Dict[Tensor, Tensor] = {}  # transient buffers, reused across steps
        self._var_now: List[Tensor] = []  # the parameters whose Sigma this step copied
        # m-sharpness: per parameter, the sum over micro-batches of its Sigma step (see step) and
        # how many micro-batches added to it; transient, emptied when the step's Sigma is set
        self._var_acc: Dict[Tensor, Tensor] = {}
        self._var_count: Dict[Tensor, int] = {}

    def _check_group(self, group: dict) -> None:
        """The constructor's values and every group's overrides."""
        check_nonneg("lr", group["lr"])
        check_positive("num_data", group["num_data"])
        group["num_data"] = float(group["num_data"])
        check_choice("var_step", group["var_step"], ("log", "linear"))
        (check_positive if group["var_step"] == "linear" else check_nonneg)("rho", group["rho"])
        check_nonneg("var_lr", group["var_lr"])
        check_positive("prior_var", group["prior_var"])
        check_positive("min_var", group["min_var"])
        check_positive("perturb_eps", group["perturb_eps"])  # 0: e = 0/0 for a zero gradient
        fill_base_keys(group, getattr(self, "_base_spare", {}))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        if g["weight_decay"] is None:  # eq. 42: ||mu||^2 / (2 N sigma_0^2)
            g["weight_decay"] = 1.0 / (g["num_data"] * g["prior_var"])

    def _variances(self, group: dict, ps: List[Tensor]) -> List[Tensor]:
        have = self._state_lists(ps, "variance")
        if have is not None:  # every step after the first: the memoised list
            return have[0]
        out = []
        for p in ps:
            st = self.state[p]
            if "variance" not in st:  # Sigma_0 = rho^2/p I (docs/spec.md; perturbation norm ~ rho)
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
    def first_step(self, zero_grad: bool = False, *, scaler=None, _micro: Optional[int] = None,
                   _m: int = 1) -> Optional[Tensor]:
        """w <- mu + e (eq. 2) and the Sigma step of eq. 42, with the gradients now in ``.grad``.
        Returns sqrt(g^T Sigma g) (Sigma before its step), or None when the gradients are not
        finite and the step is skipped (``skip_pending``).

        ``_micro``, ``_m`` (m-sharpness, used by ``step(closure, m)``): micro-batch ``_micro`` of
        ``_m``.  Its e and its Sigma step both use the step's pre-step Sigma; the step is added to
        a running sum and Sigma is put back, and ``second_step`` sets Sigma from the sum."""
        self._require_unperturbed("first_step")
        multi = _micro is not None and _m > 1
        if not multi or _micro == 0:  # the step's first (or only) perturbation
            self._var_saved["on"] = False
            self._var_now.clear()
            self._var_count.clear()
        work = [(g, ps, self._grads(ps), self._variances(g, ps)) for g, ps in self._grouped()]
        self._skip_state["pending"] = False
        self._begin_step()
        # eq. 2's g^T Sigma g spans every group (one reduction per group, summed); it is also the
        # inf/NaN check (_checked_norm)
        ok, norm = self._checked_norm(self._flat(work), scaler,
                                      lambda: _sigma_norm(work, self._over_shards),
                                      len(work) > 1 or self._sharded)
        if not ok:
            self._skip_first_pass()
            work = []
        if work and (multi or scaler is not None or self.nonfinite != "unchecked"):
            self._save_variances(work)  # a skip later in the step must find Sigma as it was
        dim = float(self._total_numel())
        for group, ps, gs, vs in work:
            backups = self._backups_for(ps)
            # m-sharpness, linear step: no clamp per micro-batch; the mean is clamped (second_step)
            min_var = -math.inf if multi and group["var_step"] != "log" else group["min_var"]
            n = ops.vsam_perturb_(ps, gs, backups, vs,
                                  None if norm is None else norm.to(ps[0].device), dim,
                                  group["perturb_eps"], group["var_lr"], group["prior_var"],
                                  group["num_data"], group["var_step"] == "log",
                                  min_var, self._found_inf(ps[0].device))
            self._mark_perturbed(ps, backups)
            norm = n if norm is None else norm
        if multi and work:
            self._add_variance_step(work)
        if zero_grad:
            self.zero_grad()
        return norm

    def _save_variances(self, work) -> None:
        """Copy Sigma before its step (once per step and parameter) for a rollback, and, with
        m-sharpness, as the pre-step Sigma every micro-batch starts from."""
        saved = set(self._var_now)
        for _, ps, _, vs in work:
            if not saved:  # the step's first save (always, without m-sharpness): one foreach copy
                copies = self._memo("var_copies", ps,
                                    lambda: [self._var_copy_buf(p, v) for p, v in zip(ps, vs)])
                foreach_copy_(copies, vs)
                self._var_now.extend(ps)
                continue
            for p, v in zip(ps, vs):
                if p not in saved:
                    self._var_copy_buf(p, v).copy_(v)
                    self._var_now.append(p)
        self._var_saved["on"] = True

    def _var_copy_buf(self, p: Tensor, v: Tensor) -> Tensor:
        """The buffer that keeps ``p``'s Sigma before its step (made or remade to fit ``v``)."""
        c = self._var_copies.get(p)
        if c is None or c.shape != v.shape or c.dtype != v.dtype:
            c = self._var_copies[p] = torch.empty_like(v)
        return c

    @torch.no_grad()
    def _add_variance_step(self, work) -> None:
        """m-sharpness: add this micro-batch's Sigma step to the running sum, then Sigma <- the
        pre-step Sigma, so the next micro-batch's e and step start from it again.  The step is
        recorded where it is additive in the micro-batch's data term: log (Sigma_i / Sigma)
        = -var_lr Sigma dL_i/dSigma for ``"log"``, the unclamped Sigma_i for ``"linear"``."""
        for group, ps, _, vs in work:
            copies = [self._var_copies[p] for p in ps]
            if group["var_step"] == "log":
                step = torch._foreach_div(vs, torch._foreach_clamp_min(copies, _TINY))
                torch._foreach_log_(step)
            else:
                step = vs
            fresh, again = ([], []), ([], [])
            for p, s in zip(ps, step):
                acc = self._var_acc.get(p)
                if acc is None or acc.shape != s.shape or acc.dtype != s.dtype:
                    acc = self._var_acc[p] = torch.empty_like(s)
                n = self._var_count.get(p, 0)
                lists = again if n else fresh
                lists[0].append(acc)
                lists[1].append(s)
                self._var_count[p] = n + 1
            if fresh[0]:
                foreach_copy_(fresh[0], fresh[1])
            if again[0]:
                torch._foreach_add_(again[0], again[1])
            foreach_copy_(vs, copies)

    @torch.no_grad()
    def _set_averaged_variance(self) -> None:
        """m-sharpness: Sigma takes the one step of eq. 42 whose data term is the mean of the
        micro-batches' (see ``step``): log: Sigma <- Sigma exp(mean_i log(Sigma_i / Sigma));
        linear: Sigma <- max(mean_i Sigma_i, min_var)."""
        for group, ps in self._grouped(with_grad=False):
            ps = [p for p in ps if p in self._var_count]
            if not ps:
                continue
            vs = [self.state[p]["variance"] for p in ps]
            accs = [self._var_acc[p] for p in ps]
            torch._foreach_mul_(accs, [1.0 / self._var_count[p] for p in ps])
            if group["var_step"] == "log":
                torch._foreach_exp_(accs)
                torch._foreach_mul_(accs, torch._foreach_clamp_min(vs, _TINY))
            else:
                torch._foreach_clamp_min_(accs, group["min_var"])
            foreach_copy_(vs, accs)
        self._var_count.clear()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler=None) -> None:
        """Alg. 3 lines 4-5: restore mu, base-optimizer step with the gradient at mu + e (SAM's
        phase).  After m-sharpness micro-batches, Sigma first takes its one averaged step; a
        skipped step puts Sigma back as it was before the step."""
        if self._var_count:
            if not self.skip_pending:
                self._set_averaged_variance()
            self._var_count.clear()
        SAM.second_step(self, zero_grad, scaler=scaler)

    def step(self, closure: Optional[Callable] = None, m: int = 1, *, scaler=None):
        """One VSAM step: closure at mu, then at mu + e.  Returns the first loss.  ``scaler``: a
        GradScaler whose ``scale(loss).backward()`` the closure calls (``scaler.update()`` after).

        m-sharpness (``m > 1``; docs/spec.md: "split the batch into m micro-batches, each with its own
        perturbation; average the m second-pass gradients, one update"): the closure is called as
        ``closure(i)`` / ``closure(i, ascent)`` for micro-batch ``i``.  Per micro-batch: first pass
        at mu -> g_i -> e_i = sqrt(p) Sigma g_i / sqrt(g_i^T Sigma g_i) (eq. 2, its own norm) ->
        second pass at mu + e_i -> back to mu.  Every e_i uses the same, pre-step Sigma.  Then one
        base update (Alg. 3 line 5) with the mean of the m gradients at mu + e_i, and one Sigma
        step (line 7) of eq. 42 with its data term sqrt(p) sqrt(g^T Sigma g) averaged over the
        micro-batches, i.e. dL/dSigma = mean_i sqrt(p) g_i^2 / (2 sqrt(g_i^T Sigma g_i))
        + 1/(2 N prior_var) - 1/(2 N Sigma).  The fused op steps Sigma per micro-batch from the
        pre-step Sigma, and the m results are combined so that this holds exactly (up to
        rounding): ``"log"``: Sigma <- Sigma exp(mean_i log(Sigma_i / Sigma)), the geometric mean
        of the Sigma_i (their arithmetic mean would differ at second order in var_lr);
        ``"linear"``: Sigma <- max(mean_i Sigma_i, min_var) with the Sigma_i unclamped, since
        clamping each one first would not be the averaged step.  Returns the mean first-pass loss.
        An exception (or a skip) leaves Sigma as before the step."""
        if closure is None:
            return self._step_without_closure(" (it evaluates the loss twice)",
                                              "first_step() / second_step()")
        if self._check_m(m) == 1:
            return self._two_passes(closure, scaler)
        return self._micro_batch_passes(
            closure, m, scaler,
            lambda i: self.first_step(zero_grad=True, scaler=scaler, _micro=i, _m=m))


VSAM = VariationalSAM
