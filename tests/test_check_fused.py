"""The inf/NaN check of an ascent pass is the norm that pass takes: one read of the gradients.

Under ``nonfinite="skip"`` (the default), ``"raise"`` and ``"skip_on_device"`` the optimizers whose
ascent takes a norm (SAM, ASAM, SAM-Adam, BiSAM, E-BiSAM, GSAM, WSAM, LookSAM, FriendlySAM, VSAM)
take it once, over every group, and decide the skip from it; the perturbation is given that norm
and does not reduce again.  Checked here: the count of reductions per ascent pass, the same
trajectory as ``"unchecked"`` bit for bit, and, with inf/NaN in one tensor among many, the skip
(or the error naming the tensor) exactly as a separate check gave it.
"""
import inspect

import pytest
import torch

import samkernels
from samkernels import ASAM, SAM, ops
from samkernels.ops import reference
from samkernels.optim import (FriendlySAM, GSAM, LookSAM, WSAM, BiSAM, EBiSAM,
                              NonFiniteGradientError, VariationalSAM)

MAKERS = {
    "sam": lambda ps, **kw: SAM(ps, lr=0.1, rho=0.05, momentum=0.9, **kw),
    "sam_adam": lambda ps, **kw: SAM(ps, lr=1e-2, rho=0.05, base="adam", **kw),
    "asam": lambda ps, **kw: ASAM(ps, lr=0.1, momentum=0.9, **kw),
    "bisam": lambda ps, **kw: BiSAM(ps, lr=0.1, rho=0.05, momentum=0.9, **kw),
    "ebisam": lambda ps, **kw: EBiSAM(ps, lr=0.1, rho=0.05, momentum=0.9, seed=3, **kw),
    "gsam": lambda ps, **kw: GSAM(ps, lr=0.1, rho=0.05, momentum=0.9, **kw),
    "wsam": lambda ps, **kw: WSAM(ps, lr=0.1, rho=0.05, momentum=0.9, **kw),
    "looksam": lambda ps, **kw: LookSAM(ps, lr=0.1, rho=0.05, momentum=0.9, k=2, **kw),
    "friendlysam": lambda ps, **kw: FriendlySAM(ps, lr=0.1, rho=0.05, momentum=0.9, **kw),
    "vsam": lambda ps, **kw: VariationalSAM(ps, lr=0.1, num_data=32, rho=0.05, momentum=0.9,
                                            **kw),
}
REDUCTIONS = ("grad_sumsq", "vsam_sumsq", "samv_dots", "nonfinite_flag")
# the perturbations and their norm argument (None: the op reduces the gradients itself)
PERTURBS = {"sam_perturb_": "grad_norm", "ebisam_perturb_": "grad_norm",
            "samv_perturb_": "norm", "vsam_perturb_": "sigma_norm"}
CHECKED = ("skip", "raise", "skip_on_device")
N_TENSORS = 40


