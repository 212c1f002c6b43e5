"""Training-loop ergonomics: m-sharpness, gradient accumulation, BatchNorm statistics, LR and rho
schedules, separate ascent loss, rho = 0, exact restore in bf16."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import samkernels
from samkernels import BSAM, SAM
from samkernels.ops import reference as ref
from samkernels.optim import bn_frozen, rho_proportional_to_lr

from helpers import closure_for


def net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(dtype)


def batch(n=24, seed=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64).to(dtype), torch.randint(0, 3, (n,), generator=g)


def grads_at(model, params, x, y):
    """Plain autograd gradient of the mean cross-entropy at the given parameter values."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, v in zip(m.parameters(), params):
            p.copy_(v)
    loss = F.cross_entropy(m(x), y)
    return torch.autograd.grad(loss, list(m.parameters()))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_sam_m_sharpness_matches_hand_written(backend):
    model, (x, y) = net(), batch()
    m, rho, lr = 3, 0.1, 0.2
    w = [p.detach().clone() for p in model.parameters()]
    ge_sum = None
    for i in range(m):  # each micro-batch: its own perturbation, second-pass gradients averaged
        xi, yi = x[i::m], y[i::m]
        g = grads_at(model, w, xi, yi)
        norm = torch.sqrt(sum((t ** 2).sum() for t in g))
        ge = grads_at(model, [a + rho * b / (norm + 1e-12) for a, b in zip(w, g)], xi, yi)
        ge_sum = ge if ge_sum is None else [a + b for a, b in zip(ge_sum, ge)]
    want = [a - lr * b / m for a, b in zip(w, ge_sum)]

    opt = SAM(model.parameters(), lr=lr, rho=rho)

    def closure(i):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[i::m]), y[i::m])
        loss.backward()
        return loss

    with samkernels.use_backend(backend):
        opt.step(closure, m=m)
    for p, v in zip(model.parameters(), want):
        torch.testing.assert_close(p.detach(), v, rtol=1e-12, atol=1e-12)


def test_bsam_m_sharpness_matches_hand_written():
    model, (x, y) = net(), batch()
    m, N, rho, lr, delta, gamma, b1, b2 = 2, 24, 0.05, 0.1, 1e-2, 0.1, 0.9, 0.999
    opt = BSAM(model.parameters(), lr=lr, num_data=N, rho=rho, weight_decay=delta, gamma=gamma, seed=7)
    w = [p.detach().clone() for p in model.parameters()]
    s = [torch.ones_like(t) for t in w]
    h_sum, ge_sum = [torch.zeros_like(t) for t in w], [torch.zeros_like(t) for t in w]
    for i in range(m):  # docs/spec.md: lines 1-4 per micro-batch, own noise (noise step i)
        z = [ref.philox_normal(opt._extra_state["seed"], i, k, t.numel()).view_as(t) for k, t in enumerate(w)]
        theta = [a + zz / torch.sqrt(N * ss) for a, zz, ss in zip(w, z, s)]
        g = grads_at(model, theta, x[i::m], y[i::m])
        ge = grads_at(model, [a + rho * gg / ss for a, gg, ss in zip(w, g, s)], x[i::m], y[i::m])
        h_sum = [hs + ss.sqrt() * gg.abs() for hs, ss, gg in zip(h_sum, s, g)]
        ge_sum = [a + b for a, b in zip(ge_sum, ge)]
    s_new = [b2 * ss + (1 - b2) * (hs / m + delta + gamma) for ss, hs in zip(s, h_sum)]
    gm = [(1 - b1) * (gs / m + delta * a) for gs, a in zip(ge_sum, w)]
    want = [a - lr * g_ / sn for a, g_, sn in zip(w, gm, s_new)]

    def closure(i, ascent):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[i::m]), y[i::m])
        loss.backward()
        return loss

    opt.step(closure, m=m)
    for p, v, sn in zip(model.parameters(), want, s_new):
        torch.testing.assert_close(p.detach(), v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["precision"], sn, rtol=1e-12, atol=1e-12)


