"""RandomSAM, MFVI, VariationalSAM, BiSAM / A-BiSAM and E-BiSAM end to end: trajectories of the
fused CPU backend against the reference backend, the update rules against autograd, argument
errors, exception safety, state_dict resume, E-BiSAM's mask and data selection, the posterior API."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import samkernels
from samkernels.ops import reference as ref
from samkernels.ops.bisam_loss import bisam_loss, bisam_loss_reference
from samkernels.optim.bisam import BiSAM, EBiSAM
from samkernels.optim.mfvi import MFVI
from samkernels.optim.random_sam import RandomSAM
from samkernels.optim.vsam import VariationalSAM

from conftest import needs_ext
import helpers
from helpers import (Boom, assert_cpu_follows_reference, assert_exception_restores,
                     assert_posterior_api, assert_resume_is_exact, assert_unchanged, data, mlp,
                     snapshot)

N = 32  # helpers.data's batch, the num_data of the Bayesian optimizers


def make_closure(opt, model, x, y):
    if isinstance(opt, BiSAM):
        return opt.closure(model, x, y)  # Q on the ascent pass, cross-entropy on the other
    return helpers.closure_for(opt, model, x, y, ascent_arg=True)


def train(make_opt, backend, steps=30, dtype=torch.float64, model=None, opt=None):
    return helpers.train(make_opt, backend, steps, dtype, model, opt, closure=make_closure)


OPTIMIZERS = {
    "randomsam": lambda ps: RandomSAM(ps, lr=0.1, sigma=0.05, momentum=0.9, weight_decay=5e-4, seed=3),
    "randomsam_rho_adamw": lambda ps: RandomSAM(ps, lr=1e-2, rho=0.5, base="adamw", weight_decay=1e-2,
                                                seed=4),
    # any base optimizer (unfused): the noise phase is fused, the update is RMSprop's
    "randomsam_rmsprop": lambda ps: RandomSAM(ps, lr=1e-2, sigma=0.05, base=torch.optim.RMSprop,
                                              momentum=0.9, alpha=0.95, seed=6),
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
    assert_cpu_follows_reference(OPTIMIZERS[name], train)


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
def after_each_pass(opt, model, then):
    """make_closure's closure on data(), calling ``then(passes so far, ascent)`` after each pass."""
    x, y = data()
    inner = make_closure(opt, model, x, y)
    calls = []

    def closure(ascent):
        calls.append(ascent)
        out = inner(ascent)
        then(len(calls), ascent)
        return out

    return closure


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("name,fail_at", [(n, f) for n in OPTIMIZERS for f in (1, 2)
                                          if f == 1 or not n.startswith(ONE_PASS)])
def test_exception_in_a_pass_restores_the_weights(backend, name, fail_at):
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())

    def fail(n, ascent):
        if n > 2 and ascent == (fail_at == 1):
            raise Boom("out of memory (simulated)")

    # one pass per step (RandomSAM, MFVI): two clean steps
    assert_exception_restores(opt, model, after_each_pass(opt, model, fail), backend,
                              clean_steps=2 if name.startswith(ONE_PASS) else 1)


@pytest.mark.parametrize("name,fail_at", [(n, f) for n in OPTIMIZERS for f in (1, 2)
                                          if f == 1 or not n.startswith(ONE_PASS)])
def test_nonfinite_pass_skips_the_whole_step(name, fail_at):
    """nonfinite="skip": weights, state and noise counter stay as they were, so the next clean
    step is the step an uninterrupted run takes."""
    model, opt, _ = train(OPTIMIZERS[name], "auto", steps=2)

    def poison(n, ascent):
        if n == fail_at:
            next(model.parameters()).grad[0, 0] = float("nan")

    poisoned = after_each_pass(opt, model, poison)

    before = snapshot(model, opt)
    opt.step(poisoned)
    assert opt.step_skipped
    assert_unchanged(before, model, opt)
    _, _, straight = train(OPTIMIZERS[name], "auto", steps=3)
    _, _, resumed = train(None, "auto", steps=1, model=model, opt=opt)
    assert resumed == straight[2:]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_resume_is_exact(name):
    assert_resume_is_exact(OPTIMIZERS[name], train)


# --- posterior ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mfvi", "mfvi_momentum", "vsam", "vsam_linear_adam"])
def test_posterior_variance_positive_and_api(name):
    model, opt, _ = train(OPTIMIZERS[name], "auto", steps=10)
    var = opt.posterior_variance()
    assert len(var) == 4 and all(v is not None and (v > 0).all() and torch.isfinite(v).all()
                                 for v in var)
    assert_posterior_api(model, opt, samples=3)


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


