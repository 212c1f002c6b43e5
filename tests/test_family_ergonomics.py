"""Issue #7 for every optimizer of the family, not just SAM: rho = 0 is the base optimizer, BatchNorm
statistics under ``freeze_bn``, exact restore in bf16, GradScaler, a separate perturbation (ascent)
loss, gradient accumulation, and the state_dict (exact key sets, exact resume).

One factory table (``SPECS``) drives every test; where a property does not apply to an optimizer
the parametrization says why (a ``skip`` mark with the reason)."""
import copy
import io
import math
from typing import Callable, NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F

import samkernels
from samkernels import ASAM, BSAM, SAM
from samkernels.ops import reference as ref
from samkernels.ops.reference import philox_uniform
from samkernels.optim import (GSAM, MFVI, WSAM, BiSAM, EBiSAM, FriendlySAM, LookSAM, RandomSAM,
                               VariationalSAM)

from conftest import needs_ext

N = 24  # batch size and the num_data of the Bayesian optimizers

needs_cpu_scaler = pytest.mark.skipif(
    not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler"),
    reason="torch.amp.GradScaler('cpu') needs torch >= 2.3")


ADAM_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})
MOMENTUM_KEYS = frozenset({"momentum_buffer"})


class Spec(NamedTuple):
    cls: type
    defaults: dict  # constructor keywords (tests override some of them)
    keys: frozenset  # the exact key set of state_dict()["state"][i]
    rho0: Optional[dict]  # overrides that make it the torch.optim base optimizer ...
    base: Optional[Callable]  # ... this one; None: rho = 0 is not the base optimizer
    why_not_base: str = ""

    def make(self, params, **kw):
        return self.cls(params, **{**self.defaults, **kw})

    @property
    def noisy(self) -> bool:  # noise_step() opens the step (BSAM, RandomSAM, MFVI)
        return hasattr(self.cls, "noise_step")

    @property
    def two_pass(self) -> bool:  # first_step + second_step (RandomSAM, MFVI: one pass)
        return hasattr(self.cls, "first_step")


def _sgd(**kw):
    return lambda ps: torch.optim.SGD(ps, **kw)