def _params(n=N_TENSORS, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for i in range(n):
        p = torch.nn.Parameter(torch.randn(1 + i % 5, 3, generator=g).to(dtype))
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
        ps.append(p)
    return ps


def _groups(ps, n_groups):
    if n_groups == 1:
        return ps
    k = len(ps) // n_groups
    return [{"params": ps[i * k:(i + 1) * k if i < n_groups - 1 else len(ps)]}
            for i in range(n_groups)]


def _set_grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


class Recorder:
    """Wraps the reductions and perturbations of ``samkernels.ops``: counts the reductions and
    records whether each perturbation was given its norm."""

    def __init__(self, monkeypatch):
        self.reductions, self.norm_given = [], []
        for name in REDUCTIONS:
            monkeypatch.setattr(ops, name, self._reduction(name, getattr(ops, name)))
        for name, arg in PERTURBS.items():
            monkeypatch.setattr(ops, name, self._perturb(name, arg, getattr(ops, name)))

    def _reduction(self, name, fn):
        def wrapped(*args, **kw):
            self.reductions.append(name)
            return fn(*args, **kw)
        return wrapped

    def _perturb(self, name, arg, fn):
        sig = inspect.signature(getattr(reference, name))

        def wrapped(*args, **kw):
            self.norm_given.append(sig.bind(*args, **kw).arguments[arg] is not None)
            return fn(*args, **kw)
        return wrapped

    def clear(self):
        self.reductions.clear()
        self.norm_given.clear()


@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("nonfinite", CHECKED + ("unchecked",))
@pytest.mark.parametrize("name", list(MAKERS))
def test_ascent_reads_the_gradients_once(monkeypatch, name, nonfinite, n_groups):
    """One reduction op per group in the ascent pass, and every perturbation gets that norm:
    the check is not a second read.  ``"unchecked"`` with one group leaves the norm to the op."""
    ps = _params()
    opt = MAKERS[name](_groups(ps, n_groups), nonfinite=nonfinite)
    rec = Recorder(monkeypatch)
    for step in range(2):  # the second step: FriendlySAM's momentum exists, LookSAM's g_v
        _set_grads(ps, 10 + step)
        rec.clear()
        opt.first_step()
        assert len(rec.reductions) == (0 if n_groups == 1 and nonfinite == "unchecked"
                                       and name not in ("gsam", "wsam", "looksam", "friendlysam")
                                       else n_groups), rec.reductions
        assert rec.norm_given and all(rec.norm_given) == (len(rec.reductions) > 0)
        _set_grads(ps, 20 + step)
        opt.second_step()
        assert not opt.step_skipped


@pytest.mark.parametrize("nonfinite", CHECKED)
@pytest.mark.parametrize("name", list(MAKERS))
def test_finite_steps_equal_unchecked(name, nonfinite):
    """The norm handed to the perturbation is the one the op takes itself: the checked
    trajectory is the unchecked one bit for bit (one group and two)."""
    for n_groups in (1, 2):
        runs = []
        for policy in (nonfinite, "unchecked"):
            ps = _params()
            opt = MAKERS[name](_groups(ps, n_groups), nonfinite=policy)
            norms = []
            for step in range(3):
                _set_grads(ps, 30 + step)
                norms.append(opt.first_step())
                _set_grads(ps, 40 + step)
                opt.second_step()
            runs.append((ps, norms, opt))
        (a, na, oa), (b, nb, ob) = runs
        for p, q in zip(a, b):
            assert torch.equal(p, q)
            for key, v in oa.state[p].items():
                if torch.is_tensor(v):
                    assert torch.equal(v, ob.state[q][key]), key
        for x, y in zip(na, nb):
            assert torch.equal(x, y)


def _snapshot(ps, opt):
    return ([p.detach().clone() for p in ps],
            [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
             for p in ps])


def _same(snap, ps, opt):
    weights, states = snap
    assert all(torch.equal(w, p) for w, p in zip(weights, ps))
    for st, p in zip(states, ps):
        now = opt.state[p]
        assert set(st) == set(now)
        for k, v in st.items():
            assert torch.equal(v, now[k]) if torch.is_tensor(v) else v == now[k], k


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", ["ascent", "descent"])
@pytest.mark.parametrize("nonfinite", CHECKED)
@pytest.mark.parametrize("name", list(MAKERS))
def test_one_bad_tensor_among_many_skips_the_step(name, nonfinite, where, bad):
    """inf/NaN in one entry of one tensor among 40 (in the second of two groups): weights and
    state as before the step, ``step_skipped``; ``"raise"`` names exactly that tensor."""
    ps = _params()
    opt = MAKERS[name](_groups(ps, 2), nonfinite=nonfinite)
    for step in range(2):  # state exists (momentum, FriendlySAM's m, VSAM's Sigma moved)
        _set_grads(ps, 50 + step)
        opt.first_step()
        _set_grads(ps, 60 + step)
        opt.second_step()
    hit = 27
    snap = _snapshot(ps, opt)
    _set_grads(ps, 70)
    if where == "ascent":
        ps[hit].grad[0, 1] = bad
    if nonfinite == "raise" and where == "ascent":
        with pytest.raises(NonFiniteGradientError, match=r"'params'\]\[7\]") as err:
            opt.first_step()
        assert "first (ascent)" in str(err.value) and "..." not in str(err.value)
        _same(snap, ps, opt)
        assert opt.step_skipped
        return
    opt.first_step()
    _set_grads(ps, 71)
    if where == "descent":
        ps[hit].grad[0, 1] = bad
    if nonfinite == "raise":
        with pytest.raises(NonFiniteGradientError, match=r"param_groups\[1\]\['params'\]\[7\]"):
            opt.second_step()
    else:
        opt.second_step()
    assert opt.step_skipped
    if nonfinite == "skip_on_device":  # host counters advance (documented): tensors only
        weights, states = snap
        assert all(torch.equal(w, p) for w, p in zip(weights, ps))
        for st, p in zip(states, ps):
            for k, v in st.items():
                if torch.is_tensor(v) and k != "step":
                    assert torch.equal(v, opt.state[p][k]), k
    else:
        _same(snap, ps, opt)


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_asam_nonfinite_weight_with_finite_gradients_is_not_skipped(nonfinite):
    """ASAM's norm ||(|w| + eta) g|| is not finite for an infinite weight even when every gradient
    is: the host policies then take the exact gradient flag, as a separate check did, and do
    not skip (the weight stays infinite; the rest of the step is taken)."""
    def start(policy):
        ps = _params()
        with torch.no_grad():
            ps[3][0, 0] = float("inf")
        return ps, ASAM(ps, lr=0.1, momentum=0.9, nonfinite=policy)

    _takes_the_unchecked_step(nonfinite, start, between=lambda ps: _set_grads(ps, 80))


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_float64_overflow_of_finite_gradients_is_not_a_skip(nonfinite):
    """float64 gradients whose squares overflow are finite: skip and raise, which decide on the
    gradients alone, take the step as unchecked does (the ascent's norm is inf, so e = 0)."""
    def start(policy):
        ps = _params(dtype=torch.float64)
        for p in ps:
            p.grad.fill_(1e200)
        return ps, SAM(ps, lr=0.1, momentum=0.9, nonfinite=policy)

    _takes_the_unchecked_step(nonfinite, start)


def _takes_the_unchecked_step(nonfinite, start, between=lambda ps: None):
    """``start(policy)`` -> (params, optimizer), ``between(params)`` after the first pass: a step
    under ``nonfinite`` is not skipped and leaves the weights the same step leaves unchecked."""
    runs = []
    for policy in (nonfinite, "unchecked"):
        ps, opt = start(policy)
        opt.first_step()
        between(ps)
        opt.second_step()
        assert not opt.step_skipped
        runs.append(ps)
    for p, q in zip(*runs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_every_backend(backend):
    """The fused check on each CPU backend: a finite step equals unchecked, a NaN skips."""
    with samkernels.use_backend(backend):
        test_finite_steps_equal_unchecked("sam", "skip")
        test_one_bad_tensor_among_many_skips_the_step("vsam", "skip", "ascent", float("nan"))


@pytest.mark.parametrize("nonfinite", CHECKED + ("unchecked",))
@pytest.mark.parametrize("name", ["sam", "gsam", "looksam", "wsam", "friendlysam"])
def test_descent_check_reads_the_gradients_once(monkeypatch, name, nonfinite):
    """The second pass: GSAM's and LookSAM's update reduces <g, g> over every group (samv_dots,
    one per group), which is then also the check (no other read); the others, whose update takes
    no norm, check with one nonfinite_flag per device (none when unchecked)."""
    ps = _params()
    opt = MAKERS[name](_groups(ps, 2), nonfinite=nonfinite)
    rec = Recorder(monkeypatch)
    for step in range(3):  # LookSAM (k = 2): full, reuse, full
        _set_grads(ps, 90 + step)
        if name == "looksam" and not opt.full_step_due:
            rec.clear()
            opt.reuse_step()
        else:
            opt.first_step()
            _set_grads(ps, 95 + step)
            rec.clear()
            opt.second_step()
        assert not opt.step_skipped
        if name in ("gsam", "looksam"):
            assert rec.reductions == ["samv_dots", "samv_dots"]
        else:
            assert rec.reductions == ([] if nonfinite == "unchecked" else ["nonfinite_flag"])


@pytest.mark.parametrize("nonfinite", CHECKED)
@pytest.mark.parametrize("name", ["gsam", "looksam"])
def test_reuse_step_with_a_bad_tensor_is_skipped(name, nonfinite):
    """LookSAM's one-pass step and GSAM's descent with NaN in one tensor: skipped (or raised,
    naming it), weights and state unchanged."""
    ps = _params()
    opt = MAKERS[name](ps, nonfinite=nonfinite)
    for step in range(1 if name == "looksam" else 2):  # LookSAM (k = 2): then a reuse step
        _set_grads(ps, 100 + step)
        opt.first_step()
        _set_grads(ps, 110 + step)
        opt.second_step()
    snap = _snapshot(ps, opt)
    _set_grads(ps, 120)
    if name == "looksam":
        assert not opt.full_step_due
        phase = opt.reuse_step
    else:
        opt.first_step()
        _set_grads(ps, 121)
        phase = opt.second_step
    ps[11].grad[0, 0] = float("nan")
    if nonfinite == "raise":
        with pytest.raises(NonFiniteGradientError, match=r"\['params'\]\[11\]"):
            phase()
    else:
        phase()
    assert opt.step_skipped
    weights, states = snap
    assert all(torch.equal(w, p) for w, p in zip(weights, ps))
    for st, p in zip(states, ps):
        for k, v in st.items():
            if torch.is_tensor(v) and not (nonfinite == "skip_on_device" and k == "step"):
                assert torch.equal(v, opt.state[p][k]), k
