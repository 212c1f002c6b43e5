"""SAM / ASAM / BSAM end to end: trajectories of the fused CPU backend against the reference
backend, the bSAM worked example of docs/spec.md, noise statistics and reproducibility, argument errors,
exception safety, and the posterior API."""

import pytest
import torch
import torch.nn.functional as F

import samkernels
from samkernels import ASAM, BSAM, SAM
from samkernels.optim import MFVI

from conftest import needs_ext
import helpers
from helpers import (Boom, assert_cpu_follows_reference, assert_exception_restores,
                     assert_posterior_api, assert_resume_is_exact, data, mlp)


def train(make_opt, backend, steps=50, dtype=torch.float64, model=None, opt=None):
    return helpers.train(make_opt, backend, steps, dtype, model, opt)


OPTIMIZERS = {
    "sam_sgd": lambda ps: SAM(ps, lr=0.1, rho=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "sam_sgd_damp": lambda ps: SAM(ps, lr=0.1, rho=0.05, momentum=0.9, dampening=0.1),
    "sam_adam": lambda ps: SAM(ps, lr=1e-2, rho=0.05, base="adam", weight_decay=1e-3),
    "sam_adamw": lambda ps: SAM(ps, lr=1e-2, rho=0.05, base="adamw", weight_decay=1e-2),
    "asam": lambda ps: ASAM(ps, lr=0.1, rho=0.5, momentum=0.9),
    "bsam": lambda ps: BSAM(ps, lr=0.1, num_data=32, rho=0.01, weight_decay=1e-3, seed=3),
    "bsam_released": lambda ps: BSAM(ps, lr=0.1, num_data=32, rho=0.01, weight_decay=1e-3, seed=3,
                                     update_order="released"),
}


@needs_ext
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_trajectory_cpu_matches_reference(name):
    m_ref = assert_cpu_follows_reference(OPTIMIZERS[name], train)
    # float32 parameters on the fused path follow the float64 reference closely too
    m32, _, _ = train(OPTIMIZERS[name], "cpu", dtype=torch.float32)
    for a, b in zip(m_ref.parameters(), m32.parameters()):
        torch.testing.assert_close(b.double(), a, rtol=1e-3, atol=1e-4)


BACKENDS = ["reference", pytest.param("cpu", marks=needs_ext), "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nonfinite", ["skip", "unchecked", "skip_on_device"])
@pytest.mark.parametrize("order,want", [("paper", 1 - 0.5 * 0.2442 / 1.0016), ("released", 0.8779)])
def test_bsam_worked_example(backend, nonfinite, order, want):
    """docs/spec.md: L = w^2, omega = 1, s = 1, N = 100, rho = 0.01, z = 0.5, delta = 0.4, lr 0.5.
    ``unchecked`` runs line 5 in the perturbation (non-deferred), the others in the update."""
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = BSAM([w], lr=0.5, num_data=100, rho=0.01, weight_decay=0.4, gamma=0.1, update_order=order,
               nonfinite=nonfinite)
    with samkernels.use_backend(backend):
        opt.noise_step()
        with torch.no_grad():
            w.fill_(1.0 + 0.5 / (100 * 1.0) ** 0.5)  # theta = omega + z sigma with z = 0.5
        (w ** 2).sum().backward()
        assert w.grad.item() == pytest.approx(2.1)
        opt.first_step(zero_grad=True)
        assert w.item() == pytest.approx(1.021, abs=1e-12)  # omega + eps
        (w ** 2).sum().backward()
        opt.second_step()
    st = opt.state[w]
    assert st["momentum_buffer"].item() == pytest.approx(0.2442, abs=1e-12)
    assert st["precision"].item() == pytest.approx(1.0016, abs=1e-12)
    # the two orders differ by 2e-4: the tolerance tells them apart
    assert w.item() == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_bsam_noise_moments(backend):
    p = torch.nn.Parameter(torch.randn(200_000))
    opt = BSAM([p], lr=0.1, num_data=50, seed=11)
    s = torch.rand(200_000) * 4 + 0.25
    opt.state[p]["precision"] = s.clone()
    opt.state[p]["momentum_buffer"] = torch.zeros(200_000)
    omega = p.detach().clone()
    with samkernels.use_backend(backend):
        opt.noise_step()
    z = (p.detach() - omega) * torch.sqrt(50 * s)  # should be N(0, 1)
    assert abs(z.mean().item()) < 0.01
    assert abs(z.var().item() - 1) < 0.015
    opt.restore()
    assert torch.equal(p.detach(), omega)


@needs_ext
def test_bsam_reproducible_from_seed():
    _, _, a = train(lambda ps: BSAM(ps, lr=0.1, num_data=32, seed=5), "cpu", steps=5)
    _, _, b = train(lambda ps: BSAM(ps, lr=0.1, num_data=32, seed=5), "cpu", steps=5)
    _, _, c = train(lambda ps: BSAM(ps, lr=0.1, num_data=32, seed=6), "cpu", steps=5)
    assert a == b and a != c
    torch.manual_seed(123)  # seed=None draws from torch's default generator
    _, _, d = train(lambda ps: BSAM(ps, lr=0.1, num_data=32), "cpu", steps=3)
    torch.manual_seed(123)
    _, _, e = train(lambda ps: BSAM(ps, lr=0.1, num_data=32), "cpu", steps=3)
    assert d == e


@pytest.mark.parametrize("kwargs,match", [
    (dict(rho=-0.1), "rho"), (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(betas=(1.0, 0.9), base="adam"), r"betas\[0\]"), (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (dict(momentum=-0.5), "momentum"), (dict(weight_decay=-1), "weight_decay"),
    (dict(base="lion"), "base"), (dict(nesterov=True), "nesterov"),
    (dict(rho=float("inf")), "rho"), (dict(betas=0.9), "betas"),
])
def test_sam_bad_hyperparameters(kwargs, match):
    kw = dict(lr=0.1)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SAM(mlp().parameters(), **kw)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_data=0), "num_data"), (dict(num_data=-5), "num_data"), (dict(rho=-1e-3), "rho"),
    (dict(lr=-0.1), "lr"), (dict(betas=(0.9, 1.0)), r"betas\[1\]"), (dict(gamma=-1), "gamma"),
    (dict(init_precision=0), "init_precision"), (dict(update_order="jax"), "update_order"),
    (dict(seed=-3), "seed"), (dict(seed="abc"), "seed"),
])
def test_bsam_bad_hyperparameters(kwargs, match):
    kw = dict(lr=0.1, num_data=100)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        BSAM(mlp().parameters(), **kw)