def test_m_must_be_a_positive_int():
    opt = SAM(net().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="m must be"):
        opt.step(lambda i: None, m=0)
    with pytest.raises(TypeError, match="micro-batch index"):
        opt.step(lambda: torch.zeros(()), m=2)


@pytest.mark.parametrize("make", [
    lambda ps: SAM(ps, lr=0.1, rho=0.05, momentum=0.9),
    lambda ps: BSAM(ps, lr=0.1, num_data=24, rho=0.05, seed=1),
])
def test_gradient_accumulation_equals_one_big_batch(make):
    """k micro-batches accumulated in .grad (loss / k) in both passes == one batch k times as big."""
    x, y = batch(24)
    k = 4

    def run(accumulate):
        model = net()
        opt = make(model.parameters())
        for _ in range(3):
            if isinstance(opt, BSAM):
                opt.noise_step()
            for ascent in (True, False):
                opt.zero_grad()
                if accumulate:
                    for i in range(k):
                        (F.cross_entropy(model(x[i::k]), y[i::k]) / k).backward()
                else:
                    F.cross_entropy(model(x), y).backward()
                (opt.first_step if ascent else opt.second_step)()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


class BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.bn, self.fc2 = torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@pytest.mark.parametrize("make", [
    lambda m: SAM(m.parameters(), lr=0.1, rho=0.5, freeze_bn=m),
    lambda m: BSAM(m.parameters(), lr=0.1, num_data=24, rho=0.5, seed=0, freeze_bn=m, freeze_bn_noisy=True),
])
def test_bn_statistics_are_those_of_one_clean_forward(make):
    x, y = batch(24, dtype=torch.float32)
    model = BNNet()
    clean = copy.deepcopy(model)
    opt = make(model)
    with torch.no_grad():
        clean(x)  # what one forward at the mean weights does to the running statistics

    closure = closure_for(opt, model, x, y)
    if isinstance(opt, BSAM):  # the noisy pass is frozen too: stats must not move at all
        opt.step(closure)
        assert torch.equal(model.bn.running_mean, torch.zeros(8))
        assert model.bn.num_batches_tracked.item() == 0
        return
    opt.step(closure)
    torch.testing.assert_close(model.bn.running_mean, clean.bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(model.bn.running_var, clean.bn.running_var, rtol=0, atol=0)
    assert model.bn.num_batches_tracked.item() == 1
    assert model.bn.track_running_stats  # switched back on


def test_bn_frozen_restores_on_error():
    model = BNNet()
    with pytest.raises(KeyError):
        with bn_frozen(model):
            assert not model.bn.track_running_stats
            raise KeyError
    assert model.bn.track_running_stats


def test_lr_scheduler_and_rho_schedule():
    model, (x, y) = net(), batch()
    sched_fn = rho_proportional_to_lr(rho_max=0.2, rho_min=0.02)
    seen = []

    def spy(group):
        rho = sched_fn(group)
        seen.append(rho)
        return rho

    opt = SAM(model.parameters(), lr=0.1, rho=0.2, momentum=0.9, rho_schedule=spy)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)

    closure = closure_for(opt, model, x, y)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(closure)
        sched.step()
    assert lrs[0] == 0.1 and lrs[-1] < lrs[1] < lrs[0]
    want = [0.02 + 0.18 * lr / 0.1 for lr in lrs]
    assert seen == pytest.approx(want)
    with pytest.raises(ValueError, match="rho_schedule"):
        SAM(model.parameters(), lr=0.1, rho_schedule=0.3)


def test_separate_ascent_loss_in_closure_and_phases():
    """closure(ascent) gets True for the pass that builds the perturbation, then False."""
    model, (x, y) = net(), batch()
    opt = SAM(model.parameters(), lr=0.1, rho=0.05)
    flags = []

    def closure(ascent):
        flags.append(ascent)
        opt.zero_grad()
        out = model(x)
        loss = (out.logsumexp(-1).mean() if ascent else F.cross_entropy(out, y))
        loss.backward()
        return loss

    opt.step(closure)
    assert flags == [True, False]


