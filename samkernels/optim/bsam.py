"""Bayesian SAM (Möllenhoff & Khan 2022, Algorithm 1; docs/spec.md "Bayesian SAM").

Three phases per step, each one fused op per parameter group:
  ``noise_step``   line 1      theta = omega + z / sqrt(N s)   (Philox noise from seed + counter)
  ``first_step``   lines 3, 5  w = omega + rho g / s; precision update with g from the noisy pass
  ``second_step``  lines 6, 7  momentum and mean update with the gradient at omega + eps
The posterior is q(theta) = N(omega, 1 / (N s)); ``sampled_params`` and ``predictive`` use it.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from samkernels import ops
from samkernels._dtypes import opmath
from samkernels.optim._base import (TwoPassOptimizer, check_betas, check_choice, check_nonneg,
                                    check_positive, foreach_copy_, mean_loss)
from samkernels.optim.utils import PosteriorSampler, SeedLike


class BSAM(PosteriorSampler, TwoPassOptimizer):
    r"""Bayesian SAM.

    Args:
        params: parameters or parameter groups.
        lr: learning rate ``alpha``.
        num_data: data-set size ``N`` (times the augmentation factor when augmenting; 4 in the
            paper).
        rho: SAM radius (``eps = rho g / s``).
        betas: ``(beta1, beta2)``: momentum and precision averaging.
        weight_decay: the L2 regulariser ``delta`` per example (the paper's tables give ``N delta``).
        gamma: damping added to the precision (0.1).
        init_precision: ``s0``.
        seed: int, ``torch.Generator`` or None (one draw from torch's default generator) — the key of
            the counter-based noise, so a run is reproducible and resumable.
        update_order: ``"paper"`` (Algorithm 1: line 7 uses the new ``s``) or ``"released"`` (the
            authors' JAX code: the mean step uses ``s`` from before line 5).
        freeze_bn: the model; BatchNorm running statistics are not updated in the perturbed pass
            (and, with ``freeze_bn_noisy=True``, not in the noisy pass either).
        rho_schedule: ``callable(group) -> rho`` evaluated at every first step.
        nonfinite: ``"skip"`` (default), ``"skip_on_device"``, ``"raise"`` or ``"unchecked"``,
            as for ``SAM``.  A skipped
            step leaves weights, precision, momentum and the noise counter as they were (the next
            step draws the noise the skipped one drew).  While checking, line 5 waits for the
            update (one more buffer per parameter), so a skip in the second pass leaves ``s`` as is.
        ddp_model: the ``DistributedDataParallel`` model: m-sharpness across ranks as for ``SAM``.
            Rank ``r`` of ``W`` draws the noise of micro-batch ``r`` of ``step(closure, m=W)`` in
            one process (see ``noise_step``), and sqrt(s)|g| is averaged over the ranks (one
            all-reduce of a parameter-sized buffer) before line 5, so every rank keeps the same
            precision.
        capturable: the noise counter on the device, as for ``SAM``: ``noise_step()`` +
            ``first_step()`` + ``second_step()`` can be captured in one CUDA graph.

    ``step(closure)`` calls the closure twice (at theta, then at omega + eps) and returns the first
    loss.  Explicit phases: ``noise_step(); backward; first_step(); backward; second_step()``.
    With a GradScaler: ``step(closure, scaler=scaler)`` or ``scaler=`` to both gradient phases.
    """

    def __init__(self, params, lr: float, num_data: float, rho: float = 0.01, *,
                 betas: Tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 gamma: float = 0.1, init_precision: float = 1.0, seed: SeedLike = None,
                 update_order: str = "paper", freeze_bn: Optional[torch.nn.Module] = None,
                 freeze_bn_noisy: bool = False,
                 rho_schedule: Optional[Callable[[dict], float]] = None, nonfinite: str = "skip",
                 ddp_model: Optional[torch.nn.Module] = None, capturable: bool = False):
        defaults = dict(lr=lr, num_data=num_data, rho=rho, betas=betas, weight_decay=weight_decay,
                        gamma=gamma, init_precision=init_precision, update_order=update_order)
        super().__init__(params, defaults)
        self._configure(freeze_bn, rho_schedule, nonfinite, ddp_model, capturable)
        self.freeze_bn_noisy = bool(freeze_bn_noisy)
        self._extra_state.update(seed=self._shared_seed(seed), noise_step=0)
        self._accum_bufs = {}  # transient sqrt(s)|g| sums (released order, m-sharpness), never saved
        self._accumulating = {"on": False}  # a dict, set in place (see TwoPassOptimizer on compile)
        self._accum_touched = {}  # parameters whose sum was started this step (an ordered set)

    def _check_group(self, group: dict) -> None:
        for key in ("lr", "rho", "weight_decay", "gamma"):
            check_nonneg(key, group[key])
        check_positive("num_data", group["num_data"])
        check_positive("init_precision", group["init_precision"])
        check_choice("update_order", group["update_order"], ("paper", "released"))
        group["betas"] = check_betas(group["betas"])
        group["num_data"] = float(group["num_data"])
        if group["weight_decay"] + group["gamma"] <= 0:
            raise ValueError("weight_decay + gamma must be > 0 (it keeps the precision positive)")

    # -- state -----------------------------------------------------------------------------------
    def _state(self, p: Tensor, group: dict) -> dict:
        st = self.state[p]
        if "precision" not in st:
            dt = opmath(p)
            st["precision"] = torch.full_like(p, group["init_precision"], dtype=dt)
            st["momentum_buffer"] = torch.zeros_like(p, dtype=dt)
        return st

    def _lists(self, group: dict, ps: List[Tensor]):
        """(backups, precisions, momenta) of ``ps``, the state created where missing; memoised per
        parameter list (the lists are shared: never mutate them)."""
        have = self._state_lists(ps, "precision", "momentum_buffer")
        if have is None:
            for p in ps:
                self._state(p, group)
            have = self._state_lists(ps, "precision", "momentum_buffer")
        return (self._backups_for(ps),) + tuple(have)

    def _accum_buf(self, p: Tensor) -> Tensor:
        a = self._accum_bufs.get(p)
        if a is None:
            a = self._accum_bufs[p] = torch.empty_like(p, dtype=self.state[p]["precision"].dtype)
        return a

    # -- phases ----------------------------------------------------------------------------------
    @torch.no_grad()
    def noise_step(self, *, _micro: Optional[int] = None, _m: int = 1) -> None:
        """Line 1: load theta = omega + z / sqrt(N s) into the parameters (mean kept in a backup).

        Noise draw ``c`` of the counter is the Philox step word.  A step that starts at counter
        ``c`` uses draw ``c + r m + i`` for micro-batch ``i`` of ``m`` on rank ``r`` of ``W`` and
        leaves the counter at ``c + W m``: in one process (``W = 1``) that is one draw per noise
        step, and W ranks with m micro-batches each draw what one process with ``m' = W m`` does."""
        self._require_unperturbed("noise_step")
        micro = _micro or 0
        if micro == 0:
            self._mark_counter("noise_step")
        rank, world = self._rank_world()
        seed = self._extra_state["seed"]
        step, at = self._counter_args("noise_step", rank * _m + micro)
        for group, ps in self._grouped(with_grad=False):
            backups, precisions, _ = self._lists(group, ps)
            ops.bsam_noise_(ps, backups, precisions, self._param_ids_for(ps), seed, step,
                            group["num_data"], at)
            self._mark_perturbed(ps, backups)
        if micro == _m - 1:
            self._advance_counter("noise_step", world * _m)

    def _rollback_skipped_step(self) -> None:
        self._rewind_counter("noise_step")

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler=None,
                   _micro: Optional[int] = None) -> None:
        """Lines 3 and 5 with g = the gradient at theta now in ``.grad``: w <- omega + rho g / s.
        Gradients that are not finite skip the step: back to omega (``skip_pending``)."""
        if not self._perturbed:
            raise RuntimeError("BSAM.first_step: call noise_step() and run the noisy backward first")
        grouped = self._grouped()  # validates the gradients before anything moves
        self._skip_state["pending"] = False
        if not self._grads_ok(True, self._flat(grouped), scaler):
            self._skip_first_pass()
            if zero_grad:
                self.zero_grad()
            return
        defer = scaler is not None or self.nonfinite != "unchecked" or self.ddp_model is not None
        noisy = self._take_perturbed()
        # the usual step: the noised parameters are exactly those with a gradient (no set work)
        same = self._moved_are_grouped(noisy, grouped)
        with_grad = set() if same else {p for _, ps in grouped for p in ps}
        for params, backups in ([] if same else noisy):  # no gradient: back to the mean
            rest = [(p, b) for p, b in zip(params, backups) if p not in with_grad]
            if rest:
                # FSDP2 shards: DTensor has no _foreach_copy_ rule (inline: torch.compile)
                (foreach_copy_ if self._sharded else torch._foreach_copy_)(
                    [p for p, _ in rest], [b for _, b in rest])
        noised = set() if same else {p for ps, _ in noisy for p in ps}
        for group, ps in grouped:
            ps = ps if same else [p for p in ps if p in noised]
            if not ps:
                continue
            backups, precisions, _ = self._lists(group, ps)
            accums = self._accums(group, ps, _micro, defer)
            ops.bsam_perturb_(ps, self._grads(ps), backups, precisions, accums, self._rho(group),
                              group["betas"][1], group["weight_decay"], group["gamma"],
                              self._found_inf(ps[0].device))
            self._mark_perturbed(ps, backups)
        if zero_grad:
            self.zero_grad()

    def _accums(self, group: dict, ps: List[Tensor], micro: Optional[int],
                defer: bool) -> List[Tensor]:
        """Scratch for sqrt(s)|g| when line 5 must wait for the update: the released-code order,
        m-sharpness (summed over micro-batches; ``micro`` > 0 keeps the running sum), a possible
        skip in the second pass (``defer``), or the average over DDP ranks."""
        if group["update_order"] != "released" and micro is None and not defer:
            self._accumulating["on"] = False
            return []
        self._accumulating["on"] = True
        if micro is None:  # one pass this step: all the sums start from zero
            out = self._memo("accums", ps, lambda: [self._accum_buf(p) for p in ps])
            torch._foreach_zero_(out)
            return out
        if not micro:  # a new step: every sum starts again, also for parameters that join late
            self._accum_touched.clear()
        out, fresh = [], []
        for p in ps:
            a = self._accum_buf(p)
            if p not in self._accum_touched:  # first sqrt(s)|g| of this step for p: from zero
                self._accum_touched[p] = None
                fresh.append(a)
            out.append(a)
        if fresh:
            torch._foreach_zero_(fresh)
        return out

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler=None,
                    _accum_scale: float = 1.0) -> None:
        """Lines 6-7 with g_eps = the gradient at omega + eps: momentum and mean update.  A skipped
        step (inf/NaN in either pass) only restores omega."""
        grouped = self._grouped()
        if self.skip_pending or (self._perturbed and not self._grads_ok(
                False, self._flat(grouped), scaler)):
            self._abandon_step()
            if zero_grad:
                self.zero_grad()
            return
        if not self._perturbed:
            raise RuntimeError("BSAM.second_step: call first_step() and run the backward first")
        perturbed = self._take_perturbed()
        # the usual step: the perturbed parameters are exactly those with a gradient (no set work;
        # ``done`` counts the updated ones, in order, for the restore below on an error)
        same = self._moved_are_grouped(perturbed, grouped)
        todo = set() if same else {p for ps, _ in perturbed for p in ps}
        done = 0
        _, world = self._rank_world()
        try:
            for group, ps in grouped:
                ps = ps if same else [p for p in ps if p in todo]
                if not ps:
                    continue
                backups, precisions, momenta = self._lists(group, ps)
                accums = self._memo("accums", ps, lambda: [self._accum_buf(p) for p in ps]) \
                    if self._accumulating["on"] else []
                if accums and world > 1:
                    self._all_reduce(accums)  # sqrt(s)|g| summed over the ranks, / W below
                beta1, beta2 = group["betas"]
                ops.bsam_update_(ps, self._grads(ps), backups, precisions, momenta, accums,
                                 group["lr"], beta1, beta2, group["weight_decay"], group["gamma"],
                                 _accum_scale / world, group["update_order"] == "released",
                                 self._found_inf(ps[0].device))
                if same:
                    done += len(ps)
                else:
                    todo.difference_update(set(ps))  # a set: torch.compile compares items with ==
        finally:  # anything not updated (no gradient now, or an error) goes back to the mean
            if same:
                flat = [(p, b) for ps, bs in perturbed for p, b in zip(ps, bs)][done:]
                if flat:
                    # FSDP2 shards: DTensor has no _foreach_copy_ rule (inline: torch.compile)
                    (foreach_copy_ if self._sharded else torch._foreach_copy_)(
                        [p for p, _ in flat], [b for _, b in flat])
            for ps, bs in perturbed if todo else ():  # (the usual step: nothing left, no set)
                rest = [(p, b) for p, b in zip(ps, bs) if p in todo]
                if rest:
                    # FSDP2 shards: DTensor has no _foreach_copy_ rule (inline: torch.compile)
                    (foreach_copy_ if self._sharded else torch._foreach_copy_)(
                        [p for p, _ in rest], [b for _, b in rest])
        self._finish_step(skipped=False)
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable] = None, m: int = 1, *, scaler=None):
        """One bSAM step: closure at theta (noisy), then at omega + eps.  Returns the first loss.

        ``closure(ascent)`` may take the pass flag as SAM's does.  m-sharpness (``m > 1``, docs/spec.md):
        lines 1-4 run per micro-batch ``i`` (``closure(i)`` or ``closure(i, ascent)``) with its own
        noise and perturbation; sqrt(s)|g| and g_eps are averaged over the micro-batches before
        lines 5-7.  Returns the mean first-pass loss.  ``scaler``: as in ``SAM.step``."""
        if closure is None:
            return self._step_without_closure(" (it evaluates the loss twice)",
                                              "noise_step() / first_step() / second_step()")
        if self._check_m(m) == 1:
            self.noise_step()
            return self._two_passes(closure, scaler)
        losses = []
        with self._restore_on_error():
            for i in range(m):
                self.noise_step(_micro=i, _m=m)
                losses.append(self._run_pass(closure, True, micro=i))
                self.first_step(zero_grad=True, scaler=scaler, _micro=i)
                if self.skip_pending:
                    break
                self._run_pass(closure, False, micro=i)
                self._accumulate_grads(first=i == 0)
                if i < m - 1:
                    self._restore_weights()  # back to omega for the next micro-batch's noise
            if not self.skip_pending:
                self._load_accumulated_grads(1.0 / m)
            self.second_step(scaler=scaler, _accum_scale=1.0 / m)
        return mean_loss(losses)

    # -- posterior -------------------------------------------------------------------------------
    @torch.no_grad()
    def posterior_variance(self) -> List[Optional[Tensor]]:
        """sigma^2 = 1 / (N s) per parameter (``None`` for parameters never updated)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p, {})
                out.append(1.0 / (group["num_data"] * st["precision"]) if "precision" in st else None)
        return out

    def _sample_group(self, group: dict, ps: List[Tensor], seed: int) -> List[Tensor]:
        """theta ~ q = N(omega, 1/(N s)): line 1's draw at noise step 0."""
        backups, precisions, _ = self._lists(group, ps)
        ops.bsam_noise_(ps, backups, precisions, self._param_ids_for(ps), seed, 0,
                        group["num_data"])
        return backups
