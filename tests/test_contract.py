"""The op contract: every multi-tensor op of the op table (samkernels/ops/_spec.py ``PHASES``) on
every backend (reference, cpu, triton through its interpreter, cuda when a GPU is present).

Everything but the argument values is derived from the table: the inputs (a list per role, in the
parameter's dtype or the opmath dtype), which lists may change (exactly the ``written`` ones),
the float64 oracle (``op.reference`` run on float64 copies), the skip form of ``found_inf``, the
return (a 0-dim float64 norm, or None) and the shared argument errors.  The inputs are the hard
ones: odd sizes, mixed bf16/fp16/fp32/fp64 in one list, transposed / strided / channels_last /
misaligned views, empty tensors, hundreds of tiny tensors, lists large enough for the CPU's threads,
empty lists.  After the contract, the checks that belong to one op or to the noise.

The Triton interpreter costs milliseconds per program instance: its long lists (launch splitting,
several chunks per tensor) are in tests/test_triton_plans.py, with small chunks.
"""
import importlib
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from samkernels import _dispatch, ops
from samkernels.ops import reference as R
from samkernels.ops._spec import PHASES, STEP_TENSORS

from conftest import has_extension
from helpers import (BF16, EMPTY, F16, F32, F64, clone_args, f64_args, op_args, same_bits, tol)
from oracles import CASE_SEED, CASES, case

# --- backends -------------------------------------------------------------------------------
HAS_CUDA = torch.cuda.is_available() and _dispatch.cuda_kernels_built()
DEVICE = {"cuda": "cuda"}


TRITON = _dispatch.triton_usable(torch.device("cpu"))  # the interpreter (conftest.py sets it)
BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not has_extension(),
                                                 reason="samkernels._C is not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="triton is not usable")),
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
]
COMPILED = BACKENDS[1:]

# the argument values, the only per-op data: CASES of tests/oracles.py
CASE_IDS = [(n, i) for n in PHASES for i in range(len(CASES[n]))]

# --- the lists -------------------------------------------------------------------------------
# odd sizes, four dtypes, every layout (helpers.hard_tensor), empty tensors
HARD = [((1,), BF16), ((5, 7), F32, "T"), ((4097,), F32), ((33,), F16, "M"),
        ((129,), F64, "M"), ((4, 6), BF16, "S"), ((2, 3, 2, 2), F32, "CL"), ((7, 3), F32, "P"),
        ((0,), F32), ((6, 5), F64, "T")]


LISTS = {
    # enough elements for the CPU's threads, its chunk borders (16384) crossed
    "big": [((20000,), F32), ((1,), F32), ((16385,), F64)],
    # hundreds of tiny tensors
    "tiny": [((1,), F32)] * 297 + [((2,), F32), ((5,), BF16), ((1,), F64)],
}


# the optional tensors every op of a kind takes last (not per-op values: their own tests below)
TRAILING = ("found_inf",) + STEP_TENSORS


# --- running an op ----------------------------------------------------------------------------
def _reference(op):
    module, fn = op.reference.split(":")
    return getattr(importlib.import_module(module), fn)


def _is_list(x):
    """A tensor list (param_ids is a list of ints)."""
    return isinstance(x, list) and all(isinstance(t, torch.Tensor) for t in x)


def run(name, backend, spec, i=0, seed=0, found_inf=None, poison=False, **override):
    """Build op ``name``'s arguments for case ``i`` on ``backend``'s device (``poison``: inf and
    NaN in its gradients, ``_poison``), run it; returns (arguments after the call, arguments
    before, the op's return)."""
    op = PHASES[name]
    device = DEVICE.get(backend, "cpu")
    args = op_args(op, {**case(name, i), **override}, spec, seed, device)
    if poison:
        _poison(args[op.arg_names.index("grads")])
    before = clone_args(args)
    extra = [] if found_inf is None else [found_inf]
    got = getattr(ops, name)(*args, *extra, backend=backend)
    return args, before, got


