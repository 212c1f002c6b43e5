"""IVON, the Improved Variational Online Newton method (Shen et al. 2024, "Variational Learning is
Effective for Large Deep Networks", Alg. 1; docs/spec.md "IVON").

Posterior q(theta) = N(m, diag(sigma^2)), sigma^2 = 1 / (lambda (h + delta)); the weights hold the
mean m.  Per step ``mc_samples`` = S samples theta_k = m + sigma z_k, each a forward/backward, and
three fused ops per parameter group:
  ``noise_step``       line 2:     theta = m + sigma z          (Philox noise from seed + counter)
  ``accumulate_step``  lines 2-3:  running means of g and of g sigma z over samples 1 .. S-1; w <- m
  ``second_step``      lines 2-8:  the last sample joins the means; momentum, Hessian and mean
                                   update; w <- m
z is never stored: each gradient phase regenerates it from the counter of its sample.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from samkernels import ops
from samkernels._dtypes import opmath
from samkernels.optim._base import (TwoPassOptimizer, check_betas, check_nonneg, check_positive,
                                    foreach_copy_, mean_loss)
from samkernels.optim.utils import PosteriorSampler, SeedLike


class IVON(PosteriorSampler, TwoPassOptimizer):
    r"""IVON (Shen et al. 2024, Alg. 1), the ``hess_approx="price"`` estimator of the reference
    package ``ivon-opt``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate ``alpha`` (times ``hess_init + weight_decay`` when ``rescale_lr``).
        ess: effective sample size ``lambda`` (usually the training-set size).
        hess_init: initial Hessian ``h0``.
        betas: ``(beta1, beta2)``: momentum and Hessian averaging.
        weight_decay: ``delta``, the prior precision per example (L2 on the mean, and the floor of
            the posterior precision ``lambda (h + delta)``).
        mc_samples: samples (forward/backward passes) per step; their gradients and Hessian
            estimates are averaged.
        clip_radius: elementwise clip of the mean step (``inf``: none).
        rescale_lr: scale ``lr`` by ``hess_init + weight_decay`` (as ``ivon-opt``), so that the
            first steps move as SGD with ``lr`` would.
        debias: divide the momentum by ``1 - beta1^t`` (t counts the steps taken).
        seed: int, ``torch.Generator`` or None — the key of the counter-based noise.
        nonfinite: ``"skip"`` (default), ``"skip_on_device"``, ``"raise"`` or ``"unchecked"``, as
            for ``SAM``.  A skipped step (inf/NaN gradients in any sample) leaves weights, Hessian,
            momentum, the step count ``t`` and the noise counter as they were.  Under
            ``"skip_on_device"`` the host cannot know, so ``t`` and the noise counter advance.
        capturable: the noise counter and ``t`` on the device, as for ``SAM`` (the fused update
            forms the bias correction ``1 - beta1^t`` from ``t`` there).

    Per step, with g_k the gradient at theta_k = m + sigma z_k and means over the S samples::

        gm <- beta1 gm + (1 - beta1) mean(g_k)
        f  =  mean(g_k z_k / sigma)          (= mean(g_k sigma z_k) lambda (h + delta))
        h  <- beta2 h + (1 - beta2) f + (1 - beta2)^2 / 2 (h - f)^2 / (h + delta)
        m  <- m - lr' clip((gm / (1 - beta1^t) + delta m) / (h + delta), -clip_radius, clip_radius)

    ``step(closure)`` runs the closure ``mc_samples`` times, each at a fresh sample (a closure
    that takes an argument gets ``ascent=True``), zeroing the gradients between samples, and
    returns the mean loss.  Explicit phases, S = ``mc_samples``::

        for k in range(S):
            opt.noise_step(); loss_fn(model(x), y).backward()
            if k < S - 1:
                opt.accumulate_step(zero_grad=True)
        opt.second_step(zero_grad=True)

    A parameter is updated when it has a gradient in every sample of the step; the others go
    back to the mean unchanged.  The posterior: ``sampled_params``, ``predictive``,
    ``posterior_variance`` (sigma^2 per parameter).  With a GradScaler: ``step(closure,
    scaler=scaler)``, or ``scaler=`` to ``accumulate_step`` and ``second_step``.
    """

    def __init__(self, params, lr: float, ess: float, hess_init: float = 1.0, *,
                 betas: Tuple[float, float] = (0.9, 0.99999), weight_decay: float = 1e-4,
                 mc_samples: int = 1, clip_radius: float = math.inf, rescale_lr: bool = True,
                 debias: bool = True, seed: SeedLike = None, nonfinite: str = "skip",
                 capturable: bool = False):
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be an int >= 1, got {mc_samples!r}")
        for name, flag in (("rescale_lr", rescale_lr), ("debias", debias)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        defaults = dict(lr=lr, ess=ess, hess_init=hess_init, betas=betas,
                        weight_decay=weight_decay, clip_radius=clip_radius)
        super().__init__(params, defaults)  # _check_group checks these, and every group's
        self._configure(None, None, nonfinite, capturable=capturable)
        self.mc_samples, self.rescale_lr, self.debias = mc_samples, rescale_lr, debias
        # seed, the noise counter (one draw per sample) and t, the steps taken (for debias)
        self._extra_state.update(seed=self._shared_seed(seed), noise_step=0, step=0)
        # this step: samples drawn (sample k draws at the noise counter, which then moves on: the
        # gradient phases regenerate its noise at counter - 1), the parameters with a gradient in
        # every sample so far (mutated in place: see TwoPassOptimizer on torch.compile)
        self._sample = {"k": 0}
        self._have: dict = {}
        self._avg_bufs = {}  # transient running means (g, g sigma z) per parameter, never saved

    def _check_group(self, group: dict) -> None:
        check_nonneg("lr", group["lr"])
        check_positive("ess", group["ess"])
        check_positive("hess_init", group["hess_init"])
        check_nonneg("weight_decay", group["weight_decay"])
        group["betas"] = check_betas(group["betas"])
        c = group["clip_radius"]
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
            raise ValueError(f"clip_radius must be a number > 0 (inf: no clipping), got {c!r}")
        group["ess"] = float(group["ess"])

    # -- state -----------------------------------------------------------------------------------
    def _lists(self, group: dict, ps: List[Tensor]):
        """(backups, hessians, momenta) of ``ps``, the state created where missing (h = h0,
        gm = 0); memoised per parameter list (shared: never mutate them)."""
        have = self._state_lists(ps, "hess", "momentum")
        if have is None:
            for p in ps:
                st = self.state[p]
                if "hess" not in st:
                    st["hess"] = torch.full_like(p, group["hess_init"], dtype=opmath(p))
                    st["momentum"] = torch.zeros_like(p, dtype=opmath(p))
            have = self._state_lists(ps, "hess", "momentum")
        return (self._backups_for(ps),) + tuple(have)

    def _avgs(self, ps: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """The running means of g and g sigma z of ``ps`` (scratch, opmath dtype), memoised."""
        def build():
            out = ([], [])
            for p in ps:
                bufs = self._avg_bufs.get(p)
                if bufs is None or bufs[0].shape != p.shape or bufs[0].device != p.device:
                    bufs = self._avg_bufs[p] = (torch.empty_like(p, dtype=opmath(p)),
                                                torch.empty_like(p, dtype=opmath(p)))
                out[0].append(bufs[0])
                out[1].append(bufs[1])
            return out
        return self._memo("ivon_avgs", ps, build)

    # -- the step's bookkeeping ------------------------------------------------------------------
    def _end_samples(self) -> None:
        self._sample["k"] = 0
        self._have.clear()

    @torch.no_grad()
    def restore(self) -> None:
        """The mean weights back and the step in progress abandoned (its noise draws are drawn
        again by the next step)."""
        super().restore()
        if self._sample["k"]:
            self._rollback_skipped_step()
            self._end_samples()

    def _rollback_skipped_step(self) -> None:  # the next step draws the skipped step's noise
        self._rewind_counter("noise_step")
        self._rewind_counter("step")

    def _finish_step(self, skipped: bool) -> None:
        super()._finish_step(skipped)
        self._end_samples()

    def _with_grad(self, grouped, first: bool):
        """``grouped`` narrowed to the parameters with a gradient in every sample so far (this one
        included: ``grouped`` holds those with one now)."""
        now = {p: None for _, ps in grouped for p in ps}
        if first:
            self._have.clear()
            self._have.update(now)
        else:
            for p in [p for p in self._have if p not in now]:
                del self._have[p]
        return [(g, [p for p in ps if p in self._have]) for g, ps in grouped]

    # -- phases ----------------------------------------------------------------------------------
    @torch.no_grad()
    def noise_step(self) -> None:
        """Line 2: load sample k of this step, theta = m + z / sqrt(lambda (h + delta)), into the
        parameters (the mean kept in a backup).  Sample k of the step that starts at counter c
        draws the noise of counter c + k - 1."""
        self._require_unperturbed("noise_step")
        k = self._sample["k"]
        if k >= self.mc_samples:
            raise RuntimeError(f"IVON.noise_step: all mc_samples={self.mc_samples} samples of this "
                               "step are drawn; run the backward and call second_step()")
        if k == 0:
            self._mark_counter("noise_step")
            self._mark_counter("step")
            self._begin_step()
        if not self.skip_pending:  # a skipped step only counts its samples
            seed = self._extra_state["seed"]
            step, at = self._counter_args("noise_step")
            for group, ps in self._grouped(with_grad=False):
                backups, hessians, _ = self._lists(group, ps)
                ops.ivon_noise_(ps, backups, hessians, self._param_ids_for(ps), seed, step,
                                group["ess"], group["weight_decay"], at)
                self._mark_perturbed(ps, backups)
        self._sample["k"] = k + 1
        self._advance_counter("noise_step", 1)

    def _check_sample(self, what: str, last: bool) -> None:
        k, s = self._sample["k"], self.mc_samples
        if k == 0:
            raise RuntimeError(f"IVON.{what}: no sample drawn; call noise_step() and run the "
                               "backward first")
        if last and k < s:
            raise RuntimeError(f"IVON.{what}: only {k} of mc_samples={s} samples drawn; call "
                               "accumulate_step() after each backward but the last, then "
                               "noise_step()")
        if not last and k == s:
            raise RuntimeError(f"IVON.{what}: sample {k} is the last of mc_samples={s}; finish "
                               "the step with second_step()")
        if not last and not self._perturbed and not self.skip_pending:
            raise RuntimeError(f"IVON.{what}: sample {k} was already accumulated; call "
                               "noise_step() and run the backward first")

    @torch.no_grad()
    def accumulate_step(self, zero_grad: bool = False, *, scaler=None) -> None:
        """Lines 2-3 for a sample before the last (mc_samples > 1): its g and g sigma z (z
        regenerated) join the step's running means; w <- m.  inf/NaN gradients skip the whole
        step: back to the mean, later samples draw nothing and ``second_step`` finishes it."""
        self._check_sample("accumulate_step", last=False)
        if self.skip_pending:
            if zero_grad:
                self.zero_grad()
            return
        grouped = self._grouped()
        if not self._grads_ok(True, self._flat(grouped), scaler):
            self._restore_weights()
            self._skip_state["pending"] = True
            if zero_grad:
                self.zero_grad()
            return
        k = self._sample["k"]
        moved = self._take_perturbed()
        done: set = set()
        seed = self._extra_state["seed"]
        step, at = self._counter_args("noise_step", -1)  # this sample's draw (counter - 1)
        try:
            for group, ps in self._with_grad(grouped, first=k == 1):
                if not ps:
                    continue
                backups, hessians, _ = self._lists(group, ps)
                avg_grads, avg_nxgs = self._avgs(ps)
                ops.ivon_accumulate_(ps, self._grads(ps), backups, hessians, avg_grads,
                                     avg_nxgs, self._param_ids_for(ps), seed, step,
                                     group["ess"], group["weight_decay"], k,
                                     self._found_inf(ps[0].device), at)
                done.update(ps)
        finally:  # the op put w <- m; anything else moved goes back too
            self._copy_back(moved, done, outside=True)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler=None) -> None:
        """Lines 2-8 with the last sample's gradient now in ``.grad``: momentum, Hessian and mean
        update, w <- m.  A skipped step (inf/NaN in any sample) only restores the mean."""
        if self.skip_pending:
            self._abandon_step()
            if zero_grad:
                self.zero_grad()
            return
        self._check_sample("second_step", last=True)
        if not self._perturbed:
            raise RuntimeError("IVON.second_step: call noise_step() and run the backward first")
        grouped = self._grouped()
        if not self._grads_ok(False, self._flat(grouped), scaler):
            self._abandon_step()
            if zero_grad:
                self.zero_grad()
            return
        k = self._sample["k"]
        moved = self._take_perturbed()
        done: set = set()
        seed = self._extra_state["seed"]
        step, at = self._counter_args("noise_step", -1)  # the last sample's draw
        self._advance_counter("step", 1)  # t: this step's number, for the bias correction
        t, debias_step = self._counter_args("step") if self.debias else (0, None)
        if debias_step is None and self.debias and torch.compiler.is_compiling():
            # 1 - beta1^t as a host float is a new constant each step to dynamo (a recompile per
            # step); t in a tensor is traced, and the op forms the same value from it
            t, debias_step = 0, torch.full((1,), t, dtype=torch.int64,
                                           device=self._params_device())
        # the usual step (one sample; the moved parameters are exactly those with a gradient):
        # no per-tensor set work, ``upto`` counts the lists updated (for the restore on an error)
        same = k == 1 and self._moved_are_grouped(moved, grouped)
        upto = 0
        try:
            # (one sample: every parameter with a gradient now had one in every sample)
            for group, ps in grouped if k == 1 else self._with_grad(grouped, first=False):
                if ps:
                    self._update(group, ps, seed, step, t, debias_step, k, at)
                if same:
                    upto += 1
                else:
                    done.update(ps)
        finally:  # anything not updated (no gradient in some sample, or an error): back to m
            if same:
                for ps, bs in moved[upto:]:
                    foreach_copy_(ps, bs)
            else:
                self._copy_back(moved, done, outside=True)
        self._finish_step(skipped=False)
        if zero_grad:
            self.zero_grad()

    def _update(self, group: dict, ps, seed: int, step, t, debias_step, k: int, at) -> None:
        """Lines 2-8 on the parameters ``ps`` of ``group`` (second_step)."""
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        lr = group["lr"] * (group["hess_init"] + wd) if self.rescale_lr else group["lr"]
        # capturable: the op forms 1 - beta1^t from t on the device (debias_step)
        bias_correction = 1.0 - math.pow(beta1, float(t)) if self.debias and \
            debias_step is None else 1.0
        backups, hessians, momenta = self._lists(group, ps)
        avg_grads, avg_nxgs = self._avgs(ps) if k > 1 else ([], [])
        ops.ivon_update_(ps, self._grads(ps), backups, hessians, momenta, avg_grads, avg_nxgs,
                         self._param_ids_for(ps), seed, step, lr, group["ess"], wd, beta1, beta2,
                         group["clip_radius"], bias_correction, k, self._found_inf(ps[0].device),
                         at, debias_step)

    def step(self, closure: Optional[Callable] = None, *, scaler=None):
        """One IVON step: the closure runs ``mc_samples`` times, each at a fresh theta ~ q (the
        gradients zeroed between samples); returns the mean loss.  ``scaler``: a GradScaler whose
        ``scale(loss).backward()`` the closure calls (``scaler.update()`` after)."""
        if closure is None:
            return self._step_without_closure(
                " (forward + backward at the sampled weights)",
                "noise_step() / accumulate_step() / second_step()")
        losses = []
        with self._restore_on_error():
            for k in range(self.mc_samples):
                self.noise_step()
                losses.append(self._run_pass(closure, ascent=True))
                if k < self.mc_samples - 1:
                    self.accumulate_step(zero_grad=True, scaler=scaler)
                    if self.skip_pending:
                        break
            self.second_step(scaler=scaler)
        return mean_loss(losses)

    # -- posterior -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def sampled_params(self, generator: SeedLike = None):
        """Load one model theta ~ q = N(m, 1 / (lambda (h + delta))) into the parameters; on exit
        the mean weights come back exactly.  Not inside a step (between its samples)."""
        if self._sample["k"]:
            raise RuntimeError("IVON.sampled_params: a step is in progress (noise_step ran); "
                               "finish it with second_step() or abandon it with restore() first")
        with super().sampled_params(generator) as opt:
            yield opt

    @torch.no_grad()
    def posterior_variance(self) -> List[Optional[Tensor]]:
        """sigma^2 = 1 / (lambda (h + delta)) per parameter, in group order (``None`` for
        parameters with no state yet)."""
        return [1.0 / (g["ess"] * (self.state[p]["hess"] + g["weight_decay"]))
                if "hess" in self.state.get(p, {}) else None
                for g in self.param_groups for p in g["params"]]

    def _sample_group(self, group: dict, ps: List[Tensor], seed: int) -> List[Tensor]:
        """theta ~ q: line 2's draw at noise step 0."""
        backups, hessians, _ = self._lists(group, ps)
        ops.ivon_noise_(ps, backups, hessians, self._param_ids_for(ps), seed, 0, group["ess"],
                        group["weight_decay"])
        return backups
