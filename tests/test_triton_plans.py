"""The Triton backend's machinery, on the CPU through its interpreter (TRITON_INTERPRET=1, set by
conftest.py): launch plans (chunking, launch splitting, layouts, the plan cache, CUDA-graph
capture), torch.compile through its custom ops, and how every kernel is launched.  What each
phase computes is tests/test_contract.py's; the GPU code path is compiled ahead of time by
tests/test_triton_aot.py.

The interpreter pays milliseconds per program instance, so tests that need several chunks per
tensor or several launches per group lower the module constants with monkeypatch.
"""
import contextlib
import importlib
import inspect
import math
import os
import pkgutil
from fractions import Fraction

import pytest
import torch

triton = pytest.importorskip("triton")

import samkernels.triton as T  # noqa: E402
from samkernels.ops._spec import PHASES  # noqa: E402
from samkernels.ops import reference as R  # noqa: E402
from samkernels.triton import _multi_tensor as mt  # noqa: E402
from samkernels.triton.sam import adam_scalars  # noqa: E402

from helpers import (BF16, F16, F32, F64, clone_args, f64_args, hard_tensor, op_args,  # noqa: E402
                     same_bits, tol)
from oracles import case  # noqa: E402
from test_contract import check_against_reference  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU tests need the Triton interpreter")

NOISE_OPS = [n for n, op in PHASES.items() if op.takes_ids]


@pytest.fixture
def small_chunks(monkeypatch):
    """256-element blocks, 512-element chunks, at most 5 chunks per launch."""
    monkeypatch.setattr(mt, "BLOCK", 256)
    monkeypatch.setattr(mt, "CHUNK", 512)
    monkeypatch.setattr(mt, "MAX_CHUNKS_PER_LAUNCH", 5)


# full chunks (the unmasked path, 2 blocks each) and tails, noise quads across chunk borders, and
# more tiny tensors than one launch takes
SPLIT = [((1000,), F32), ((1537,), F32), ((3,), F16), ((512,), BF16)] + [((1,), F32)] * 6 + \
    [((2,), F64)]


@pytest.mark.parametrize("name", list(PHASES))
def test_several_chunks_and_launches(small_chunks, name):
    check_against_reference(name, "triton", SPLIT, seed=12)


@pytest.mark.parametrize("name", NOISE_OPS)
def test_noise_independent_of_partition(monkeypatch, name):
    """Bit-identical results whatever the chunking (programs, blocks, launches)."""
    op = PHASES[name]
    spec = [((3001,), F32), ((5,), F32), ((2, 301), BF16)]
    kw = {"grad_norm": 2.0} if "grad_norm" in op.arg_names else {}
    a = op_args(op, {**case(name), **kw}, spec, 13)
    b = clone_args(a)
    getattr(T, name)(*a)
    monkeypatch.setattr(mt, "BLOCK", 256)
    monkeypatch.setattr(mt, "CHUNK", 1024)
    monkeypatch.setattr(mt, "MAX_CHUNKS_PER_LAUNCH", 2)
    getattr(T, name)(*b)
    for x, y in zip(a, b):
        if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            assert all(same_bits(s, t) for s, t in zip(x, y))


# layouts: transposed, contiguous, transposed, channels_last (dense: processed in memory order,
# no copy), every other column, and a misaligned view of fp64 (copied and written back)
LAYOUTS = [((6, 5), F32, "T"), ((2, 5), F32), ((4, 3), BF16, "T"), ((2, 3, 2, 2), F32, "CL"),
           ((3, 4), F32, "S"), ((5, 3), F64, "S")]


def test_dense_layouts_are_not_copied():
    gen = torch.Generator().manual_seed(0)
    lists = [[hard_tensor(e[0], e[1], e[2] if len(e) > 2 else None, gen) for e in LAYOUTS]
             for _ in range(2)]
    with mt.contiguous(lists, mutated=(0,)) as flat:
        same = [a.data_ptr() == b.data_ptr() for a, b in zip(lists[0], flat[0])]
    assert same == [True, True, True, True, False, False]
    with mt.contiguous(lists, mutated=(0,), elementwise=False) as flat:  # the noise's view
        same = [a.data_ptr() == b.data_ptr() for a, b in zip(lists[0], flat[0])]
    assert same == [False, True, False, False, False, False]


