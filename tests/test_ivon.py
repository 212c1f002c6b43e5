"""IVON (samkernels.optim.IVON; docs/spec.md "IVON") against the reference package ``ivon-opt``,
and the optimizer conventions: exact resume, skipped steps, GradScaler, errors, phase order.

Fidelity: ivon-opt draws its noise with ``torch.randn`` (one call per parameter group and sample);
the tests replace that draw with the concatenation, in the group's parameter order, of the Philox
normals IVON uses for the same sample (``R.philox_normal(seed, counter, parameter id)``), so both
optimizers see the same theta and must take the same steps.
"""
import copy
import io
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import samkernels  # noqa: E402
from samkernels.ops import reference as R  # noqa: E402
from samkernels.optim import IVON, NonFiniteGradientError  # noqa: E402

from conftest import has_extension  # noqa: E402

try:  # the reference package; tests/install_and_test.sh installs it
    import ivon as ivon_opt  # noqa: E402
except ImportError as exc:  # pragma: no cover - a failing test, never a skip
    raise ImportError("tests/test_ivon.py needs ivon-opt (pip install ivon-opt==0.1.3), the "
                      "reference IVON it checks samkernels.optim.IVON against") from exc

F32, F64 = torch.float32, torch.float64
SEED = 0x5EED_1D0_0B


def net(dtype=F64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(),
                               torch.nn.Linear(9, 3)).to(dtype)


def batch(t, dtype=F64, n=24):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(n, 6, generator=g, dtype=F64).to(dtype), torch.randint(0, 3, (n,),
                                                                                generator=g)