# --- m-sharpness against hand-written float64 references --------------------------------------
# The references below use plain torch autograd on the micro-batches (torch.func.functional_call
# at explicit weights), never the optimizer: they check the maths, not self-consistency.
def grads_at(model, weights, x, y, loss_fn):
    """d loss_fn(model_weights(x), y) / d weights, by plain autograd."""
    ws = [w.detach().clone().requires_grad_() for w in weights]
    names = [n for n, _ in model.named_parameters()]
    out = torch.func.functional_call(model, dict(zip(names, ws)), (x,))
    return list(torch.autograd.grad(loss_fn(out, y), ws))


def sgd_reference(ws, grads, bufs, lr, momentum, weight_decay):
    """torch.optim.SGD (dampening 0, no nesterov): d = g + wd w; buf = momentum buf + d (d the
    first time); w <- w - lr buf."""
    out, new_bufs = [], []
    for w, g, b in zip(ws, grads, bufs):
        d = g + weight_decay * w
        b = d if b is None else momentum * b + d
        out.append(w - lr * b)
        new_bufs.append(b)
    return out, new_bufs


def micro_closure(opt, model, x, y, m, after_backward=None):
    """closure(i, ascent) on micro-batch i of m (x.chunk(m)); BiSAM's ascent passes use Q."""
    xs, ys = x.chunk(m), y.chunk(m)

    def closure(i, ascent):
        opt.zero_grad()
        logits = model(xs[i])
        if ascent and isinstance(opt, BiSAM):
            loss = opt.ascent_loss(logits, ys[i])
        else:
            loss = F.cross_entropy(logits, ys[i])
        loss.backward()
        if after_backward is not None:
            after_backward()
        return loss.detach()

    return closure


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("var_step", ["log", "linear"])
@pytest.mark.parametrize("m", [1, 3])
def test_vsam_m_sharpness_matches_hand_reference(backend, var_step, m):
    """docs/spec.md m-sharpness for VSAM (Alg. 3): per micro-batch g_i at mu, e_i = sqrt(p) Sigma g_i /
    sqrt(g_i^T Sigma g_i) with the same pre-step Sigma, gradient at mu + e_i; one SGD step with the
    mean of those, and one Sigma step of eq. 42 with the data term averaged over the micro-batches
    (autograd on u = log Sigma with the g_i fixed).  m = 1 is the plain VSAM step.  Two steps, so
    the second uses the momentum buffer and the stepped Sigma."""
    nd, pv, rho, lr, mom = 1000.0, 0.5, 0.05, 0.1, 0.9
    vlr = 50.0 if var_step == "log" else 1e-8
    model = mlp()
    x, y = data()
    opt = VariationalSAM(model.parameters(), lr=lr, num_data=nd, rho=rho, momentum=mom,
                         prior_var=pv, var_lr=vlr, var_step=var_step, perturb_eps=1e-300)
    ws = [p.detach().clone() for p in model.parameters()]
    p_count = sum(w.numel() for w in ws)
    var = [torch.full_like(w, rho ** 2 / p_count) for w in ws]
    bufs = [None] * len(ws)
    losses = []
    for _ in range(2):
        with samkernels.use_backend(backend):
            closure = micro_closure(opt, model, x, y, m) if m > 1 else make_closure(opt, model, x, y)
            losses.append(opt.step(closure, m=m).item())
        g_eps, data_terms, first_losses = [torch.zeros_like(w) for w in ws], [], []
        for xi, yi in zip(x.chunk(m), y.chunk(m)):
            g = grads_at(model, ws, xi, yi, F.cross_entropy)
            s = torch.sqrt(sum((v * gi * gi).sum() for v, gi in zip(var, g)))  # eq. 2's normaliser
            e = [math.sqrt(p_count) * v * gi / s for v, gi in zip(var, g)]
            ge = grads_at(model, [w + ei for w, ei in zip(ws, e)], xi, yi, F.cross_entropy)
            g_eps = [a + b / m for a, b in zip(g_eps, ge)]
            data_terms.append(g)
            with torch.no_grad():
                first_losses.append(F.cross_entropy(torch.func.functional_call(
                    model, dict(zip([n for n, _ in model.named_parameters()], ws)), (xi,)), yi))
        # eq. 42 on u = log Sigma, its data term sqrt(p) sqrt(g^T Sigma g) averaged over micro-batches
        us = [v.log().requires_grad_() for v in var]
        data_term = sum(math.sqrt(p_count) * torch.sqrt(sum((u.exp() * gi * gi).sum()
                                                            for u, gi in zip(us, g)))
                        for g in data_terms) / m
        obj = data_term + sum(u.exp().sum() / (2 * nd * pv) - u.sum() / (2 * nd) for u in us)
        dus = torch.autograd.grad(obj, us)
        if var_step == "log":
            new_var = [(u - vlr * du).exp().detach() for u, du in zip(us, dus)]
        else:  # dL/dSigma = dL/du / Sigma; Alg. 3 line 7, clamped at min_var
            new_var = [(v - vlr * du / v).clamp(min=1e-12) for v, du in zip(var, dus)]
        ws, bufs = sgd_reference(ws, g_eps, bufs, lr, mom, 1.0 / (nd * pv))  # wd: eq. 42's prior
        assert losses[-1] == pytest.approx(torch.stack(first_losses).mean().item(), rel=1e-12)
        var = new_var
    assert max(((v / (rho ** 2 / p_count)) - 1).abs().max().item() for v in var) > 1e-3  # Sigma moved
    for p, w, v in zip(model.parameters(), ws, var):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["variance"], v, rtol=1e-10, atol=0)
    assert not opt.is_perturbed


