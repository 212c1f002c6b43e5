"""Random test inputs and comparisons shared by the op and optimizer tests."""
from __future__ import annotations

import copy
import io
from typing import List, Sequence

import pytest
import torch
import torch.nn.functional as F

import samkernels
from samkernels.ops._spec import STEP_TENSORS


def tol(dtype: torch.dtype):
    """(rtol, atol) for a fused result in ``dtype`` against the float64 reference."""
    return {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-6),
            torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}[dtype]


def make_params(shapes: Sequence[tuple], dtypes: Sequence[torch.dtype], gen: torch.Generator,
                noncontig: Sequence[bool] = ()) -> List[torch.Tensor]:
    """Fresh random tensors (never zeros); ``noncontig[i]`` gives a transposed (strided) view."""
    out = []
    for i, (shape, dt) in enumerate(zip(shapes, dtypes)):
        if i < len(noncontig) and noncontig[i] and len(shape) == 2:
            t = torch.randn(shape[::-1], generator=gen, dtype=torch.float64).to(dt).t()
            assert not t.is_contiguous()
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dt)
        out.append(t)
    return out


def positive_like(ts, gen, lo=0.5, hi=3.0, state_dtype=True):
    """Positive random state (precisions) in each tensor's opmath dtype."""
    out = []
    for t in ts:
        dt = torch.float64 if t.dtype == torch.float64 else torch.float32
        out.append((torch.rand(t.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dt))
    return out


def state_like(ts, gen):
    out = []
    for t in ts:
        dt = torch.float64 if t.dtype == torch.float64 else torch.float32
        out.append(torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dt))
    return out


def f64(ts):
    return [t.detach().double().clone() for t in ts]


def assert_close_list(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], what: str):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        rtol, atol = tol(g.dtype)
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}[{i}] ({g.dtype}, {tuple(g.shape)}): {m}")


def mlp(dtype=torch.float64, seed=0):
    """The small MLP the optimizer tests train (6 -> 17 -> 3)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3)).to(dtype)


def data(dtype=torch.float64, n=32, seed=1):
    """n random inputs for ``mlp`` (drawn in float64, then cast) and labels in 0..2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64).to(dtype), torch.randint(0, 3, (n,), generator=g)


def closure_for(opt, model, x, y, ascent_arg=False):
    """step(closure)'s closure: zero the gradients, the cross-entropy of ``model(x)``, backward,
    the loss.  ``ascent_arg``: it takes the pass flag ``closure(ascent)`` (and ignores it), the
    other form the optimizers accept."""
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return (lambda ascent: closure()) if ascent_arg else closure


def train(make_opt, backend, steps, dtype=torch.float64, model=None, opt=None,
          closure=closure_for):
    """``steps`` steps of ``opt.step(closure(opt, model, x, y))`` on ``data(dtype)`` under
    ``backend``, from ``mlp(dtype)`` and ``make_opt(its parameters)`` unless given: (model,
    optimizer, the losses)."""
    model = mlp(dtype) if model is None else model
    opt = make_opt(model.parameters()) if opt is None else opt
    x, y = data(dtype)
    losses = []
    with samkernels.use_backend(backend):
        for _ in range(steps):
            losses.append(opt.step(closure(opt, model, x, y)).item())
    return model, opt, losses


class Boom(RuntimeError):
    """A failure inside a closure (out of memory, simulated)."""


def assert_same_state(before: dict, after: dict):
    """Two optimizer state_dicts: the same per-parameter state bit for bit, the same samkernels
    entry (step and noise counters)."""
    assert ("samkernels" in after) == ("samkernels" in before)
    assert after.get("samkernels") == before.get("samkernels")
    for i, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(after["state"][i][k]), torch.as_tensor(v)), (i, k)


def snapshot(model, opt):
    """Deep copies of the model's and the optimizer's state_dicts."""
    return copy.deepcopy((model.state_dict(), opt.state_dict()))


