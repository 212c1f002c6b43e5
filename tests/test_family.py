"""RandomSAM, MFVI, VariationalSAM, BiSAM / A-BiSAM and E-BiSAM end to end: trajectories of the
fused CPU backend against the reference backend, the update rules against autograd, argument
errors, exception safety, state_dict resume, E-BiSAM's mask and data selection, the posterior API."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

import samkernels
from samkernels.ops import reference as ref
from samkernels.ops.bisam_loss import bisam_loss
from samkernels.optim.bisam import BiSAM, EBiSAM
from samkernels.optim.mfvi import MFVI
from samkernels.optim.random_sam import RandomSAM
from samkernels.optim.vsam import VariationalSAM

from conftest import needs_ext
import helpers
from helpers import mlp

N = 32


def data(dtype=torch.float64, n=N, seed=1):
    return helpers.data(dtype, n, seed)


def make_closure(opt, model, x, y):
    if isinstance(opt, BiSAM):
        return opt.closure(model, x, y)  # Q on the ascent pass, cross-entropy on the other

    def closure(ascent):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    return closure


def train(make_opt, backend, steps=30, dtype=torch.float64, model=None, opt=None):
    model = mlp(dtype) if model is None else model
    opt = make_opt(model.parameters()) if opt is None else opt
    x, y = data(dtype)
    losses = []
    with samkernels.use_backend(backend):
        for _ in range(steps):
            losses.append(opt.step(make_closure(opt, model, x, y)).item())
    return model, opt, losses


OPTIMIZERS = {
    "randomsam": lambda ps: RandomSAM(ps, lr=0.1, sigma=0.05, momentum=0.9, weight_decay=5e-4, seed=3),
    "randomsam_rho_adamw": lambda ps: RandomSAM(ps, lr=1e-2, rho=0.5, base="adamw", weight_decay=1e-2,
                                                seed=4),
    "mfvi": lambda ps: MFVI(ps, lr=0.1, num_data=N, rho=0.5, var_lr=0.05, seed=3),
    "mfvi_momentum": lambda ps: MFVI(ps, lr=0.05, num_data=N, init_var=1e-3, momentum=0.9,
                                     prior_var=0.5, seed=5),
    "vsam": lambda ps: VariationalSAM(ps, lr=0.1, num_data=N, rho=0.05, momentum=0.9),
    "vsam_linear_adam": lambda ps: VariationalSAM(ps, lr=1e-2, num_data=N, rho=0.05, base="adam",
                                                  var_step="linear", var_lr=1e-6),
    "bisam": lambda ps: BiSAM(ps, lr=0.1, rho=0.05, momentum=0.9, weight_decay=5e-4),
    "bisam_tanh_adaptive": lambda ps: BiSAM(ps, lr=0.1, rho=0.5, phi="tanh", adaptive=True,
                                            momentum=0.9),
    "ebisam": lambda ps: EBiSAM(ps, lr=0.1, rho=0.05, momentum=0.9, seed=3),
    "ebisam_raw": lambda ps: EBiSAM(ps, lr=0.1, rho=0.05, normalize=False, beta=0.3, gamma=0.75,
                                    seed=3),
}
ONE_PASS = ("randomsam", "mfvi")


@needs_ext
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_trajectory_cpu_matches_reference(name):
    m_ref, _, l_ref = train(OPTIMIZERS[name], "reference")
    m_cpu, _, l_cpu = train(OPTIMIZERS[name], "cpu")
    assert l_ref[-1] < l_ref[0]  # it trains
    for a, b in zip(m_ref.parameters(), m_cpu.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


# --- the update rules against autograd --------------------------------------------------------
def quad_loss(theta, a, c):
    return 0.5 * (a * theta * theta).sum() + (c * theta).sum()


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_mfvi_step_is_the_reparametrised_gradient(backend):
    """Alg. 2 with u = log Sigma: the step equals autograd of L(mu + e^{u/2} z) + KL/N (eq. 39)."""
    torch.manual_seed(0)
    n, nd, pv, lr, vlr = 41, 7.0, 0.3, 0.1, 0.2
    a, c = torch.rand(n, dtype=torch.float64) + 0.5, torch.randn(n, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(n, dtype=torch.float64))
    opt = MFVI([w], lr=lr, num_data=nd, init_var=0.05, var_lr=vlr, prior_var=pv, seed=9)
    mu0 = w.detach().clone()
    with samkernels.use_backend(backend):
        opt.noise_step()
        z = (w.detach() - mu0) / math.sqrt(0.05)
        quad_loss(w, a, c).backward()
        opt.second_step()
    mu = mu0.clone().requires_grad_()
    u = torch.full((n,), math.log(0.05), dtype=torch.float64, requires_grad=True)
    v = u.exp()
    kl = 0.5 * (v / pv - u + mu * mu / pv - 1 + math.log(pv)).sum()
    (quad_loss(mu + (u / 2).exp() * z, a, c) + kl / nd).backward()
    torch.testing.assert_close(w.detach(), mu.detach() - lr * mu.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.state[w]["variance"], (u - vlr * u.grad).exp().detach(),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("var_step", ["log", "linear"])
def test_vsam_perturbation_and_sigma_step(backend, var_step):
    """eq. 2 for e, and the Sigma step of eq. 42 (autograd, g fixed) in both modes."""
    torch.manual_seed(1)
    n, nd, pv, vlr, rho = 23, 5.0, 2.0, 1e-4, 0.3
    w = torch.nn.Parameter(torch.randn(n, dtype=torch.float64))
    opt = VariationalSAM([w], lr=0.1, num_data=nd, rho=rho, var_lr=vlr, prior_var=pv,
                         var_step=var_step, perturb_eps=1e-300)
    a, c = torch.rand(n, dtype=torch.float64) + 0.5, torch.randn(n, dtype=torch.float64)
    with samkernels.use_backend(backend):
        opt.step(lambda: (opt.zero_grad(), quad_loss(w, a, c).backward())[0])  # a first step
        mu, v0 = w.detach().clone(), opt.state[w]["variance"].clone()
        quad_loss(w, a, c).backward()
        g = w.grad.detach().clone()
        opt.first_step()
    e = math.sqrt(n) * v0 * g / (v0 * g * g).sum().sqrt()
    torch.testing.assert_close(w.detach(), mu + e, rtol=1e-12, atol=1e-14)
    u = v0.log().requires_grad_()
    v = u.exp()
    obj = math.sqrt(n) * (v * g * g).sum().sqrt() + v.sum() / (2 * nd * pv) - u.sum() / (2 * nd)
    obj.backward()
    if var_step == "log":
        want = (u - vlr * u.grad).exp()
    else:  # dL/dSigma = dL/du / Sigma
        want = (v0 - vlr * u.grad / v0).clamp(min=1e-12)
    torch.testing.assert_close(opt.state[w]["variance"], want.detach(), rtol=1e-12, atol=1e-15)
    opt.restore()


@pytest.mark.parametrize("phi", ["neglog", "tanh"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_bisam_perturbation_uses_the_ascent_loss(phi, adaptive):
    """Alg. 1 line 4 (e = rho dQ/||dQ||) and Alg. 2 line 4 (e = rho T^2 dQ / ||T dQ||, T = |w|)."""
    model = mlp()
    x, y = data()
    rho = 0.5 if adaptive else 0.05
    opt = BiSAM(model.parameters(), lr=0.1, rho=rho, phi=phi, adaptive=adaptive)
    ps = list(model.parameters())
    w0 = [p.detach().clone() for p in ps]
    gq = torch.autograd.grad(bisam_loss(model(x), y, phi=phi), ps)
    opt.ascent_loss(model(x), y).backward()
    for p, g in zip(ps, gq):
        torch.testing.assert_close(p.grad, g)
    opt.first_step(zero_grad=True)
    t = [w.abs() if adaptive else torch.ones_like(w) for w in w0]
    norm = torch.sqrt(sum(((ti * g) ** 2).sum() for ti, g in zip(t, gq)))
    for p, w, ti, g in zip(ps, w0, t, gq):
        torch.testing.assert_close(p.detach(), w + rho * ti * ti * g / norm, rtol=1e-9, atol=1e-12)  # eps 1e-12


def test_bisam_step_forms_agree():
    """step(model=...), step(opt.closure(...)) and the explicit phases are the same step."""
    outs = []
    for form in range(3):
        model = mlp()
        x, y = data()
        opt = BiSAM(model.parameters(), lr=0.1, momentum=0.9, phi="tanh")
        for _ in range(3):
            if form == 0:
                opt.step(model=model, inputs=x, target=y)
            elif form == 1:
                opt.step(opt.closure(model, x, y, F.cross_entropy))
            else:
                opt.ascent_loss(model(x), y).backward()
                opt.first_step(zero_grad=True)
                F.cross_entropy(model(x), y).backward()
                opt.second_step(zero_grad=True)
        outs.append([p.detach().clone() for p in model.parameters()])
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass flag"):
        opt.step(lambda: torch.zeros(()))
    with pytest.raises(ValueError, match="inputs"):
        opt.step(model=model, target=y)


# --- E-BiSAM ---------------------------------------------------------------------------------
def test_ebisam_selection_hand_made():
    opt = EBiSAM(mlp().parameters(), lr=0.1, gamma=0.5, seed=0)
    before = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    after = torch.tensor([5.0, 1.0, 2.5, 3.0, 10.0, 4.0])  # rises 5, 0, .5, 0, 6, -1
    assert opt.select(before, after).tolist() == [0, 2, 4]
    assert opt.select(before, after, gamma=1 / 6).tolist() == [4]
    assert opt.select(before, after, gamma=1.0).tolist() == list(range(6))
    ten = torch.arange(10.0)
    assert opt.select(torch.zeros(10), ten, gamma=0.3).tolist() == [7, 8, 9]  # 0.3*10 keeps 3
    with pytest.raises(ValueError, match="gamma"):
        opt.select(before, after, gamma=0.0)
    with pytest.raises(ValueError, match="q_before"):
        opt.select(before, after[:3])


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_ebisam_mask_and_scale(backend):
    """Alg. 3 lines 3-7: about beta of the coordinates move, each by rho/(1-beta) g/||g||."""
    lin = torch.nn.Linear(100, 60).double()
    beta, rho = 0.3, 0.05
    opt = EBiSAM(lin.parameters(), lr=0.1, rho=rho, beta=beta, seed=7)
    w0 = [p.detach().clone() for p in lin.parameters()]
    for p in lin.parameters():
        p.grad = torch.randn_like(p) + 0.1  # never zero
    gs = [p.grad.clone() for p in lin.parameters()]
    norm = torch.sqrt(sum((g * g).sum() for g in gs))
    with samkernels.use_backend(backend):
        opt.first_step()
    moved = total = 0
    for p, w, g in zip(lin.parameters(), w0, gs):
        m = p.detach() != w
        moved, total = moved + m.sum().item(), total + m.numel()
        full = w + rho / (1 - beta) * g / norm
        torch.testing.assert_close(p.detach()[m], full[m], rtol=1e-12, atol=1e-14)
    assert abs(moved / total - beta) < 0.03
    opt.restore()
    assert all(torch.equal(p.detach(), w) for p, w in zip(lin.parameters(), w0))


def test_ebisam_closure_trains_on_the_selected_examples():
    model = mlp()
    x, y = data()
    opt = EBiSAM(model.parameters(), lr=0.1, gamma=0.25, seed=1)
    closure = opt.closure(model, x, y)
    q0 = bisam_loss(model(x), y, reduction="none").detach()
    closure(True)
    opt.first_step(zero_grad=True)
    closure(False)
    got = [p.grad.clone() for p in model.parameters()]
    keep = opt.select(q0, bisam_loss(model(x), y, reduction="none").detach())
    assert keep.numel() == 8
    want = torch.autograd.grad(F.cross_entropy(model(x[keep]), y[keep]), list(model.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    opt.second_step()


# --- fixed-point checks ------------------------------------------------------------------------
def sgd_trajectory(steps=10):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = data()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.mark.parametrize("make", [
    lambda ps: RandomSAM(ps, lr=0.1, sigma=0.0, momentum=0.9, weight_decay=5e-4),
    lambda ps: VariationalSAM(ps, lr=0.1, num_data=N, rho=0.0, momentum=0.9, weight_decay=5e-4),
])
def test_zero_perturbation_is_the_base_optimizer(make):
    want = sgd_trajectory()
    got, _, _ = train(make, "auto", steps=10)
    for a, b in zip(want.parameters(), got.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_randomsam_noise_is_the_philox_counter(backend):
    model = mlp()
    opt = RandomSAM(model.parameters(), lr=0.1, rho=0.2, seed=12345)
    p_count = sum(p.numel() for p in model.parameters())
    sigma0 = 0.2 / math.sqrt(p_count)
    w0 = [p.detach().clone() for p in model.parameters()]
    with samkernels.use_backend(backend):
        opt.noise_step()
    for i, (p, w) in enumerate(zip(model.parameters(), w0)):
        z = ref.philox_normal(12345, 0, i, p.numel()).view(p.shape)
        torch.testing.assert_close(p.detach(), w + sigma0 * z, rtol=1e-12, atol=1e-15)
    opt.restore()


@needs_ext
@pytest.mark.parametrize("name", ["vsam", "ebisam"])
def test_multi_group_reduction_spans_all_groups(name):
    def run(groups):
        model = mlp()
        ps = list(model.parameters())
        opt = OPTIMIZERS[name]([{"params": ps[:2]}, {"params": ps[2:]}] if groups else ps)
        x, y = data()
        make_closure(opt, model, x, y)(True)
        opt.first_step()
        return [p.detach().clone() for p in ps]

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# --- arguments -----------------------------------------------------------------------------------
@pytest.mark.parametrize("make,kwargs,match", [
    (RandomSAM, dict(sigma=-1.0), "sigma"), (RandomSAM, dict(rho=-0.1), "rho"),
    (RandomSAM, dict(sigma=0.1, rho=0.1), "sigma or rho"), (RandomSAM, dict(lr=-1.0), "lr"),
    (RandomSAM, dict(base="lion"), "base"), (RandomSAM, dict(betas=(1.0, 0.9)), r"betas\[0\]"),
    (RandomSAM, dict(seed=-2), "seed"), (RandomSAM, dict(nesterov=True), "nesterov"),
    (MFVI, dict(num_data=0), "num_data"), (MFVI, dict(rho=0.0), "rho"),
    (MFVI, dict(init_var=-1.0), "init_var"), (MFVI, dict(var_lr=float("nan")), "var_lr"),
    (MFVI, dict(prior_var=0), "prior_var"), (MFVI, dict(momentum=1.0), "momentum"),
    (VariationalSAM, dict(num_data=-3), "num_data"), (VariationalSAM, dict(rho=-0.05), "rho"),
    (VariationalSAM, dict(var_step="exp"), "var_step"),
    (VariationalSAM, dict(var_step="linear", rho=0.0), "rho"),
    (VariationalSAM, dict(var_lr=-0.01), "var_lr"), (VariationalSAM, dict(min_var=0), "min_var"),
    (VariationalSAM, dict(weight_decay=-1), "weight_decay"),
    (VariationalSAM, dict(prior_var=float("inf")), "prior_var"),
    (VariationalSAM, dict(perturb_eps=0.0), "perturb_eps"), (MFVI, dict(nonfinite="zero"), "nonfinite"),
    (BiSAM, dict(phi="relu"), "phi"), (BiSAM, dict(mu=0), "mu"), (BiSAM, dict(alpha=-1), "alpha"),
    (BiSAM, dict(rho=-1), "rho"), (BiSAM, dict(base="rmsprop"), "base"),
    (EBiSAM, dict(beta=1.0), "beta"), (EBiSAM, dict(gamma=0.0), "gamma"),
    (EBiSAM, dict(gamma=1.5), "gamma"), (EBiSAM, dict(adaptive=True), "adaptive"),
])
def test_bad_hyperparameters(make, kwargs, match):
    kw = dict(lr=0.1)
    if make in (MFVI, VariationalSAM):
        kw["num_data"] = 10
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make(mlp().parameters(), **kw)


def test_step_without_closure_explains():
    for make in (lambda ps: RandomSAM(ps, lr=0.1), lambda ps: MFVI(ps, lr=0.1, num_data=3),
                 lambda ps: VariationalSAM(ps, lr=0.1, num_data=3), lambda ps: BiSAM(ps, lr=0.1)):
        with pytest.raises(RuntimeError, match="closure"):
            make(mlp().parameters()).step()


# --- exception safety and resume ------------------------------------------------------------------
class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("name,fail_at", [(n, f) for n in OPTIMIZERS for f in (1, 2)
                                          if f == 1 or not n.startswith(ONE_PASS)])
def test_exception_in_a_pass_restores_the_weights(backend, name, fail_at):
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    x, y = data()
    inner = make_closure(opt, model, x, y)
    calls = []

    def closure(ascent):
        calls.append(ascent)
        out = inner(ascent)
        if len(calls) > 2 and ascent == (fail_at == 1):
            raise Boom("out of memory (simulated)")
        return out

    with samkernels.use_backend(backend):
        opt.step(closure)
        if name.startswith(ONE_PASS):  # one pass per step: two clean steps
            opt.step(closure)
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(Boom):
            opt.step(closure)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not opt.is_perturbed


@pytest.mark.parametrize("name,fail_at", [(n, f) for n in OPTIMIZERS for f in (1, 2)
                                          if f == 1 or not n.startswith(ONE_PASS)])
def test_nonfinite_pass_skips_the_whole_step(name, fail_at):
    """nonfinite="skip": weights, state and noise counter stay as they were, so the next clean
    step is the step an uninterrupted run takes."""
    model, opt, _ = train(OPTIMIZERS[name], "auto", steps=2)
    x, y = data()
    inner = make_closure(opt, model, x, y)
    calls = []

    def poisoned(ascent):
        calls.append(ascent)
        out = inner(ascent)
        if len(calls) == fail_at:
            next(model.parameters()).grad[0, 0] = float("nan")
        return out

    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    opt.step(poisoned)
    assert opt.step_skipped and not opt.is_perturbed
    after = (model.state_dict(), opt.state_dict())
    for k, v in before[0].items():
        assert torch.equal(after[0][k], v), k
    assert after[1]["samkernels"] == before[1]["samkernels"]
    for i, st in before[1]["state"].items():
        for k, v in st.items():
            assert torch.equal(after[1]["state"][i][k], v), (i, k)
    _, _, straight = train(OPTIMIZERS[name], "auto", steps=3)
    _, _, resumed = train(None, "auto", steps=1, model=model, opt=opt)
    assert resumed == straight[2:]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_resume_is_exact(name):
    make = OPTIMIZERS[name]
    model, opt, _ = train(make, "auto", steps=3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    m_straight, _, straight = train(make, "auto", steps=6)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    model2 = mlp(seed=5)
    model2.load_state_dict(ck["model"])
    opt2 = make(model2.parameters())
    opt2.load_state_dict(ck["opt"])
    _, _, resumed = train(make, "auto", steps=3, model=model2, opt=opt2)
    assert resumed == straight[3:]
    for a, b in zip(m_straight.parameters(), model2.parameters()):
        assert torch.equal(a, b)


# --- posterior ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mfvi", "mfvi_momentum", "vsam", "vsam_linear_adam"])
def test_posterior_variance_positive_and_api(name):
    model, opt, _ = train(OPTIMIZERS[name], "auto", steps=10)
    var = opt.posterior_variance()
    assert len(var) == 4 and all(v is not None and (v > 0).all() and torch.isfinite(v).all()
                                 for v in var)
    mean = [p.detach().clone() for p in model.parameters()]
    with opt.sampled_params(generator=0):
        sample = [p.detach().clone() for p in model.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(sample, mean))
    assert all(torch.equal(p.detach(), m) for p, m in zip(model.parameters(), mean))
    x, _ = data()
    probs = opt.predictive(model, x, samples=3, generator=1)
    assert probs.shape == (N, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(N, dtype=probs.dtype))
    assert torch.equal(probs, opt.predictive(model, x, samples=3, generator=1))
    with pytest.raises(ValueError, match="samples"):
        opt.predictive(model, x, samples=0)


@needs_ext
def test_bf16_parameters_keep_fp32_variance():
    model = mlp(torch.bfloat16)
    opt = MFVI(model.parameters(), lr=0.05, num_data=N, seed=0)
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
        assert opt.state[p]["variance"].dtype == torch.float32


@pytest.mark.parametrize("make", [lambda ps: BiSAM(ps, lr=0.1, momentum=0.9),
                                  lambda ps: EBiSAM(ps, lr=0.1, momentum=0.9, seed=2)])
def test_built_closure_with_m_sharpness(make):
    """step(model=..., m=2) is step(opt.closure(..., m=2), m=2); E-BiSAM draws one mask per
    micro-batch; a closure built for m=1 refuses micro-batch indices."""
    outs = []
    for form in range(2):
        model = mlp()
        x, y = data()
        opt = make(model.parameters())
        for _ in range(2):
            if form == 0:
                opt.step(model=model, inputs=x, target=y, m=2)
            else:
                opt.step(opt.closure(model, x, y, m=2), m=2)
        outs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    if isinstance(opt, EBiSAM):
        assert opt.state_dict()["samkernels"]["noise_step"] == 4
    with pytest.raises(ValueError, match="built for m=1"):
        opt.step(opt.closure(model, x, y), m=2)
    assert not opt.is_perturbed
