"""Issue 16, footguns: second_step without its first phase is an error (base_step() is the explicit
plain step), a scheduled rho shows in the param group, out-of-range hyper-parameters warn.

Each of these tests fails on the code before the fix (there second_step silently took a plain step,
base_step did not exist, group["rho"] kept its initial value and momentum=1.5 passed silently)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from samkernels.optim import (ASAM, BSAM, MFVI, SAM, BiSAM, EBiSAM, RandomSAM, VariationalSAM,
                              rho_proportional_to_lr)


def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(n)]


def backward(model, x, y):
    F.cross_entropy(model(x), y).backward()


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


# the optimizers whose second_step used to take a silent plain step, and how to build each
SILENT = {
    "SAM": lambda ps: SAM(ps, lr=0.1, momentum=0.9),
    "ASAM": lambda ps: ASAM(ps, lr=0.1, base="adam"),
    "BiSAM": lambda ps: BiSAM(ps, lr=0.1, momentum=0.9),
    "EBiSAM": lambda ps: EBiSAM(ps, lr=0.1, seed=3),
    "VariationalSAM": lambda ps: VariationalSAM(ps, lr=0.1, num_data=100, momentum=0.9),
    "RandomSAM": lambda ps: RandomSAM(ps, lr=0.1, rho=0.05, seed=3, momentum=0.9),
    "RandomSAM-RMSprop": lambda ps: RandomSAM(ps, lr=0.01, rho=0.05, seed=3,
                                              base=torch.optim.RMSprop),
}
FIRST = {"RandomSAM": "noise_step", "RandomSAM-RMSprop": "noise_step"}


def first_phase(opt, model, x, y):
    """The step's first phase(s), leaving the gradient for second_step in .grad."""
    if isinstance(opt, (RandomSAM, MFVI)):
        opt.noise_step()
        backward(model, x, y)
        return
    if isinstance(opt, BSAM):
        opt.noise_step()
    backward(model, x, y)
    opt.first_step(zero_grad=True)
    backward(model, x, y)


def _resumed(ckpt, model, build):
    """(model, optimizer, scheduler) built afresh and loaded from ckpt = their three state_dicts."""
    model.load_state_dict(ckpt[0])
    opt, sched = build(model)
    opt.load_state_dict(ckpt[1])
    sched.load_state_dict(ckpt[2])
    return model, opt, sched


# --- 1. phase order ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SILENT))
def test_second_step_without_first_phase_raises_and_moves_nothing(name):
    model = net()
    opt = SILENT[name](model.parameters())
    (x, y), = batches(1)
    backward(model, x, y)
    before = weights(model)
    first = FIRST.get(name, "first_step")
    with pytest.raises(RuntimeError, match=rf"{first} -> backward -> second_step.*base_step"):
        opt.second_step()
    assert same(before, weights(model))
    assert opt.state_dict()["state"] == {}  # no base-optimizer state was created either
    # a full step, then a second second_step: the step is over, so again an error
    opt.zero_grad()
    first_phase(opt, model, x, y)
    opt.second_step(zero_grad=True)
    backward(model, x, y)
    after = weights(model)
    with pytest.raises(RuntimeError, match="no step in progress"):
        opt.second_step()
    assert same(after, weights(model))


@pytest.mark.parametrize("name", sorted(SILENT))
def test_restore_abandons_the_step(name):
    model = net()
    opt = SILENT[name](model.parameters())
    (x, y), = batches(1)
    before = weights(model)
    first_phase(opt, model, x, y)
    opt.restore()
    assert same(before, weights(model))
    with pytest.raises(RuntimeError, match="no step in progress"):
        opt.second_step()
    assert same(before, weights(model))


@pytest.mark.parametrize("cls", [BSAM, MFVI])
def test_noisy_optimizers_still_refuse_and_have_no_base_step(cls):
    model = net()
    opt = cls(model.parameters(), lr=0.1, num_data=100)
    (x, y), = batches(1)
    backward(model, x, y)
    with pytest.raises(RuntimeError):
        opt.second_step()
    with pytest.raises(NotImplementedError, match="no plain base-optimizer step"):
        opt.base_step()


# --- 2. base_step: the explicit plain step ----------------------------------------------------
@pytest.mark.parametrize("base", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("cls", [SAM, ASAM, BiSAM, RandomSAM, VariationalSAM])
def test_base_step_is_the_rho_zero_step(cls, base):
    """base_step equals, bit for bit in fp32, the same optimizer's full step with no perturbation
    (rho = 0 / sigma = 0) on the same batches; weight decay and momentum included."""
    kw = dict(lr=0.05, base=base, weight_decay=1e-3)
    if base == "sgd":
        kw.update(momentum=0.9, nesterov=True)
    if cls is RandomSAM:
        make = lambda ps, r: RandomSAM(ps, sigma=r, seed=1, **kw)  # noqa: E731
    elif cls is VariationalSAM:
        kw["weight_decay"] = 1e-3
        make = None
    else:
        make = lambda ps, r: cls(ps, rho=r, **kw)  # noqa: E731
    m1, m2 = net(), net()
    if cls is VariationalSAM:  # Sigma never reaches the mean in a base step: compare with SAM
        a = VariationalSAM(m1.parameters(), num_data=100, **kw)
        b = SAM(m2.parameters(), rho=0.0, **kw)
    else:
        a, b = make(m1.parameters(), 0.1), make(m2.parameters(), 0.0)
    for x, y in batches(4):
        backward(m1, x, y)
        a.base_step(zero_grad=True)

        def closure(ascent):  # BiSAM needs the pass flag; with rho = 0 the ascent loss is moot
            b.zero_grad()
            backward(m2, x, y)
        b.step(closure)
    assert same(weights(m1), weights(m2))
    if cls is not VariationalSAM:
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])