def assert_unchanged(before, model, opt):
    """The weights and the optimizer state as in ``before`` (a ``snapshot``), not perturbed."""
    for k, v in before[0].items():
        assert torch.equal(model.state_dict()[k], v), k
    assert_same_state(before[1], opt.state_dict())
    assert not opt.is_perturbed


def assert_exception_restores(opt, model, closure, backend, clean_steps=1):
    """``clean_steps`` steps of ``step(closure)`` (the state exists), then a step whose closure
    raises Boom: it propagates, and weights and optimizer state are as before that step."""
    with samkernels.use_backend(backend):
        for _ in range(clean_steps):
            opt.step(closure)
        before = snapshot(model, opt)
        with pytest.raises(Boom):
            opt.step(closure)
    assert_unchanged(before, model, opt)


def assert_posterior_api(model, opt, samples):
    """sampled_params draws other weights and puts the mean back; predictive(model, x) gives one
    row of probabilities per input, the same again for the same generator, the mean weights
    untouched; samples=0 is an error."""
    mean = [p.detach().clone() for p in model.parameters()]
    with opt.sampled_params(generator=0):
        sample = [p.detach().clone() for p in model.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(sample, mean))
    assert all(torch.equal(p.detach(), m) for p, m in zip(model.parameters(), mean))
    x, _ = data()
    probs = opt.predictive(model, x, samples=samples, generator=1)
    assert probs.shape == (x.shape[0], 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(x.shape[0], dtype=probs.dtype))
    assert torch.equal(probs, opt.predictive(model, x, samples=samples, generator=1))
    assert all(torch.equal(p.detach(), m) for p, m in zip(model.parameters(), mean))
    with pytest.raises(ValueError, match="samples"):
        opt.predictive(model, x, samples=0)


