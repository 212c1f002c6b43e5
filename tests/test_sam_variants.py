"""GSAM, WSAM, LookSAM and FriendlySAM against their papers and against pytorch_optimizer.

Each optimizer runs 30 float64 steps on every backend (reference, cpu, triton interpreter) next to
an independent float64 implementation of its paper's update written here (flattened vectors, the
gradients from autograd, the base step from torch.optim), and is compared with
``pytorch_optimizer``'s class of the same name: as shipped (it takes the global gradient norm in
float32, see ``_f32_norm_gap``) and with that one norm taken in float64, where the two must agree
to rounding.  The family-wide properties (rho = 0 is the base optimizer, GradScaler, inf/NaN
skips, exact resume, state_dict keys) run in tests/test_family_ergonomics.py.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import samkernels
from samkernels.optim import GSAM, WSAM, FriendlySAM, LookSAM, rho_proportional_to_lr

from conftest import has_extension
from helpers import closure_for

F64 = torch.float64
TRITON = samkernels._dispatch.triton_usable(torch.device("cpu"))
BACKENDS = ["reference",
            pytest.param("cpu", marks=pytest.mark.skipif(not has_extension(), reason="no _C")),
            pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="no triton"))]
STEPS = 30


# --- model, data ---------------------------------------------------------------------------------
def net(seed=0, dtype=F64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 11), torch.nn.Tanh(),
                               torch.nn.Linear(11, 3)).to(dtype)


def batch(t, n=20, dtype=F64):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(n, 6, generator=g, dtype=F64).to(dtype), torch.randint(0, 3, (n,), generator=g)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


# --- the independent float64 implementation ------------------------------------------------------
class Paper:
    """The paper's update on a copy of ``model``: gradients by autograd at given weights, the base
    step by torch.optim on leaf tensors, the direction computed here on flattened vectors."""

    def __init__(self, model, base, lr, **base_kw):
        self.model = copy.deepcopy(model)
        self.w = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[base]
        self.opt = cls(self.w, lr=lr, **base_kw)
        self.shapes = [p.shape for p in self.w]

    def grad(self, at, x, y):
        params = {n: a.detach().requires_grad_() for (n, _), a in
                  zip(self.model.named_parameters(), at)}
        loss = F.cross_entropy(torch.func.functional_call(self.model, params, (x,)), y)
        return self.flat(torch.autograd.grad(loss, list(params.values())))

    def flat(self, ts):
        return torch.cat([t.reshape(-1) for t in ts])

    def split(self, v):
        out, i = [], 0
        for s in self.shapes:
            n = math.prod(s)
            out.append(v[i:i + n].view(s))
            i += n
        return out

    def now(self):
        return [w.detach() for w in self.w]

    def shifted(self, e):
        return [w.detach() + x for w, x in zip(self.w, self.split(e))]

    def base_step(self, d):
        for w, x in zip(self.w, self.split(d)):
            w.grad = x.clone()
        self.opt.step()

    def add(self, v):
        with torch.no_grad():
            for w, x in zip(self.w, self.split(v)):
                w.add_(x)


def paper_gsam(p, t, x, y, rho, alpha, eps):
    g0 = p.grad(p.now(), x, y)
    gp = p.grad(p.shifted(rho * g0 / (g0.norm() + eps)), x, y)
    # Zhuang et al. 2022, Alg. 1, the authors' eps placement
    cos = torch.dot(g0, gp) / (g0.norm() * gp.norm() + eps)
    g_perp = g0 - cos * g0.norm() * gp / (gp.norm() + eps)
    p.base_step(gp - alpha * g_perp)


def paper_wsam(p, t, x, y, rho, gamma, decoupled, lr, eps):
    g0 = p.grad(p.now(), x, y)
    gp = p.grad(p.shifted(rho * g0 / (g0.norm() + eps)), x, y)
    k = gamma / (1 - gamma)
    if decoupled:  # Yue et al. 2023, Alg. 1: the base step with g, then the sharpness term
        p.base_step(g0)
        p.add(-lr * k * (gp - g0))
    else:
        p.base_step(k * gp + (1 - k) * g0)


def paper_looksam(p, t, x, y, rho, alpha, k, state, eps, reuse_eps=None):
    g = p.grad(p.now(), x, y)
    if t % k == 0:  # Liu et al. 2022, Alg. 1
        gs = p.grad(p.shifted(rho * g / (g.norm() + eps)), x, y)
        state["gv"] = gs - torch.dot(gs, g) / (torch.dot(g, g) + eps) * g
        p.base_step(gs)
    else:
        gv = state.get("gv", torch.zeros_like(g))
        p.base_step(g + alpha * g.norm() / (gv.norm() + (eps if reuse_eps is None else reuse_eps))
                    * gv)


def paper_friendly(p, t, x, y, rho, sigma, lmbda, state, eps):
    g = p.grad(p.now(), x, y)
    if "m" not in state:  # Li et al. 2024 (the authors' code: the first step takes m = g)
        u, state["m"] = g, g.clone()
    else:
        u = g - sigma * state["m"]
        state["m"] = lmbda * state["m"] + (1 - lmbda) * g
    gp = p.grad(p.shifted(rho * u / (u.norm() + eps)), x, y)
    p.base_step(gp)


BASES = {"sgd": (0.05, dict(momentum=0.9, weight_decay=1e-3)),
         "nesterov": (0.05, dict(momentum=0.9, nesterov=True)),
         "adam": (1e-2, dict(weight_decay=1e-3)),
         "adamw": (1e-2, dict(weight_decay=1e-2))}


def _ours(cls, model, base, **kw):
    lr, base_kw = BASES[base]
    return cls(model.parameters(), lr=lr, base="sgd" if base == "nesterov" else base,
               **base_kw, **kw)


def _paper(model, base):
    lr, base_kw = BASES[base]
    return Paper(model, "sgd" if base == "nesterov" else base, lr, **base_kw)


METHODS = {
    "gsam": (GSAM, dict(rho=0.1, alpha=0.4),
             lambda p, t, x, y, st: paper_gsam(p, t, x, y, 0.1, 0.4, 1e-12)),
    "wsam": (WSAM, dict(rho=0.1, gamma=0.8),
             lambda p, t, x, y, st: paper_wsam(p, t, x, y, 0.1, 0.8, True, p.opt.param_groups[0]["lr"],
                                               1e-12)),
    "wsam_coupled": (WSAM, dict(rho=0.1, gamma=0.4, decoupled=False),
                     lambda p, t, x, y, st: paper_wsam(p, t, x, y, 0.1, 0.4, False, None, 1e-12)),
    "looksam": (LookSAM, dict(rho=0.1, k=3, alpha=0.7),
                lambda p, t, x, y, st: paper_looksam(p, t, x, y, 0.1, 0.7, 3, st, 1e-12)),
    "friendlysam": (FriendlySAM, dict(rho=0.1, sigma=0.9, lmbda=0.6),
                    lambda p, t, x, y, st: paper_friendly(p, t, x, y, 0.1, 0.9, 0.6, st, 1e-12)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("method", list(METHODS))
def test_equals_the_paper_over_30_steps(method, base, backend):
    """30 float64 steps of step(closure) == the paper's update written here, to rounding.  The
    Triton interpreter (slow) runs 8 steps (LookSAM's full and reuse steps both) on SGD."""
    if backend == "triton" and base != "sgd":
        pytest.skip("the interpreter is slow; the other bases run on reference and cpu")
    cls, kw, paper_step = METHODS[method]
    model = net()
    ours, paper, st = _ours(cls, model, base, **kw), _paper(model, base), {}
    with samkernels.use_backend(backend):
        for t in range(8 if backend == "triton" else STEPS):
            x, y = batch(t)
            ours.step(closure_for(ours, model, x, y))
            paper_step(paper, t, x, y, st)
    for a, b in zip(model.parameters(), paper.now()):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)
    # it moved, and not like plain SAM would: the variant's direction matters
    assert any(not torch.allclose(a, b) for a, b in zip(weights(model), weights(net())))