def test_base_step_sgd_equals_torch_sgd():
    """The meaning of base_step: torch.optim.SGD's step (to fp32 rounding: the fused op orders
    its arithmetic differently; the bit-for-bit reference is the rho = 0 step above)."""
    m1, m2 = net(), net()
    a = SAM(m1.parameters(), lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3)
    b = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3)
    for x, y in batches(4):
        backward(m1, x, y)
        a.base_step(zero_grad=True)
        backward(m2, x, y)
        b.step()
        b.zero_grad()
    for u, v in zip(weights(m1), weights(m2)):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-7)


def test_sam_every_k_steps_with_scheduler_and_exact_resume():
    """The LookSAM-style loop: a SAM step every k-th iteration, base_step otherwise.  It equals a
    twin that sets rho = 0 for the plain iterations, LR schedulers see every step (no warning),
    and a state_dict taken mid-run resumes exactly."""
    k, data = 3, batches(8)

    def run(model, opt, sched, its, twin=False):
        for it in its:
            x, y = data[it]
            if twin:
                opt.param_groups[0]["rho"] = 0.1 if it % k == 0 else 0.0
                opt.step(lambda: (opt.zero_grad(), backward(model, x, y)))
            else:
                backward(model, x, y)
                if it % k == 0:
                    opt.first_step(zero_grad=True)
                    backward(model, x, y)
                    opt.second_step(zero_grad=True)
                else:
                    opt.base_step(zero_grad=True)
            sched.step()

    def build(model):
        opt = SAM(model.parameters(), lr=0.1, rho=0.1, momentum=0.9)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    m1, m2 = net(), net()
    (o1, s1), (o2, s2) = build(m1), build(m2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        run(m1, o1, s1, range(4))
    run(m2, o2, s2, range(4), twin=True)
    assert same(weights(m1), weights(m2))
    ckpt = copy.deepcopy((m1.state_dict(), o1.state_dict(), s1.state_dict()))
    run(m1, o1, s1, range(4, 8))
    m3, o3, s3 = _resumed(ckpt, net(5), build)  # other initial weights: all comes from ckpt
    run(m3, o3, s3, range(4, 8))
    assert same(weights(m1), weights(m3))


@pytest.mark.parametrize("name", sorted(SILENT))
def test_base_step_refused_mid_step(name):
    model = net()
    opt = SILENT[name](model.parameters())
    (x, y), = batches(1)
    first_phase(opt, model, x, y)
    with pytest.raises(RuntimeError, match="base_step"):
        opt.base_step()
    opt.second_step()  # the step in progress still finishes normally


@pytest.mark.parametrize("name", ["EBiSAM", "RandomSAM", "VariationalSAM"])
def test_skipped_base_step_leaves_everything(name):
    """inf gradients skip a base step as they skip a full step: weights and state unchanged, and
    no noise counter is rolled back to an earlier step's value."""
    model = net()
    opt = SILENT[name](model.parameters())
    x, y = batches(1)[0]
    for _ in range(2):
        first_phase(opt, model, x, y)
        opt.second_step(zero_grad=True)
    sd = copy.deepcopy(opt.state_dict())
    before = weights(model)
    backward(model, x, y)
    next(model.parameters()).grad[0, 0] = float("inf")
    opt.base_step(zero_grad=True)
    assert opt.step_skipped
    assert same(before, weights(model))
    sd2 = opt.state_dict()
    assert sd2.get("samkernels") == sd.get("samkernels")
    assert all(torch.equal(sd["state"][k][n], sd2["state"][k][n])
               for k in sd["state"] for n in sd["state"][k] if torch.is_tensor(sd["state"][k][n]))


def test_vsam_base_step_leaves_sigma():
    model = net()
    opt = VariationalSAM(model.parameters(), lr=0.1, num_data=100, momentum=0.9)
    (x, y), = batches(1)
    first_phase(opt, model, x, y)
    opt.second_step(zero_grad=True)
    sigma = [v.clone() for v in opt.posterior_variance()]
    before = weights(model)
    backward(model, x, y)
    opt.base_step(zero_grad=True)
    assert not same(before, weights(model))
    assert same(sigma, opt.posterior_variance())


# --- 3. rho_schedule: the group shows the rho in effect ----------------------------------------
@pytest.mark.parametrize("cls", [SAM, BiSAM, BSAM])
def test_group_rho_is_the_scheduled_value_and_resume_is_exact(cls):
    data = batches(6)
    sched_fn = rho_proportional_to_lr(rho_max=0.2, rho_min=0.02)

    def build(model):
        kw = dict(num_data=100, seed=4) if cls is BSAM else dict(momentum=0.9)
        opt = cls(model.parameters(), lr=0.1, rho=0.2, rho_schedule=sched_fn, **kw)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)

    def run(model, opt, sched, its, shown=None):
        for it in its:
            x, y = data[it]
            lr = opt.param_groups[0]["lr"]
            opt.step(lambda ascent: (opt.zero_grad(), backward(model, x, y)))
            if shown is not None:
                shown.append((opt.param_groups[0]["rho"], 0.02 + 0.18 * lr / 0.1))
            sched.step()

    m1 = net()
    o1, s1 = build(m1)
    shown = []
    run(m1, o1, s1, range(3), shown)
    for got, want in shown:
        assert got == pytest.approx(want)
    assert shown[-1][0] < 0.2 and o1.param_groups[0]["initial_rho"] == 0.2
    ckpt = copy.deepcopy((m1.state_dict(), o1.state_dict(), s1.state_dict()))
    run(m1, o1, s1, range(3, 6))
    m2, o2, s2 = _resumed(ckpt, net(9), build)
    assert o2.param_groups[0]["initial_rho"] == 0.2
    run(m2, o2, s2, range(3, 6))
    assert same(weights(m1), weights(m2))
    assert o1.param_groups[0]["rho"] == o2.param_groups[0]["rho"]