SPECS = {
    "sam_sgd": Spec(SAM, dict(lr=0.1, rho=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                    MOMENTUM_KEYS, dict(rho=0.0),
                    _sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "sam_adam": Spec(SAM, dict(lr=1e-2, rho=0.05, base="adam", weight_decay=1e-3), ADAM_KEYS,
                     dict(rho=0.0), lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3)),
    "sam_adamw": Spec(SAM, dict(lr=1e-2, rho=0.05, base="adamw", weight_decay=1e-2), ADAM_KEYS,
                      dict(rho=0.0), lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2)),
    "asam": Spec(ASAM, dict(lr=0.1, rho=0.5, momentum=0.9, weight_decay=1e-3), MOMENTUM_KEYS,
                 dict(rho=0.0), _sgd(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "bsam": Spec(BSAM, dict(lr=0.1, num_data=N, rho=0.05, weight_decay=1e-3, seed=4),
                 frozenset({"precision", "momentum_buffer"}), None, None,
                 "bSAM at rho = 0 still samples theta = omega + z / sqrt(N s) for its gradient and "
                 "divides the step by its learned precision s: not SGD/Adam"),
    "randomsam": Spec(RandomSAM, dict(lr=1e-2, sigma=0.05, base="adam", weight_decay=1e-3, seed=3),
                      ADAM_KEYS, dict(sigma=0.0),  # sigma = 0: no perturbation (documented)
                      lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3)),
    "mfvi": Spec(MFVI, dict(lr=0.1, num_data=N, rho=0.5, var_lr=0.05, momentum=0.9, seed=3),
                 frozenset({"variance", "momentum_buffer"}), None, None,
                 "MFVI needs rho > 0 (or init_var > 0): it samples from its learned variance, and "
                 "its KL term acts as weight decay 1/(N prior_var); not SGD"),
    # VSAM documents that rho = 0 keeps Sigma = 0 and is "exactly the base optimizer"; its default
    # weight decay is eq. 42's 1/(N prior_var), so the torch counterpart needs it given explicitly
    "vsam": Spec(VariationalSAM, dict(lr=0.1, num_data=N, rho=0.05, momentum=0.9),
                 frozenset({"variance", "momentum_buffer"}), dict(rho=0.0, weight_decay=1e-3),
                 _sgd(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "bisam_neglog": Spec(BiSAM, dict(lr=0.1, rho=0.05, momentum=0.9, weight_decay=5e-4),
                         MOMENTUM_KEYS, dict(rho=0.0), _sgd(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "bisam_tanh": Spec(BiSAM, dict(lr=1e-2, rho=0.05, phi="tanh", base="adam"), ADAM_KEYS,
                       dict(rho=0.0), lambda ps: torch.optim.Adam(ps, lr=1e-2)),
    "abisam": Spec(BiSAM, dict(lr=1e-2, rho=0.5, adaptive=True, base="adamw", weight_decay=1e-2),
                   ADAM_KEYS, dict(rho=0.0),
                   lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2)),
    # E-BiSAM's data selection (gamma < 1) trains on the top-gamma part of the batch only, which
    # no base optimizer does; gamma = 1 keeps every example (ceil(1 * B) = B, in order)
    "ebisam": Spec(EBiSAM, dict(lr=0.1, rho=0.05, momentum=0.9, beta=0.5, gamma=0.5, seed=3),
                   MOMENTUM_KEYS, dict(rho=0.0, gamma=1.0), _sgd(lr=0.1, momentum=0.9)),
    # the SAM variants: rho = 0 (GSAM and LookSAM with alpha = 0) is the base optimizer bit for
    # bit (WSAM decoupled: w - lr k (g - g) adds an exact zero; FriendlySAM: e = 0)
    "gsam": Spec(GSAM, dict(lr=0.1, rho=0.05, alpha=0.4, momentum=0.9, weight_decay=1e-3),
                 MOMENTUM_KEYS, dict(rho=0.0, alpha=0.0),
                 _sgd(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "wsam_adamw": Spec(WSAM, dict(lr=1e-2, rho=0.05, gamma=0.8, base="adamw", weight_decay=1e-2),
                       ADAM_KEYS, dict(rho=0.0),
                       lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2)),
    "wsam_coupled": Spec(WSAM, dict(lr=0.1, rho=0.05, gamma=0.8, decoupled=False, momentum=0.9),
                         MOMENTUM_KEYS, None, None,
                         "coupled WSAM at rho = 0 steps with k g + (1 - k) g: g within rounding"),
    "looksam": Spec(LookSAM, dict(lr=1e-2, rho=0.05, k=2, alpha=0.7, base="adam"),
                    ADAM_KEYS | {"looksam_gv"}, dict(rho=0.0, alpha=0.0),
                    lambda ps: torch.optim.Adam(ps, lr=1e-2)),
    "friendlysam": Spec(FriendlySAM, dict(lr=0.1, rho=0.05, sigma=0.8, lmbda=0.6, momentum=0.9,
                                          nesterov=True),
                        MOMENTUM_KEYS | {"friendly_momentum"}, dict(rho=0.0),
                        _sgd(lr=0.1, momentum=0.9, nesterov=True)),
}
NAMES = list(SPECS)
TWO_PASS = [n for n in NAMES if SPECS[n].two_pass]


# --- model, data, closures -------------------------------------------------------------------------
def net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(dtype)


def batch(seed=2, n=N, dtype=torch.float64):
    """Fresh random inputs (drawn in float64, then cast; never zeros) and labels in 0..2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.randint(0, 3, (n,), generator=g)


def logits_of(model, x):
    out = model(x)
    return out if out.dtype == torch.float64 else out.float()


def loss_of(opt, logits, y, ascent):
    """The pass's loss: BiSAM-family ascent passes use Q (eq. 14), every other pass cross-entropy."""
    if ascent and isinstance(opt, BiSAM):
        return opt.ascent_loss(logits, y)
    return F.cross_entropy(logits, y)


def closure_for(opt, model, x, y, seen=None):
    """closure(ascent); ``seen`` collects (ascent, weights at the pass) for every pass."""
    def closure(ascent):
        if seen is not None:
            seen.append((ascent, [p.detach().clone() for p in model.parameters()]))
        opt.zero_grad()
        loss = loss_of(opt, logits_of(model, x), y, ascent)
        loss.backward()
        return loss.detach()
    return closure


def train_step(opt, model, x, y):
    """The everyday step: BiSAM's built closure (Q on the ascent pass, E-BiSAM's data selection on
    the other), a plain closure for the rest."""
    if isinstance(opt, BiSAM):
        return opt.step(model=model, inputs=x, target=y)
    return opt.step(closure_for(opt, model, x, y))


def phases(opt, backward):
    """One step through the explicit phases; ``backward(ascent)`` runs forward + backward.
    LookSAM between its full steps: one pass and ``reuse_step``."""
    if not getattr(opt, "full_step_due", True):
        backward(False)
        opt.reuse_step(zero_grad=True)
        return
    if hasattr(opt, "noise_step"):
        opt.noise_step()
    if hasattr(opt, "first_step"):
        backward(True)
        opt.first_step(zero_grad=True)
        backward(False)
    else:  # RandomSAM, MFVI: the one pass, at the sampled weights, is the step's first (ascent) pass
        backward(True)
    opt.second_step(zero_grad=True)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_state_equal(sa, sb):
    """Two state_dicts bit for bit: the samkernels extras (seed, counter), every state tensor."""
    assert sa.get("samkernels") == sb.get("samkernels")
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys(), k
        for name, v in sa["state"][k].items():
            w = sb["state"][k][name]
            assert (torch.equal(v, w) if torch.is_tensor(v) else v == w), (k, name)


# --- 1. rho = 0 is the base optimizer --------------------------------------------------------------
def _rho0_params():
    return [pytest.param(n, marks=pytest.mark.skip(reason=SPECS[n].why_not_base))
            if SPECS[n].base is None else n for n in NAMES]


@pytest.mark.parametrize("name", _rho0_params())
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [1, 2])
def test_rho_zero_is_the_base_optimizer(name, backend, dtype, groups):
    """rho = 0 (RandomSAM: sigma = 0) over 10 steps of fresh batches: bit for bit torch.optim's
    SGD/Adam/AdamW on the reference backend (it uses torch.optim's calls), within rounding on the
    fused C++ backend.  groups=2: the first layer in its own group at half the learning rate (the
    perturbation's norm then spans two groups)."""
    spec = SPECS[name]
    a, b = net(dtype), net(dtype)

    def param_groups(model):
        if groups == 1:
            return model.parameters()
        return [{"params": list(model[0].parameters()), "lr": spec.defaults["lr"] / 2},
                {"params": list(model[2].parameters())}]

    ours, theirs = spec.make(param_groups(a), **spec.rho0), spec.base(param_groups(b))
    for t in range(10):
        x, y = batch(seed=100 + t, dtype=dtype)
        with samkernels.use_backend(backend):
            train_step(ours, a, x, y)  # BiSAM family: Q on the ascent pass (times rho = 0)
        theirs.zero_grad()
        F.cross_entropy(b(x), y).backward()
        theirs.step()
    for p, q in zip(a.parameters(), b.parameters()):
        if backend == "reference":
            assert torch.equal(p, q), (p - q).abs().max()
        elif dtype == torch.float64:
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        else:  # one rounding apart per step: Adam's fused update differs from ATen's by up to
            # 1 ulp of |w| ~ 0.5 (6e-8) a step (measured: 4.5e-7 after 10 steps; SGD: 6e-8)
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


# --- 2. BatchNorm statistics under freeze_bn ---------------------------------------------------------
class BNNet(torch.nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.bn, self.fc2 = torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)
        self.to(dtype)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _bn_params():
    out = []
    for n in NAMES:  # freeze_bn_noisy exists only where the step's first pass is at noisy weights
        out += [(n, False), (n, True)] if SPECS[n].noisy else [(n, None)]
    return out


@pytest.mark.parametrize("name,noisy_frozen", _bn_params())
def test_bn_statistics_under_freeze_bn(name, noisy_frozen):
    """After one step(closure) with freeze_bn=model the running statistics are those of ONE clean
    forward of the step's first pass:
      SAM-type (SAM, ASAM, VSAM, BiSAM, E-BiSAM): the pass at the unperturbed weights w; the
        perturbed pass (E-BiSAM: both its no-grad Q forward and the selected-batch forward) is frozen;
      BSAM, RandomSAM, MFVI: the first pass runs at the sampled weights theta; it updates the
        statistics (one forward at theta) unless freeze_bn_noisy=True, which freezes it too: then the
        statistics do not move at all (and BSAM's perturbed pass is always frozen)."""
    spec = SPECS[name]
    x, y = batch(seed=7)
    model = BNNet()
    start = copy.deepcopy(model)
    kw = {} if noisy_frozen is None else dict(freeze_bn_noisy=noisy_frozen)
    opt = spec.make(model.parameters(), freeze_bn=model, **kw)
    seen = []
    if isinstance(opt, BiSAM):
        built = opt.closure(model, x, y)

        def closure(ascent):
            seen.append((ascent, weights(model)))
            return built(ascent)
    else:
        closure = closure_for(opt, model, x, y, seen)
    opt.step(closure)

    assert [a for a, _ in seen] == ([True, False] if spec.two_pass else [True])
    first = seen[0][1]
    moved = lambda ws: any(not torch.equal(a, b) for a, b in zip(ws, start.parameters()))  # noqa: E731
    assert moved(first) == spec.noisy  # SAM-type: the first pass is at w exactly
    if spec.two_pass:
        assert moved(seen[1][1])  # the frozen pass really ran at other weights
    bn, bn0 = model.bn, start.bn
    assert bn.track_running_stats  # switched back on
    if noisy_frozen:
        assert torch.equal(bn.running_mean, bn0.running_mean)
        assert torch.equal(bn.running_var, bn0.running_var)
        assert bn.num_batches_tracked.item() == 0
        return
    clean = copy.deepcopy(start)
    with torch.no_grad():
        for p, w in zip(clean.parameters(), first):
            p.copy_(w)
        clean(x)  # one training-mode forward at the first pass's weights
    assert torch.equal(bn.running_mean, clean.bn.running_mean)
    assert torch.equal(bn.running_var, clean.bn.running_var)
    assert bn.num_batches_tracked.item() == 1


# --- 3. exact restore in bf16 ----------------------------------------------------------------------
def _skip_for(names_why):
    """NAMES, with the given ones marked skip(reason)."""
    return [pytest.param(n, marks=pytest.mark.skip(reason=names_why[n])) if n in names_why else n
            for n in NAMES]


_LOOKSAM_REUSE = "LookSAM's steps between its full steps are one unperturbed pass"
_MIXED_UPDATE = ("the update direction mixes both passes' gradients (tests/test_sam_variants.py "
                 "checks it against the paper)")


@pytest.mark.parametrize("name", _skip_for({"looksam": _LOOKSAM_REUSE}))
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_bf16_lr_zero_step_leaves_weights_bit_identical(name, backend):
    """lr = 0 makes every update a no-op on w (SGD/Adam: w - 0 d; AdamW: w (1 - 0 wd); bSAM:
    omega - 0 m / s; MFVI: mu - 0 d; the weight decay stays on): whatever the perturbation did, the
    bf16 weights after each full step are bit for bit those before."""
    spec = SPECS[name]
    model = net(torch.bfloat16)
    opt = spec.make(model.parameters(), lr=0.0)
    for t in range(3):
        x, y = batch(seed=20 + t, dtype=torch.bfloat16)
        w0, seen = weights(model), []
        with samkernels.use_backend(backend):
            opt.step(closure_for(opt, model, x, y, seen))
        perturbed = seen[-1][1]  # the last pass ran at the perturbed (or sampled) weights
        assert any(not torch.equal(a, b) for a, b in zip(perturbed, w0))
        for p, w in zip(model.parameters(), w0):
            assert torch.equal(p, w)


@pytest.mark.parametrize("name", _skip_for({n: _MIXED_UPDATE for n in
                                             ("gsam", "wsam_adamw", "wsam_coupled", "looksam")}))
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_bf16_update_is_applied_to_the_never_perturbed_weights(name, backend):
    """lr > 0, bf16, third step (state exists): w_after == the update applied to the bf16 weights
    from before the step, with this step's gradients.  SAM-type and RandomSAM: a twin optimizer with
    the same state, at the never-perturbed weights, takes only ``base_step()`` (the plain
    base-optimizer step; second_step without its first phase is an error) with the captured
    update gradient.  BSAM and MFVI (no second_step
    without their noisy phase): the reference update op applied to copies of the old weights and
    state (reference backend only: that is the op the optimizer then runs)."""
    spec = SPECS[name]
    if spec.cls in (BSAM, MFVI) and backend != "reference":
        pytest.skip("compared with the reference op: reference backend only")
    model = net(torch.bfloat16)
    opt = spec.make(model.parameters())
    with samkernels.use_backend(backend):
        for t in range(2):
            x, y = batch(seed=30 + t, dtype=torch.bfloat16)
            opt.step(closure_for(opt, model, x, y))
        x, y = batch(seed=32, dtype=torch.bfloat16)
        w0, sd0 = weights(model), copy.deepcopy(opt.state_dict())
        grads = {}

        def closure(ascent):
            opt.zero_grad()
            loss_of(opt, logits_of(model, x), y, ascent).backward()
            grads[ascent] = [p.grad.clone() for p in model.parameters()]
            return torch.zeros(())

        opt.step(closure)
        w1 = weights(model)
        assert any(not torch.equal(a, b) for a, b in zip(w0, w1))  # it trained
        g_update = grads[False] if spec.two_pass else grads[True]
        if spec.cls not in (BSAM, MFVI):
            twin_model = net(torch.bfloat16)
            with torch.no_grad():
                for p, w in zip(twin_model.parameters(), w0):
                    p.copy_(w)
            twin = spec.make(twin_model.parameters())
            twin.load_state_dict(sd0)
            for p, g in zip(twin_model.parameters(), g_update):
                p.grad = g.clone()
            twin.base_step()
            for p, w in zip(twin_model.parameters(), w1):
                assert torch.equal(p, w)
            # the base optimizer's state too (not VSAM's Sigma or FriendlySAM's m, stepped in
            # first_step, nor the noise / mask counters: the twin ran no first phase)
            st, st_twin = opt.state_dict()["state"], twin.state_dict()["state"]
            for i in st:
                for key in spec.keys - {"variance", "friendly_momentum"}:
                    assert torch.equal(st_twin[i][key], st[i][key]), (i, key)
            return
    # BSAM / MFVI against the reference ops, on copies of the old weights and state
    params, backups = [w.clone() for w in w0], [w.clone() for w in w0]
    st = [sd0["state"][i] for i in range(len(w0))]
    g = opt.param_groups[0]
    if spec.cls is BSAM:
        s, m = [d["precision"].clone() for d in st], [d["momentum_buffer"].clone() for d in st]
        # line 5 waits for the update while inf/NaN are checked: sqrt(s)|g| of the noisy pass
        acc = [ss.sqrt() * gg.float().abs() for ss, gg in zip(s, grads[True])]
        b1, b2 = g["betas"]
        ref.bsam_update_(params, g_update, backups, s, m, acc, g["lr"], b1, b2, g["weight_decay"],
                         g["gamma"], 1.0, False)
        want_state = {"precision": s, "momentum_buffer": m}
    else:
        v, m = [d["variance"].clone() for d in st], [d["momentum_buffer"].clone() for d in st]
        ref.mfvi_update_(params, g_update, backups, v, m, list(range(len(w0))),
                         sd0["samkernels"]["seed"], sd0["samkernels"]["noise_step"], g["lr"],
                         g["var_lr"], g["momentum"], g["prior_var"], g["num_data"])
        want_state = {"variance": v, "momentum_buffer": m}
    for p, w in zip(w1, params):
        assert torch.equal(p, w)
    for key, want in want_state.items():
        for i, w in enumerate(want):
            assert torch.equal(opt.state_dict()["state"][i][key], w), (i, key)


# --- 4. GradScaler ---------------------------------------------------------------------------------
class Run:
    """A float32 model, an optimizer, a closure that can poison one pass with inf or NaN (the
    harness of tests/test_precision.py, for every optimizer)."""

    def __init__(self, name, scaler=None):
        self.model = net(torch.float32)
        self.opt = SPECS[name].make(self.model.parameters())
        self.scaler, self.poison, self.calls, self.t = scaler, None, [], 0

    def closure(self, ascent):
        self.calls.append(ascent)
        self.opt.zero_grad()
        loss = loss_of(self.opt, self.model(self.x), self.y, ascent)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.poison is not None and self.poison[0] == ascent:
            self.model[2].weight.grad[1, 3] = self.poison[1]
        return loss

    def next_batch(self):
        self.x, self.y = batch(seed=40 + self.t, dtype=torch.float32)
        self.t += 1

    def step(self, poison=None, how="closure"):
        self.next_batch()
        self.poison = poison
        if how == "closure":
            loss = self.opt.step(self.closure, scaler=self.scaler)
        elif how == "built":  # BiSAM's own closure, told about the scaler
            loss = self.opt.step(model=self.model, inputs=self.x, target=self.y, scaler=self.scaler)
        elif not getattr(self.opt, "full_step_due", True):  # LookSAM between its full steps
            loss = self.closure(False)
            self.opt.reuse_step(zero_grad=True, scaler=self.scaler)
        else:  # the explicit phases, scaler= to each gradient phase
            loss = None
            if hasattr(self.opt, "noise_step"):
                self.opt.noise_step()
            if hasattr(self.opt, "first_step"):
                self.closure(True)
                self.opt.first_step(zero_grad=True, scaler=self.scaler)
                self.closure(False)
            else:
                self.closure(True)
            self.opt.second_step(zero_grad=True, scaler=self.scaler)
        if self.scaler is not None:
            self.scaler.update()
        self.poison = None
        return loss

    def snapshot(self):
        return weights(self.model), copy.deepcopy(self.opt.state_dict())


@needs_cpu_scaler
@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_is_exact_on_finite_steps(name):
    """A power-of-two scale and its unscale are exact: the run equals the run without a scaler."""
    plain, scaled = Run(name), Run(name, scaler=torch.amp.GradScaler("cpu"))
    for _ in range(4):
        plain.step()
        scaled.step()
    for p, q in zip(plain.model.parameters(), scaled.model.parameters()):
        assert torch.equal(p, q)
    assert_state_equal(plain.opt.state_dict(), scaled.opt.state_dict())
    assert scaled.scaler.get_scale() == 65536.0


@needs_cpu_scaler
@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_in_explicit_phases_equals_the_closure_step(name):
    """scaler= on each gradient phase == step(closure, scaler=) == no scaler, bit for bit."""
    plain, closure, phased = Run(name), Run(name, torch.amp.GradScaler("cpu")), \
        Run(name, torch.amp.GradScaler("cpu"))
    for _ in range(3):
        plain.step()
        closure.step()
        phased.step(how="phases")
    for p, q, r in zip(plain.model.parameters(), closure.model.parameters(),
                       phased.model.parameters()):
        assert torch.equal(p, r) and torch.equal(q, r)
    assert_state_equal(closure.opt.state_dict(), phased.opt.state_dict())
    assert phased.scaler.get_scale() == 65536.0


@needs_cpu_scaler
@pytest.mark.parametrize("name", [n for n in NAMES if issubclass(SPECS[n].cls, BiSAM)])
def test_grad_scaler_with_the_built_bisam_closure(name):
    """step(model=, inputs=, target=, scaler=) (the closure BiSAM builds, E-BiSAM's data selection
    included) with a scaler == without one, bit for bit."""
    plain, scaled = Run(name), Run(name, torch.amp.GradScaler("cpu"))
    for _ in range(3):
        plain.step(how="built")
        scaled.step(how="built")
    for p, q in zip(plain.model.parameters(), scaled.model.parameters()):
        assert torch.equal(p, q)
    assert_state_equal(plain.opt.state_dict(), scaled.opt.state_dict())


def _poison_params():
    out = []
    for n in NAMES:  # RandomSAM and MFVI have one pass only (the ascent-flagged one)
        for ascent in ([True, False] if SPECS[n].two_pass else [True]):
            for bad in (float("inf"), float("nan")):
                out.append(pytest.param(n, ascent, bad, id=f"{n}-pass{2 - ascent}-{bad}"))
    return out


@needs_cpu_scaler
@pytest.mark.parametrize("mode", ["scaler-closure", "scaler-phases", "noscaler-closure"])
@pytest.mark.parametrize("name,ascent,bad", _poison_params())
def test_nonfinite_pass_skips_the_step(name, ascent, bad, mode):
    """inf/NaN in either pass (with a GradScaler, through step(closure) or the explicit phases; or
    without one, the default nonfinite="skip"): weights and the whole state (noise / mask counters
    included) stay bit for bit, the scale backs off, and the next step equals the step of a run in
    which the bad step never happened."""
    scaled, how = mode.split("-")
    new_scaler = (lambda: torch.amp.GradScaler("cpu")) if scaled == "scaler" else (lambda: None)
    run, control = Run(name, new_scaler()), Run(name, new_scaler())
    for r in (run, control):
        r.step(how=how)
        r.step(how=how)  # momentum / moments / precision / variances exist
    before = run.snapshot()
    scale = run.scaler.get_scale() if run.scaler is not None else None
    run.calls.clear()
    run.step(poison=(ascent, bad), how=how)
    assert run.opt.step_skipped and not run.opt.is_perturbed and not run.opt.skip_pending
    if how == "closure":  # no second pass after a bad first
        assert run.calls == ([True] if ascent else [True, False])
    after = run.snapshot()
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    assert_state_equal(before[1], after[1])
    if scale is not None:
        assert run.scaler.get_scale() == scale / 2
    control.next_batch()  # the control run never sees the bad step's batch
    run.step(how=how)  # training goes on, and the scaler's bookkeeping accepts the next step
    control.step(how=how)
    assert not run.opt.step_skipped
    assert any(not torch.equal(a, b) for a, b in zip(before[0], run.model.parameters()))
    for a, b in zip(run.model.parameters(), control.model.parameters()):
        assert torch.equal(a, b)  # the halved power-of-two scale unscales exactly too
    assert_state_equal(run.opt.state_dict(), control.opt.state_dict())


# --- 5. a separate perturbation (ascent) loss ------------------------------------------------------
def ascent_loss(logits, y):
    """Any loss other than the training loss (and other than BiSAM's Q)."""
    return 0.5 * (logits ** 2).mean() + logits[:, 0].mean()


def grads_at(model, ws, x, fn):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, w in zip(m.parameters(), ws):
            p.copy_(w)
    return torch.autograd.grad(fn(m(x)), list(m.parameters()))


def expected_perturbed(opt, ws, gs, sd):
    """By hand, float64: the weights of the perturbed pass from the ascent-pass weights ``ws`` (BSAM:
    theta, whose mean is the backup) and its gradient ``gs``; ``sd``: state_dict before the step."""
    g0 = opt.param_groups[0]
    if isinstance(opt, BSAM):  # Alg. 1 line 3: omega + rho g / s, s from before the step
        omega = [b.clone() for b in sd["omega"]]
        return [o + g0["rho"] * g / sd["state"][i]["precision"] for i, (o, g) in enumerate(zip(omega, gs))]
    if isinstance(opt, VariationalSAM):  # eq. 2: sqrt(p) Sigma g / (sqrt(g^T Sigma g) + eps)
        var = [sd["state"][i]["variance"] for i in range(len(ws))]
        p = sum(w.numel() for w in ws)
        norm = torch.sqrt(sum((v * g * g).sum() for v, g in zip(var, gs)))
        return [w + math.sqrt(p) * v * g / (norm + g0["perturb_eps"]) for w, v, g in zip(ws, var, gs)]
    if g0["adaptive"]:  # ASAM / A-BiSAM: rho T^2 g / (||T g|| + eps), T = |w| + eta
        ts = [w.abs() + g0["eta"] for w in ws]
        norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(ts, gs)))
        return [w + g0["rho"] * t * t * g / (norm + g0["perturb_eps"]) for w, t, g in zip(ws, ts, gs)]
    norm = torch.sqrt(sum((g ** 2).sum() for g in gs))
    e = [g0["rho"] * g / (norm + g0["perturb_eps"]) for g in gs]
    if isinstance(opt, EBiSAM):  # SWP: coordinate i perturbed iff u_i < beta, scaled by 1/(1-beta)
        seed, step = sd["samkernels"]["seed"], sd["samkernels"]["noise_step"]
        masks = [philox_uniform(seed, step, i, w.numel()).view_as(w) < g0["beta"] for i, w in enumerate(ws)]
        e = [torch.where(mk, ee / (1 - g0["beta"]), torch.zeros_like(ee)) for mk, ee in zip(masks, e)]
    return [w + ee for w, ee in zip(ws, e)]


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.skip(reason="FriendlySAM's ascent is on g - sigma m (tests/"
                                           "test_sam_variants.py)")) if n == "friendlysam" else n
    for n in TWO_PASS])
