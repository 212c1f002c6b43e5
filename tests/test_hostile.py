"""Hostile inputs: for every optimizer and op, a bad input either fails with a clear error or is
handled safely, and the weights are never corrupted.  Plus a property test: random shapes, dtypes
and hyper-parameters, each CPU op against the reference."""
import importlib
import inspect
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import samkernels
from samkernels import ops
from samkernels.ops import reference as ref

from conftest import needs_ext
from helpers import tol

NAN, INF = float("nan"), float("inf")

# name -> submodule that defines it (the samkernels.optim export is looked up first)
FAMILY = {"SAM": "sam", "ASAM": "sam", "BSAM": "bsam", "RandomSAM": "random_sam", "MFVI": "mfvi",
          "VariationalSAM": "vsam", "BiSAM": "bisam", "EBiSAM": "bisam"}
KNOWN_ARGS = {"lr": 0.05, "num_data": 32}
EXTRA = {"SAM": dict(momentum=0.9, weight_decay=1e-3), "ASAM": dict(momentum=0.9),
         "BSAM": dict(weight_decay=1e-3, rho=0.05)}


def optimizer_class(name):
    cls = getattr(samkernels.optim, name, None)
    if cls is None:
        try:
            cls = getattr(importlib.import_module(f"samkernels.optim.{FAMILY[name]}"), name, None)
        except ImportError:
            cls = None
    assert cls is not None, f"samkernels.optim.{name} does not exist"
    return cls