@pytest.mark.parametrize("base,torch_opt", [
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3)),
    ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3)),
    ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2)),
])
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rho_zero_is_the_base_optimizer(base, torch_opt, backend, dtype):
    """The reference backend uses torch.optim's own calls: bit for bit.  The fused C++ kernel does
    the same maths but rounds differently where ATen's AVX2 kernels fuse multiply-adds."""
    x, y = batch(dtype=dtype)
    kw = dict(sgd=dict(lr=0.1, momentum=0.9, weight_decay=1e-3), adam=dict(lr=1e-2, weight_decay=1e-3),
              adamw=dict(lr=1e-2, weight_decay=1e-2))[base]
    a, b = net(dtype=dtype), net(dtype=dtype)
    ours, theirs = SAM(a.parameters(), rho=0.0, base=base, **kw), torch_opt(b.parameters())
    for _ in range(20):
        with samkernels.use_backend(backend):
            ours.step(lambda: (ours.zero_grad(), F.cross_entropy(a(x), y).backward()))
        theirs.zero_grad()
        F.cross_entropy(b(x), y).backward()
        theirs.step()
    for p, q in zip(a.parameters(), b.parameters()):
        if backend == "reference":
            assert torch.equal(p, q)
        elif dtype == torch.float64:
            torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-14)
        else:
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # 20 steps of fp32 rounding


def test_restore_is_exact_in_bf16():
    """The weights after a bf16 SAM step equal an update applied to the never-perturbed weights."""
    model, (x, y) = net(dtype=torch.bfloat16), batch(dtype=torch.bfloat16)
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), lr=0.1, rho=0.5)
    F.cross_entropy(model(x).float(), y).backward()
    opt.first_step(zero_grad=True)
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), w0))  # really moved
    F.cross_entropy(model(x).float(), y).backward()
    ge = [p.grad.clone() for p in model.parameters()]
    opt.second_step()
    for p, w, g in zip(model.parameters(), w0, ge):  # w0 - lr * g, rounded once to bf16
        assert torch.equal(p.detach(), (w.float() - 0.1 * g.float()).to(torch.bfloat16))
    opt2 = SAM(model.parameters(), lr=0.0, rho=0.5)  # lr 0: after the step, exactly w again
    w1 = [p.detach().clone() for p in model.parameters()]
    opt2.step(lambda: (opt2.zero_grad(), F.cross_entropy(model(x).float(), y).backward()))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w1))


