"""The SAM variants: GSAM (Zhuang et al. 2022), WSAM (Yue et al. 2023), LookSAM (Liu et al. 2022)
and FriendlySAM (Li et al. 2024), each with SGD, Adam or AdamW as base optimizer (as ``SAM``).

They share ``SAM``'s two passes and three fused ops (docs/spec.md "SAM variants"):
``samv_perturb_`` (SAM's ascent that also keeps the first-pass gradient g0, or FriendlySAM's
ascent on g0 - sigma m), ``samv_dots`` (the global dot products a direction needs, a float64
device tensor: no host sync) and ``samv_restore_sgd_`` / ``samv_restore_adam_`` (restore and the
base step with d = c0 g + c1 s, the coefficients a float64 device tensor computed from the dots,
plus WSAM's decoupled correction and LookSAM's stored component).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from samkernels import ops
from samkernels._dtypes import opmath
from samkernels.optim._base import check_beta, check_nonneg, foreach_copy_
from samkernels.optim.sam import SAM, _sam_norm

__all__ = ["GSAM", "WSAM", "LookSAM", "FriendlySAM"]


def _check_int(name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class _Variant(SAM):
    """What the variants share: their own group keys, the ascent that keeps g0 (``first_step``),
    the per-step dot products and the mixed restore + base step (``_base_update`` of ``SAM``
    with the ``samv`` ops).  Subclasses give ``_coeffs`` (and FriendlySAM its own ascent)."""

    _KEYS: Tuple[str, ...] = ()   # the variant's own hyper-parameters (in every group)
    _NEEDS_DOTS = True            # the direction needs samv_dots (WSAM does not)

    def __init__(self, params, lr: float, rho: float, base: str, extra: Dict[str, object],
                 **kwargs):
        self._extra_defaults = dict(extra)  # before super().__init__: _check_group reads it
        super().__init__(params, lr, rho, base, **kwargs)
        self.defaults.update(extra)
        self._saved: Dict[Tensor, Tensor] = {}  # transient g0 buffers, as the backups
        # per step: mode ("full": first_step ran; "plain": base_step; "reuse": LookSAM's
        # one-pass step), the dots of this step, the parameters whose g0 first_step kept
        self._variant = {"mode": "full", "dots": None, "kept": None, "coeffs": None}
        self._coeff_cache: Dict[tuple, Tensor] = {}

    def _check_group(self, group: dict) -> None:
        for key, value in getattr(self, "_extra_defaults", {}).items():
            group.setdefault(key, value)
        for key in self._KEYS:
            group.setdefault(key, self.defaults.get(key))
        super()._check_group(group)
        self._check_variant(group)

    def _check_variant(self, group: dict) -> None:
        """Subclasses: raise ValueError naming the variant's hyper-parameter out of range."""

    # -- buffers ---------------------------------------------------------------------------------
    def _saved_buf(self, p: Tensor) -> Tensor:
        s = self._saved.get(p)
        if s is None or s.shape != p.shape or s.dtype != opmath(p) or s.device != p.device:
            # p's own layout (channels_last too): the fused ops then take every list of p in
            # place, where a differing layout makes the GPU backends copy p's lists each call
            s = self._saved[p] = torch.zeros_like(p, dtype=opmath(p))
        return s

    def _saved_for(self, ps: List[Tensor]) -> List[Tensor]:
        """The g0 buffers of ``ps`` (opmath dtype, transient: not in ``state_dict``)."""
        return self._memo("samv_saved", ps, lambda: [self._saved_buf(p) for p in ps])

    def _state_buf(self, ps: List[Tensor], name: str) -> List[Tensor]:
        """``state[p][name]`` for ``ps``, created as zeros (opmath dtype) where missing."""
        have = self._state_lists(ps, name)
        if have is not None:
            return have[0]
        for p in ps:
            if name not in self.state[p]:
                self.state[p][name] = torch.zeros_like(p, dtype=opmath(p))  # p's layout
        return [self.state[p][name] for p in ps]

    def _const_coeffs(self, values: Tuple[float, ...], device) -> Tensor:
        """A float64 coefficient tensor of host constants, made once per (values, device).  A
        step must not write a Python number into a GPU tensor (``c[1] = -alpha``): that is a
        host-to-device copy, which syncs and cannot be captured in a CUDA graph."""
        key = (values, device)
        c = self._coeff_cache.get(key)
        if c is None:
            if len(self._coeff_cache) > 64:
                self._coeff_cache.clear()
            c = self._coeff_cache[key] = torch.tensor(values, dtype=torch.float64, device=device)
        return c

    # -- first pass ------------------------------------------------------------------------------
    def _ascent_norm(self, work) -> Tensor:
        """||T g|| over every group (T = |w| + eta with ASAM, else 1), on the device."""
        return _sam_norm(work, self._over_shards)

    def _perturb(self, group: dict, ps, gs, backups, norm: Tensor) -> None:
        ops.samv_perturb_(ps, gs, backups, self._saved_for(ps), [], norm, self._rho(group),
                          group["perturb_eps"], group["adaptive"],
                          group["eta"] if group["adaptive"] else 0.0, 0.0, 0.0, False,
                          self._found_inf(ps[0].device))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler=None) -> Optional[Tensor]:
        """w <- w + e (as ``SAM.first_step``), keeping the gradient g0 for the update.  Returns
        the ascent's norm, or None when the gradients are not finite and the step is skipped."""
        self._require_unperturbed("first_step")
        work = [(g, ps, self._grads(ps)) for g, ps in self._grouped()]
        self._skip_state["pending"] = False
        self._begin_step()
        self._variant.update(mode="full", kept=None)
        ok, norm = self._checked_norm(self._flat(work), scaler,
                                      lambda: self._ascent_norm(work), True)
        if not ok:  # the norm's own reduction was the inf/NaN check (_checked_norm)
            self._skip_first_pass()
            work = []
        self._before_perturb(work)
        for group, ps, gs in work:
            backups = self._backups_for(ps)
            self._perturb(group, ps, gs, backups, norm.to(ps[0].device))
            self._mark_perturbed(ps, backups)
        self._variant["kept"] = [id(p) for _, ps, _ in work for p in ps]
        if zero_grad:
            self.zero_grad()
        return norm

    def _before_perturb(self, work) -> None:
        """FriendlySAM: keep what a skip later in the step must put back."""

    # -- second pass -----------------------------------------------------------------------------
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler=None) -> None:
        """Restore w and take the base step with the variant's direction (see the class)."""
        self._variant["dots"] = None
        try:
            super().second_step(zero_grad, scaler=scaler)
        finally:
            self._variant.update(dots=None, mode="full", kept=None)

    def _start_base_step(self) -> None:
        if self._variant["mode"] != "reuse":
            self._variant["mode"] = "plain"

    def _direction_lists(self, ps: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """(s, outs) of the mixed update for ``ps``: g0 and nothing by default."""
        return self._saved_for(ps), []

    def _step_dots(self, grouped) -> Tensor:
        """samv_dots(g, s) summed over every group: computed once per step, on the device.
        Parameters with a gradient now but none in the first pass get s = g0 = 0."""
        dots = self._variant["dots"]
        if dots is not None:
            return dots
        kept = self._variant["kept"]
        if self._variant["mode"] == "full" and kept is not None and \
                kept != [id(p) for _, ps in grouped for p in ps]:
            had = set(kept)
            for _, ps in grouped:
                for p in ps:
                    if id(p) not in had:
                        self._saved_buf(p).zero_()
        dev = grouped[0][1][0].device
        parts = self._over_shards([ops.samv_dots(self._grads(ps),
                                                 self._direction_lists(ps)[0], 0.0).to(dev)
                                   for _, ps in grouped])
        dots = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
        self._variant["dots"] = dots
        return dots

    def _descent_ok(self, grouped, scaler) -> bool:
        """GSAM's and LookSAM's directions take <g, g> over every group (``samv_dots``, kept for
        the update): under the checked policies that sum of squares is the second pass's
        inf/NaN check, as the ascent's norm is the first's (``_checked_norm``, which also takes
        the exact flag for a non-finite sum of finite gradients, float64 overflow)."""
        if not self._NEEDS_DOTS or self._variant["mode"] == "plain" or not grouped:
            return super()._descent_ok(grouped, scaler)
        ok, _ = self._checked_norm(self._flat(grouped), scaler,
                                   lambda: self._step_dots(grouped)[0], False, ascent=False)
        return ok

    def _base_update(self, group: dict, ps) -> None:
        if self._variant["mode"] == "plain":  # base_step: SAM's plain step
            return super()._base_update(group, ps)
        dots = self._step_dots(self._grouped()) if self._NEEDS_DOTS else None
        self._variant["coeffs"] = self._coeffs(group, dots, ps[0].device)
        super()._base_update(group, ps)

    def _restore_sgd(self, ps, grads, backups, bufs, *rest) -> None:
        if self._variant["mode"] == "plain":
            return ops.sam_restore_sgd_(ps, grads, backups, bufs, *rest)
        s, outs = self._direction_lists(ps)
        ops.samv_restore_sgd_(ps, grads, backups, s, bufs, outs, self._variant["coeffs"], *rest)

    def _restore_adam(self, ps, grads, backups, exp_avgs, exp_avg_sqs, step, *rest) -> None:
        if self._variant["mode"] == "plain":
            return ops.sam_restore_adam_(ps, grads, backups, exp_avgs, exp_avg_sqs, step, *rest)
        s, outs = self._direction_lists(ps)
        ops.samv_restore_adam_(ps, grads, backups, s, exp_avgs, exp_avg_sqs, outs,
                               self._variant["coeffs"], step, *rest)

    def step(self, closure=None, m: int = 1, *, scaler=None):
        """One step (``SAM.step``); m-sharpness (``m > 1``) is not offered by the variants."""
        if self._check_m(m) != 1:
            raise ValueError(f"{type(self).__name__}: m-sharpness (m > 1) is not supported; "
                             f"got m={m}")
        return super().step(closure, 1, scaler=scaler)


class GSAM(_Variant):
    r"""GSAM (Zhuang et al. 2022, "Surrogate Gap Guided Sharpness-Aware Minimization").

    The ascent is SAM's (ASAM's with ``adaptive=True``): e = rho_t g0 / (||g0|| + eps), g0 the
    gradient at w.  With g_p the gradient at w + e, the update direction is

        d = g_p - alpha g0_perp,   g0_perp = g0 - cos ||g0|| g_p / (||g_p|| + eps),
        cos = <g0, g_p> / (||g_p|| ||g0|| + eps)

    (the authors' eps placement; docs/spec.md "GSAM"), norms and dots over all groups, then w is
    restored and the base optimizer (SGD / Adam / AdamW, as ``SAM``) steps with d.  rho_t
    proportional to the learning rate, as in the paper: pass
    ``rho_schedule=rho_proportional_to_lr(rho_max, rho_min, lr_max, lr_min)``.

    Args: as ``SAM``, plus ``alpha`` (>= 0; 0 is SAM).  Usage: as ``SAM`` (``step(closure)`` or
    ``first_step`` / ``second_step``; ``base_step`` is a plain base-optimizer step).  The first
    gradient is kept in a transient buffer (one parameter-sized opmath buffer, not saved).
    """

    _KEYS = ("alpha",)

    def __init__(self, params, lr: float, rho: float = 0.05, base: str = "sgd", *,
                 alpha: float = 0.4, **kwargs):
        super().__init__(params, lr, rho, base, dict(alpha=alpha), **kwargs)

    def _check_variant(self, group: dict) -> None:
        check_nonneg("alpha", group["alpha"])

    def _coeffs(self, group: dict, dots: Tensor, device) -> Tensor:
        eps, alpha = group["perturb_eps"], group["alpha"]
        d = dots.to(device)
        n_p, n_0 = d[0].sqrt(), d[2].sqrt()
        cos = d[1] / (n_p * n_0 + eps)
        # host constants from the cache, device values assigned: no host-to-device copy
        c = self._const_coeffs((0.0, -alpha, 0.0, 0.0, 0.0, 0.0), device).clone()
        c[0] = 1.0 + alpha * cos * n_0 / (n_p + eps)
        return c


class WSAM(_Variant):
    r"""WSAM (Yue et al. 2023, "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
    Regularization Term").

    The ascent is SAM's; with g0 the gradient at w, g_p the one at w + e and
    k = gamma / (1 - gamma):

      * ``decoupled=True`` (the paper's default, Alg. 1): the base step with g0, then
        w <- w - lr k (g_p - g0);
      * ``decoupled=False``: the base step with d = k g_p + (1 - k) g0.

    Args: as ``SAM``, plus ``gamma`` in [0, 1) (0 is the base optimizer with the gradient at w,
    1/2 is SAM) and ``decoupled``.  docs/spec.md "WSAM".
    """

    _KEYS = ("gamma", "decoupled")
    _NEEDS_DOTS = False

    def __init__(self, params, lr: float, rho: float = 0.05, base: str = "sgd", *,
                 gamma: float = 0.9, decoupled: bool = True, **kwargs):
        super().__init__(params, lr, rho, base, dict(gamma=gamma, decoupled=decoupled), **kwargs)

    def _check_variant(self, group: dict) -> None:
        check_beta("gamma", group["gamma"])
        if not isinstance(group["decoupled"], bool):
            raise ValueError(f"decoupled must be a bool, got {group['decoupled']!r}")

    def _coeffs(self, group: dict, dots, device) -> Tensor:
        k = group["gamma"] / (1.0 - group["gamma"])
        if group["decoupled"]:  # (0, 1, 0, 0, 0, 0) + lr (0, 0, -k, k, 0, 0): no host copy per lr
            return torch.add(self._const_coeffs((0.0, 1.0, 0.0, 0.0, 0.0, 0.0), device),
                             self._const_coeffs((0.0, 0.0, -k, k, 0.0, 0.0), device),
                             alpha=group["lr"])
        return self._const_coeffs((k, 1.0 - k, 0.0, 0.0, 0.0, 0.0), device)


class LookSAM(_Variant):
    r"""LookSAM (Liu et al. 2022, "Towards Efficient and Scalable Sharpness-Aware Minimization").

    Every ``k`` steps (steps 0, k, 2k, ...) a full SAM step: ascent e = rho g0 / (||g0|| + eps),
    the base step with g_p (the gradient at w + e), and the component of g_p orthogonal to g0
    stored: g_v = g_p - (<g_p, g0> / (||g0||^2 + eps)) g0.  On the other steps one
    forward/backward at w, and the base step with

        d = g + alpha (||g|| / (||g_v|| + eps)) g_v.

    Norms and dots over all groups (the paper's full-model vectors).  ``step(closure)`` picks
    the kind of step; with explicit phases ask ``full_step_due``::

        loss_fn(model(x), y).backward()
        if opt.full_step_due:
            opt.first_step(zero_grad=True); loss_fn(model(x), y).backward(); opt.second_step()
        else:
            opt.reuse_step(zero_grad=True)

    The step counter (every finished step counts, a skipped one does not) and g_v
    (``state[p]["looksam_gv"]``) are saved by ``state_dict``.  docs/spec.md "LookSAM".

    With ``capturable=True`` each kind of step is captured once (``first_step()`` +
    ``second_step()``; ``reuse_step()``) and the caller replays them on its own step count:
    ``full_step_due`` counts the steps Python ran, not the replays.
    """

    _KEYS = ("alpha",)

    def __init__(self, params, lr: float, rho: float = 0.1, base: str = "sgd", *, k: int = 10,
                 alpha: float = 0.7, **kwargs):
        _check_int("k", k)
        super().__init__(params, lr, rho, base, dict(alpha=alpha), **kwargs)
        self.k = k
        self._extra_state.setdefault("looksam_step", 0)

    def _check_variant(self, group: dict) -> None:
        check_nonneg("alpha", group["alpha"])

    @property
    def full_step_due(self) -> bool:
        """True when the next step is a full (two-pass) SAM step."""
        return self._extra_state.get("looksam_step", 0) % self.k == 0

    def _direction_lists(self, ps):
        gv = self._state_buf(ps, "looksam_gv")
        if self._variant["mode"] == "reuse":
            return gv, []
        return self._saved_for(ps), gv

    def _coeffs(self, group: dict, dots: Tensor, device) -> Tensor:
        eps = group["perturb_eps"]
        d = dots.to(device)
        # host constants from the cache, device values assigned (see GSAM._coeffs)
        if self._variant["mode"] == "reuse":  # d = g + alpha ||g|| / (||g_v|| + eps) g_v
            c = self._const_coeffs((1.0, 0.0, 0.0, 0.0, 0.0, 0.0), device).clone()
            c[1] = group["alpha"] * d[0].sqrt() / (d[2].sqrt() + eps)
        else:  # d = g_p;  g_v = g_p - <g_p, g0> / (||g0||^2 + eps) g0
            c = self._const_coeffs((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), device).clone()
            c[5] = -d[1] / (d[2] + eps)
        return c

    @torch.no_grad()
    def reuse_step(self, zero_grad: bool = False, *, scaler=None) -> None:
        """LookSAM's one-pass step with the gradient now in ``.grad`` (taken at w): the base step
        with g + alpha ||g|| / ||g_v|| g_v.  Before any full step g_v = 0: a plain step."""
        self._require_idle("reuse_step")
        self._variant["mode"] = "reuse"
        try:
            self._skip_state["pending"] = False
            self._begin_step()
            self.second_step(zero_grad, scaler=scaler)
        finally:
            self._variant["mode"] = "full"

    def second_step(self, zero_grad: bool = False, *, scaler=None) -> None:
        mode = self._variant["mode"]
        try:
            super().second_step(zero_grad, scaler=scaler)
        finally:
            self._variant["mode"] = mode

    def _finish_step(self, skipped: bool) -> None:
        super()._finish_step(skipped)
        if not skipped:
            self._extra_state["looksam_step"] = self._extra_state.get("looksam_step", 0) + 1

    def step(self, closure=None, m: int = 1, *, scaler=None):
        """A full SAM step when ``full_step_due`` (``closure`` called twice), else one pass and
        ``reuse_step``.  Returns the (first) loss."""
        if closure is None:
            return self._step_without_closure("", "first_step() / second_step() / reuse_step()")
        if self._check_m(m) != 1:
            raise ValueError(f"LookSAM: m-sharpness (m > 1) is not supported; got m={m}")
        if self.full_step_due:
            return self._two_passes(closure, scaler)
        with self._restore_on_error():
            loss = self._run_pass(closure, ascent=False, at_mean=True)
            self.reuse_step(scaler=scaler)
        return loss


class FriendlySAM(_Variant):
    r"""FriendlySAM (Li et al. 2024, "Friendly Sharpness-Aware Minimization").

    The ascent removes the full-gradient component, estimated by an exponential moving average
    m of the first-pass gradients:

        u = g0 - sigma m,   m <- lmbda m + (1 - lmbda) g0,   e = rho u / (||u|| + eps)

    (u uses m before its update; on the first step u = g0 and m <- g0, as the authors' code),
    then SAM's restore and base step with g_p, the gradient at w + e.  ``sigma = 0`` is SAM.
    Norm over all groups.  ``state[p]["friendly_momentum"]`` is saved by ``state_dict``; a step
    skipped in its second pass puts m back (docs/spec.md "FriendlySAM").  ``adaptive`` is not
    offered.
    """

    _KEYS = ("sigma", "lmbda")
    _NEEDS_DOTS = False

    def __init__(self, params, lr: float, rho: float = 0.05, base: str = "sgd", *,
                 sigma: float = 1.0, lmbda: float = 0.9, **kwargs):
        if kwargs.get("adaptive"):
            raise ValueError("adaptive=True is not offered by FriendlySAM (its ascent is on "
                             "g - sigma m)")
        super().__init__(params, lr, rho, base, dict(sigma=sigma, lmbda=lmbda), **kwargs)
        self._m_copies: Dict[Tensor, Tensor] = {}
        self._m_saved = {"on": False, "params": [], "fresh": []}

    def _check_variant(self, group: dict) -> None:
        check_nonneg("sigma", group["sigma"])
        check_beta("lmbda", group["lmbda"])
        if group["adaptive"]:
            raise ValueError("adaptive=True is not offered by FriendlySAM")

    def _momenta(self, ps) -> Optional[List[Tensor]]:
        """The momenta of ``ps`` (memoised), None while some parameter has none yet."""
        have = self._state_lists(ps, "friendly_momentum")
        return None if have is None else have[0]

    def _split(self, ps) -> List[Tuple[bool, List[int]]]:
        """(first, indices): the parameters without a momentum yet take first=True."""
        if self._momenta(ps) is not None:  # the usual step: no per-tensor lookups
            return [(False, list(range(len(ps))))]
        have = [("friendly_momentum" in self.state[p]) if p in self.state else False for p in ps]
        out = [(first, [i for i, h in enumerate(have) if h != first]) for first in (False, True)]
        return [(f, idx) for f, idx in out if idx]

    def _ascent_norm(self, work) -> Tensor:
        dev = work[0][1][0].device
        sq = []
        for group, ps, gs in work:
            for first, idx in self._split(ps):
                whole = len(idx) == len(ps)
                sel, gsel = (ps, gs) if whole else ([ps[i] for i in idx], [gs[i] for i in idx])
                if first:
                    sq.append(ops.grad_sumsq(sel, gsel, False, 0.0).to(dev))
                else:
                    ms = self._momenta(ps) if whole else \
                        [self.state[p]["friendly_momentum"] for p in sel]
                    sq.append(ops.samv_dots(gsel, ms, group["sigma"])[0].to(dev))
        sq = self._over_shards(sq)
        return sq[0].sqrt() if len(sq) == 1 else torch.stack(sq).sum().sqrt()

    def _before_perturb(self, work) -> None:
        """Keep m (and which m this step creates) for a skip in the second pass."""
        self._m_saved.update(on=False, params=[], fresh=[])
        if not work:
            return
        keep = self.nonfinite != "unchecked" or self._skip_state["ascents"] > 0
        copies: Dict[tuple, Tuple[List[Tensor], List[Tensor]]] = {}
        for _, ps, _ in work:
            ms = self._momenta(ps)
            if ms is not None:  # the usual step: every m exists; its copies are memoised
                if keep:
                    foreach_copy_(self._memo("friendly_copies", ps,
                                             lambda: [self._m_copy(p) for p in ps]), ms)
                    self._m_saved["params"].extend(ps)
                continue
            for p in ps:
                st = self.state[p]
                if "friendly_momentum" not in st:
                    st["friendly_momentum"] = torch.zeros_like(p, dtype=opmath(p))  # p's layout
                    self._m_saved["fresh"].append(p)
                    st["friendly_first"] = True
                elif keep:
                    c, m = self._m_copy(p), st["friendly_momentum"]
                    pair = copies.setdefault((m.device, m.dtype), ([], []))
                    pair[0].append(c)
                    pair[1].append(m)
                    self._m_saved["params"].append(p)
        for dst, src in copies.values():  # one foreach copy per device and dtype
            foreach_copy_(dst, src)
        self._m_saved["on"] = True

    def _m_copy(self, p: Tensor) -> Tensor:
        """The buffer that keeps ``p``'s m through a step (for a skip in its second pass)."""
        c, m = self._m_copies.get(p), self.state[p]["friendly_momentum"]
        if c is None or c.shape != m.shape or c.dtype != m.dtype:
            c = self._m_copies[p] = torch.empty_like(m)
        return c

    def _split_first(self, ps) -> List[Tuple[bool, List[int]]]:
        if not self._m_saved["fresh"]:  # no m was created in this step: none is first
            return [(False, list(range(len(ps))))]
        flags = [self.state[p].get("friendly_first", False) for p in ps]
        out = [(first, [i for i, f in enumerate(flags) if f == first]) for first in (False, True)]
        return [(f, idx) for f, idx in out if idx]

    def _perturb(self, group: dict, ps, gs, backups, norm: Tensor) -> None:
        found = self._found_inf(ps[0].device)
        for first, idx in self._split_first(ps):
            if len(idx) == len(ps):  # (the usual step: the lists as they are)
                sel, gsel, bsel, ms = ps, gs, backups, self._momenta(ps)
            else:
                sel = [ps[i] for i in idx]
                gsel, bsel = [gs[i] for i in idx], [backups[i] for i in idx]
                ms = [self.state[p]["friendly_momentum"] for p in sel]
            ops.samv_perturb_(sel, gsel, bsel, [], ms, norm, self._rho(group),
                              group["perturb_eps"], False, 0.0, group["sigma"], group["lmbda"],
                              first, found)
        if self._m_saved["fresh"]:
            for p in ps:
                self.state[p].pop("friendly_first", None)

    def _base_update(self, group: dict, ps) -> None:
        SAM._base_update(self, group, ps)  # SAM's restore and base step with g_p

    def _restore_sgd(self, *args) -> None:
        ops.sam_restore_sgd_(*args)

    def _restore_adam(self, *args) -> None:
        ops.sam_restore_adam_(*args)

    def _finish_step(self, skipped: bool) -> None:
        super()._finish_step(skipped)
        if not skipped:
            self._m_saved["on"] = False

    def _rollback_skipped_step(self) -> None:
        """The step was skipped after its ascent: m as before it (a new m is dropped)."""
        if self._m_saved["on"]:
            for p in self._m_saved["params"]:
                self.state[p]["friendly_momentum"].copy_(self._m_copies[p])
            for p in self._m_saved["fresh"]:
                self.state[p].pop("friendly_momentum", None)
                self.state[p].pop("friendly_first", None)
            self._m_saved["on"] = False
            self._memos.clear()

    def _rollback_on_device(self, found: Tensor) -> None:
        """skip_on_device: where ``found`` is set, m goes back to its copy (a new m stays zero:
        the next step then takes u = g, m = (1 - lmbda) g)."""
        if self._m_saved["on"]:
            skip = found.reshape(()) != 0
            for p in self._m_saved["params"]:
                m = self.state[p]["friendly_momentum"]
                m.copy_(torch.where(skip.to(m.device), self._m_copies[p], m))
            for p in self._m_saved["fresh"]:
                m = self.state[p]["friendly_momentum"]
                m.copy_(torch.where(skip.to(m.device), torch.zeros_like(m), m))
            self._m_saved["on"] = False