def loss_fn(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


# two groups: other lr, ess, h0, weight decay and betas in the second
HYPER = dict(lr=0.1, ess=200.0, hess_init=0.5, betas=(0.9, 0.999), weight_decay=1e-3)
GROUP2 = dict(lr=0.05, ess=100.0, hess_init=2.0, betas=(0.8, 0.99), weight_decay=5e-3)


def ours(model, mc_samples, seed=SEED, **kw):
    ps = list(model.parameters())
    return IVON([{"params": ps[:2]}, {"params": ps[2:], **GROUP2}], seed=seed,
                mc_samples=mc_samples, **{**HYPER, **kw})


def peer(model, mc_samples, **kw):
    ps = list(model.parameters())
    conv = lambda h: {("beta1" if k == "betas" else k): v for k, v in h.items()}  # noqa: E731
    g2 = conv(GROUP2)
    g2["beta2"] = GROUP2["betas"][1]
    g2["beta1"] = GROUP2["betas"][0]
    h = {**HYPER, **kw}
    b1, b2 = h.pop("betas")
    return ivon_opt.IVON([{"params": ps[:2]}, {"params": ps[2:], **g2}], beta1=b1, beta2=b2,
                         mc_samples=mc_samples, **h)


_NORMALS = {}


def _philox_normal(seed, counter, pid, n):
    """R.philox_normal (pure Python, slow), computed once per argument tuple: the tests draw the
    same noise on every backend and dtype."""
    key = (seed, counter, pid, n)
    if key not in _NORMALS:
        _NORMALS[key] = R.philox_normal(seed, counter, pid, n)
    return _NORMALS[key]


class InjectedRandn:
    """Replaces torch.randn while ivon-opt samples: call j of a sample returns group j's noise,
    the Philox normals of (seed, counter, parameter id) of the group's parameters, concatenated
    in order; parameter ids count over all groups (IVON's).  Other calls go to torch.randn."""

    def __init__(self, groups, monkeypatch):
        self.groups, self.queue, self.mp = groups, [], monkeypatch
        self.real = torch.randn
        monkeypatch.setattr(torch, "randn", self)

    def load(self, seed, counter):
        pid, self.queue = 0, []
        for g in self.groups:
            zs = []
            for p in g["params"]:
                zs.append(_philox_normal(seed, counter, pid, p.numel()))
                pid += 1
            self.queue.append(torch.cat(zs))  # a new tensor: the cached normals stay

    def __call__(self, *args, **kw):
        if not self.queue:  # not ivon-opt sampling
            return self.real(*args, **kw)
        (n,), device, dtype = args, kw.get("device"), kw.get("dtype")
        z = self.queue.pop(0)
        assert z.numel() == n, (z.numel(), n)
        return z.to(dtype=dtype, device=device)


def train_both(dtype, mc_samples, steps, monkeypatch, **kw):
    """``steps`` steps of IVON and of ivon-opt from the same model and noise."""
    a, b = net(dtype), net(dtype)
    opt, ref = ours(a, mc_samples, **kw), peer(b, mc_samples, **kw)
    inject = InjectedRandn(ref.param_groups, monkeypatch)
    for t in range(steps):
        x, y = batch(t, dtype)

        def closure():
            loss = loss_fn(a, x, y)
            loss.backward()
            return loss
        opt.zero_grad()
        la = opt.step(closure)
        losses = []
        for k in range(mc_samples):
            inject.load(SEED, t * mc_samples + k)
            with ref.sampled_params(train=True):
                ref.zero_grad()
                loss = loss_fn(b, x, y)
                loss.backward()
                losses.append(loss.detach())
        ref.step()
        assert not inject.queue
        torch.testing.assert_close(la, sum(losses) / mc_samples, rtol=1e-6 if dtype == F32 else
                                   1e-12, atol=0)
    return a, b, opt, ref, inject


def _flat_state(opt, ref, key_ours, key_ref):
    mine = torch.cat([opt.state[p][key_ours].flatten() for g in opt.param_groups
                      for p in g["params"]])
    theirs = torch.cat([g[key_ref] for g in ref.param_groups])
    return mine, theirs


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not has_extension(), reason="samkernels._C is not built")), "triton"])
@pytest.mark.parametrize("mc_samples", [1, 2])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
def test_equals_ivon_opt_over_50_steps(dtype, mc_samples, backend, monkeypatch):
    """50 steps, two groups, weight decay on, the same noise: the same weights, Hessian and
    momentum as ivon-opt (fp64 to 1e-12; fp32 close: the kernels' normals are within a few ulp of
    the float64 ones ivon-opt gets)."""
    steps = 50 if backend != "triton" else 6  # the interpreter is slow
    with samkernels.use_backend(backend):
        a, b, opt, ref, _ = train_both(dtype, mc_samples, steps, monkeypatch)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=5e-5, atol=5e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **tol)
    for ours_key, ref_key in (("hess", "hess"), ("momentum", "momentum")):
        mine, theirs = _flat_state(opt, ref, ours_key, ref_key)
        torch.testing.assert_close(mine, theirs, **tol)
    assert opt.state_dict()["samkernels"]["step"] == ref.current_step == steps
    # the run moved: a wrong Hessian or momentum would show
    assert not torch.allclose(a[0].weight, net(dtype)[0].weight, rtol=0, atol=1e-3)


@pytest.mark.parametrize("clip_radius,rescale_lr,debias",
                         [(0.02, False, False), (1e-3, True, True)])
def test_equals_ivon_opt_with_clipping_and_flags(clip_radius, rescale_lr, debias, monkeypatch):
    """clip_radius (small enough to clip), rescale_lr and debias off / on: still ivon-opt's run."""
    kw = dict(clip_radius=clip_radius, rescale_lr=rescale_lr, debias=debias)
    a, b, *_ = train_both(F64, 2, 20, monkeypatch, **kw)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
