"""Mixed precision and non-finite gradients: bf16 parameters, autocast, GradScaler, and the
``nonfinite`` policy.  A step with inf/NaN gradients in either pass must leave the weights and the
whole optimizer state (momentum, Adam moments and step, bSAM precision, noise counter) bit for bit
as they were."""
import copy

import pytest
import torch
import torch.nn.functional as F

from samkernels import ASAM, BSAM, SAM
from samkernels.optim._base import NonFiniteGradientError  # proposed export: samkernels.optim

MAKERS = {
    "sam_sgd": lambda ps, **kw: SAM(ps, lr=0.1, rho=0.05, momentum=0.9, weight_decay=1e-3, **kw),
    "sam_adam": lambda ps, **kw: SAM(ps, lr=1e-2, rho=0.05, base="adam", **kw),
    "asam": lambda ps, **kw: ASAM(ps, lr=0.1, momentum=0.9, **kw),
    "bsam": lambda ps, **kw: BSAM(ps, lr=0.1, num_data=32, rho=0.01, weight_decay=1e-3, seed=4, **kw),
}

needs_cpu_scaler = pytest.mark.skipif(
    not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler"),
    reason="torch.amp.GradScaler('cpu') needs torch >= 2.3")


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3)).to(dtype)


def data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g).to(dtype), torch.randint(0, 3, (32,), generator=g)


class Run:
    """A model, an optimizer, a closure that can poison one pass of one step with inf or NaN."""

    def __init__(self, name, dtype=torch.float32, scaler=None, autocast=False, **kw):
        self.model = mlp(dtype)
        self.opt = MAKERS[name](self.model.parameters(), **kw)
        self.x, self.y = data(dtype)
        self.scaler, self.autocast = scaler, autocast
        self.poison = None  # (pass, value): pass True = the ascent pass
        self.calls = []

    def closure(self, ascent):
        self.calls.append(ascent)
        self.opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = F.cross_entropy(self.model(self.x).float(), self.y)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.poison is not None and self.poison[0] == ascent:
            self.model[2].weight.grad[1, 3] = self.poison[1]
        return loss

    def step(self, poison=None):
        self.poison = poison
        loss = self.opt.step(self.closure, scaler=self.scaler)
        if self.scaler is not None:
            self.scaler.update()
        self.poison = None
        return loss

    def snapshot(self):
        return ([p.detach().clone() for p in self.model.parameters()],
                copy.deepcopy(self.opt.state_dict()))


def assert_same(before, after):
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    sa, sb = before[1], after[1]
    assert sa["samkernels"] == sb["samkernels"]  # noise seed and counter included
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            assert torch.equal(sb["state"][k][name], v), (k, name)


@pytest.mark.parametrize("name", list(MAKERS))
def test_bf16_parameters_train_with_fp32_state(name):
    run = Run(name, dtype=torch.bfloat16)
    losses = [run.step().item() for _ in range(8)]
    assert losses[-1] < losses[0]
    for p in run.model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        for k, v in run.opt.state[p].items():
            if torch.is_tensor(v) and v.dim() > 0:
                assert v.dtype == torch.float32, k


@pytest.mark.parametrize("name", ["sam_sgd", "bsam"])
def test_autocast_bf16_follows_fp32(name):
    """fp32 master weights, bf16 forward: the trajectory stays near the fp32 one."""
    ref, amp = Run(name), Run(name, autocast=True)
    for _ in range(10):
        ref.step()
        amp.step()
    for p, q in zip(ref.model.parameters(), amp.model.parameters()):
        assert q.dtype == torch.float32 and torch.isfinite(q).all()
        torch.testing.assert_close(q, p, rtol=0.05, atol=0.02)


# exactness of the scaler on finite steps, for every optimizer configuration:
# test_family_ergonomics.py::test_grad_scaler_is_exact_on_finite_steps