def factory(name):
    """``make(params, **overrides)`` with the class's required arguments filled in."""
    cls = optimizer_class(name)
    sig = inspect.signature(cls)
    required = [n for n, p in list(sig.parameters.items())[1:]
                if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = [n for n in required if n not in KNOWN_ARGS]
    assert not unknown, f"{name} needs {unknown}; add valid values to KNOWN_ARGS"
    base = {n: KNOWN_ARGS[n] for n in required}
    base.update({"seed": 0} if "seed" in sig.parameters else {})
    base.update(EXTRA.get(name, {}))
    return lambda ps, **kw: cls(ps, **{**base, **kw})


def param(*shape, dtype=torch.float32, device="cpu"):
    return torch.nn.Parameter(torch.randn(*shape, dtype=dtype, device=device))


# --- construction ------------------------------------------------------------------------------
CONSTRUCTION = {  # what: (build(make), error, message regex)
    "empty parameter list": (lambda mk: mk([]), ValueError, "empty parameter list"),
    "integer tensor": (lambda mk: mk([torch.ones(3, dtype=torch.int64)]), ValueError,
                       r"dtype torch.int64.*floating-point"),
    "complex parameter": (lambda mk: mk([param(3, dtype=torch.complex64)]), ValueError,
                          "floating-point"),
    "cpu and meta in one group": (lambda mk: mk([param(3), param(3, device="meta")]), ValueError,
                                  r"\['params'\]\[1\].*meta device"),
    "a parameter twice": (lambda mk: mk([param(3)] * 2), ValueError, "twice"),
    "non-leaf tensor": (lambda mk: mk([param(3) * 2]), ValueError, "non-leaf"),
    "same parameter in two groups": (lambda mk: mk([{"params": [p]}, {"params": [p]}]), ValueError,
                                     "more than one parameter group"),
    "lr < 0": (lambda mk: mk([param(3)], lr=-0.1), ValueError, "lr"),
    "lr NaN": (lambda mk: mk([param(3)], lr=NAN), ValueError, "lr"),
    "lr inf": (lambda mk: mk([param(3)], lr=INF), ValueError, "lr"),
    "lr < 0 in a second group": (lambda mk: mk([{"params": [param(3)]},
                                               {"params": [param(2)], "lr": -1.0}]),
                                 ValueError, r"param_groups\[1\] \(sets lr\): lr"),
    "lr NaN in a group": (lambda mk: mk([{"params": [param(3)], "lr": NAN}]), ValueError,
                          r"param_groups\[0\] \(sets lr\)"),
    "unknown nonfinite policy": (lambda mk: mk([param(3)], nonfinite="ignore"), ValueError,
                                 "nonfinite"),
}
p = param(3)  # shared by "same parameter in two groups"

SPECIFIC = {  # per optimizer: (keyword arguments, message regex)
    "SAM": [(dict(rho=-0.1), "rho"), (dict(rho=NAN), "rho"), (dict(rho=INF), "rho"),
            (dict(momentum=-1.0), "momentum"), (dict(dampening=NAN), "dampening"),
            (dict(weight_decay=-1e-4), "weight_decay"), (dict(adam_eps=0.0), "adam_eps"),
            (dict(perturb_eps=0.0), "perturb_eps"), (dict(perturb_eps=NAN), "perturb_eps"),
            (dict(eta=-1.0), "eta"), (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
            (dict(betas=(NAN, 0.9)), r"betas\[0\]"), (dict(betas=0.9), "betas"),
            (dict(base="lion"), "base"), (dict(momentum=0.0, nesterov=True), "nesterov")],
    "ASAM": [(dict(rho=-1.0), "rho"), (dict(eta=NAN), "eta")],
    "BSAM": [(dict(num_data=0), "num_data"), (dict(num_data=-3), "num_data"),
             (dict(num_data=NAN), "num_data"), (dict(num_data=INF), "num_data"),
             (dict(init_precision=0.0), "init_precision"), (dict(gamma=NAN), "gamma"),
             (dict(gamma=0.0, weight_decay=0.0), r"weight_decay \+ gamma"),
             (dict(rho=-1e-3), "rho"), (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
             (dict(update_order="jax"), "update_order"), (dict(seed=-1), "seed"),
             (dict(seed="x"), "seed")],
}


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate")
@pytest.mark.parametrize("name", list(FAMILY))
@pytest.mark.parametrize("what", list(CONSTRUCTION))
def test_construction_rejects(name, what):
    make = factory(name)
    build, error, match = CONSTRUCTION[what]
    try:
        build(make)
    except error as exc:
        assert re.search(match, str(exc)), f"{what}: unclear message {exc}"
        return
    pytest.fail(f"{name}: {what} was accepted")


@pytest.mark.parametrize("name,kwargs,match", [(n, kw, m) for n, cases in SPECIFIC.items()
                                               for kw, m in cases])
def test_bad_hyperparameter_names_the_argument(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(name)([param(3)], **kwargs)


# --- behaviour during steps --------------------------------------------------------------------
class Net(torch.nn.Module):
    """An MLP with a frozen bias and a parameter the loss never uses (its gradient stays None)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(6, 9), torch.nn.Linear(9, 3)
        self.fc1.bias.requires_grad_(False)
        self.unused = torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def run_steps(name, loss_scale=1.0, poison=None, steps=3, **kw):
    """Train ``steps`` steps; ``poison`` = (step, value) writes value into one gradient entry of
    both passes of that step.  Returns the model, the optimizer and the weights before each step."""
    model = Net()
    opt = factory(name)(model.parameters(), **kw)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    history = []

    def closure(ascent=True):  # takes the pass flag: BiSAM insists (same loss in both passes here)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * loss_scale
        loss.backward()
        if poison is not None and poison[0] == len(history) - 1:
            model.fc2.weight.grad[0, 0] = poison[1]
        return loss

    for _ in range(steps):
        history.append({k: t.detach().clone() for k, t in model.named_parameters()})
        opt.step(closure)
    return model, opt, history


@pytest.mark.parametrize("name", list(FAMILY))
def test_none_gradients_and_frozen_parameters_are_untouched(name):
    model, opt, history = run_steps(name)
    assert torch.equal(model.unused.detach(), history[0]["unused"])  # gradient always None
    assert torch.equal(model.fc1.bias.detach(), history[0]["fc1.bias"])  # requires_grad=False
    assert model.fc1.bias not in opt.state or not opt.state[model.fc1.bias]
    assert not torch.equal(model.fc2.weight.detach(), history[0]["fc2.weight"])  # the rest trains
    assert not opt.is_perturbed


@pytest.mark.parametrize("name", list(FAMILY))
@pytest.mark.parametrize("scale", [0.0, 1e30], ids=["zero_grad", "huge_grad_1e30"])
def test_zero_and_huge_gradients_keep_weights_finite(name, scale):
    model, opt, _ = run_steps(name, loss_scale=scale)
    finite = all(torch.isfinite(t).all() for t in model.parameters())
    assert finite, f"{name}: loss * {scale} made the weights non-finite"
    if scale == 0.0:
        assert not getattr(opt, "step_skipped", False)


@pytest.mark.parametrize("name", list(FAMILY))
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_nonfinite_gradient_skips_the_step(name, bad):
    """Step 1 of 3 has a bad gradient: it is skipped, so the run equals 2 clean steps."""
    model, opt, _ = run_steps(name, poison=(1, bad))
    assert all(torch.isfinite(t).all() for t in model.parameters()), \
        f"{name}: a {bad} gradient reached the weights"
    clean, _, _ = run_steps(name, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clean.parameters())), \
        f"{name}: the skipped step left a trace (weights, state or noise counter)"


@pytest.mark.parametrize("name", list(FAMILY))
def test_sparse_gradient_fails_before_anything_moves(name):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = factory(name)(emb.parameters())
    before = emb.weight.detach().clone()

    def closure(ascent=True):
        opt.zero_grad()
        loss = emb(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    with pytest.raises((ValueError, RuntimeError), match="sparse"):
        opt.step(closure)
    assert torch.equal(emb.weight.detach(), before)
    assert not opt.is_perturbed


# --- the ops themselves (cpu backend) ------------------------------------------------------------
def _lists():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, generator=g)], [torch.randn(4, generator=g)]


OPS = {  # what: (call(params, grads), error, message regex); params must come back unchanged
    "list lengths differ": (lambda p, g: ops.sam_perturb_(p, g, [], None, 0.1, 1e-12, False, 0.0,
                                                          backend="cpu"),
                            RuntimeError, "backups has 0 tensors but params has 1"),
    "shapes differ": (lambda p, g: ops.sam_restore_sgd_(p, g, [torch.ones(4)], [torch.ones(5)], 0.1,
                                                        0.9, 0.0, False, 0.0, True, backend="cpu"),
                      RuntimeError, r"momentum_bufs\[0\] has 5 elements"),
    "gradient dtype differs": (lambda p, g: ops.sam_perturb_(p, [g[0].double()], [torch.ones(4)],
                                                             None, 0.1, 1e-12, False, 0.0,
                                                             backend="cpu"),
                               RuntimeError, r"grads\[0\] has dtype Double, expected Float"),
    "state not in opmath dtype": (lambda p, g: ops.bsam_perturb_(p, g, [torch.ones(4)],
                                                                 [torch.ones(4, dtype=torch.float64)],
                                                                 [], 0.1, 0.999, 0.0, 0.1,
                                                                 backend="cpu"),
                                  RuntimeError, r"precisions\[0\] has dtype Double"),
    "integer params": (lambda p, g: ops.sam_perturb_([torch.ones(4, dtype=torch.int32)], g,
                                                     [torch.ones(4)], None, 0.1, 1e-12, False,
                                                     0.0, backend="cpu"),
                       RuntimeError, "expected a floating dtype"),
    "complex params": (lambda p, g: ops.bsam_noise_([torch.ones(4, dtype=torch.complex64)],
                                                    [torch.ones(4)], [torch.ones(4)], [0], 1, 0,
                                                    10.0, backend="cpu"),
                       RuntimeError, "expected a floating dtype"),
    "sparse gradient": (lambda p, g: ops.sam_perturb_(p, [g[0].to_sparse()], [torch.ones(4)], None,
                                                      0.1, 1e-12, False, 0.0, backend="cpu"),
                        NotImplementedError, "Sparse"),
    "cpu and meta tensors": (lambda p, g: ops.sam_perturb_(p, [torch.ones(4, device="meta")],
                                                           [torch.ones(4)], None, 0.1, 1e-12, False,
                                                           0.0, backend="cpu"),
                             RuntimeError, "one device"),
    "adam step 0": (lambda p, g: ops.sam_restore_adam_(p, g, [torch.ones(4)], [torch.zeros(4)],
                                                       [torch.zeros(4)], 0, 0.1, 0.9, 0.999, 1e-8,
                                                       0.0, False, backend="cpu"),
                    RuntimeError, "step counts from 1"),
    "param_ids too long": (lambda p, g: ops.bsam_noise_(p, [torch.ones(4)], [torch.ones(4)], [0, 1],
                                                        1, 0, 10.0, backend="cpu"),
                           RuntimeError, "param_ids has 2 entries"),
}


@needs_ext
@pytest.mark.parametrize("what", list(OPS))
def test_op_rejects(what):
    call, error, match = OPS[what]
    p, g = _lists()
    before = p[0].clone()
    with pytest.raises(error, match=match):
        call(p, g)
    assert torch.equal(p[0], before)


def test_empty_lists_are_a_no_op_with_a_zero_norm():
    """No parameter has a gradient yet: the phase does nothing and its norm is 0 (float64)."""
    norm = ops.sam_perturb_([], [], [], None, 0.1, 1e-12, False, 0.0, backend="cpu")
    assert norm.dtype == torch.float64 and norm.shape == () and norm.item() == 0.0


@needs_ext
def test_meta_tensors_give_shapes_only():
    """On the meta device the ops are their fake kernels (shape inference), used by compile."""
    m = [torch.empty(5, device="meta")]
    norm = ops.sam_perturb_(m, m, [torch.empty(5, device="meta")], None, 0.1, 1e-12, False, 0.0,
                            backend="cpu")
    assert norm.device.type == "meta" and norm.shape == ()


# --- property test: random inputs, cpu op == reference -----------------------------------------
OP_NAMES = ["grad_sumsq", "sam_perturb_", "sam_restore_sgd_", "sam_restore_adam_", "bsam_noise_",
            "bsam_perturb_", "bsam_update_"]
finite = dict(allow_nan=False, allow_infinity=False)


@st.composite
def op_inputs(draw):
    n = draw(st.integers(1, 4))
    dtypes = draw(st.lists(st.sampled_from([torch.float32, torch.float64]), min_size=n, max_size=n))
    shapes = draw(st.lists(st.sampled_from([(1,), (3,), (7,), (2, 5), (5, 2), (33,), (4, 1, 3)]),
                           min_size=n, max_size=n))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    hp = dict(lr=draw(st.floats(0, 1, **finite)), rho=draw(st.floats(0, 2, **finite)),
              eta=draw(st.sampled_from([0.0, 0.01, 0.5])), adaptive=draw(st.booleans()),
              momentum=draw(st.floats(0, 0.99, **finite)), dampening=draw(st.floats(0, 0.5, **finite)),
              nesterov=draw(st.booleans()), wd=draw(st.floats(0, 0.1, **finite)),
              first=draw(st.booleans()), step=draw(st.integers(1, 1000)),
              beta1=draw(st.floats(0, 0.99, **finite)), beta2=draw(st.floats(0.5, 0.9999, **finite)),
              gamma=draw(st.floats(0.01, 1, **finite)), num_data=draw(st.floats(1, 1e5, **finite)),
              accumulate=draw(st.booleans()), released=draw(st.booleans()),
              decoupled=draw(st.booleans()), noise_seed=draw(st.integers(0, 2 ** 62)),
              noise_step=draw(st.integers(0, 2 ** 40)), accum_scale=draw(st.floats(0.1, 1, **finite)))
    return draw(st.sampled_from(OP_NAMES)), dtypes, shapes, seed, hp


def _tensors(shapes, dtypes, gen, lo=None, hi=None):
    out = []
    for shape, dt in zip(shapes, dtypes):
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if lo is not None:
            t = torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
        out.append(t.to(dt))
    return out


def _call(name, p, g, b, s1, s2, acc, hp, backend):
    """Run op ``name`` on the given lists (in place) and return what it returns."""
    mod = ops if backend == "cpu" else ref
    kw = {"backend": "cpu"} if backend == "cpu" else {}
    if name == "grad_sumsq":
        return mod.grad_sumsq(p, g, hp["adaptive"], hp["eta"], **kw)
    if name == "sam_perturb_":
        return mod.sam_perturb_(p, g, b, None, hp["rho"], 1e-12, hp["adaptive"], hp["eta"], **kw)
    if name == "sam_restore_sgd_":
        nesterov = hp["nesterov"] and hp["momentum"] > 0
        return mod.sam_restore_sgd_(p, g, b, s1, hp["lr"], hp["momentum"],
                                    0.0 if nesterov else hp["dampening"], nesterov, hp["wd"],
                                    hp["first"], **kw)
    if name == "sam_restore_adam_":
        return mod.sam_restore_adam_(p, g, b, s1, s2, hp["step"], hp["lr"], hp["beta1"], hp["beta2"],
                                     1e-8, hp["wd"], hp["decoupled"], **kw)
    ids = [7 * i + 2 for i in range(len(p))]
    if name == "bsam_noise_":
        return mod.bsam_noise_(p, b, s1, ids, hp["noise_seed"], hp["noise_step"], hp["num_data"], **kw)
    if name == "bsam_perturb_":
        return mod.bsam_perturb_(p, g, b, s1, acc, hp["rho"], hp["beta2"], hp["wd"], hp["gamma"], **kw)
    return mod.bsam_update_(p, g, b, s1, s2, acc, hp["lr"], hp["beta1"], hp["beta2"], hp["wd"],
                            hp["gamma"], hp["accum_scale"], hp["released"] and bool(acc), **kw)


@needs_ext
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(op_inputs())
def test_random_inputs_cpu_op_matches_reference(case):
    name, dtypes, shapes, seed, hp = case
    gen = torch.Generator().manual_seed(seed)
    opm = [torch.float64 if d == torch.float64 else torch.float32 for d in dtypes]
    p, g, b = (_tensors(shapes, dtypes, gen) for _ in range(3))
    s1 = _tensors(shapes, opm, gen, 0.5, 3.0)  # momentum / exp_avg / precision
    s2 = _tensors(shapes, opm, gen, 0.0, 2.0)  # exp_avg_sq / momenta
    acc = _tensors(shapes, opm, gen, 0.0, 2.0) if hp["accumulate"] else []  # bSAM's deferred line 5
    lists = [p, g, b, s1, s2, acc]
    ref_lists = [[t.double().clone() for t in lst] for lst in lists]
    out = _call(name, *lists, hp, "cpu")
    want = _call(name, *ref_lists, hp, "reference")
    if out is not None:
        torch.testing.assert_close(out.double(), want.double(), rtol=1e-6, atol=1e-30)
    for got_list, want_list in zip(lists, ref_lists):
        for got, w in zip(got_list, want_list):
            rtol, atol = tol(got.dtype)
            scale = max(1.0, w.abs().max().item())  # absolute error grows with the magnitude
            torch.testing.assert_close(got.double(), w, rtol=rtol * 4, atol=atol * 4 * scale,
                                       msg=lambda m: f"{name} {hp}: {m}")