def test_schedule_reading_group_rho_does_not_compound():
    """A schedule written against the old behaviour (group["rho"] = the base value) still sees the
    base value every step; the group then shows the result."""
    model = net()
    seen = []

    def half(group):
        seen.append(group["rho"])
        return 0.5 * group["rho"]

    opt = SAM(model.parameters(), lr=0.1, rho=0.2, rho_schedule=half)
    for x, y in batches(3):
        opt.step(lambda: (opt.zero_grad(), backward(model, x, y)))
        assert opt.param_groups[0]["rho"] == pytest.approx(0.1)
    assert seen == [0.2, 0.2, 0.2]


# --- 4. out-of-range hyper-parameters warn, naming the argument ---------------------------------
WARN_CASES = [
    (SAM, dict(momentum=1.5), "momentum"), (SAM, dict(momentum=1.0), "momentum"),
    (SAM, dict(momentum=0.9, dampening=1.5), "dampening"),
    (BiSAM, dict(momentum=1.5), "momentum"),
    (RandomSAM, dict(rho=0.05, momentum=1.5), "momentum"),
    (RandomSAM, dict(rho=0.05, momentum=0.9, dampening=2.0), "dampening"),
    (VariationalSAM, dict(num_data=10, momentum=1.2), "momentum"),
]
OK_CASES = [
    (SAM, dict(momentum=0.0)), (SAM, dict(momentum=0.9, dampening=0.0)),
    (SAM, dict(momentum=0.99, dampening=1.0)), (SAM, dict(momentum=0.9, nesterov=True)),
    (SAM, dict(base="adam", betas=(0.0, 0.999))), (BiSAM, dict(momentum=0.9)),
    (RandomSAM, dict(rho=0.05, momentum=0.9, dampening=0.5)),
    (VariationalSAM, dict(num_data=10, momentum=0.9)), (BSAM, dict(num_data=10)),
    (MFVI, dict(num_data=10, momentum=0.9)), (EBiSAM, dict(momentum=0.5)),
]


@pytest.mark.parametrize("cls,kw,name", WARN_CASES)
def test_out_of_range_hyperparameters_warn(cls, kw, name):
    with pytest.warns(UserWarning, match=rf"^{name}=.*outside"):
        opt = cls(net().parameters(), lr=0.1, **kw)
    assert opt.param_groups[0][name] == kw[name]  # accepted as torch.optim accepts it


def test_out_of_range_group_override_warns():
    opt = SAM(net().parameters(), lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="^momentum=1.3"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "momentum": 1.3})


@pytest.mark.parametrize("cls,kw", OK_CASES)
def test_normal_ranges_do_not_warn(cls, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(net().parameters(), lr=0.1, **kw)


@pytest.mark.parametrize("cls,kw,name", [
    (SAM, dict(rho=-0.1), "rho"), (SAM, dict(momentum=-0.1), "momentum"),
    (SAM, dict(base="adam", betas=(1.0, 0.999)), "betas"),
    (SAM, dict(base="adam", betas=(0.9, 1.5)), "betas"),
    (BSAM, dict(num_data=10, betas=(0.9, 1.0)), "betas"),
    (RandomSAM, dict(rho=-1.0), "rho"), (MFVI, dict(num_data=10, momentum=1.0), "momentum"),
])
def test_meaningless_values_already_raise(cls, kw, name):
    with pytest.raises(ValueError, match=name):
        cls(net().parameters(), lr=0.1, **kw)