@pytest.mark.parametrize("backend", BACKENDS[:2])
@pytest.mark.parametrize("method", ["gsam", "wsam", "looksam"])
def test_explicit_phases_equal_the_closure_step(method, backend):
    """first_step / second_step (LookSAM: reuse_step when no full step is due) == step(closure),
    bit for bit, two param groups (the norms and dots span both)."""
    cls, kw, _ = METHODS[method]

    def groups(m):
        return [{"params": list(m[0].parameters()), "lr": 0.02}, {"params": list(m[2].parameters())}]

    a, b = net(), net()
    oa = cls(groups(a), lr=0.05, momentum=0.9, **kw)
    ob = cls(groups(b), lr=0.05, momentum=0.9, **kw)
    with samkernels.use_backend(backend):
        for t in range(7):
            x, y = batch(t)
            oa.step(closure_for(oa, a, x, y))
            F.cross_entropy(b(x), y).backward()
            if getattr(ob, "full_step_due", True):
                ob.first_step(zero_grad=True)
                F.cross_entropy(b(x), y).backward()
                ob.second_step(zero_grad=True)
            else:
                ob.reuse_step(zero_grad=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_gsam_rho_proportional_to_lr():
    """GSAM's rho_t = rho_min + (rho_max - rho_min)(lr_t - lr_min)/(lr_max - lr_min) through
    rho_schedule, under a linear LR decay: equal to the paper's update with that rho_t."""
    model = net()
    opt = GSAM(model.parameters(), lr=0.1, alpha=0.3, momentum=0.9,
               rho_schedule=rho_proportional_to_lr(rho_max=0.2, rho_min=0.02, lr_max=0.1,
                                                   lr_min=0.01))
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=10)
    paper = Paper(model, "sgd", 0.1, momentum=0.9)
    psched = torch.optim.lr_scheduler.LinearLR(paper.opt, 1.0, 0.1, total_iters=10)
    for t in range(12):
        x, y = batch(t)
        lr = paper.opt.param_groups[0]["lr"]
        rho_t = 0.02 + (0.2 - 0.02) * (lr - 0.01) / (0.1 - 0.01)
        opt.step(closure_for(opt, model, x, y))
        assert opt.param_groups[0]["rho"] == pytest.approx(rho_t, rel=1e-12)
        paper_gsam(paper, t, x, y, rho_t, 0.3, 1e-12)
        sched.step()
        psched.step()
    for a, b in zip(model.parameters(), paper.now()):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)