def test_same_predictive_as_ivon_opt(dtype, monkeypatch):
    """After 20 steps, ``predictive`` (8 posterior samples, seeds drawn from one generator, noise
    step 0) equals ivon-opt's sampled_params loop with the same noise."""
    a, b, opt, ref, inject = train_both(dtype, 1, 20, monkeypatch)
    x, _ = batch(99, dtype)
    got = opt.predictive(a, x, samples=8, generator=4242)
    gen = torch.Generator().manual_seed(4242)
    total = 0
    b.eval()
    for _ in range(8):
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen).item())
        inject.load(seed, 0)
        with torch.no_grad(), ref.sampled_params():
            total = total + torch.softmax(b(x).float(), dim=-1)
    want = total / 8
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == F64 else 2e-5, atol=1e-7)
    for p, q in zip(a.parameters(), b.parameters()):  # the mean weights came back
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12 if dtype == F64 else 2e-4,
                                   atol=1e-12 if dtype == F64 else 2e-5)
    # sigma^2 = 1 / (lambda (h + delta)), ivon-opt's noise scale squared
    var = torch.cat([v.flatten() for v in opt.posterior_variance()])
    want_var = torch.cat([1.0 / (g["ess"] * (g["hess"] + g["weight_decay"]))
                          for g in ref.param_groups])
    torch.testing.assert_close(var, want_var, rtol=1e-10 if dtype == F64 else 2e-4, atol=0)


# --- optimizer conventions ---------------------------------------------------------------------
def run(opt, model, t0, t1, dtype=F64, poison=None):
    """Steps t0 .. t1-1 with step(closure); ``poison``: (step, sample) whose gradient gets an
    inf."""
    for t in range(t0, t1):
        x, y = batch(t, dtype)
        calls = []

        def closure():
            loss = loss_fn(model, x, y)
            loss.backward()
            if poison is not None and poison == (t, len(calls)):
                model[2].weight.grad[1, 2] = float("inf")
            calls.append(1)
            return loss
        opt.zero_grad()
        opt.step(closure)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_state_equal(a, b):
    assert a["samkernels"] == b["samkernels"]
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]), (i, k)


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
@pytest.mark.parametrize("mc_samples", [1, 3])
def test_state_dict_resume_is_exact(mc_samples, dtype):
    """3 steps, save, 3 more; a fresh model and optimizer (other weights, other seed) load the
    saved states and take the same 3 steps: bit-identical weights and state (float32 state for
    bf16 parameters)."""
    model = net(dtype)
    opt = ours(model, mc_samples)
    run(opt, model, 0, 3, dtype)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run(opt, model, 3, 6, dtype)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2 = net(dtype, seed=5)
    opt2 = ours(model2, mc_samples, seed=77)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for p in model2.parameters():
        assert opt2.state[p]["hess"].dtype == (F64 if dtype == F64 else F32)
    run(opt2, model2, 3, 6, dtype)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert_state_equal(opt.state_dict(), opt2.state_dict())
    sd = opt.state_dict()
    assert set(sd["samkernels"]) == {"cls", "seed", "noise_step", "step"}
    assert all(set(st) == {"hess", "momentum"} for st in sd["state"].values())