@pytest.mark.parametrize("base,torch_cls,kw", [
    ("sgd", torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-3)),
    ("adam", torch.optim.Adam, dict(weight_decay=1e-3)),
])
def test_one_cycle_momentum_cycling_follows_torch(base, torch_cls, kw):
    """OneCycleLR(cycle_momentum=True) cycles betas[0] whenever "betas" is in the defaults: an SGD
    SAM must not carry an unused betas (nor an Adam SAM an unused momentum).  At rho = 0 on the
    reference backend the cycled trajectory is torch.optim's bit for bit."""
    x, y = batch()
    a, b = net(), net()
    ours, theirs = SAM(a.parameters(), lr=0.1, rho=0.0, base=base, **kw), torch_cls(b.parameters(), lr=0.1, **kw)
    assert ("betas" in ours.defaults) == ("betas" in theirs.defaults)
    assert ("momentum" in ours.defaults) == ("momentum" in theirs.defaults)
    key = "momentum" if base == "sgd" else "betas"
    sched = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=8, cycle_momentum=True)
             for o in (ours, theirs)]
    seen = []
    for _ in range(7):
        seen.append((ours.param_groups[0][key], theirs.param_groups[0][key]))
        with samkernels.use_backend("reference"):
            ours.step(lambda: (ours.zero_grad(), F.cross_entropy(a(x), y).backward()))
        theirs.zero_grad()
        F.cross_entropy(b(x), y).backward()
        theirs.step()
        for s in sched:
            s.step()
    assert all(u == v for u, v in seen)
    assert len({u for u, _ in seen}) > 3  # really cycled
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_groups_hold_only_their_base_keys():
    model = net()
    opt = SAM(model[0].parameters(), lr=0.1, momentum=0.9, betas=(0.8, 0.99), adam_eps=1e-6)
    assert "betas" not in opt.param_groups[0] and opt.param_groups[0]["momentum"] == 0.9
    opt.add_param_group({"params": model[2].parameters(), "base": "adam"})  # the keywords' betas
    g = opt.param_groups[1]
    assert g["betas"] == (0.8, 0.99) and g["adam_eps"] == 1e-6 and "momentum" not in g
    with pytest.raises(ValueError, match=r"betas\[0\]"):  # unused keywords are still checked
        SAM(model.parameters(), lr=0.1, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="momentum"):
        SAM(model.parameters(), lr=0.1, base="adam", momentum=-1.0)
    x, y = batch()
    opt.step(lambda: (opt.zero_grad(), F.cross_entropy(model(x), y).backward()))
    other = net()
    opt2 = SAM(other[0].parameters(), lr=0.1, momentum=0.9)
    opt2.add_param_group({"params": other[2].parameters()})
    opt2.load_state_dict(opt.state_dict())  # mixed bases survive a checkpoint
    assert opt2.param_groups[1]["base"] == "adam" and opt2.param_groups[1]["betas"] == (0.8, 0.99)