def test_gsam_alpha_zero_is_sam_and_looksam_k1_is_sam():
    """GSAM with alpha = 0, LookSAM with k = 1 and FriendlySAM with sigma = 0 take SAM's steps
    (the first two within rounding of the mixed direction's coefficients, the last exactly)."""
    for cls, kw, exact in [(GSAM, dict(alpha=0.0), False), (LookSAM, dict(k=1), True),
                           (FriendlySAM, dict(sigma=0.0, lmbda=0.5), False)]:
        a, b = net(), net()
        oa = cls(a.parameters(), lr=0.05, rho=0.1, momentum=0.9, **kw)
        ob = samkernels.SAM(b.parameters(), lr=0.05, rho=0.1, momentum=0.9)
        for t in range(8):
            x, y = batch(t)
            oa.step(closure_for(oa, a, x, y))
            ob.step(closure_for(ob, b, x, y))
        for p, q in zip(a.parameters(), b.parameters()):
            if exact:
                assert torch.equal(p, q), cls
            else:
                torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


# --- pytorch_optimizer ---------------------------------------------------------------------------
# a test requirement (tests/install_and_test.sh installs it): missing, the module fails to import
import pytorch_optimizer as po  # noqa: E402
from pytorch_optimizer.optimizer import sam as po_sam  # noqa: E402


def _f64_norm(param_groups, device=None, *, weight_adaptive=False):
    """pytorch_optimizer's get_global_gradient_norm (sum of squared gradient norms, |w|-weighted
    for adaptive groups) with the squares summed in float64 instead of float32."""
    total = torch.zeros(1, dtype=F64)
    for group in param_groups:
        for p in group["params"]:
            if p.grad is not None:
                g = p.grad * p.abs() if weight_adaptive and group.get("adaptive") else p.grad
                total += g.double().square().sum()
    return total


class _Rho:
    def __init__(self, rho):
        self.rho = rho

    def step(self):
        return self.rho


def _peer(method, model, k=3):
    ps = list(model.parameters())
    if method == "gsam":
        base = torch.optim.SGD(ps, lr=0.05, momentum=0.9)
        return po.GSAM(ps, base, model, _Rho(0.1), alpha=0.4)
    if method == "wsam":
        return po.WSAM(model, ps, torch.optim.SGD, rho=0.1, gamma=0.8, lr=0.05, momentum=0.9)
    if method == "looksam":
        return po.LookSAM(ps, torch.optim.SGD, rho=0.1, k=k, alpha=0.7, lr=0.05, momentum=0.9)
    return po.FriendlySAM(ps, torch.optim.SGD, rho=0.1, sigma=0.9, lmbda=0.6, lr=0.05,
                          momentum=0.9)