def check_against_reference(name, backend, spec, i=0, seed=0, poison=False, **override):
    op = PHASES[name]
    args, before, got = run(name, backend, spec, i, seed, poison=poison, **override)
    want_args = f64_args(before)
    want = _reference(op)(*want_args)
    for a, x, b, w in zip(op.args, args, before, want_args):
        if not _is_list(x):
            if isinstance(x, torch.Tensor):  # a given norm: read only
                assert same_bits(x, b), a.name
            continue
        assert len(x) == len(b)
        for j, (t, t0, tw) in enumerate(zip(x, b, w)):
            if not a.written:  # exactly the written lists change
                assert same_bits(t, t0), f"{name} changed {a.name}[{j}], which it only reads"
            else:
                rtol, atol = tol(t.dtype)
                torch.testing.assert_close(
                    t.double(), tw.cpu() if t.is_cuda else tw, rtol=rtol, atol=atol,
                    check_device=False, equal_nan=True,
                    msg=lambda m: f"{name} {a.name}[{j}] ({t.dtype}, {tuple(t.shape)}): {m}")
    check_return(op, args, got, want)
    return args, got


def check_return(op, args, got, want):
    """Norm ops: a 0-dim float64 on the parameters' device (the norm contract), the given norm
    itself when one was passed; the other ops return None."""
    if op.result == "dots":  # samv_dots: three float64 sums on the lists' device
        lead = args[0]
        assert isinstance(got, torch.Tensor) and got.shape == (3,) and got.dtype == F64, got
        assert got.device.type == (lead[0].device.type if lead else "cpu")
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-12, atol=1e-300)
        return
    if op.result == "flag":  # nonfinite_flag: a 0-dim float32 0.0 / 1.0 on the lists' device
        lead = args[0]
        assert isinstance(got, torch.Tensor) and got.dim() == 0 and got.dtype == F32, got
        assert got.device.type == (lead[0].device.type if lead else "cpu")
        assert same_bits(got.cpu(), want.cpu()), (got, want)
        return
    if op.result != "norm":
        assert got is None, f"{op.name} returned {got!r}"
        return
    lead = args[0]
    assert isinstance(got, torch.Tensor) and got.dim() == 0 and got.dtype == F64, got
    assert got.device.type == (lead[0].device.type if lead else "cpu")
    given = [x for a, x in zip(op.args, args) if a.type == "Tensor?" and a.name != "found_inf"]
    if given and given[0] is not None:
        assert same_bits(got, given[0])
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-12, atol=0, equal_nan=True)