def test_plan_cache():
    mt.clear_cache()
    op = PHASES["sam_restore_sgd_"]
    args = op_args(op, case("sam_restore_sgd_"), [((5,), F32), ((3, 4), F32)], 14)
    T.sam_restore_sgd_(*args)
    T.sam_restore_sgd_(*args)
    assert len(mt._cache) == 1  # same storages: the tables are reused
    args[0][0] = args[0][0].clone()  # a new storage: a new plan
    T.sam_restore_sgd_(*args)
    assert len(mt._cache) == 2
    lists = [args[0], args[1]]
    assert mt.plan_for(lists) is mt.plan_for(lists)
    # the same tensors in one list of four: other tables (the key once held only their sequence)
    assert mt.plan_for([lists[0] + lists[1]]) is not mt.plan_for(lists)


def test_no_plan_is_built_inside_a_graph_capture(monkeypatch):
    """A plan's tables reach the device by a host copy, which a CUDA graph would re-read at every
    replay: inside a capture an uncached plan is a clear error (warm up first), a cached one is
    used and kept alive for the graph beyond the LRU cache.  The capture is simulated."""
    mt.clear_cache()
    p, g, b = torch.ones(5), torch.full((5,), 2.0), torch.zeros(5)
    monkeypatch.setattr(mt, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="run the step .* once eagerly before capturing"):
        T.sam_perturb_([p], [g], [b], None, 0.05, 1e-12, False, 0.0)
    assert torch.equal(p, torch.ones(5))  # nothing ran
    monkeypatch.setattr(mt, "_capturing", lambda device: False)
    T.sam_perturb_([p], [g], [b], None, 0.05, 1e-12, False, 0.0)  # eager warm-up builds it
    plan = mt.plan_for([[p], [g], [b]])
    monkeypatch.setattr(mt, "_capturing", lambda device: True)
    assert mt.plan_for([[p], [g], [b]]) is plan
    assert mt._captured[id(plan)] is plan
    mt.clear_cache()
    assert mt._captured[id(plan)] is plan  # still alive for the graph


# --- device_step: read by the kernels at every call, never part of a plan ------------------------
def _stepped_runner(name, spec, seed):
    """run(step, device_step) -> the op's tensor lists after a call on the SAME tensors (restored
    in place before each call, so every call hits one plan)."""
    op = PHASES[name]
    args = op_args(op, {**case(name), "step": 1}, spec, seed)
    init = clone_args(args)
    lists = [i for i, a in enumerate(args) if isinstance(a, list) and a
             and isinstance(a[0], torch.Tensor)]
    at = op.arg_names.index("step")

    def run(step, device_step):
        for i in lists:
            for t, v in zip(args[i], init[i]):
                t.copy_(v)
        args[at] = step
        getattr(T, name)(*args, *([None] if op.takes_found_inf else []), device_step)
        return [t.clone() for i in lists for t in args[i]]
    return run


def _same(xs, ys):
    return all(same_bits(x, y) for x, y in zip(xs, ys))


@pytest.mark.parametrize("name", ["bsam_noise_", "mfvi_update_", "sam_restore_adam_"])
def test_device_step_is_read_at_each_call_and_not_planned(monkeypatch, name):
    """The counter is a kernel argument, not a table entry: another counter tensor reuses the plan
    (inside a capture too, simulated), and a counter advanced in place is read anew at the next
    call -- what a replayed CUDA graph sees.  A call without one reads the plan's zero."""
    mt.clear_cache()
    run = _stepped_runner(name, [((5,), F32), ((3, 4), BF16), ((9,), F64)], 22)
    want = run(7, None)
    plans = dict(mt._cache)
    counter = torch.tensor(3, dtype=torch.int64)
    assert _same(run(4, counter), want)
    counter.add_(2)  # advanced on the device between two replays
    assert _same(run(2, counter), want)
    assert not _same(run(4, counter), want)
    monkeypatch.setattr(mt, "_capturing", lambda device: True)
    assert _same(run(1, torch.full((1,), 6, dtype=torch.int64)), want)
    assert dict(mt._cache) == plans and all(p.zero.tolist() == [0] for p in plans.values())
    assert counter.item() == 5  # read, never written