def _peer_step(method, opt, model, x, y):
    def closure():
        opt.zero_grad()
        with torch.enable_grad():  # GSAM's step calls it under no_grad
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return (None, loss.detach()) if method == "gsam" else loss.detach()
    if method in ("looksam", "friendlysam"):  # their usage: gradients at w first, then step
        closure()
    opt.step(closure)


def _run_peer(method, model_fn, steps, f64_norm, monkeypatch, k=3):
    model = model_fn()
    if f64_norm:
        monkeypatch.setattr(po_sam, "get_global_gradient_norm", _f64_norm)
    opt = _peer(method, model, k)
    for t in range(steps):
        _peer_step(method, opt, model, *batch(t))
    monkeypatch.undo()
    return weights(model)


def _run_ours(method, model_fn, steps, backend="cpu" if has_extension() else "reference", k=3):
    model = model_fn()
    kw = {"gsam": dict(rho=0.1, alpha=0.4), "wsam": dict(rho=0.1, gamma=0.8),
          "looksam": dict(rho=0.1, k=k, alpha=0.7),
          "friendlysam": dict(rho=0.1, sigma=0.9, lmbda=0.6)}[method]
    cls = {"gsam": GSAM, "wsam": WSAM, "looksam": LookSAM, "friendlysam": FriendlySAM}[method]
    opt = cls(model.parameters(), lr=0.05, momentum=0.9, **kw)
    with samkernels.use_backend(backend):
        for t in range(steps):
            x, y = batch(t)
            opt.step(closure_for(opt, model, x, y))
    return weights(model)