def test_vsam_m_sharpness_sigma_step_is_not_the_mean_of_the_steps():
    """The log step's averaged data term is the geometric mean of the micro-batches' Sigma_i, which
    differs from their arithmetic mean by more than the tolerance above (so that test can tell)."""
    model = mlp()
    x, y = data()
    opt = VariationalSAM(model.parameters(), lr=0.1, num_data=1000.0, rho=0.05, var_lr=50.0)
    ps = list(model.parameters())
    sigmas = []
    for i in range(3):  # each micro-batch's Sigma_i alone, from the same Sigma
        o = VariationalSAM(ps, lr=0.1, num_data=1000.0, rho=0.05, var_lr=50.0)
        micro_closure(o, model, x, y, 3)(i, True)
        o.first_step(zero_grad=True)
        o.restore()
        sigmas.append([o.state[p]["variance"].clone() for p in ps])
    opt.step(micro_closure(opt, model, x, y, 3), m=3)
    got = [opt.state[p]["variance"] for p in ps]
    geo = [torch.stack([s[k] for s in sigmas]).log().mean(0).exp() for k in range(len(ps))]
    ari = [torch.stack([s[k] for s in sigmas]).mean(0) for k in range(len(ps))]
    for a, b in zip(got, geo):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert max(((a - b) / b).abs().max().item() for a, b in zip(ari, geo)) > 1e-8


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_randomsam_m_sharpness_matches_hand_reference(backend):
    """Micro-batch i of the step that starts at counter c draws z_i = philox(seed, c + i); the
    gradients at mu + sigma z_i on the micro-batches are averaged; one SGD step (docs/spec.md)."""
    m, sigma, seed, lr, mom, wd = 3, 0.05, 11, 0.1, 0.9, 5e-4
    model = mlp()
    x, y = data()
    opt = RandomSAM(model.parameters(), lr=lr, sigma=sigma, momentum=mom, weight_decay=wd,
                    seed=seed)
    ws = [p.detach().clone() for p in model.parameters()]
    bufs = [None] * len(ws)
    for t in range(2):
        with samkernels.use_backend(backend):
            opt.step(micro_closure(opt, model, x, y, m), m=m)
        g = [torch.zeros_like(w) for w in ws]
        for i, (xi, yi) in enumerate(zip(x.chunk(m), y.chunk(m))):
            z = [ref.philox_normal(seed, t * m + i, pid, w.numel()).view(w.shape)
                 for pid, w in enumerate(ws)]
            gi = grads_at(model, [w + sigma * zi for w, zi in zip(ws, z)], xi, yi, F.cross_entropy)
            g = [a + b / m for a, b in zip(g, gi)]
        ws, bufs = sgd_reference(ws, g, bufs, lr, mom, wd)
        assert opt.state_dict()["samkernels"]["noise_step"] == (t + 1) * m
    for p, w in zip(model.parameters(), ws):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)
    assert not opt.is_perturbed