@pytest.mark.parametrize("name", ["vi_noise_", "ebisam_perturb_"])
@pytest.mark.parametrize("split", [(2**64 - 1, 2), (-3, 10), (5, -2), (2**63 - 1, 2**63 - 1)],
                         ids=["wraps", "negative-host", "negative-device", "int64-overflow"])
def test_device_step_sum_wraps_like_the_host_step(name, split):
    """The kernels add the counter to the host step in 64-bit arithmetic: the Philox step words
    are those of the low 64 bits of the integer sum, as for the host step (``_i64``)."""
    host, on_device = split
    run = _stepped_runner(name, [((5,), F32), ((3, 4), BF16)], 23)
    assert _same(run(host, torch.tensor(on_device, dtype=torch.int64)),
                 run(host + on_device, None))


@triton.jit
def _adam_scalars_kernel(out, steps, step_lo, step_hi, lr_bits, b1_bits, b2_bits,
                         MATH: triton.language.constexpr):
    i = triton.language.program_id(0)
    step_size, sqrt_bc2 = adam_scalars(lr_bits, b1_bits, b2_bits, step_lo, step_hi, steps + i,
                                       MATH)
    triton.language.store(out + 2 * i, step_size.to(triton.language.float64))
    triton.language.store(out + 2 * i + 1, sqrt_bc2.to(triton.language.float64))


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.95, 0.98), (0.5, 0.75), (0.0, 0.9999)])
def test_adam_bias_corrections_are_the_hosts(betas):
    """The Adam kernels form lr / (1 - beta1^t) and sqrt(1 - beta2^t) from the step on the
    device, t = host + device step: in the interpreter bit for bit Python's double ``beta ** t``
    formulas (the host computation they replace), rounded to fp32 for fp32 groups."""
    lr, (beta1, beta2) = 0.003, betas
    steps = list(range(1, 41)) + [100, 482, 494, 503, 1000, 2904, 12345, 2**31 + 5, 2**40 + 3,
                                  2**53 + 1]
    want64 = torch.tensor([[lr / (1 - beta1 ** t), math.sqrt(1 - beta2 ** t)] for t in steps],
                          dtype=F64).view(-1)
    for host in (0, 2**32 + 1):
        counters = torch.tensor([t - host for t in steps], dtype=torch.int64)
        for math_dt, dt in ((triton.language.float64, F64), (triton.language.float32, F32)):
            out = torch.zeros(2 * len(steps), dtype=F64)
            _adam_scalars_kernel[(len(steps),)](out, counters, *mt.u32_words(host),
                                                *map(mt.f64_bits, (lr, beta1, beta2)),
                                                MATH=math_dt)
            assert same_bits(out, want64.to(dt).to(F64)), (host, dt)


@triton.jit
def _one_minus_power_kernel(out, betas, steps):
    i = triton.language.program_id(0)
    triton.language.store(out + i, mt.one_minus_power(triton.language.load(betas + i),
                                                      triton.language.load(steps + i)))


@triton.jit
def _fma_kernel(out, a, b):
    x, y = triton.language.load(a), triton.language.load(b)
    triton.language.store(out, triton.language.fma(x, y, -(x * y)))


def _fma_rounds_once() -> bool:
    """Whether this Triton runs tl.fma as a fused multiply-add (one rounding): the GPU's does,
    and Triton 3.9's interpreter; Triton 3.6's interpreter computes x * y + z (two roundings),
    under which no double-double arithmetic can be exact.  (1 + 2^-30)^2 = 1 + 2^-29 + 2^-60:
    the fma recovers the 2^-60 the product rounded away."""
    a = torch.tensor([1.0 + 2.0 ** -30], dtype=F64)
    out = torch.zeros(1, dtype=F64)
    _fma_kernel[(1,)](out, a, a)
    return out.item() == 2.0 ** -60