class OneTensor(torch.nn.Module):
    """Softmax regression with one weight tensor: per-tensor norms are the global ones."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(6, 3, dtype=F64) * 0.3)

    def forward(self, x):
        return x @ self.w


def _rel(a, b):
    return max(((p - q).norm() / q.norm()).item() for p, q in zip(a, b))


@pytest.mark.parametrize("method,k", [("gsam", 3), ("wsam", 3), ("looksam", 1),
                                      ("friendlysam", 3)])
def test_pytorch_optimizer_agrees_once_its_norm_is_float64(method, k, monkeypatch):
    """pytorch_optimizer 4.1.0's GSAM / WSAM / LookSAM / FriendlySAM, float64, 20 steps:

    * with its global gradient norm patched to sum in float64 (``_f64_norm``), the weights equal
      ours to 1e-12 relative: the same algorithm.  LookSAM on a one-tensor model (there its
      per-tensor projection and norms are the paper's global ones) with k = 1: its steps in
      between add a hard-coded 1e-8 to ||g_v|| (see the next test);
    * as shipped, its float32 norm puts it between 1e-11 and 1e-5 relative away: the gap is real
      and it is its norm's, not ours."""
    model = OneTensor if method == "looksam" else net
    ours = _run_ours(method, model, 20, k=k)
    theirs64 = _run_peer(method, model, 20, True, monkeypatch, k=k)
    theirs32 = _run_peer(method, model, 20, False, monkeypatch, k=k)
    assert _rel(ours, theirs64) < 1e-12, _rel(ours, theirs64)
    gap = _rel(ours, theirs32)
    assert 1e-11 < gap < 1e-5, gap


def test_pytorch_optimizer_looksam_reuse_steps(monkeypatch):
    """LookSAM with k = 3 (one-tensor model, float64 norm): pytorch_optimizer's steps between the
    full ones scale g_v by ||g|| / (||g_v|| + 1e-8), the paper's ratio (ours) is
    ||g|| / (||g_v|| + perturb_eps), perturb_eps = 1e-12.  ||g_v|| is small here (~1e-2), so that
    eps alone moves the weights by ~4e-7 relative over 20 steps: the paper's update written here
    with 1e-8 in that one place is the peer's to 1e-9 (g_v = g_p - c g0 cancels ~50-fold, which
    amplifies rounding and the two eps placements of c to ~1e-10), and ours is ~4e-7 away."""
    theirs = _run_peer("looksam", OneTensor, 20, True, monkeypatch)
    model = OneTensor()
    paper, st = Paper(model, "sgd", 0.05, momentum=0.9), {}
    for t in range(20):
        paper_looksam(paper, t, *batch(t), 0.1, 0.7, 3, st, 1e-12, reuse_eps=1e-8)
    assert _rel(paper.now(), theirs) < 1e-9, _rel(paper.now(), theirs)
    gap = _rel(_run_ours("looksam", OneTensor, 20), theirs)
    assert 1e-8 < gap < 1e-5, gap


def test_pytorch_optimizer_looksam_is_layerwise():
    """On a model with several tensors pytorch_optimizer's LookSAM projects and scales per tensor
    (its g_v is per-parameter), the paper (and ours) on the whole gradient: visibly different."""
    ours = _run_ours("looksam", net, 12)
    mp = pytest.MonkeyPatch()
    theirs = _run_peer("looksam", net, 12, True, mp)
    assert _rel(ours, theirs) > 1e-6


# --- resume, skips, errors -----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gsam", "looksam", "friendlysam"])
def test_resume_mid_cycle_is_exact(method):
    """state_dict after 4 steps (LookSAM: in the middle of its k = 3 cycle), loaded into a fresh
    optimizer and model: the next 5 steps are bit-identical."""
    cls, kw, _ = METHODS[method]
    a = net()
    oa = cls(a.parameters(), lr=0.05, momentum=0.9, **kw)
    for t in range(4):
        oa.step(closure_for(oa, a, *batch(t)))
    sd, wd = copy.deepcopy(oa.state_dict()), copy.deepcopy(a.state_dict())
    b = net(seed=5)
    b.load_state_dict(wd)
    ob = cls(b.parameters(), lr=0.05, momentum=0.9, **kw)
    ob.load_state_dict(sd)
    for t in range(4, 9):
        oa.step(closure_for(oa, a, *batch(t)))
        ob.step(closure_for(ob, b, *batch(t)))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("mode", ["skip", "skip_on_device"])
@pytest.mark.parametrize("second", [False, True])
@pytest.mark.parametrize("method", list(METHODS))
def test_inf_skips_the_step(method, second, mode):
    """inf in the first or the second pass: weights and every state tensor as before (FriendlySAM:
    its m put back), and the run goes on as if the step had not been taken."""
    cls, kw, _ = METHODS[method]
    a, c = net(), net()
    oa = cls(a.parameters(), lr=0.05, momentum=0.9, nonfinite=mode, **kw)
    oc = cls(c.parameters(), lr=0.05, momentum=0.9, nonfinite=mode, **kw)
    for t in range(2):
        oa.step(closure_for(oa, a, *batch(t)))
        oc.step(closure_for(oc, c, *batch(t)))
    if method == "looksam":  # a full step (its second pass exists)
        oa.k = oc.k = 2
    before_w, before_s = weights(a), copy.deepcopy(oa.state_dict())
    x, y = batch(50)
    calls = []

    def poisoned():
        calls.append(1)
        oa.zero_grad()
        F.cross_entropy(a(x), y).backward()
        if len(calls) == (2 if second else 1):
            a[0].weight.grad[0, 0] = float("inf")
        return 0.0

    oa.step(poisoned)
    assert oa.step_skipped
    for p, q in zip(a.parameters(), before_w):
        assert torch.equal(p, q)
    after = oa.state_dict()
    for i, st in before_s["state"].items():
        assert after["state"][i].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(after["state"][i][k], v), (i, k)
    if mode == "skip":
        assert after["samkernels"] == before_s["samkernels"]
        for t in range(2, 4):
            oa.step(closure_for(oa, a, *batch(t)))
            oc.step(closure_for(oc, c, *batch(t)))
        for p, q in zip(a.parameters(), c.parameters()):
            assert torch.equal(p, q)


@pytest.mark.parametrize("make,match", [
    (lambda ps: GSAM(ps, lr=0.1, alpha=-0.1), "alpha"),
    (lambda ps: GSAM(ps, lr=0.1, alpha=float("nan")), "alpha"),
    (lambda ps: WSAM(ps, lr=0.1, gamma=1.0), "gamma"),
    (lambda ps: WSAM(ps, lr=0.1, gamma=-0.5), "gamma"),
    (lambda ps: WSAM(ps, lr=0.1, decoupled="yes"), "decoupled"),
    (lambda ps: LookSAM(ps, lr=0.1, k=0), "k"),
    (lambda ps: LookSAM(ps, lr=0.1, k=2.5), "k"),
    (lambda ps: LookSAM(ps, lr=0.1, alpha=-1.0), "alpha"),
    (lambda ps: FriendlySAM(ps, lr=0.1, sigma=-1.0), "sigma"),
    (lambda ps: FriendlySAM(ps, lr=0.1, lmbda=1.0), "lmbda"),
    (lambda ps: FriendlySAM(ps, lr=0.1, adaptive=True), "adaptive"),
    (lambda ps: GSAM([{"params": ps, "alpha": -2.0}], lr=0.1), "alpha"),
])
def test_bad_hyper_parameters_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make(list(net().parameters()))


@pytest.mark.parametrize("method", list(METHODS))
def test_misuse_errors(method):
    """m-sharpness is refused naming m; second_step without first_step raises; LookSAM's
    reuse_step in the middle of a step raises."""
    cls, kw, _ = METHODS[method]
    model = net()
    opt = cls(model.parameters(), lr=0.05, **kw)
    with pytest.raises(ValueError, match="m-sharpness .*m=2"):
        opt.step(lambda i: F.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward(), m=2)
    F.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    if cls is LookSAM:
        opt.first_step()
        with pytest.raises(RuntimeError, match="reuse_step"):
            opt.reuse_step()


def test_looksam_steps_alternate_and_take_one_pass_between():
    """step(closure) with k = 3: passes per step 2, 1, 1, 2, 1, 1 (the ascent flag on the full
    steps' first pass only)."""
    model = net()
    opt = LookSAM(model.parameters(), lr=0.05, k=3)
    seen = []
    for t in range(6):
        x, y = batch(t)

        def closure(ascent):
            seen.append((t, ascent))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
        opt.step(closure)
    per_step = [[a for s, a in seen if s == t] for t in range(6)]
    assert per_step == [[True, False], [False], [False], [True, False], [False], [False]]


def test_looksam_one_pass_steps_update_batchnorm_statistics():
    """With ``freeze_bn``, BatchNorm keeps its running statistics in the pass at w + e only: the
    one pass of a reuse step is at w itself and updates them, as a full step's first pass does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3))
    opt = LookSAM(model.parameters(), lr=0.05, k=3, freeze_bn=model)
    bn = model[1]
    for t in range(3):  # one full step, then two reuse steps
        x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        before = bn.running_mean.clone()
        passes = []

        def closure(ascent):
            passes.append(ascent)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
        opt.step(closure)
        assert not torch.equal(bn.running_mean, before), t
        assert passes == ([True, False] if t == 0 else [False])


@pytest.mark.parametrize("method", ["gsam", "looksam", "friendlysam"])
def test_channels_last_buffers_follow_the_parameter(method):
    """A channels_last weight's buffers (g0, g_v, FriendlySAM's momentum) take its layout, so the
    fused ops take its lists in place (a contiguous buffer beside a channels_last weight made the
    GPU backends copy the weight's lists at every call, and a Triton step uncapturable); the
    steps equal those of the same model in the contiguous layout."""
    cls, kw, _ = METHODS[method]
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).double()
    conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    assert not conv_cl.weight.is_contiguous()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 4, 4))  # a class per output pixel (4 channels)
    opts = [cls(m.parameters(), lr=0.05, momentum=0.9, **kw) for m in (conv, conv_cl)]
    for _ in range(4):  # LookSAM (k=3): full and one-pass steps
        for m, opt in zip((conv, conv_cl), opts):
            opt.step(closure_for(opt, m, x, y))
    w = conv_cl.weight
    bufs = [t for t in opts[1].state[w].values() if torch.is_tensor(t) and t.shape == w.shape]
    bufs += [b for b in getattr(opts[1], "_saved", {}).values() if b.shape == w.shape]
    assert bufs and all(b.stride() == w.stride() for b in bufs), [b.stride() for b in bufs]
    # (the two layouts' convolutions may round differently: equal to float64 rounding)
    torch.testing.assert_close(w, conv.weight, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(conv_cl.bias, conv.bias, rtol=1e-12, atol=1e-14)