@pytest.mark.parametrize("m", [2, 3])
def test_bisam_m_sharpness_matches_hand_reference(m):
    """BiSAM with m-sharpness (Alg. 1 per micro-batch): e_i = rho dQ_i / (||dQ_i|| + 1e-12) from the
    ascent loss Q on micro-batch i (bisam_loss_reference: plain PyTorch, neglog, mu = 1.5), the
    cross-entropy gradient at w + e_i, averaged; one SGD-momentum step.  Two steps."""
    rho, lr, mom, wd = 0.05, 0.1, 0.9, 5e-4
    model = mlp()
    x, y = data()
    opt = BiSAM(model.parameters(), lr=lr, rho=rho, momentum=mom, weight_decay=wd)
    ws = [p.detach().clone() for p in model.parameters()]
    bufs = [None] * len(ws)
    q = lambda f, t: bisam_loss_reference(f, t, mu=1.5, phi="neglog")  # noqa: E731
    for _ in range(2):
        opt.step(model=model, inputs=x, target=y, m=m)
        g = [torch.zeros_like(w) for w in ws]
        for xi, yi in zip(x.chunk(m), y.chunk(m)):
            gq = grads_at(model, ws, xi, yi, q)
            norm = torch.sqrt(sum((a * a).sum() for a in gq))
            e = [rho * a / (norm + 1e-12) for a in gq]
            ge = grads_at(model, [w + ei for w, ei in zip(ws, e)], xi, yi, F.cross_entropy)
            g = [a + b / m for a, b in zip(g, ge)]
        ws, bufs = sgd_reference(ws, g, bufs, lr, mom, wd)
    for p, w in zip(model.parameters(), ws):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)
    # and it is not the m = 1 step (the micro-batches' own perturbations matter)
    plain = mlp()
    BiSAM(plain.parameters(), lr=lr, rho=rho, momentum=mom, weight_decay=wd).step(
        model=plain, inputs=x, target=y)
    assert not torch.allclose(next(plain.parameters()), next(model.parameters()))


M_SHARP = ("randomsam", "randomsam_rmsprop", "vsam", "vsam_linear_adam")


@pytest.mark.parametrize("name", M_SHARP)
def test_m_sharpness_nonfinite_skips_the_whole_step(name):
    """A NaN in any pass of an m = 3 step skips it: weights, state (Sigma, momentum, the inner
    optimizer's), and the noise counter as before; the next clean step is the straight run's."""
    m = 3
    one_pass = name.startswith(ONE_PASS)
    for poison_at in ((1,) if one_pass else (2, 5)):
        model, x, y = mlp(), *data()
        opt = OPTIMIZERS[name](model.parameters())
        for _ in range(2):
            opt.step(micro_closure(opt, model, x, y, m), m=m)
        calls = []

        def poison():
            calls.append(1)
            if len(calls) == poison_at + 1:
                next(model.parameters()).grad[0, 0] = float("nan")

        before = copy.deepcopy((model.state_dict(), opt.state_dict()))
        opt.step(micro_closure(opt, model, x, y, m, poison), m=m)
        assert opt.step_skipped and not opt.is_perturbed
        after = (model.state_dict(), opt.state_dict())
        for k, v in before[0].items():
            assert torch.equal(after[0][k], v), k
        assert after[1]["samkernels"] == before[1]["samkernels"]
        for key in ("state", "base_optimizer"):  # ours, and the inner torch optimizer's
            st_before = before[1].get(key, {}) if key == "state" else \
                before[1].get(key, {}).get("state", {})
            st_after = after[1].get(key, {}) if key == "state" else \
                after[1].get(key, {}).get("state", {})
            for i, st in st_before.items():
                for k, v in st.items():
                    assert torch.equal(st_after[i][k], v), (key, i, k)
        opt.step(micro_closure(opt, model, x, y, m), m=m)
        straight, ox, oy = mlp(), *data()
        o2 = OPTIMIZERS[name](straight.parameters())
        for _ in range(3):
            o2.step(micro_closure(o2, straight, ox, oy, m), m=m)
        for a, b in zip(model.parameters(), straight.parameters()):
            assert torch.equal(a, b)


def test_mfvi_refuses_m_sharpness():
    model = mlp()
    x, y = data()
    opt = MFVI(model.parameters(), lr=0.1, num_data=N)
    with pytest.raises(ValueError, match="no m-sharpness"):
        opt.step(micro_closure(opt, model, x, y, 2), m=2)
    assert not opt.is_perturbed
    opt.step(make_closure(opt, model, x, y), m=1)  # m = 1 is the ordinary step