def test_one_minus_power_is_correctly_rounded():
    """The GPU's bias corrections (``one_minus_power``, double-double squaring): 1 - beta^t with
    beta^t rounded once, against exact rational arithmetic -- also at steps where glibc's pow
    misrounds (beta 0.9999 at 494, 0.99 at 503, 0.95 at 482, 0.999 at 2904), where it differs
    from Python's ``beta ** t`` by design.  A negative step counts as 0.  (Run where tl.fma
    rounds once, as on a GPU: the interpreter of Triton 3.9, not 3.6's.)"""
    if not _fma_rounds_once():
        pytest.skip(f"Triton {triton.__version__}'s interpreter rounds tl.fma twice (x * y + z); "
                    "the GPU's fma, which one_minus_power is written for, rounds once")
    cases = [(b, t) for b in (0.9, 0.999, 0.9999, 0.5, 0.0, 0.123456789)
             for t in (0, 1, 2, 3, 7, 40, 1000, 4097)]
    cases += [(0.9999, 494), (0.99, 503), (0.95, 482), (0.999, 2904), (0.9, 2**40 + 3),
              (0.9999, 2**53 + 1), (0.9, -5)]
    betas = torch.tensor([b for b, _ in cases], dtype=F64)
    steps = torch.tensor([t for _, t in cases], dtype=torch.int64)
    out = torch.zeros(len(cases), dtype=F64)
    _one_minus_power_kernel[(len(cases),)](out, betas, steps)
    want = [1.0 - (float(Fraction(b) ** max(t, 0)) if t <= 5000 else 0.0) for b, t in cases]
    assert out.tolist() == want


