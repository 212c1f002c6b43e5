"""Mean-field variational inference (Ujváry et al., "Rethinking SAM as Variational Inference",
Alg. 2; docs/spec.md "MFVI family").

Posterior q(theta) = N(mu, diag(Sigma)); the weights hold mu.  Loss (eq. 5):
E_q L_B(theta) + KL[q || N(0, prior_var I)] / N.  One forward/backward per step, two fused ops:
  ``noise_step``   Alg. 2 line 3:    theta = mu + Sigma^1/2 z   (Philox noise from seed + counter)
  ``second_step``  Alg. 2 lines 4-5: reparametrised gradients, mean and variance step; z is
                   regenerated from the counter, never stored.

Parametrisation: the state holds ``variance`` = Sigma (diagonal); the gradient step is taken on
u = log Sigma (``Sigma <- Sigma exp(-var_lr dL/du)``), so Sigma stays positive with no clipping.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor

from samkernels import ops
from samkernels._dtypes import opmath
from samkernels.optim._base import TwoPassOptimizer, check_beta, check_nonneg, check_positive
from samkernels.optim.utils import PosteriorSampler, SeedLike


class GaussianPosterior(PosteriorSampler):
    """Posterior API of an optimizer whose state holds a diagonal Gaussian q = N(w, diag(variance))
    in ``state[p]["variance"]`` (MFVI, VariationalSAM).  The class provides ``_variances(group, ps)``
    (creating the state when missing)."""

    def _total_numel(self) -> int:
        """p of the papers: the parameter count over all groups."""
        return sum(p.numel() for g in self.param_groups for p in g["params"])

    @torch.no_grad()
    def posterior_variance(self) -> List[Optional[Tensor]]:
        """Sigma per parameter, in group order (``None`` for parameters with no state yet)."""
        return [self.state[p]["variance"].clone() if "variance" in self.state.get(p, {}) else None
                for g in self.param_groups for p in g["params"]]

    def _sample_group(self, group: dict, ps: List[Tensor], seed: int) -> List[Tensor]:
        backups = self._backups_for(ps)  # theta = mu + sqrt(Sigma) z, noise step 0
        ops.vi_noise_(ps, backups, self._variances(group, ps), self._param_ids_for(ps), seed, 0, 0.0)
        return backups


class MFVI(GaussianPosterior, TwoPassOptimizer):
    r"""Mean-field VI with reparametrised single-sample gradients (Alg. 2).

    Args:
        params: parameters or parameter groups.
        lr: learning rate of the mean (Alg. 2's eta_1).
        num_data: data-set size ``N`` (the KL is divided by it, eq. 5).
        rho: sets the initial variance ``Sigma0 = rho^2 / p`` (p = parameter count over all groups,
            as RandomSAM's ``Sigma = rho^2/p I``), i.e. an initial perturbation of norm about rho.
        var_lr: learning rate of u = log Sigma (Alg. 2's eta_2, applied in log space).
        prior_var: ``sigma_p^2`` of the prior N(0, sigma_p^2 I).  Its KL term acts on the mean as
            weight decay ``1/(N prior_var)`` (eq. 39; the paper's eq. 6 writes 2 alpha mu with
            alpha = 1/(N sigma_0^2), a factor 2 off eq. 39's gradient: we follow eq. 39).
        init_var: initial Sigma (overrides ``rho``).
        momentum: heavy-ball momentum on the mean (0 = Alg. 2 as printed).
        seed: int, torch.Generator or None — the key of the counter-based noise.
        freeze_bn: the model; with ``freeze_bn_noisy=True`` BatchNorm running statistics are not
            updated in the (noisy) pass.
        nonfinite: ``"skip"`` (default), ``"skip_on_device"``, ``"raise"`` or ``"unchecked"``,
            as for ``SAM``.  A skipped
            step leaves weights, variances, momentum and the noise counter as they were.
        capturable: the noise counter on the device, as for ``SAM``.

    Per step, the gradient of the sampled theta gives (u = log Sigma)::

        mu <- mu - lr (g + mu/(N prior_var))          (with momentum when set)
        u  <- u - var_lr (g z Sigma^1/2 / 2 + (Sigma/prior_var - 1)/(2N))

    Note (paper vs code): Alg. 2 line 5 as printed updates the mean with the data gradient only,
    ``mu <- mu - eta_1 [grad_mu L_B](mu + Sigma^1/2 eta)``, with no KL term (line 4 adds the KL
    gradient to the Sigma step alone).  We add the prior's gradient ``mu / (N prior_var)``, i.e.
    weight decay ``1/(N prior_var)``: the objective Alg. 2 descends is eq. 5, E_q L_B + KL/N, and
    the mu-gradient of eq. 39's ``||mu||^2 / (2 prior_var)`` term divided by N is exactly that (the
    paper's own eqs. 6-7 keep it as ``2 alpha mu``, alpha = 1/(N sigma_0^2), a factor 2 off eq. 39;
    eq. 40 and VSAM's eq. 42 carry the same ``||mu||^2 / (2 N sigma_0^2)``).  Dropping it would
    optimise a different objective than the Sigma step (which does use the KL), and the posterior
    would not be the one of eq. 5.

    No m-sharpness: MFVI is not SAM-type.  There is one pass per step and no perturbation built
    from a gradient, and the Sigma step needs each sample's own ``g z`` product (the
    reparametrised gradient, eq. 39), which averaging micro-batch gradients would not give.
    ``step(closure, m)`` with ``m > 1`` raises ``ValueError``; average over a larger batch instead.

    ``step(closure)`` calls the closure once, at theta (as the step's first pass: a closure that
    takes an argument gets ``ascent=True``; a SAM-style closure with a separate ascent loss would
    train MFVI on that loss), and returns its loss.  Explicit phases::

        opt.noise_step(); loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)
    """

    def __init__(self, params, lr: float, num_data: float, rho: float = 0.05, *,
                 var_lr: float = 0.01, prior_var: float = 1.0, init_var: Optional[float] = None,
                 momentum: float = 0.0, seed: SeedLike = None,
                 freeze_bn: Optional[torch.nn.Module] = None, freeze_bn_noisy: bool = False,
                 nonfinite: str = "skip", capturable: bool = False):
        defaults = dict(lr=lr, num_data=num_data, rho=rho, var_lr=var_lr,
                        prior_var=prior_var, init_var=init_var, momentum=momentum)
        super().__init__(params, defaults)  # _check_group checks these, and every group's
        self._configure(freeze_bn, None, nonfinite, capturable=capturable)
        self.freeze_bn_noisy = bool(freeze_bn_noisy)
        self._extra_state.update(seed=self._shared_seed(seed), noise_step=0)

    def _check_group(self, group: dict) -> None:
        check_nonneg("lr", group["lr"])
        check_positive("num_data", group["num_data"])
        group["num_data"] = float(group["num_data"])
        if group["init_var"] is None:
            check_positive("rho", group["rho"])
        else:
            check_nonneg("rho", group["rho"])
            check_positive("init_var", group["init_var"])
        check_nonneg("var_lr", group["var_lr"])
        check_positive("prior_var", group["prior_var"])
        check_beta("momentum", group["momentum"])

    # -- state -----------------------------------------------------------------------------------
    def _variances(self, group: dict, ps: List[Tensor]) -> List[Tensor]:
        have = self._state_lists(ps, "variance")  # every step after the first: memoised
        if have is not None:
            return have[0]
        out = []
        for p in ps:
            st = self.state[p]
            if "variance" not in st:
                v0 = group["init_var"]
                if v0 is None:
                    v0 = group["rho"] ** 2 / self._total_numel()
                st["variance"] = torch.full_like(p, v0, dtype=opmath(p))
            out.append(st["variance"])
        return out

    def _momenta(self, group: dict, ps: List[Tensor]) -> List[Tensor]:
        if group["momentum"] == 0:
            return []
        return [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p, dtype=opmath(p)))
                for p in ps]

    # -- phases ----------------------------------------------------------------------------------
    @torch.no_grad()
    def noise_step(self) -> None:
        """Alg. 2 line 3: theta = mu + Sigma^1/2 z into the parameters (mu kept in a backup)."""
        self._require_unperturbed("noise_step")
        self._mark_counter("noise_step")
        seed = self._extra_state["seed"]
        step, at = self._counter_args("noise_step")
        for group, ps in self._grouped(with_grad=False):
            backups = self._backups_for(ps)
            ops.vi_noise_(ps, backups, self._variances(group, ps),
                          self._param_ids_for(ps), seed, step, 0.0, at)
            self._mark_perturbed(ps, backups)
        self._advance_counter("noise_step", 1)

    def _rollback_skipped_step(self) -> None:  # the next step draws the skipped step's noise
        self._rewind_counter("noise_step")

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler=None) -> None:
        """Alg. 2 lines 4-5 with g = the gradient at theta now in ``.grad``: mean and variance
        step, w <- mu.  Parameters without a gradient go back to mu unchanged.  inf/NaN gradients
        skip the step (only mu is restored)."""
        if not self._perturbed:
            raise RuntimeError("MFVI.second_step: call noise_step() and run the backward first")
        grouped = self._grouped()
        if not self._grads_ok(False, self._flat(grouped), scaler):
            self._abandon_step()
            if zero_grad:
                self.zero_grad()
            return
        perturbed = self._take_perturbed()
        # the usual step (every noised parameter has a gradient, same lists): no per-tensor sets
        same = self._moved_are_grouped(perturbed, grouped)
        todo = None if same else {p for ps, _ in perturbed for p in ps}
        seed = self._extra_state["seed"]
        step, at = self._counter_args("noise_step", -1)  # the draw of noise_step (counter - 1)
        done = 0
        try:
            for group, ps in grouped:
                ps = ps if same else [p for p in ps if p in todo]
                if not ps:
                    continue
                ops.mfvi_update_(ps, self._grads(ps), self._backups_for(ps),
                                 self._variances(group, ps), self._momenta(group, ps),
                                 self._param_ids_for(ps), seed, step,
                                 group["lr"], group["var_lr"], group["momentum"],
                                 group["prior_var"], group["num_data"],
                                 self._found_inf(ps[0].device), at)
                if same:
                    done += 1
                else:
                    todo.difference_update(set(ps))
        finally:  # anything not updated (no gradient now, or an error) goes back to the mean
            if same:
                todo = {p for _, ps in grouped[done:] for p in ps}
            if todo or not same:
                self._copy_back(perturbed, todo)
        self._finish_step(skipped=False)
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable] = None, m: int = 1, *, scaler=None):
        """One MFVI step: the closure runs once at theta ~ q; returns its loss.  ``scaler``: a
        GradScaler whose ``scale(loss).backward()`` the closure calls (``scaler.update()`` after).
        ``m``: only 1 (MFVI has no m-sharpness; see the class docstring)."""
        if self._check_m(m) != 1:
            raise ValueError(f"MFVI has no m-sharpness (got m={m}): it is not SAM-type (one pass, "
                             "no gradient-built perturbation) and its variance step needs each "
                             "sample's own g*z product; use m=1 (a larger batch averages more)")
        if closure is None:
            return self._step_without_closure(" (forward + backward at the sampled weights)",
                                              "noise_step() / second_step()")
        self.noise_step()
        with self._restore_on_error():
            loss = self._run_pass(closure, ascent=True)
            self.second_step(scaler=scaler)
        return loss