# --- the contract ---------------------------------------------------------------------------
def test_cases_cover_the_table():
    """The per-op values (tests/oracles.py) name only real arguments and give every scalar; each
    optional list is also passed empty, each bool takes both values, each optional norm None and
    given."""
    assert set(CASES) == set(PHASES)
    for name, op in PHASES.items():
        scalars = {a.name for a in op.args
                   if a.type not in ("Tensor[]", "Tensor?", "int[]")} | \
            {a.name for a in op.args if a.type == "Tensor?" and a.name not in TRAILING}
        assert set(CASES[name][0]) == scalars, name
        for v in CASES[name]:
            assert set(v) <= set(op.arg_names), (name, v)
        seen = lambda arg: {repr(case(name, i).get(arg)) for i in range(len(CASES[name]))}  # noqa
        for a in op.lists:
            if a.role == "state?":
                assert repr(EMPTY) in seen(a.name), (name, a.name)
        for a in op.args:
            if a.type == "bool":
                assert seen(a.name) == {"True", "False"}, (name, a.name)
            if a.type == "Tensor?" and a.name not in TRAILING:
                assert "None" in seen(a.name) and len(seen(a.name)) > 1, (name, a.name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,i", CASE_IDS, ids=[f"{n}-{i}" for n, i in CASE_IDS])
def test_matches_reference(name, i, backend):
    """The hard list: only the written lists change, each equal to the float64 reference within
    its dtype's tolerance; the return is the norm contract's (or None)."""
    check_against_reference(name, backend, HARD, i, seed=i)


GRAD_CASES = [(n, i) for n, i in CASE_IDS if "grads" in PHASES[n].arg_names]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # (numpy, interpreter)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,i", GRAD_CASES, ids=[f"{n}-{i}" for n, i in GRAD_CASES])
def test_nonfinite_gradients_without_a_flag_follow_the_reference(name, i, backend):
    """inf and NaN gradients with no flag (the ops under ``nonfinite="unchecked"``): every written
    list and the return are the reference's, NaN where it has NaN, inf where it has inf.  A
    maximum or clamp that returns its other argument for a NaN (Triton's tl.maximum, C's fmax)
    would hide the NaN in the state."""
    check_against_reference(name, backend, HARD, i, seed=i, poison=True)


# The reference loops over the tensors in Python: long lists test nothing new there.  Triton's
# launch splitting and chunking: tests/test_triton_plans.py, with the interpreter's chunks made
# small (its programs are too slow for long lists).
@pytest.fixture
def two_threads():
    """The CPU kernels' threaded path (tests/conftest.py runs the suite with one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("backend", [b for b in COMPILED if b.values[0] != "triton"])
@pytest.mark.parametrize("lists", ["big", "tiny"])
@pytest.mark.parametrize("name", list(PHASES))
def test_long_lists(name, lists, backend, two_threads):
    """The base case on a list for the threads and on hundreds of tiny tensors."""
    check_against_reference(name, backend, LISTS[lists], seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PHASES))
def test_empty_lists(name, backend):
    """Empty lists (with found_inf too): nothing to do, the norm ops return a zero norm."""
    op = PHASES[name]
    # a flag that needs a list is an error without it, even on empty lists (see
    # test_flag_needing_a_list)
    unset = {flag: False for flag, _, _ in op.requires}
    check_against_reference(name, backend, [], seed=1, **unset)
    if op.takes_found_inf:
        flag = torch.ones(1, device=DEVICE.get(backend, "cpu"))
        args, before, got = run(name, backend, [], found_inf=flag, **unset)
        check_return(op, args, got, _reference(op)(*before, found_inf=flag.cpu()))


GATED = [n for n, op in PHASES.items() if op.takes_found_inf]


def _poison(grads):
    """Non-finite gradients (the reason found_inf is set): inf and NaN in the first entries."""
    for g in grads[:4]:
        if g.numel():
            g[(0,) * g.dim()] = float("inf")
            g[tuple(s - 1 for s in g.shape)] = float("nan")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", GATED)
def test_found_inf_skip_form(name, backend):
    """A nonzero flag selects the skip form, decided on the device: a perturbation (an op that
    writes the backups) only copies backup <- w; an update only restores w <- backup; no state
    changes.  The norm is still computed and returned.  A zero flag is no flag, bit for bit."""
    op = PHASES[name]
    device = DEVICE.get(backend, "cpu")
    perturb = "backups" in op.written
    fn = getattr(ops, name)
    # zero flag == no flag
    plain = op_args(op, case(name), HARD, 2, device)
    flagged = op_args(op, case(name), HARD, 2, device)
    out = fn(*plain, backend=backend)
    out0 = fn(*flagged, torch.zeros(1, device=device), backend=backend)
    for a, x, y in zip(op.args, plain, flagged):
        if _is_list(x):
            assert all(same_bits(s, t) for s, t in zip(x, y)), a.name
    if out is not None:
        assert same_bits(out, out0)
    # set flag, non-finite gradients
    args = op_args(op, case(name), HARD, 3, device)
    _poison(args[op.arg_names.index("grads")])
    before = clone_args(args)
    want = _reference(op)(*f64_args(before), found_inf=torch.ones(1, dtype=F64))
    got = fn(*args, torch.ones(1, device=device), backend=backend)
    lists = dict(zip(op.arg_names, before))
    for a, x, b in zip(op.args, args, before):
        if not _is_list(x):
            continue
        source = (lists["params"] if perturb and a.name == "backups" else
                  lists["backups"] if not perturb and a.name == "params" else b)
        for j, (t, s) in enumerate(zip(x, source)):
            assert same_bits(t, s), f"{name} skip form: {a.name}[{j}]"
    check_return(op, args, got, want)
    if op.result == "norm":  # with finite gradients, the norm it returns is the reference's
        args, before, got = run(name, backend, HARD, seed=3, found_inf=torch.ones(1, device=device))
        check_return(op, args, got, _reference(op)(*f64_args(before), found_inf=torch.ones(1)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lists", ["hard", "big"])
def test_nonfinite_flag_sees_every_placement(lists, backend):
    """nonfinite_flag, the optimizers' check: 1.0 for one inf, -inf or NaN anywhere (first or
    last element of each tensor, whatever its dtype or layout, across chunk borders), 0.0 for
    finite lists, the largest finite values included."""
    spec = HARD if lists == "hard" else LISTS["big"]
    device = DEVICE.get(backend, "cpu")
    op = PHASES["nonfinite_flag"]

    def flag(grads):
        out = ops.nonfinite_flag(grads, backend=backend)
        assert out.dim() == 0 and out.dtype == F32 and out.device.type == device
        return out.item()

    grads, = op_args(op, {}, spec, 7, device)
    assert flag(grads) == 0.0
    for j, t in enumerate(grads):
        if t.numel() == 0:
            continue
        for k, bad in ((0, float("inf")), (t.numel() - 1, float("nan")),
                       (t.numel() // 2, float("-inf"))):
            where = tuple(torch.unravel_index(torch.tensor(k), t.shape))
            old = t[where].clone()
            t[where] = bad
            assert flag(grads) == 1.0, (j, tuple(t.shape), t.dtype, k, bad)
            t[where] = old
        t[where] = torch.finfo(t.dtype).max
    assert flag(grads) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flag", [torch.tensor(1.), torch.tensor([float("inf")]),
                                  torch.tensor(float("nan")), torch.tensor(True),
                                  torch.tensor([2.0], dtype=F64)],
                         ids=["one", "inf[1]", "nan", "bool", "f64[1]"])
def test_found_inf_flag_forms(flag, backend):
    """Any nonzero (NaN too) one-element flag, whatever its dtype or shape, selects the skip
    form."""
    args, before, _ = run("sam_restore_sgd_", backend, HARD,
                          found_inf=flag.to(DEVICE.get(backend, "cpu")))
    for p, b in zip(args[0], before[2]):
        assert same_bits(p, b)


def _spoiled(name, kind, device):
    """(arguments, the name the error must give) for a mistake ``kind`` in op ``name``'s call."""
    op = PHASES[name]
    args = op_args(op, case(name), [((3,), F32), ((2, 2), F64)], 4, device)
    lists = [k for k, a in enumerate(op.args) if a.type == "Tensor[]"]
    last = lists[-1]
    if kind == "length":  # the last list one tensor short
        args[last] = args[last][:1]
        return args, op.args[last].name
    if kind == "device":  # one tensor on the meta device among real ones
        args[last][1] = torch.empty_like(args[last][1], device="meta")
        return args, "device|meta"
    if kind == "numel":  # one tensor of the last list with one element too many
        args[last][0] = torch.zeros(4, dtype=args[last][0].dtype, device=device)
        return args, rf"{op.args[last].name}\[0\]"
    if kind == "dtype":  # one tensor of the last list in the wrong dtype
        args[last][0] = args[last][0].to(F16)
        return args, rf"{op.args[last].name}\[0\]"
    if kind == "param_ids":
        args[op.arg_names.index("param_ids")] = [0]
        return args, "param_ids"
    raise AssertionError(kind)