def test_torch_compile_traces_the_custom_ops():
    """A compiled step (fullgraph) through Triton phases, found_inf included, equals the
    reference: each phase is one opaque, functionalised node."""
    spec = [((10,), F32), ((3,), F32)]
    sgd = op_args(PHASES["sam_restore_sgd_"], case("sam_restore_sgd_", 4), spec, 16)
    mfvi = op_args(PHASES["mfvi_update_"], case("mfvi_update_"), spec, 19)
    vsam = op_args(PHASES["vsam_perturb_"], case("vsam_perturb_"), spec, 20)
    want = [f64_args(a) for a in (sgd, mfvi, vsam)]
    flag = torch.zeros(())

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(sgd, mfvi, vsam, found_inf):
        T.sam_restore_sgd_(*sgd)
        T.mfvi_update_(*mfvi, found_inf)
        return T.grad_sumsq(sgd[0], sgd[1], False, 0.0), T.vsam_perturb_(*vsam, found_inf)

    norm, vnorm = step(sgd, mfvi, vsam, flag)
    R.sam_restore_sgd_(*want[0])
    R.mfvi_update_(*want[1])
    want_vnorm = R.vsam_perturb_(*want[2])
    for got, ref, lists in zip((sgd, mfvi, vsam), want, ((0, 3), (0, 3, 4), (0, 2, 3))):
        for k in lists:
            for t, r in zip(got[k], ref[k]):
                torch.testing.assert_close(t.double(), r, rtol=tol(t.dtype)[0],
                                           atol=tol(t.dtype)[1])
    torch.testing.assert_close(norm, R.grad_sumsq(want[0][0], want[0][1], False, 0.0),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(vnorm, want_vnorm, rtol=1e-12, atol=0)


# --- every launch: on the tensors' device, every float as f64 bits --------------------------------
def test_device_guard_helper(monkeypatch):
    """mt.device_guard: a shared no-op for CPU tensors (torch.cuda untouched), and
    torch.cuda.device(that device) for CUDA tensors, whatever device is current."""
    def no_cuda(device):
        raise AssertionError(f"torch.cuda.device({device}) called for a CPU tensor")
    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    cpu = torch.device("cpu")
    assert mt.device_guard(cpu) is mt.device_guard(cpu)  # nothing built per call
    with mt.device_guard(cpu):
        pass
    seen = []
    monkeypatch.setattr(torch.cuda, "device",
                        lambda device: seen.append(device) or contextlib.nullcontext())
    with mt.device_guard(torch.device("cuda", 1)):
        pass
    assert seen == [torch.device("cuda", 1)]


def _kernels():
    """Every Triton kernel of the package, as (module, name)."""
    out = set()
    for info in pkgutil.iter_modules(T.__path__):
        mod = importlib.import_module(f"{T.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and hasattr(obj, "fn") and hasattr(obj, "arg_names"):
                out.add((obj.fn.__module__, name))
    return out


def _is_float_type(t: str) -> bool:
    """A scalar argument type that Triton would bind as a float (fp32 for a Python float)."""
    t = t.split(".")[-1]
    return not t.startswith("*") and t.startswith(("fp", "float", "bf"))


@pytest.fixture
def launches(monkeypatch):
    """Records each Triton launch as (module, kernel, inside mt.device_guard?, {argument: type
    as Triton's binder types it}): the annotation where there is one, else triton's mangle_type
    (a Python float -> 'fp32', which a GPU would get)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import mangle_type
    depth = [0]
    real_guard, real_run = mt.device_guard, InterpretedFunction.run

    @contextlib.contextmanager
    def guard(device):
        with real_guard(device):
            depth[0] += 1
            try:
                yield
            finally:
                depth[0] -= 1

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(self.arg_names, args), **kwargs)
        types = {}
        for name, value in bound.items():
            if name not in params:  # num_warps ...
                continue
            ann = params[name].annotation
            if ann is triton.language.constexpr or "constexpr" in str(ann):
                continue
            types[name] = mangle_type(value) if ann is inspect.Parameter.empty else str(ann)
        calls.append((self.fn.__module__, self.fn.__name__, depth[0] > 0, types))
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    calls = []
    monkeypatch.setattr(mt, "device_guard", guard)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    return calls


def test_every_launch_is_guarded_and_binds_no_float(launches):
    """Each kernel of the package runs inside mt.device_guard (Triton launches on the current
    device and stream), and no scalar argument is a Python float (the binder types it fp32 on a
    GPU: an fp64 group or loss would lose its exact hyper-parameters)."""
    from samkernels.triton.bisam_loss import bisam_loss_fwd_triton
    spec = [((5,), F32), ((3,), F64)]
    for name, op in PHASES.items():
        getattr(T, name)(*op_args(op, case(name), spec, 20))
        if op.takes_found_inf:  # the skip forms' kernels
            getattr(T, name)(*op_args(op, case(name), spec, 21), torch.zeros(1))
    T.philox_probe(1, 2, 3, 8)
    logits, target = torch.randn(3, 10, dtype=F64), torch.tensor([1, -100, 4])
    bisam_loss_fwd_triton(logits, target, 2.0, 1, 1.5, -100, 0.25, True)
    seen = {(mod, name) for mod, name, _, _ in launches}
    assert seen == _kernels(), sorted(_kernels() - seen)
    for mod, name, guarded, types in launches:
        assert guarded, f"{mod}.{name} launched outside mt.device_guard"
        floats = {a: t for a, t in types.items() if _is_float_type(t)}
        assert not floats, f"{mod}.{name}: float arguments {floats} (pass mt.f64_bits)"


def test_interpreter_patches_the_same_builtins():
    """conftest.py looks triton.language's builtins up once for the interpreter: its
    _patch_builtin patches the same members with the same builtins as Triton's own, on a clean
    triton.language (a launch) and on a patched one (a @triton.jit helper called in a kernel)."""
    import triton.language as tl
    from triton.runtime import interpreter as ti
    fast = ti._patch_builtin
    assert getattr(fast, "looked_up_once", False), "conftest.py did not install it"
    pkgs = (tl, tl.tensor, tl.math, tl.core, tl.core.tensor_descriptor_base)

    def changes(patch, pkg):
        scope = ti._LangPatchScope()
        patch(pkg, ti.interpreter_builder, scope)
        # (where, what it replaced, the builtin the replacement calls)
        out = [(obj, name, original, (getattr(obj, name).__kwdefaults__ or {}).get("member"))
               for obj, name, original in scope._changes]
        scope.restore()
        return out

    for pkg in pkgs:
        got, want = changes(fast, pkg), changes(fast.original, pkg)
        assert want and all(m is not None for *_, m in want) and got == want, pkg
    outer = ti._LangPatchScope()  # as inside a launch
    try:
        for pkg in pkgs:
            fast.original(pkg, ti.interpreter_builder, outer)
        for pkg in pkgs:
            assert changes(fast, pkg) == changes(fast.original, pkg), pkg
    finally:
        outer.restore()