@pytest.mark.parametrize("mc_samples,sample", [(1, 0), (3, 0), (3, 2)])
def test_inf_skips_the_step(mc_samples, sample):
    """An inf gradient in any sample skips the whole step: weights, state, t and the noise counter
    as before, so the run then equals one that never took that step."""
    model, clean = net(), net()
    opt, opt_clean = ours(model, mc_samples), ours(clean, mc_samples)
    run(opt, model, 0, 2)
    run(opt_clean, clean, 0, 2)
    before, sd = weights(model), copy.deepcopy(opt.state_dict())
    run(opt, model, 2, 3, poison=(2, sample))
    assert opt.step_skipped
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert_state_equal(opt.state_dict(), sd)
    run(opt, model, 3, 5)
    run(opt_clean, clean, 3, 5)
    for p, q in zip(model.parameters(), clean.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("mc_samples", [1, 2])
def test_skip_on_device_and_raise(mc_samples):
    """skip_on_device: the fused ops skip on the device flag (weights and state as before);
    raise: NonFiniteGradientError with the weights at the mean and nothing changed."""
    for policy in ("skip_on_device", "raise"):
        model = net()
        opt = ours(model, mc_samples, nonfinite=policy)
        run(opt, model, 0, 2)
        before = weights(model)
        hess = [opt.state[p]["hess"].clone() for p in model.parameters()]
        if policy == "raise":
            with pytest.raises(NonFiniteGradientError, match="inf/NaN"):
                run(opt, model, 2, 3, poison=(2, mc_samples - 1))
        else:
            run(opt, model, 2, 3, poison=(2, mc_samples - 1))
            assert opt.step_skipped
        for p, q, h in zip(model.parameters(), before, hess):
            assert torch.equal(p, q) and torch.equal(opt.state[p]["hess"], h)


@pytest.mark.skipif(not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler"),
                    reason="torch.amp.GradScaler('cpu') needs torch >= 2.3")
@pytest.mark.parametrize("mc_samples", [1, 2])
def test_grad_scaler_is_exact_and_skips(mc_samples):
    """A power-of-two scale is exact (== no scaler, bit for bit, in the closure step and in the
    explicit phases); an inf in a scaled pass skips the step and backs the scale off."""
    runs = []
    for how in ("plain", "closure", "phases"):
        model = net(F32)
        opt = ours(model, mc_samples)
        scaler = torch.amp.GradScaler("cpu") if how != "plain" else None
        for t in range(3):
            x, y = batch(t, F32)

            def backward():
                loss = loss_fn(model, x, y)
                (scaler.scale(loss) if scaler else loss).backward()
                return loss
            opt.zero_grad()
            if how == "phases":
                for k in range(mc_samples):
                    opt.noise_step()
                    backward()
                    if k < mc_samples - 1:
                        opt.accumulate_step(zero_grad=True, scaler=scaler)
                opt.second_step(zero_grad=True, scaler=scaler)
            else:
                opt.step(backward, scaler=scaler)
            if scaler:
                scaler.update()
        runs.append((weights(model), opt.state_dict(), scaler))
    for w, sd, _ in runs[1:]:
        assert all(torch.equal(p, q) for p, q in zip(w, runs[0][0]))
        assert_state_equal(sd, runs[0][1])
    assert runs[1][2].get_scale() == 65536.0
    # an inf under the scaler: skipped, scale halved
    model = net(F32)
    opt = ours(model, mc_samples)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batch(0, F32)
    before = weights(model)

    def bad():
        loss = loss_fn(model, x, y)
        scaler.scale(loss).backward()
        model[0].bias.grad[0] = float("nan")
        return loss
    opt.step(bad, scaler=scaler)
    scaler.update()
    assert opt.step_skipped and scaler.get_scale() == 32768.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_explicit_phases_equal_the_closure_step():
    """noise_step / accumulate_step / second_step in the documented order == step(closure)."""
    a, b = net(), net()
    opt_a, opt_b = ours(a, 3), ours(b, 3)
    run(opt_a, a, 0, 3)
    for t in range(3):
        x, y = batch(t)
        opt_b.zero_grad()
        for k in range(3):
            opt_b.noise_step()
            loss_fn(b, x, y).backward()
            if k < 2:
                opt_b.accumulate_step(zero_grad=True)
        opt_b.second_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert_state_equal(opt_a.state_dict(), opt_b.state_dict())


def test_phase_order_misuse_is_an_error():
    model = net()
    opt = ours(model, 2)
    x, y = batch(0)
    with pytest.raises(RuntimeError, match="no sample drawn"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="no sample drawn"):
        opt.accumulate_step()
    opt.noise_step()
    with pytest.raises(RuntimeError, match="still perturbed"):
        opt.noise_step()
    loss_fn(model, x, y).backward()
    with pytest.raises(RuntimeError, match="only 1 of mc_samples=2"):
        opt.second_step()
    opt.accumulate_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="already accumulated"):
        opt.accumulate_step()
    with pytest.raises(RuntimeError, match="step is in progress"):
        with opt.sampled_params(0):
            pass
    opt.noise_step()
    loss_fn(model, x, y).backward()
    with pytest.raises(RuntimeError, match="last of mc_samples=2"):
        opt.accumulate_step()
    opt.second_step()
    assert opt.state_dict()["samkernels"]["step"] == 1
    # restore() abandons a step: its noise is drawn again
    opt.noise_step()
    opt.restore()
    assert opt.state_dict()["samkernels"]["noise_step"] == 2
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