# (an op of one list, nonfinite_flag, takes any lengths, sizes and float dtypes)
SHARED_ERRORS = [(n, k) for n, op in PHASES.items()
                 for k in (["length"] if len(op.lists) > 1 else []) + ["device"] +
                 (["param_ids"] if op.takes_ids else [])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kind", SHARED_ERRORS, ids=[f"{n}-{k}" for n, k in SHARED_ERRORS])
def test_shared_argument_errors(name, kind, backend):
    """A list of the wrong length, a tensor on another device, param_ids of the wrong length:
    an error on every backend, naming the argument, before anything is written."""
    _raises(name, kind, backend, direct=kind != "length")


TENSOR_ERRORS = [(n, k) for n, op in PHASES.items() if len(op.lists) > 1
                 for k in ("numel", "dtype")]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("name,kind", TENSOR_ERRORS, ids=[f"{n}-{k}" for n, k in TENSOR_ERRORS])
def test_kernel_argument_errors(name, kind, backend):
    """A tensor with the wrong size or dtype: the kernels, which read every tensor, name it (the
    reference computes in float64 whatever it is given)."""
    _raises(name, kind, backend, direct=True)


def _raises(name, kind, backend, direct):
    """``kind`` of mistake in op ``name``'s call raises naming the argument and writes nothing;
    ``direct``: the compiled cpu op called without the wrapper raises it too."""
    args, what = _spoiled(name, kind, DEVICE.get(backend, "cpu"))
    before = clone_args(args)
    with pytest.raises((ValueError, RuntimeError), match=what):
        getattr(ops, name)(*args, backend=backend)
    if backend == "cpu" and direct:
        with pytest.raises(RuntimeError, match=what):
            getattr(torch.ops.samkernels, name)(*args)
    for x, b in zip(args, before):
        if _is_list(x):
            assert all(t.is_meta or same_bits(t, t0) for t, t0 in zip(x, b))


REQUIRES = [(n, r) for n, op in PHASES.items() for r in op.requires]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,req", REQUIRES, ids=[f"{n}-{r[0]}" for n, r in REQUIRES])
def test_flag_needing_a_list(name, req, backend):
    """A flag the table says needs an optional list (bsam_update_'s released_order needs accums:
    without them line 5 already ran in bsam_perturb_ and the old s is gone) is an error without
    it on every path, never a silent fallback."""
    flag, needed, _ = req
    op = PHASES[name]
    args = op_args(op, {**case(name), flag: True, needed: EMPTY}, HARD, 5,
                   DEVICE.get(backend, "cpu"))
    with pytest.raises((ValueError, RuntimeError), match=f"{flag}=True needs {needed}"):
        getattr(ops, name)(*args, backend=backend)
    if backend == "cpu":
        with pytest.raises(RuntimeError, match=f"{flag}=True needs {needed}"):
            getattr(torch.ops.samkernels, name)(*args)


@pytest.mark.skipif(not has_extension(), reason="samkernels._C is not built")
@pytest.mark.parametrize("name", list(PHASES))
def test_opcheck_and_fake(name):
    """torch.library.opcheck of the compiled op (schema, autograd registration, fake), with and
    without found_inf; under FakeTensorMode the return is the contract's.  (AOT dispatch of
    whole compiled steps: tests/test_compile.py.)"""
    op = PHASES[name]
    spec = [((3,), F32), ((2, 2), F64)]
    args = op_args(op, case(name), spec, 6)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(getattr(torch.ops.samkernels, name).default, args, test_utils=checks)
    if op.takes_found_inf:
        torch.library.opcheck(getattr(torch.ops.samkernels, name).default,
                              op_args(op, case(name), spec, 6) + [torch.ones(1)],
                              test_utils=checks)
    with FakeTensorMode() as mode:
        fake = [[mode.from_tensor(t) for t in a] if _is_list(a) else
                mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = getattr(torch.ops.samkernels, name)(*fake)
    if op.result == "norm":
        assert out.shape == () and out.dtype == F64
    elif op.result == "dots":
        assert out.shape == (3,) and out.dtype == F64
    elif op.result == "flag":
        assert out.shape == () and out.dtype == F32
    else:
        assert out is None


# --- device_step: the counters of the capturable optimizers, read on the device ------------------
STEPPED = [n for n, op in PHASES.items() if op.takes_device_step]
# (host step, device step): the device value is added; the high Philox step word is crossed
SPLITS = [(0, 5), (3, 4), (1, 2**32 - 2), (7, 2**33)]


def test_device_step_is_taken_by_every_op_with_a_step():
    """Exactly the ops with a ``step`` take ``device_step``, right after ``found_inf`` (or last),
    defaulting to None."""
    for name, op in PHASES.items():
        assert op.takes_device_step == ("step" in op.arg_names), name
        if op.takes_device_step:
            k = op.arg_names.index("device_step")
            assert op.args[k].default == "None", name
            assert op.args[k - 1].name == "found_inf" if op.takes_found_inf else k == len(op.args) - 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 7, 1000])