@pytest.mark.parametrize("api", ["closure", "phases"])
def test_perturbation_comes_from_the_ascent_loss(name, api):
    """closure(ascent) with a different loss in the ascent pass (or, explicit phases, first_step
    after a backward of that loss): the perturbed weights are built from the ascent loss's gradient,
    computed here by hand in float64; and they are not those the training loss would give."""
    spec = SPECS[name]
    model = net()
    x, y = batch(seed=50)
    opt = spec.make(model.parameters(), **(dict(k=1) if spec.cls is LookSAM else {}))
    with samkernels.use_backend("reference"):
        opt.step(closure_for(opt, model, x, y))  # one ordinary step: the state is not the initial one
        sd = copy.deepcopy(opt.state_dict())
        sd["omega"] = weights(model)
        x, y = batch(seed=51)
        if api == "closure":
            seen = []

            def closure(ascent):
                seen.append((ascent, weights(model)))
                opt.zero_grad()
                out = model(x)
                (ascent_loss(out, y) if ascent else F.cross_entropy(out, y)).backward()

            opt.step(closure)
            assert [a for a, _ in seen] == [True, False]
            at_ascent, got = seen[0][1], seen[1][1]
        else:
            opt.zero_grad()  # the closure step leaves the second pass's gradients
            if spec.noisy:
                opt.noise_step()
            at_ascent = weights(model)
            ascent_loss(model(x), y).backward()
            opt.first_step(zero_grad=True)
            got = weights(model)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
    g_ascent = grads_at(model, at_ascent, x, lambda out: ascent_loss(out, y))
    want = expected_perturbed(opt, at_ascent, g_ascent, sd)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    g_train = grads_at(model, at_ascent, x, lambda out: F.cross_entropy(out, y))
    wrong = expected_perturbed(opt, at_ascent, g_train, sd)
    assert any(not torch.allclose(a, b, rtol=1e-6, atol=1e-8) for a, b in zip(got, wrong))