@pytest.mark.parametrize("kw,name", [
    (dict(lr=-1.0), "lr"), (dict(ess=0.0), "ess"), (dict(hess_init=0.0), "hess_init"),
    (dict(weight_decay=-1e-4), "weight_decay"), (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\]"), (dict(clip_radius=0.0), "clip_radius"),
    (dict(mc_samples=0), "mc_samples"), (dict(mc_samples=1.5), "mc_samples"),
    (dict(rescale_lr=1), "rescale_lr"), (dict(seed="x"), "seed"),
    (dict(nonfinite="maybe"), "nonfinite")])
def test_errors_name_the_argument(kw, name):
    args = dict(lr=0.1, ess=100.0)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        IVON(net().parameters(), **args)
    opt = IVON(net().parameters(), lr=0.1, ess=10.0)
    group_kw = {k: v for k, v in kw.items() if k in ("lr", "ess", "hess_init", "weight_decay",
                                                      "betas", "clip_radius")}
    if group_kw:  # the same check on a group added later, naming the group
        with pytest.raises(ValueError, match=name):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=F64))],
                                 **group_kw})


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not has_extension(), reason="samkernels._C is not built")), "triton"])
def test_ops_reject_a_count_without_means(backend):
    """ivon_update_ with count > 1 and no running means (the earlier samples would be lost), one
    mean list without the other, or a count below 1: an error naming the argument on every
    backend."""
    p = [torch.zeros(3)]
    def args(count, avg):
        return (p, [torch.ones(3)], [torch.zeros(3)], [torch.ones(3)], [torch.zeros(3)], avg, avg,
                [0], 1, 0, 0.1, 10.0, 0.0, 0.9, 0.99, math.inf, 1.0, count)
    with pytest.raises((ValueError, RuntimeError), match="count=2 needs avg_grads"):
        samkernels.ops.ivon_update_(*args(2, []), backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="count numbers the samples"):
        samkernels.ops.ivon_update_(*args(0, []), backend=backend)
    half = list(args(2, [torch.zeros(3)]))
    half[6] = []  # avg_grads without avg_nxgs
    with pytest.raises((ValueError, RuntimeError), match="avg_grads has 1 tensors but avg_nxgs"):
        samkernels.ops.ivon_update_(*half, backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="count numbers the samples"):
        samkernels.ops.ivon_accumulate_(p, [torch.ones(3)], [torch.zeros(3)], [torch.ones(3)],
                                        [torch.zeros(3)], [torch.zeros(3)], [0], 1, 0, 10.0, 0.0,
                                        0, backend=backend)


def test_sampled_params_has_ivon_variance():
    """sampled_params draws theta = m + z / sqrt(lambda (h + delta)): h = 3, delta = 1, lambda = 4
    gives a spread of 1/4."""
    w = torch.nn.Parameter(torch.zeros(40_000, dtype=F64))
    opt = IVON([w], lr=0.1, ess=4.0, hess_init=3.0, weight_decay=1.0)
    with opt.sampled_params(7):
        spread = w.detach().std().item()
    assert spread == pytest.approx(0.25, rel=0.02)
    assert torch.equal(w.detach(), torch.zeros_like(w))
    assert opt.posterior_variance()[0].unique().tolist() == [1 / 16]


def test_a_parameter_without_a_gradient_in_one_sample_stays():
    """A parameter with no gradient in some sample of the step is not updated (back at its mean,
    its state untouched); the others are."""
    model = net()
    opt = ours(model, 2)
    x, y = batch(0)
    first = weights(model)
    opt.noise_step()
    loss_fn(model, x, y).backward()
    opt.accumulate_step(zero_grad=True)
    opt.noise_step()
    loss_fn(model, x, y).backward()
    model[2].bias.grad = None
    opt.second_step(zero_grad=True)
    assert torch.equal(model[2].bias, first[3])
    assert not torch.equal(model[2].weight, first[2])
    assert torch.equal(opt.state[model[2].bias]["momentum"], torch.zeros(3, dtype=F64))