def test_debias_step_forms_the_bias_correction(t, backend):
    """ivon_update_ with ``debias_step=tensor(t)`` is, bit for bit, the op given
    ``bias_correction = 1 - beta1**t`` (Python's float power, as IVON's host path)."""
    name = "ivon_update_"
    op = PHASES[name]
    device = DEVICE.get(backend, "cpu")
    values = case(name)
    want = op_args(op, {**values, "bias_correction": 1.0 - values["beta1"] ** t}, HARD, 9, device)
    got = op_args(op, {**values, "bias_correction": 0.5}, HARD, 9, device)  # ignored
    fn = getattr(ops, name)
    fn(*want, backend=backend)
    fn(*got, None, None, torch.tensor(t, dtype=torch.int64, device=device), backend=backend)
    for a, x, y in zip(op.args, want, got):
        if _is_list(x):
            for j, (s, u) in enumerate(zip(x, y)):
                assert same_bits(s, u), f"{a.name}[{j}]"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", SPLITS, ids=[f"{a}+{b}" for a, b in SPLITS])
@pytest.mark.parametrize("name", STEPPED)
def test_device_step_adds_to_step(name, split, backend):
    """``step=a, device_step=tensor(b)`` is, bit for bit, the op at ``step=a+b`` (every dtype and
    layout, both Philox step words); the counter is read, never written."""
    op = PHASES[name]
    device = DEVICE.get(backend, "cpu")
    host, on_device = split
    fn = getattr(ops, name)
    want = op_args(op, {**case(name), "step": host + on_device}, HARD, 8, device)
    got = op_args(op, {**case(name), "step": host}, HARD, 8, device)
    counter = torch.tensor(on_device, dtype=torch.int64, device=device)
    out_want = fn(*want, backend=backend)
    if op.takes_found_inf:
        out_got = fn(*got, None, counter, backend=backend)
    else:
        out_got = fn(*got, counter, backend=backend)
    assert counter.item() == on_device
    for a, x, y in zip(op.args, want, got):
        if _is_list(x):
            for j, (s, t) in enumerate(zip(x, y)):
                assert same_bits(s, t), f"{name} {a.name}[{j}]"
    if out_want is not None:
        assert same_bits(out_want, out_got)