# --- 6. gradient accumulation ----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_gradient_accumulation_equals_one_big_batch(name):
    """k micro-batches accumulated in .grad (loss / k each) before every phase == one batch k times
    as big, over 3 steps (explicit phases, float64, reference backend; same seed, so the same noise
    and E-BiSAM masks).  E-BiSAM runs with gamma = 1: its data selection ranks the examples of one
    batch, so it is only defined per batch (and explicit phases with the whole batch in the second
    pass are gamma = 1 anyway)."""
    spec, k = SPECS[name], 4
    kw = dict(gamma=1.0) if spec.cls is EBiSAM else {}

    def run(accumulate):
        model = net()
        opt = spec.make(model.parameters(), **kw)
        for t in range(3):
            x, y = batch(seed=60 + t)

            def backward(ascent):
                if accumulate:
                    for i in range(k):
                        (loss_of(opt, model(x[i::k]), y[i::k], ascent) / k).backward()
                else:
                    loss_of(opt, model(x), y, ascent).backward()

            with samkernels.use_backend("reference"):
                phases(opt, backward)
        return weights(model), opt.state_dict()

    (wa, sa), (wb, sb) = run(True), run(False)
    for a, b in zip(wa, wb):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    for i in sa["state"]:
        for key, v in sa["state"][i].items():
            torch.testing.assert_close(v, sb["state"][i][key], rtol=1e-12, atol=1e-13)


