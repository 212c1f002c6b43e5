"""Training-loop ergonomics: m-sharpness, gradient accumulation, BatchNorm statistics, LR and rho
schedules, separate ascent loss, rho = 0, exact restore in bf16."""
import copy

import pytest
import torch
import torch.nn.functional as F

import samkernels
from samkernels import BSAM, SAM
from samkernels.ops import reference as ref
from samkernels.optim import bn_frozen, rho_proportional_to_lr



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
    for i in range(m):  # SPEC: lines 1-4 per micro-batch, own noise (noise step i)
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

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

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

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

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