STEP_TENSOR_ARGS = [(n, t) for n, op in PHASES.items() for t in op.step_tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["float", "two", "device", "list"])
@pytest.mark.parametrize("name,arg", STEP_TENSOR_ARGS, ids=[f"{n}-{t}" for n, t in STEP_TENSOR_ARGS])
def test_device_step_errors(name, arg, kind, backend):
    """A device_step (debias_step) that is not a one-element int64 tensor on the parameters'
    device is an error naming it, before anything is written."""
    op = PHASES[name]
    device = DEVICE.get(backend, "cpu")
    args = op_args(op, case(name), [((3,), F32), ((2, 2), F64)], 4, device)
    before = clone_args(args)
    bad = {"float": torch.zeros((), device=device),
           "two": torch.zeros(2, dtype=torch.int64, device=device),
           "device": torch.zeros((), dtype=torch.int64, device="meta"),
           "list": [1]}[kind]
    with pytest.raises((TypeError, ops.OpArgumentError), match=arg):
        getattr(ops, name)(*args, **{arg: bad}, backend=backend)
    for x, b in zip(args, before):
        if _is_list(x):
            assert all(same_bits(s, t) for s, t in zip(x, b))


@pytest.mark.skipif(not has_extension(), reason="samkernels._C is not built")
@pytest.mark.parametrize("name", STEPPED)
def test_device_step_opcheck(name):
    """torch.library.opcheck of the compiled op with a device_step."""
    op = PHASES[name]
    args = op_args(op, case(name), [((3,), F32), ((2, 2), F64)], 6)
    args += ([None] if op.takes_found_inf else []) + [torch.tensor(2, dtype=torch.int64)]
    torch.library.opcheck(getattr(torch.ops.samkernels, name).default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


# --- op-specific properties ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_perturb_rho_zero_is_exact(backend):
    """rho = 0: the weights and their backups equal the old weights bit for bit."""
    args, before, _ = run("sam_perturb_", backend, HARD, rho=0.0)
    for p, b, w in zip(args[0], args[2], before[0]):
        assert same_bits(p, w) and same_bits(b, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log_step", [True, False])
def test_vsam_variances_stay_positive(backend, log_step):
    """The log step keeps Sigma > 0; the linear step (Alg. 3 line 7) clamps at min_var, here on
    some entries but not all."""
    min_var = case("vsam_perturb_")["min_var"]
    args, _, _ = run("vsam_perturb_", backend, HARD, log_step=log_step)
    # min_var as each tensor's dtype rounds it
    floor = torch.cat([torch.full((t.numel(),), min_var, dtype=t.dtype) for t in args[3]])
    v = torch.cat([t.flatten().cpu() for t in args[3]])
    if log_step:
        assert (v > 0).all()
    else:
        assert (v >= floor).all() and 0 < (v == floor).sum() < v.numel()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ebisam_mask_is_philox_uniform_below_beta(backend):
    """Coordinate i is perturbed iff philox_uniform(seed, step, id, i) < beta (fp64 parameters,
    |g| >= 1: a chosen coordinate moves, the others stay bit for bit), betas around u = 1/2; over
    20000 coordinates the chosen fraction is beta."""
    device = DEVICE.get(backend, "cpu")
    base = case("ebisam_perturb_")
    for beta in (0.3, 0.5 + 2.0 ** -24, 0.5 - 2.0 ** -24, 0.1):
        spec = [((1001,), F64), ((7, 3), F64), ((20000,), F32)]
        op = PHASES["ebisam_perturb_"]
        args = op_args(op, {**base, "beta": beta}, spec, 7, device)
        args[1] = [g.abs() + 1.0 for g in args[1]]
        getattr(ops, "ebisam_perturb_")(*args, backend=backend)
        for p, b, pid in zip(args[0][:2], args[2], args[3]):
            u = R.philox_uniform(base["seed"], base["step"], pid, p.numel()).view(p.shape)
            assert torch.equal((p != b).cpu(), u < beta), beta
        frac = (args[0][2] != args[2][2]).double().mean().item()
        assert abs(frac - beta) < 0.015, (beta, frac)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("beta", [1.0, -0.1])
def test_ebisam_beta_out_of_range(backend, beta):
    """beta outside [0, 1): a clear error from the kernels."""
    args = op_args(PHASES["ebisam_perturb_"], {**case("ebisam_perturb_"), "beta": beta},
                   [((4,), F32)], 8, DEVICE.get(backend, "cpu"))
    with pytest.raises((ValueError, RuntimeError), match="beta"):
        ops.ebisam_perturb_(*args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_mfvi_update_regenerates_the_noise(backend, dtype):
    """With lr = 0 and no KL, the variance step depends on z only through g z: feeding g = 1 shows
    that mfvi_update_ regenerates exactly the z that vi_noise_ added."""
    device = DEVICE.get(backend, "cpu")
    p = [torch.randn(1001, dtype=dtype, device=device), torch.randn(3, 5, dtype=dtype,
                                                                    device=device)]
    v = [torch.full(t.shape, 0.04, dtype=dtype, device=device) for t in p]
    b = [torch.empty_like(t) for t in p]
    mu = [t.clone() for t in p]
    ops.vi_noise_(p, b, v, [4, 9], 99, 6, 0.0, backend=backend)
    z = [(t.double() - m.double()) / 0.2 for t, m in zip(p, mu)]
    ops.mfvi_update_(p, [torch.ones_like(t) for t in p], b, v, [], [4, 9], 99, 6, 0.0, 1.0, 0.0,
                     0.04, 1e30, backend=backend)
    for vi, zi, pi, mi in zip(v, z, p, mu):
        torch.testing.assert_close(vi.double(), 0.04 * torch.exp(-0.5 * zi * 0.2),
                                   rtol=1e-12 if dtype == F64 else 1e-5, atol=0)
        assert same_bits(pi, mi)


# --- the noise: Philox keyed by (seed, step, parameter id, element) ------------------------------
NOISE_OPS = [n for n, op in PHASES.items() if op.takes_ids]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NOISE_OPS)
def test_noise_independent_of_the_list(name, backend):
    """A parameter gets the same result whether it is alone or inside a list (its noise depends
    on its id, not on its place or its neighbours)."""
    op = PHASES[name]
    spec = [((20001,), F32), ((3,), F32), ((5,), BF16)]
    both, _, _ = run(name, backend, spec, seed=9, grad_norm=2.0) if "grad_norm" in \
        op.arg_names else run(name, backend, spec, seed=9)
    alone = op_args(op, {**case(name), "grad_norm": 2.0} if "grad_norm" in op.arg_names else
                    case(name), spec, 9, DEVICE.get(backend, "cpu"))
    alone = [x[:1] if isinstance(x, list) else x for x in alone]  # param_ids too
    getattr(ops, name)(*alone, backend=backend)
    for a, x, y in zip(op.args, both, alone):
        if _is_list(x) and x:
            assert same_bits(x[0], y[0]), a.name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["bsam_noise_", "vi_noise_"])
def test_noise_of_a_short_tensor_is_a_prefix_of_a_long_ones(name, backend):
    """A tensor's noise depends only on (seed, step, param id, element index): a short tensor gets
    exactly the first elements of a long one's (the CPU kernel sizes its Philox block to the
    run)."""
    op = PHASES[name]
    device = DEVICE.get(backend, "cpu")
    long_ = op_args(op, {**case(name), "param_ids": [7]}, [((5000,), F32)], 10, device)
    getattr(ops, name)(*long_, backend=backend)
    for n in (1, 3, 5, 33, 1023, 1025):
        short = op_args(op, {**case(name), "param_ids": [7]}, [((5000,), F32)], 10, device)
        short = [[t[:n].clone() for t in x] if _is_list(x) and x else x for x in short]
        getattr(ops, name)(*short, backend=backend)
        assert same_bits(long_[0][0][:n], short[0][0]), n


def test_philox_known_answers():
    """The reference's Philox4x32-10 against Random123's published known-answer vectors."""
    t = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in kat:
        got = R.philox4x32(*(t(c) for c in ctr), *key)
        assert tuple(int(x) for x in got) == want


def test_philox_normal_moments_and_independence():
    z = R.philox_normal(seed=42, step=0, param_id=0, numel=400_000)
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1) < 0.01
    assert abs(((z[1:] * z[:-1]).mean()).item()) < 0.01  # neighbours (shared blocks) uncorrelated
    assert abs((z ** 4).mean().item() - 3) < 0.05
    for o in [R.philox_normal(42, 1, 0, 1000), R.philox_normal(42, 0, 1, 1000),
              R.philox_normal(43, 0, 0, 1000)]:  # a change of step, parameter or seed
        assert (o - z[:1000]).abs().min() > 0