# --- 7. state_dict ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_key_sets(name):
    """Exactly the persistent state per parameter: no backups, accumulators, Sigma copies or other
    transient buffers; the optimizer-wide extras are the class name and, for the seeded ones, the
    noise seed and counter."""
    spec = SPECS[name]
    model = net()
    opt = spec.make(model.parameters())
    for t in range(2):
        train_step(opt, model, *batch(seed=70 + t))
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "samkernels"}
    assert set(sd["state"]) == set(range(len(list(model.parameters()))))
    for i, st in sd["state"].items():
        assert set(st) == spec.keys, (i, sorted(st))
    extra = {"cls"} | ({"seed", "noise_step"} if "seed" in spec.defaults else set()) | \
        ({"looksam_step"} if spec.cls is LookSAM else set())
    assert set(sd["samkernels"]) == extra
    assert sd["samkernels"]["cls"] == type(opt).__name__


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_exact_resume(name, dtype):
    """3 steps, save (through torch.save), 3 more; a fresh model and optimizer (other weights, other
    seed) load the saved states and run the same 3 steps: bit-identical weights and state.  bf16:
    the float32 state must come back as float32 (torch.optim's load casts to the parameter dtype)."""
    spec = SPECS[name]
    model = net(dtype)
    opt = spec.make(model.parameters())
    for t in range(3):
        train_step(opt, model, *batch(seed=80 + t, dtype=dtype))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for t in range(3, 6):
        train_step(opt, model, *batch(seed=80 + t, dtype=dtype))

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2 = net(dtype, seed=123)
    opt2 = spec.make(model2.parameters(), **(dict(seed=999) if "seed" in spec.defaults else {}))
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for p in model2.parameters():
        for key, v in opt2.state[p].items():
            if torch.is_tensor(v) and v.dim() > 0:
                assert v.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), key
    for t in range(3, 6):
        train_step(opt2, model2, *batch(seed=80 + t, dtype=dtype))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert_state_equal(opt.state_dict(), opt2.state_dict())