# --- RandomSAM: rho_schedule and any torch.optim base -------------------------------------------
def test_randomsam_rho_schedule_sets_the_noise_scale():
    """rho_schedule(group) -> rho, as SAM's: sigma0 = rho_t / sqrt(p), evaluated at each draw (it
    overrides the configured sigma); an LR scheduler moving lr moves the noise scale."""
    model = mlp()
    ps = list(model.parameters())
    p_count = sum(p.numel() for p in ps)
    opt = RandomSAM(ps, lr=0.1, sigma=0.05, seed=21, rho_schedule=lambda g: 2.0 * g["lr"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for t in range(3):
        w0 = [p.detach().clone() for p in ps]
        opt.noise_step()
        sigma0 = 2.0 * 0.1 * 0.5 ** t / math.sqrt(p_count)
        for i, (p, w) in enumerate(zip(ps, w0)):
            z = ref.philox_normal(21, t, i, p.numel()).view(p.shape)
            torch.testing.assert_close(p.detach(), w + sigma0 * z, rtol=1e-12, atol=1e-15)
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt.second_step()  # a zero gradient: back to the mean
        for p, w in zip(ps, w0):
            assert torch.equal(p.detach(), w)
        sched.step()
    bad = RandomSAM(mlp().parameters(), lr=0.1, rho_schedule=lambda g: -1.0)
    with pytest.raises(ValueError, match="rho_schedule returned"):
        bad.noise_step()
    with pytest.raises(ValueError, match="rho_schedule"):
        RandomSAM(mlp().parameters(), lr=0.1, rho_schedule=0.1)


def _train_with(make, steps=8, scheduler=None, seed=0):
    model = mlp(seed=seed)
    opt = make(model.parameters())
    sched = scheduler(opt) if scheduler is not None else None
    closure = helpers.closure_for(opt, model, *data())
    for _ in range(steps):
        opt.step(closure)
        if sched is not None:
            sched.step()
    return model, opt


@pytest.mark.parametrize("forward", ["keywords", "base_kwargs"])
def test_randomsam_torch_base_at_sigma_0_is_that_optimizer(forward):
    """base=torch.optim.RMSprop, sigma = 0: bit for bit RMSprop, LR scheduler included (the group
    dicts are shared, so the scheduler's lr reaches the inner optimizer)."""
    kw = dict(momentum=0.9, alpha=0.95, weight_decay=1e-3, centered=True)
    sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)  # noqa: E731
    want, _ = _train_with(lambda ps: torch.optim.RMSprop(ps, lr=1e-2, **kw), scheduler=sched)
    if forward == "keywords":
        make = lambda ps: RandomSAM(ps, lr=1e-2, sigma=0.0, base=torch.optim.RMSprop, **kw)  # noqa: E731
    else:
        make = lambda ps: RandomSAM(ps, lr=1e-2, sigma=0.0, base=torch.optim.RMSprop,  # noqa: E731
                                    momentum=0.9, base_kwargs=dict(alpha=0.95, weight_decay=1e-3,
                                                                   centered=True))
    got, opt = _train_with(make, scheduler=sched)
    for a, b in zip(want.parameters(), got.parameters()):
        assert torch.equal(a, b)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 2)
    assert opt._inner.param_groups is opt.param_groups


def test_randomsam_torch_base_resume_is_exact():
    """state_dict() carries the inner optimizer's state ("base_optimizer") and the noise counter;
    a fresh RandomSAM loading it continues bit for bit, and the groups stay shared."""
    def groups_shared(opt):
        assert opt._inner.param_groups is opt.param_groups

    sd = assert_resume_is_exact(OPTIMIZERS["randomsam_rmsprop"], train, weights_only=True,
                                loaded=groups_shared)["opt"]
    assert sd["base_optimizer"]["state"] and "square_avg" in sd["base_optimizer"]["state"][0]
    with pytest.raises(ValueError, match="base"):
        OPTIMIZERS["randomsam"](mlp().parameters()).load_state_dict(sd)