def test_philox_uniform_matches_the_normals_words():
    """Lane 0 of philox_normal is Box-Muller of (u0, u1) of the same block: reconstruct it."""
    u = R.philox_uniform(42, 3, 9, 400)
    z = R.philox_normal(42, 3, 9, 400)
    want = torch.sqrt(-2 * torch.log(u[0::4])) * torch.cos(2 * torch.pi * u[1::4])
    torch.testing.assert_close(z[0::4], want)
    big = R.philox_uniform(7, 0, 0, 50_000)
    assert 0 < big.min() and big.max() < 1
    assert abs(big.mean().item() - 0.5) < 0.005 and abs(big.var().item() - 1 / 12) < 0.002


@pytest.mark.skipif(not TRITON, reason="triton is not usable")
@pytest.mark.parametrize("seed,step,pid", [(0, 0, 0), (1234, 5, 3),
                                           (2 ** 64 - 3, 2 ** 33 + 7, 2 ** 32 - 1),
                                           (CASE_SEED, 2 ** 32 - 1, 2 ** 31 + 5)])
def test_triton_philox_stream_is_the_references(seed, step, pid):
    """Triton's Philox words are the reference's (counter (i/4, id, step_lo, step_hi), key
    (seed_lo, seed_hi)), and its normals the reference's in fp32 and fp64."""
    from samkernels.triton import philox_probe
    numel = 203
    words, z32 = philox_probe(seed, step, pid, numel, torch.float32)
    q = torch.arange(words.shape[0], dtype=torch.int64)
    lo = lambda v: v & 0xFFFFFFFF  # noqa: E731
    full = lambda v: torch.full_like(q, lo(v))  # noqa: E731
    want_words = R.philox4x32(q, full(pid), full(step), full(step >> 32), lo(seed), lo(seed >> 32))
    assert torch.equal(words, torch.stack(want_words, dim=1))
    if (seed, step, pid) == (0, 0, 0):  # Random123's known answer for counter = key = 0
        assert words[0].tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    want = R.philox_normal(seed, step, pid, numel)
    torch.testing.assert_close(z32.double(), want, rtol=1e-5, atol=2e-6)
    _, z64 = philox_probe(seed, step, pid, numel, torch.float64)
    torch.testing.assert_close(z64, want, rtol=1e-12, atol=1e-13)


@pytest.mark.skipif(not TRITON, reason="triton is not usable")
def test_triton_uniforms_below_is_exact():
    """uniforms_below(beta) = #{u < beta} over the 2^23 possible uniforms: E-BiSAM's mask compares
    the 23-bit integer, never a rounded float."""
    from samkernels.triton import uniforms_below
    u = (torch.arange(1 << 23, dtype=F64) + 0.5) * 2.0 ** -23
    gen = torch.Generator().manual_seed(0)
    betas = [0.0, 1e-300, 2.0 ** -24, 2.0 ** -24 + 1e-18, 0.5, 1 - 2.0 ** -24, 1 - 1e-17]
    betas += torch.rand(20, generator=gen, dtype=F64).tolist()
    betas += [float(u[k]) for k in (0, 1, 12345, (1 << 23) - 1)]
    betas += [math.nextafter(float(u[k]), d) for k in (0, 777, (1 << 23) - 1) for d in (0, 1)]
    want = torch.searchsorted(u, torch.tensor(betas, dtype=F64), side="left")
    assert [uniforms_below(b) for b in betas] == want.tolist()