def test_rho_zero_is_valid():
    """docs/spec.md "Zero radius": SAM with rho = 0 is torch.optim.SGD's trajectory; bSAM's second
    pass then runs at the mean itself."""
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    model, _, _ = train(lambda ps: SAM(ps, rho=0.0, **kw), "auto", steps=3)
    plain, _, _ = train(lambda ps: torch.optim.SGD(ps, **kw), "auto", steps=3)
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    w = torch.nn.Parameter(torch.tensor([0.7, -1.3], dtype=torch.float64))
    bsam = BSAM([w], lr=0.1, num_data=10, rho=0.0)
    bsam.noise_step()
    (w ** 2).sum().backward()
    bsam.first_step(zero_grad=True)
    assert torch.equal(w.detach(), torch.tensor([0.7, -1.3], dtype=torch.float64))


@pytest.mark.parametrize("make", [lambda ps: SAM(ps, lr=0.1), lambda ps: BSAM(ps, lr=0.1, num_data=4)])
def test_sparse_gradient_is_rejected(make):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = make(emb.parameters())

    def closure():
        opt.zero_grad()
        loss = emb(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*sparse"):
        opt.step(closure)
    assert torch.equal(emb.weight.detach(), before)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("name", ["sam_sgd", "sam_adam", "asam", "bsam"])
@pytest.mark.parametrize("fail_at", [1, 2])
def test_exception_in_a_pass_restores_the_weights(backend, name, fail_at):
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    x, y = data()
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if len(calls) % 2 == fail_at % 2 and len(calls) > 2:
            raise Boom("out of memory (simulated)")
        return loss

    # The optimizer state is untouched too (default nonfinite="skip": bSAM's line 5 waits for the
    # update, Adam's step count is taken at the update), and so is bSAM's noise counter.
    assert_exception_restores(opt, model, closure, backend)


@needs_ext
def test_multi_group_norm_spans_all_groups():
    """Two groups must perturb exactly like one group holding the same parameters."""
    def run(groups):
        model = mlp()
        ps = list(model.parameters())
        opt = SAM([{"params": ps[:2]}, {"params": ps[2:]}] if groups else ps, lr=0.1, rho=0.3)
        x, y = data()
        F.cross_entropy(model(x), y).backward()
        norm = opt.first_step()
        return norm, [p.detach().clone() for p in ps]

    n1, p1 = run(False)
    n2, p2 = run(True)
    torch.testing.assert_close(n2.double(), n1.double())
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_resume_is_exact(name):
    ck = assert_resume_is_exact(OPTIMIZERS[name], train)
    assert all("backup" not in k for st in ck["opt"]["state"].values() for k in st)


def test_load_state_dict_from_other_class_or_shape_fails():
    model = mlp()
    sam = SAM(model.parameters(), lr=0.1, momentum=0.9)
    x, y = data()
    sam.step(lambda: (sam.zero_grad(), F.cross_entropy(model(x), y).backward())[0] or torch.zeros(()))
    with pytest.raises(ValueError, match="saved by SAM"):
        BSAM(model.parameters(), lr=0.1, num_data=10).load_state_dict(sam.state_dict())
    other = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match="elements"):
        SAM(other.parameters(), lr=0.1, momentum=0.9).load_state_dict(sam.state_dict())