def test_randomsam_base_argument_errors():
    ps = lambda: mlp().parameters()  # noqa: E731
    with pytest.raises(ValueError, match="base"):
        RandomSAM(ps(), lr=0.1, base=samkernels.optim.SAM)
    with pytest.raises(ValueError, match="base"):
        RandomSAM(ps(), lr=0.1, base=dict)
    with pytest.raises(TypeError, match="alpha"):
        RandomSAM(ps(), lr=0.1, base="sgd", alpha=0.9)
    with pytest.raises(TypeError, match="base_kwargs"):
        RandomSAM(ps(), lr=0.1, base="adam", base_kwargs=dict(amsgrad=True))
    with pytest.raises(ValueError, match="skip_on_device"):
        RandomSAM(ps(), lr=0.1, base=torch.optim.RMSprop, nonfinite="skip_on_device")
    with pytest.raises(ValueError, match="eps"):
        RandomSAM(ps(), lr=0.1, base=torch.optim.Adam, adam_eps=1e-6)
    with pytest.raises(ValueError, match="twice"):
        RandomSAM(ps(), lr=0.1, base=torch.optim.RMSprop, momentum=0.9,
                  base_kwargs=dict(momentum=0.5))
    with pytest.raises(ValueError, match="momentum"):  # the torch optimizer checks its own
        RandomSAM(ps(), lr=0.1, base=torch.optim.RMSprop, momentum=-1.0)


# --- OneCycleLR / CyclicLR: cycle_momentum reaches the base optimizer in use ---------------------
def _sgd_like(ps, **kw):
    return torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, **kw)


@pytest.mark.parametrize("ours,theirs,key", [
    (lambda ps: RandomSAM(ps, lr=0.1, sigma=0.0, momentum=0.9, weight_decay=5e-4), _sgd_like,
     "momentum"),
    (lambda ps: VariationalSAM(ps, lr=0.1, num_data=N, rho=0.0, momentum=0.9, weight_decay=5e-4),
     _sgd_like, "momentum"),
    (lambda ps: RandomSAM(ps, lr=1e-2, sigma=0.0, base="adam", weight_decay=1e-3),
     lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3), "betas"),
    (lambda ps: VariationalSAM(ps, lr=1e-2, num_data=N, rho=0.0, base="adamw", weight_decay=1e-2),
     lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2), "betas"),
    (lambda ps: RandomSAM(ps, lr=1e-2, sigma=0.0, base=torch.optim.RMSprop, momentum=0.9),
     lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.9), "momentum"),
])
def test_one_cycle_lr_cycles_the_momentum_in_use(ours, theirs, key):
    """SGD bases carry no betas (torch's OneCycleLR/CyclicLR would cycle betas[0] instead of
    momentum), Adam bases no momentum: at zero perturbation the run is torch's optimizer under the
    same OneCycleLR(cycle_momentum=True), and the groups' momentum (beta1) really cycles."""
    other = "betas" if key == "momentum" else "momentum"
    opt = ours(mlp().parameters())
    assert other not in opt.defaults and all(other not in g for g in opt.param_groups)
    seen = []

    def one_cycle(o):
        return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=8,
                                                   cycle_momentum=True)

    def record(o):
        sched = one_cycle(o)
        if isinstance(o, (RandomSAM, VariationalSAM)):
            orig = sched.step

            def step(*a, **k):
                orig(*a, **k)
                v = o.param_groups[0][key]
                seen.append(v if key == "momentum" else v[0])
            sched.step = step
        return sched

    want, _ = _train_with(theirs, steps=7, scheduler=one_cycle)
    got, opt = _train_with(ours, steps=7, scheduler=record)
    for a, b in zip(want.parameters(), got.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert len(set(seen)) >= 5 and min(seen) < 0.9 < max(seen)
    fresh = ours(mlp().parameters())  # the saved groups (without the other base's key) load
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0][key] == opt.param_groups[0][key]
    assert other not in fresh.param_groups[0]


def test_group_with_another_fused_base_gets_its_keys():
    """A param group may switch the fused base; it gets that base's keys (from the keywords given
    to the constructor, else the defaults), checked."""
    lin = torch.nn.Linear(3, 2).double()
    opt = RandomSAM([{"params": [lin.weight]}, {"params": [lin.bias], "base": "adam"}], lr=0.1,
                    sigma=0.0, momentum=0.9, betas=(0.8, 0.99))
    assert opt.param_groups[0]["momentum"] == 0.9 and "betas" not in opt.param_groups[0]
    assert opt.param_groups[1]["betas"] == (0.8, 0.99) and "momentum" not in opt.param_groups[1]
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "base": "adam",
                             "betas": (1.5, 0.9)})
    with pytest.raises(ValueError, match="base"):
        VariationalSAM([{"params": [lin.weight], "base": "lion"}], lr=0.1, num_data=3)