@needs_cpu_scaler
@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("ascent", [True, False], ids=["pass1", "pass2"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_grad_scaler_skips_a_nonfinite_step(name, ascent, bad):
    run = Run(name, scaler=torch.amp.GradScaler("cpu"))
    run.step()
    run.step()  # momentum / moments / precision exist
    before, scale = run.snapshot(), run.scaler.get_scale()
    run.calls.clear()
    run.step(poison=(ascent, bad))
    assert run.opt.step_skipped and not run.opt.is_perturbed
    assert run.calls == ([True] if ascent else [True, False])  # no second pass after a bad first
    assert_same(before, run.snapshot())
    assert run.scaler.get_scale() == scale / 2
    run.step()  # training goes on, and the scaler's bookkeeping accepts the next step
    assert not run.opt.step_skipped
    assert any(not torch.equal(a, b) for a, b in zip(before[0], run.model.parameters()))


@needs_cpu_scaler
@pytest.mark.parametrize("name", ["sam_sgd", "bsam"])
def test_grad_scaler_with_explicit_phases_and_m_sharpness(name):
    """scaler= on both phases equals step(closure, scaler=); m-sharpness with a scaler equals it
    without one."""
    a, b = Run(name, scaler=torch.amp.GradScaler("cpu")), Run(name, scaler=torch.amp.GradScaler("cpu"))
    for _ in range(3):
        a.step()
        if isinstance(b.opt, BSAM):
            b.opt.noise_step()
        b.closure(True)
        b.opt.first_step(zero_grad=True, scaler=b.scaler)
        b.closure(False)
        b.opt.second_step(zero_grad=True, scaler=b.scaler)
        b.scaler.update()
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)

    def micro(run):
        def closure(i, ascent):
            run.opt.zero_grad()
            loss = F.cross_entropy(run.model(run.x[i::2]), run.y[i::2])
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
            return loss
        for _ in range(3):
            run.opt.step(closure, m=2, scaler=run.scaler)
            if run.scaler is not None:
                run.scaler.update()
        return [p.detach() for p in run.model.parameters()]

    for p, q in zip(micro(Run(name)), micro(Run(name, scaler=torch.amp.GradScaler("cpu")))):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("ascent", [True, False], ids=["pass1", "pass2"])
def test_default_policy_skips_without_a_scaler(name, ascent):
    run = Run(name)
    run.step()
    before = run.snapshot()
    run.step(poison=(ascent, float("nan")))
    assert run.opt.step_skipped
    assert_same(before, run.snapshot())
    run.step()
    assert not run.opt.step_skipped


@pytest.mark.parametrize("name", ["sam_sgd", "bsam"])
def test_skip_in_explicit_phases(name):
    """A bad first pass leaves the weights at the mean; second_step then only finishes the skip."""
    run = Run(name)
    run.step()
    before = run.snapshot()
    if isinstance(run.opt, BSAM):
        run.opt.noise_step()
    run.poison = (True, float("inf"))
    run.closure(True)
    run.opt.first_step(zero_grad=True)
    assert run.opt.skip_pending and not run.opt.is_perturbed
    for a, b in zip(before[0], run.model.parameters()):
        assert torch.equal(a, b)
    run.closure(False)  # the second pass a loop may still run: harmless
    run.opt.second_step(zero_grad=True)
    assert run.opt.step_skipped and not run.opt.skip_pending
    assert_same(before, run.snapshot())


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("ascent", [True, False], ids=["pass1", "pass2"])
def test_nonfinite_raise(name, ascent):
    run = Run(name, nonfinite="raise")
    run.step()
    before = run.snapshot()
    with pytest.raises(NonFiniteGradientError,
                       match=r"inf/NaN gradients in param_groups\[0\]\['params'\]\[2\].*mean"):
        run.step(poison=(ascent, float("inf")))
    assert not run.opt.is_perturbed
    assert_same(before, run.snapshot())


def test_unchecked_policy_and_bad_policy_name():
    run = Run("sam_sgd", nonfinite="unchecked")
    run.step(poison=(False, float("nan")))  # documented opt-out: nothing looks at the gradients
    assert torch.isnan(run.model[2].weight).any() and not run.opt.step_skipped
    with pytest.raises(ValueError, match="nonfinite"):
        SAM(mlp().parameters(), lr=0.1, nonfinite="ignore")
    with pytest.raises(ValueError, match="perturb_eps"):
        SAM(mlp().parameters(), lr=0.1, perturb_eps=0.0)


@pytest.mark.parametrize("name", list(MAKERS))
def test_zero_gradients_give_no_nan(name):
    model = mlp()
    opt = MAKERS[name](model.parameters())
    w0 = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        (model(data()[0]).sum() * 0.0).backward()  # ||g|| = 0
        return torch.zeros(())

    for _ in range(3):
        opt.step(closure)
    assert not opt.step_skipped
    for p, w in zip(model.parameters(), w0):
        assert torch.isfinite(p).all()
        if name == "sam_adam":  # zero gradient: Adam does not move
            assert torch.equal(p, w)