@needs_ext
@pytest.mark.parametrize("cls,key", [(BSAM, "precision"), (MFVI, "variance")])
def test_bf16_parameters_keep_fp32_state(cls, key):
    model = mlp(torch.bfloat16)
    opt = cls(model.parameters(), lr=0.05, num_data=32, seed=0)
    x, y = data(torch.bfloat16)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        assert opt.state[p][key].dtype == torch.float32
    sd = opt.state_dict()
    opt2 = cls(model.parameters(), lr=0.05, num_data=32)
    opt2.load_state_dict(sd)
    for p in model.parameters():
        assert opt2.state[p][key].dtype == torch.float32
        assert torch.equal(opt2.state[p][key], opt.state[p][key])


def test_posterior_api():
    model, opt, _ = train(OPTIMIZERS["bsam"], "auto", steps=3)
    var = opt.posterior_variance()
    for v, p in zip(var, model.parameters()):
        torch.testing.assert_close(v, 1.0 / (32 * opt.state[p]["precision"]))
    assert_posterior_api(model, opt, samples=4)


def test_predictive_averages_softmax_over_posterior_samples():
    """predictive(k) is the mean of k softmaxes, each at one sample of sampled_params drawn from
    the same generator stream, and differs from the softmax at the mean weights."""
    model, opt, _ = train(OPTIMIZERS["bsam"], "auto", steps=3)
    x, _ = data()
    probs = opt.predictive(model, x, samples=5, generator=torch.Generator().manual_seed(11))
    gen = torch.Generator().manual_seed(11)
    model.eval()
    with torch.no_grad():
        by_hand = []
        for _ in range(5):
            with opt.sampled_params(gen):
                by_hand.append(torch.softmax(model(x).float(), -1))
        at_mean = torch.softmax(model(x).float(), -1)
    total = by_hand[0]
    for q in by_hand[1:]:
        total = total + q
    assert torch.equal(probs, total / 5)
    assert not torch.allclose(probs, at_mean, atol=1e-4)  # the samples are not the mean
    assert not torch.allclose(by_hand[0], by_hand[1], atol=1e-6)  # each sample is a new draw


def test_sampled_params_have_the_posterior_scale():
    """theta - omega ~ N(0, 1/(N s)) elementwise: standardised by the posterior sd it has mean 0 and
    variance 1 (checked over ~40k weights), and an int seed or a Generator reproduce a sample."""
    model = torch.nn.Linear(200, 200)
    opt = BSAM(model.parameters(), lr=0.1, num_data=50, rho=0.01, init_precision=1.0, seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-uniform precision, so the scale is checked per element
        for p in model.parameters():
            opt._state(p, opt.param_groups[0])["precision"].copy_(
                torch.rand(p.shape, generator=gen) * 4 + 0.5)
    mean = [p.detach().clone() for p in model.parameters()]
    sd = [v.sqrt() for v in opt.posterior_variance()]
    with opt.sampled_params(generator=5):
        z = torch.cat([((p - m) / s).flatten() for p, m, s in zip(model.parameters(), mean, sd)])
        first = [p.detach().clone() for p in model.parameters()]
    assert abs(z.mean().item()) < 0.03 and abs(z.var().item() - 1) < 0.03
    with opt.sampled_params(generator=5):
        assert all(torch.equal(p, f) for p, f in zip(model.parameters(), first))
    with opt.sampled_params(generator=torch.Generator().manual_seed(9)):
        a = [p.detach().clone() for p in model.parameters()]
    with opt.sampled_params(generator=torch.Generator().manual_seed(9)):
        assert all(torch.equal(p, t) for p, t in zip(model.parameters(), a))
    assert all(torch.equal(p.detach(), m) for p, m in zip(model.parameters(), mean))


def test_bsam_seed_from_a_generator_is_reproducible():
    def run(seed):
        torch.manual_seed(0)
        model = mlp()
        opt = BSAM(model.parameters(), lr=0.1, num_data=32, rho=0.01, seed=seed)
        x, y = data()
        for _ in range(3):
            opt.step(helpers.closure_for(opt, model, x, y))
        return [p.detach().clone() for p in model.parameters()]

    a = run(torch.Generator().manual_seed(4))
    b = run(torch.Generator().manual_seed(4))
    c = run(torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_step_without_closure_explains():
    with pytest.raises(RuntimeError, match="closure"):
        SAM(mlp().parameters(), lr=0.1).step()
    with pytest.raises(RuntimeError, match="closure"):
        BSAM(mlp().parameters(), lr=0.1, num_data=3).step()