def assert_cpu_follows_reference(make_opt, train):
    """``train(make_opt, backend)`` on the reference and the fused CPU backend: it trains, and the
    float64 weights agree to 1e-10.  Returns the reference's model."""
    m_ref, _, l_ref = train(make_opt, "reference")
    m_cpu, _, _ = train(make_opt, "cpu")
    assert l_ref[-1] < l_ref[0]  # it trains
    for a, b in zip(m_ref.parameters(), m_cpu.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    return m_ref


def assert_resume_is_exact(make_opt, train, weights_only=False, loaded=lambda opt: None):
    """``train(make_opt, "auto", steps=3)``, a checkpoint of the model's and optimizer's
    state_dicts (through torch.save / torch.load), and a straight 6-step run; a fresh model with
    other initial weights and a fresh optimizer load the checkpoint (``loaded(optimizer)`` checks
    it then) and take 3 steps: the straight run's last 3 losses and its weights, bit for bit.
    Returns the checkpoint as loaded."""
    model, opt, _ = train(make_opt, "auto", steps=3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    m_straight, _, straight = train(make_opt, "auto", steps=6)
    buf.seek(0)
    ck = torch.load(buf, weights_only=weights_only)
    model2 = mlp(seed=5)
    model2.load_state_dict(ck["model"])
    opt2 = make_opt(model2.parameters())
    opt2.load_state_dict(ck["opt"])
    loaded(opt2)
    _, _, resumed = train(make_opt, "auto", steps=3, model=model2, opt=opt2)
    assert resumed == straight[3:]
    for a, b in zip(m_straight.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    return ck


# --- inputs of any op of the op table (samkernels/ops/_spec.py) --------------------------------
# A list spec is a sequence of (shape, dtype[, layout]); layouts of the hard inputs:
#   "T"  a transposed view (dense, not contiguous)   "CL" channels_last (dense, not contiguous)
#   "S"  every other column (strided, not dense)     "M"  misaligned (storage offset of one)
#   "P"  the parameter transposed, its other lists contiguous (a mix of layouts across lists)
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
EMPTY = "empty"  # as a case's value for an optional list (role state?): pass it empty
# state lists that may take either sign; the others (precisions, second moments, variances,
# accumulators) hold positive values
SIGNED_STATE = ("momentum_bufs", "exp_avgs", "momenta", "saved", "outs", "avg_grads",
                "avg_nxgs")
PARAM_DTYPE_ROLES = ("param", "grad", "backup")


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """A state list's dtype for a parameter of ``dtype`` (float64 stays, the others float32)."""
    return F64 if dtype == F64 else F32


def hard_tensor(shape, dtype, layout, gen, device="cpu", positive=False) -> torch.Tensor:
    """One random tensor (drawn in float64, then cast and moved) with ``layout`` (see above)."""
    n = 1
    for s in shape:
        n *= s
    full = {"T": tuple(reversed(shape)), "S": tuple(shape[:-1]) + (2 * shape[-1],),
            "M": (n + 1,)}.get(layout, shape)
    v = torch.rand(full, generator=gen, dtype=F64) + 0.5 if positive else \
        torch.randn(full, generator=gen, dtype=F64)
    t = v.to(device=device, dtype=dtype)
    if layout == "T":
        t = t.t()
    elif layout == "S":
        t = t[..., ::2]
    elif layout == "M":
        t = t[1:].view(shape)
    elif layout == "CL":
        t = t.contiguous(memory_format=torch.channels_last)
    assert t.shape == torch.Size(shape), (t.shape, shape)
    return t


def param_ids(n: int) -> List[int]:
    """Distinct int64 ids, most with a high word (docs/spec.md "Noise": the tensor is then a part
    of its parameter starting at that Philox block), one of them 2^32 - 1 (the block counter
    wraps), so negative as an int64."""
    out = []
    for i in range(n):
        v = (0, 1, 2 ** 32 - 1, 12345)[i % 4] << 32 | (7 * i + 3)
        out.append(v - 2 ** 64 if v >= 2 ** 63 else v)
    return out


def op_args(op, case: dict, spec, seed: int = 0, device="cpu") -> list:
    """The positional arguments of ``op`` (an OpSpec) in table order, without the trailing
    ``found_inf``, ``device_step`` and ``debias_step`` (tests pass those by name or position).

    Tensor lists follow ``spec`` by role: param / grad / backup in the parameter's dtype, state in
    its opmath dtype; a written backup list starts as NaN (every element must be written); a list
    set to ``EMPTY`` in ``case`` is empty.  ``param_ids`` defaults to ``param_ids(len(spec))``, a
    tensor argument (a given norm, coefficients) is a float64 tensor of its value in ``case``,
    and every other argument is taken from ``case``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for a in op.args:
        if a.name == "found_inf" or a.name in STEP_TENSORS:
            continue
        v = case.get(a.name)
        if a.type == "Tensor[]":
            if v == EMPTY:
                out.append([])
                continue
            lst = []
            for entry in spec:
                shape, dt = entry[0], entry[1]
                layout = entry[2] if len(entry) > 2 else None
                if layout == "P":
                    layout = "T" if a.role == "param" else None
                if a.role not in PARAM_DTYPE_ROLES:
                    dt = opmath_dtype(dt)
                t = hard_tensor(shape, dt, layout, gen, device,
                                positive=a.role.startswith("state") and a.name not in SIGNED_STATE)
                if a.role == "backup" and a.written:
                    t.fill_(float("nan"))
                lst.append(t)
            out.append(lst)
        elif a.name == "param_ids" and v is None:
            out.append(param_ids(len(spec)))
        elif a.type == "Tensor?":
            out.append(None if v is None else torch.tensor(v, dtype=F64, device=device))
        elif a.type == "Tensor":  # a norm or coefficients the op reads on the device
            out.append(torch.tensor(v, dtype=F64, device=device))
        else:
            out.append(case[a.name])
    return out


def clone_args(args) -> list:
    return [[t.clone() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
            else a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def f64_args(args) -> list:
    """Float64 copies of every tensor in ``args`` (the reference's inputs)."""
    return [f64(a) if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
            else a.detach().double().clone() if isinstance(a, torch.Tensor) else a for a in args]


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and stored bits (-0.0 != 0.0, NaN payloads count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = _INT_OF_SIZE[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))