@pytest.mark.parametrize("make", [
    lambda ps: SAM(ps, lr=0.1, rho=0.05, momentum=0.9),
    lambda ps: BSAM(ps, lr=0.1, num_data=24, rho=0.05, seed=1),
])
def test_lr_scheduler_sees_explicit_phase_steps(make):
    """Explicit phases never call step(): second_step itself must tell torch's schedulers that the
    optimizer stepped, or they warn "lr_scheduler.step() before optimizer.step()"."""
    model, (x, y) = net(), batch()
    opt = make(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            if isinstance(opt, BSAM):
                opt.noise_step()
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_rho_proportional_to_lr_decays_with_a_manual_lr():
    """lr_max is each group's lr at the first call, remembered (also across a checkpoint)."""
    model, (x, y) = net(), batch()
    seen = []
    sched_fn = rho_proportional_to_lr(rho_max=0.2, rho_min=0.02)

    def spy(group):
        seen.append(sched_fn(group))
        return seen[-1]

    opt = SAM(model.parameters(), lr=0.1, rho=0.2, rho_schedule=spy)
    closure = lambda: (opt.zero_grad(), F.cross_entropy(model(x), y).backward())  # noqa: E731
    lrs = [0.1, 0.05, 0.025]
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr  # no LR scheduler: the user decays lr by hand
        opt.step(closure)
    assert seen == pytest.approx([0.02 + 0.18 * lr / 0.1 for lr in lrs])
    opt2 = SAM(net().parameters(), lr=0.5, rho=0.2, rho_schedule=sched_fn)
    opt2.load_state_dict(opt.state_dict())  # lr_max (0.1) rides along in the group
    assert sched_fn(opt2.param_groups[0]) == pytest.approx(0.02 + 0.18 * 0.25)


def test_closure_with_defaulted_arguments():
    """Only positional parameters without a default (or one named ascent) receive arguments."""
    model, (x, y) = net(), batch()
    opt = SAM(model.parameters(), lr=0.1, rho=0.05)
    got = []

    def closure(inputs=x, target=y):
        got.append(inputs is x)
        opt.zero_grad()
        loss = F.cross_entropy(model(inputs), target)
        loss.backward()
        return loss

    opt.step(closure)
    assert got == [True, True]

    flags = []

    def with_flag(i, ascent=False, inputs=x):
        flags.append((i, ascent, inputs is x))
        opt.zero_grad()
        F.cross_entropy(model(inputs[i::2]), y[i::2]).backward()

    opt.step(with_flag, m=2)
    assert flags == [(0, True, True), (0, False, True), (1, True, True), (1, False, True)]


class TwoBranch(torch.nn.Module):
    """a(x) + b(x): ``use_b`` decides whether b is in the graph (and gets a gradient)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(5, 3).double(), torch.nn.Linear(5, 3).double()

    def forward(self, x, use_b):
        return self.a(x) + self.b(x) if use_b else self.a(x)


def _m_step(model, opt, x, y, uses):
    m = len(uses)

    def closure(i):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[i::m], uses[i]), y[i::m])
        loss.backward()
        return loss

    if m == 1:
        opt.step(lambda: closure(0))
    else:
        opt.step(closure, m=m)


@pytest.mark.parametrize("m", [1, 2])
def test_m_sharpness_leaves_a_parameter_without_gradient_alone(m):
    """A layer used in step 1 but not in step 2 must not move in step 2 (no stale accumulator)."""
    model, (x, y) = TwoBranch(), batch()
    opt = SAM(model.parameters(), lr=0.1, rho=0.05, momentum=0.9)
    _m_step(model, opt, x, y, [True] * m)
    after_first = [p.detach().clone() for p in model.b.parameters()]
    _m_step(model, opt, x, y, [False] * m)
    assert all(torch.equal(p, q) for p, q in zip(model.b.parameters(), after_first))


def _by_hand(model, x, y, uses, lr, rho):
    """SAM-SGD with m-sharpness from plain autograd: only the parameters in a micro-batch's graph
    are perturbed and get that micro-batch's gradient; the update averages over all m."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    m, acc = len(uses), {}
    for i, use_b in enumerate(uses):
        names = [k for k in w if use_b or k.startswith("a.")]

        def grads(vals):
            ps = {k: v.clone().requires_grad_(k in names) for k, v in vals.items()}
            loss = F.cross_entropy(torch.func.functional_call(model, ps, (x[i::m], use_b)), y[i::m])
            return dict(zip(names, torch.autograd.grad(loss, [ps[k] for k in names])))

        g = grads(w)
        norm = torch.sqrt(sum((t ** 2).sum() for t in g.values()))
        ge = grads({k: v + rho * g[k] / (norm + 1e-12) if k in g else v for k, v in w.items()})
        for k, t in ge.items():
            acc[k] = acc[k] + t if k in acc else t
    return {k: v - lr * acc[k] / m if k in acc else v for k, v in w.items()}


def test_m_sharpness_parameter_gradients_in_some_micro_batches():
    """Step 1 fills every accumulator; step 2 gives b a gradient only in micro-batch 1 (its stale
    accumulator must be reset there); step 3 only in micro-batch 0 (no .grad left at the end)."""
    model, (x, y) = TwoBranch(), batch()
    lr, rho = 0.1, 0.05
    opt = SAM(model.parameters(), lr=lr, rho=rho)
    for uses in ([True, True], [False, True], [True, False], [False, False]):
        want = _by_hand(model, x, y, uses, lr, rho)
        _m_step(model, opt, x, y, uses)
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), want[k], rtol=1e-12, atol=1e-13)


def test_bsam_msharpness_sums_start_from_zero_for_late_parameters():
    """bSAM's sqrt(s)|g| sums (m-sharpness) start from zero for a parameter whose first gradient of
    the step comes in a later micro-batch: what the buffers held before the step does not matter."""
    x, y = batch()
    runs = []
    for fresh in (False, True):
        model = TwoBranch()
        opt = BSAM(model.parameters(), lr=0.1, num_data=64, rho=0.05, seed=1)
        _m_step(model, opt, x, y, [True, True])
        if fresh:  # garbage in every sum left from step 1: a correct step never reads it
            for a in opt._accum_bufs.values():
                a.fill_(1e3)
        _m_step(model, opt, x, y, [False, True])  # b joins in micro-batch 1 only
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*runs))

