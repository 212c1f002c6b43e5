"""Triton backend of the MFVI-family / E-BiSAM phases vs the executable spec
(samkernels/ops/reference_vi.py run in float64), and the ``found_inf`` skip form of every
gradient-consuming Triton phase.

Runs on the CPU through the Triton interpreter (TRITON_INTERPRET=1, set before anything imports
triton); the interpreter costs ~12 ms per program instance, so tensors are small, and tests that
need several chunks per tensor or several launches per group lower the module constants with
monkeypatch (as tests/test_triton_ops.py does).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import inspect  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

import samkernels.triton as T  # noqa: E402
from samkernels.ops import reference as R  # noqa: E402
from samkernels.triton import _multi_tensor as mt  # noqa: E402
from samkernels.triton import vi_step  # noqa: E402

from test_triton_ops import (BF16, F16, F32, F64, MIXED, NONCONTIG, ODD, _close,  # noqa: E402
                             _f64, _make)
from test_triton_ops import phase_args as sam_phase_args  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU tests need the Triton interpreter")

SEED = 0x0123456789ABCDEF  # > 2^32: both key words matter
VI_OPS = ["vi_noise_", "mfvi_update_", "vsam_sumsq", "vsam_perturb_", "ebisam_perturb_"]


def _dim(spec):
    return float(sum(math.prod(e[0]) for e in spec))


def phase_args(name, spec, seed=0, **kw):
    """Fresh random arguments of phase ``name`` (keyword overrides for the scalars; "pos" for a
    fresh positive list).  The SAM / bSAM phases come from test_triton_ops.phase_args."""
    if name not in VI_OPS:
        return sam_phase_args(name, spec, seed=seed, **kw)
    gen = torch.Generator().manual_seed(seed)
    w = lambda: _make(spec, "w", gen)  # noqa: E731
    st = lambda: _make(spec, "state", gen)  # noqa: E731
    pos = lambda: _make(spec, "pos", gen)  # noqa: E731  (state dtype, in [0.5, 1.5))
    ids = [3 * i + 1 for i in range(len(spec))]
    if name == "vi_noise_":
        a = dict(params=w(), backups=w(), variances=pos(), param_ids=ids, seed=SEED, step=5,
                 sigma=0.03)
    elif name == "mfvi_update_":
        a = dict(params=w(), grads=w(), backups=w(), variances=pos(), momenta=st(), param_ids=ids,
                 seed=SEED, step=7, lr=0.1, var_lr=0.3, momentum=0.9, prior_var=0.5,
                 num_data=50.0)
    elif name == "vsam_sumsq":
        a = dict(grads=w(), variances=pos())
    elif name == "vsam_perturb_":
        # min_var inside the range of the variances: the linear step clamps some entries only
        a = dict(params=w(), grads=w(), backups=w(), variances=pos(), sigma_norm=None,
                 dim=_dim(spec), eps=1e-12, var_lr=1e-3, prior_var=2.0, num_data=40.0,
                 log_step=True, min_var=0.9)
    elif name == "ebisam_perturb_":
        a = dict(params=w(), grads=w(), backups=w(), param_ids=ids, grad_norm=None, seed=SEED,
                 step=11, rho=0.05, beta=0.5, eps=1e-12)
    else:
        raise KeyError(name)
    for k, v in kw.items():
        assert k in a, k
        a[k] = pos() if v == "pos" else v
    return list(a.values())


def _tensor_list(x):
    return isinstance(x, list) and x and isinstance(x[0], torch.Tensor)


def _clone(args):
    return [[t.clone() for t in a] if _tensor_list(a) else
            (a.clone() if isinstance(a, torch.Tensor) else a) for a in args]


def check(name, args, norm_rtol=1e-12):
    """Run phase ``name`` with Triton on ``args`` and the reference in float64 on copies; compare
    every tensor (mutated or not) and the return value.  Returns the Triton return value."""
    ref_args = [_f64(a) for a in args]
    want = getattr(R, name)(*ref_args)
    got = getattr(T, name)(*args)
    for i, (a, r) in enumerate(zip(args, ref_args)):
        if _tensor_list(a):
            for j, (t, tr) in enumerate(zip(a, r)):
                _close(t, tr, f"{name} arg {i} tensor {j} ({t.dtype}, {tuple(t.shape)})")
    if want is not None:  # the norm contract: float64, 0-dim, float64 accumulation
        assert got.dim() == 0 and got.dtype == want.dtype == F64, (got.dtype, want.dtype)
        torch.testing.assert_close(got, want, atol=0, rtol=norm_rtol)
    return got


# --- each phase vs the reference ---------------------------------------------------------------
@pytest.mark.parametrize("learned", [False, True])
def test_vi_noise(learned):
    args = phase_args("vi_noise_", ODD, seed=1, variances="pos" if learned else [],
                      param_ids=[7, 0, 3, 2**32 + 1, 2**40 + 11])
    mean = [p.clone() for p in args[0]]
    check("vi_noise_", args)
    for p, b, m in zip(args[0], args[1], mean):
        assert torch.equal(b, m) and not torch.equal(p, m)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_mfvi_update(momentum):
    kw = dict(momentum=momentum) if momentum else dict(momentum=0.0, momenta=[])
    check("mfvi_update_", phase_args("mfvi_update_", ODD, seed=2, **kw))


def test_vsam_sumsq():
    got = check("vsam_sumsq", phase_args("vsam_sumsq", ODD, seed=3))
    assert got.dtype == F64


@pytest.mark.parametrize("log_step", [True, False])
@pytest.mark.parametrize("given_norm", [False, True])
def test_vsam_perturb(log_step, given_norm):
    norm = torch.tensor(3.25, dtype=F64) if given_norm else None
    args = phase_args("vsam_perturb_", ODD, seed=4, log_step=log_step, sigma_norm=norm)
    v_old = [v.clone() for v in args[3]]
    got = check("vsam_perturb_", args)
    if given_norm:
        assert got is norm  # returned as passed, like the reference
    else:
        assert got.dtype == F64
    if not log_step:  # the clamp was active on some entries, not on all
        clamped = torch.cat([(v == 0.9).flatten() for v in args[3]])
        assert 0 < clamped.sum() < clamped.numel()
        assert all((v >= 0.9).all() for v in args[3])
    assert not all(torch.equal(v, o) for v, o in zip(args[3], v_old))


@pytest.mark.parametrize("given_norm", [False, True])
@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_ebisam_perturb(given_norm, beta):
    norm = torch.tensor(0.7, dtype=F64) if given_norm else None
    spec = ODD + [((20000,), F32)]
    args = phase_args("ebisam_perturb_", spec, seed=5, grad_norm=norm, beta=beta)
    got = check("ebisam_perturb_", args)
    if given_norm:
        assert got is norm
    p, b = args[0][-1], args[2][-1]
    assert abs((p != b).double().mean().item() - beta) < 0.015  # chosen with probability beta


def test_ebisam_mask_is_philox_uniform_below_beta():
    """The chosen coordinates are exactly {i : philox_uniform(i) < beta} (fp64 parameters: the
    perturbed ones differ from the backup, the others are bit-identical)."""
    spec = [((1001,), F64), ((7, 3), F64)]
    for beta in (0.3, 0.5 + 2.0 ** -24, 0.5 - 2.0 ** -24):  # around u = 1/2 - 2^-24 / + 2^-24
        args = phase_args("ebisam_perturb_", spec, seed=6, beta=beta)
        args[1] = [g.abs() + 1.0 for g in args[1]]  # g != 0: every chosen coordinate moves
        T.ebisam_perturb_(*args)
        for p, b, pid in zip(args[0], args[2], args[3]):
            u = R.philox_uniform(SEED, 11, pid, p.numel()).view(p.shape)
            assert torch.equal(p != b, u < beta)


def test_uniforms_below_is_exact():
    u = (torch.arange(1 << 23, dtype=F64) + 0.5) * 2.0 ** -23
    gen = torch.Generator().manual_seed(0)
    betas = [0.0, 1e-300, 2.0 ** -24, 2.0 ** -24 + 1e-18, 0.5, 1 - 2.0 ** -24, 1 - 1e-17]
    betas += torch.rand(20, generator=gen, dtype=F64).tolist()
    betas += [float(u[k]) for k in (0, 1, 12345, (1 << 23) - 1)]
    betas += [math.nextafter(float(u[k]), d) for k in (0, 777, (1 << 23) - 1) for d in (0, 1)]
    want = torch.searchsorted(u, torch.tensor(betas, dtype=F64), side="left")  # #{u < beta}
    assert [vi_step.uniforms_below(b) for b in betas] == want.tolist()


def test_ebisam_beta_out_of_range():
    args = phase_args("ebisam_perturb_", [((4,), F32)], beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        T.ebisam_perturb_(*args)


# --- the noise contract ------------------------------------------------------------------------
def test_fp64_matches_reference_tightly():
    spec = [((1001,), F64), ((4,), F64), ((3, 5), F64)]
    check("vi_noise_", phase_args("vi_noise_", spec, seed=7, step=2**40 + 3))
    check("mfvi_update_", phase_args("mfvi_update_", spec, seed=8, step=2**33 + 1))
    check("vsam_perturb_", phase_args("vsam_perturb_", spec, seed=9, log_step=False),
          norm_rtol=1e-13)
    check("ebisam_perturb_", phase_args("ebisam_perturb_", spec, seed=10))


def test_mfvi_update_regenerates_the_noise():
    """With lr = 0 and no KL, the variance step depends on z only through g z: feeding g = 1 shows
    that mfvi_update_ regenerates exactly the z that vi_noise_ added (fp64 and fp32)."""
    for dt in (F64, F32):
        p = [torch.randn(1001, dtype=dt), torch.randn(3, 5, dtype=dt)]
        v = [torch.full(t.shape, 0.04, dtype=dt) for t in p]
        b = [torch.empty_like(t) for t in p]
        mu = [t.clone() for t in p]
        T.vi_noise_(p, b, v, [4, 9], 99, 6, 0.0)
        z = [(t.double() - m.double()) / 0.2 for t, m in zip(p, mu)]
        T.mfvi_update_(p, [torch.ones_like(t) for t in p], b, v, [], [4, 9], 99, 6, 0.0, 1.0,
                       0.0, 0.04, 1e30)
        for vi, zi, pi, mi in zip(v, z, p, mu):
            torch.testing.assert_close(vi.double(), 0.04 * torch.exp(-0.5 * zi * 0.2),
                                       rtol=1e-12 if dt == F64 else 1e-5, atol=0)
            assert torch.equal(pi, mi)


@pytest.mark.parametrize("name", ["vi_noise_", "mfvi_update_", "ebisam_perturb_"])
def test_noise_independent_of_partition(monkeypatch, name):
    """Bit-identical results whatever the chunking (programs, blocks, launches)."""
    spec = [((3001,), F32), ((5,), F32), ((2, 301), BF16)]
    a = phase_args(name, spec, seed=13, grad_norm=torch.tensor(2.0)) \
        if name == "ebisam_perturb_" else phase_args(name, spec, seed=13)
    b = _clone(a)
    getattr(T, name)(*a)
    monkeypatch.setattr(mt, "BLOCK", 256)
    monkeypatch.setattr(mt, "CHUNK", 1024)
    monkeypatch.setattr(mt, "MAX_CHUNKS_PER_LAUNCH", 2)
    getattr(T, name)(*b)
    for x, y in zip(a, b):
        if _tensor_list(x):
            for s, t in zip(x, y):
                assert torch.equal(s, t)


# --- multi-tensor machinery --------------------------------------------------------------------
PHASES = [("vi_noise_", {}), ("mfvi_update_", {}), ("vsam_sumsq", {}),
          ("vsam_perturb_", dict(log_step=False)), ("ebisam_perturb_", {})]
IDS = [p[0] for p in PHASES]


@pytest.mark.parametrize("name,kw", PHASES, ids=IDS)
def test_mixed_dtypes_in_one_list(name, kw):
    check(name, phase_args(name, MIXED, seed=14, **kw))


@pytest.mark.parametrize("name,kw", PHASES, ids=IDS)
def test_non_contiguous(name, kw):
    args = phase_args(name, NONCONTIG, seed=15, **kw)
    # one parameter stored transposed while its grads and state are contiguous: copied
    p = args[0][1]
    args[0][1] = torch.empty(p.shape[::-1], dtype=p.dtype).t().copy_(p)
    check(name, args)  # mutated views are checked in place, through strides


@pytest.mark.parametrize("name,kw", PHASES, ids=IDS)
def test_many_tiny_tensors_split_launches(monkeypatch, name, kw):
    monkeypatch.setattr(mt, "MAX_CHUNKS_PER_LAUNCH", 6)  # 25 tensors -> 5 launches per phase
    spec = [((1,), F32)] * 22 + [((2,), F32), ((5,), BF16), ((1,), F64)]
    check(name, phase_args(name, spec, seed=16, **kw))


@pytest.mark.parametrize("name,kw", PHASES, ids=IDS)
def test_several_chunks_per_tensor(monkeypatch, name, kw):
    # full chunks (unmasked path, 2 blocks each) and tails; noise quads across chunk borders
    monkeypatch.setattr(mt, "BLOCK", 256)
    monkeypatch.setattr(mt, "CHUNK", 512)
    monkeypatch.setattr(mt, "MAX_CHUNKS_PER_LAUNCH", 5)
    spec = [((1000,), F32), ((1537,), F32), ((3,), F16), ((512,), BF16)]
    check(name, phase_args(name, spec, seed=17, **kw))


def test_empty_inputs():
    T.vi_noise_([], [], [], [], 1, 2, 0.1)
    T.mfvi_update_([], [], [], [], [], [], 1, 2, 0.1, 0.1, 0.9, 1.0, 10.0)
    s = T.vsam_sumsq([], [])
    assert s.dtype == F64 and s.item() == 0.0
    assert T.vsam_perturb_([], [], [], [], None, 0.0, 1e-12, 0.1, 1.0, 10.0, True, 0.0).item() == 0
    assert T.ebisam_perturb_([], [], [], [], None, 1, 2, 0.05, 0.5, 1e-12).item() == 0
    flag = torch.ones(())
    T.mfvi_update_([], [], [], [], [], [], 1, 2, 0.1, 0.1, 0.9, 1.0, 10.0, flag)
    # empty tensors next to non-empty ones
    spec = [((0,), F32), ((3,), F32), ((0, 4), F64)]
    for name, kw in PHASES:
        check(name, phase_args(name, spec, seed=18, **kw))


def test_param_ids_length_checked():
    args = phase_args("vi_noise_", [((4,), F32), ((2,), F32)], param_ids=[0])
    with pytest.raises(ValueError, match="param_id"):
        T.vi_noise_(*args)


def test_torch_compile_traces_custom_ops():
    spec = [((10,), F32), ((3,), F32)]
    args = phase_args("mfvi_update_", spec, seed=19)
    vargs = phase_args("vsam_perturb_", spec, seed=20)
    ref_args, ref_vargs = [_f64(a) for a in args], [_f64(a) for a in vargs]
    flag = torch.zeros(())

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(p, g, b, v, m, vp, vg, vb, vv, found_inf):
        T.mfvi_update_(p, g, b, v, m, [1, 4], 3, 7, 0.1, 0.3, 0.9, 0.5, 50.0, found_inf)
        return T.vsam_perturb_(vp, vg, vb, vv, None, 13.0, 1e-12, 1e-3, 2.0, 40.0, True, 0.9,
                               found_inf)

    got = step(*args[:5], *vargs[:4], flag)
    R.mfvi_update_(*ref_args[:5], [1, 4], 3, 7, 0.1, 0.3, 0.9, 0.5, 50.0)
    want = R.vsam_perturb_(*ref_vargs[:4], None, 13.0, 1e-12, 1e-3, 2.0, 40.0, True, 0.9)
    for t, r in zip(args[0] + args[3] + args[4] + vargs[0] + vargs[2] + vargs[3],
                    ref_args[0] + ref_args[3] + ref_args[4] + ref_vargs[0] + ref_vargs[2]
                    + ref_vargs[3]):
        _close(t, r, "compiled mfvi / vsam")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


# --- found_inf: the skip form, decided on the device ---------------------------------------------
# (op, kwargs, perturbation?): the skip form of a perturbation copies backup <- w, that of an
# update w <- backup
GATED = [("sam_perturb_", dict(adaptive=True), True),
         ("sam_restore_sgd_", dict(weight_decay=1e-3, nesterov=True), False),
         ("sam_restore_adam_", dict(decoupled=True, weight_decay=1e-2), False),
         ("bsam_perturb_", dict(accums="pos"), False),
         ("bsam_update_", dict(accums="pos", released_order=True), False),
         ("mfvi_update_", {}, False),
         ("vsam_perturb_", dict(log_step=True), True),
         ("ebisam_perturb_", {}, True)]
# mixed dtypes, a tensor stored transposed, an empty one
FLAG_SPEC = [((1000,), F32), ((33,), BF16), ((129,), F64), ((3,), F16), ((4, 3), F32, "T"),
             ((0,), F32)]


def _bits(t):
    return t.contiguous().view(-1).view(torch.uint8)


def _flagged(name, kw, seed, flag):
    args = phase_args(name, FLAG_SPEC, seed=seed, **kw)
    return args, getattr(T, name)(*args, flag)


@pytest.mark.parametrize("name,kw,perturb", GATED, ids=[g[0] for g in GATED])
def test_found_inf_zero_is_a_normal_step(name, kw, perturb):
    plain = phase_args(name, FLAG_SPEC, seed=21, **kw)
    out = getattr(T, name)(*plain)
    args, got = _flagged(name, kw, 21, torch.tensor(0.))
    for x, y in zip(args, plain):
        if _tensor_list(x):
            for s, t in zip(x, y):
                assert torch.equal(s, t)
    if out is not None:
        assert torch.equal(got, out)


@pytest.mark.parametrize("flag", [torch.tensor(1.), torch.tensor([float("inf")]),
                                  torch.tensor(float("nan")), torch.tensor(True),
                                  torch.tensor([2.0], dtype=F64)],
                         ids=["one", "inf[1]", "nan", "bool", "f64[1]"])
def test_found_inf_flag_forms(flag):
    """Any nonzero (NaN too) one-element flag, whatever its dtype, selects the skip form."""
    args, _ = _flagged("sam_restore_sgd_", {}, 22, flag)
    for p, b in zip(args[0], args[2]):
        assert torch.equal(p, b)


@pytest.mark.parametrize("name,kw,perturb", GATED, ids=[g[0] for g in GATED])
def test_found_inf_set_skips(name, kw, perturb):
    """found_inf = 1 and non-finite gradients: a perturbation only copies backup <- w (w, Sigma
    untouched, the norm still returned); an update only copies w <- backup (state untouched)."""
    args = phase_args(name, FLAG_SPEC, seed=23, **kw)
    grads = args[1]
    for g in grads[:3]:
        g.view(-1)[0] = float("inf")
        g.view(-1)[-1] = float("nan")
    before = _clone(args)
    plain = _clone(args)
    out = getattr(T, name)(*plain) if perturb else None
    got = getattr(T, name)(*args, torch.tensor(1.))
    for i, (x, y) in enumerate(zip(args, before)):
        if not _tensor_list(x):
            continue
        for j, (s, t) in enumerate(zip(x, y)):
            if perturb and i == 2:  # backups <- params, bit for bit
                want = before[0][j]
            elif not perturb and i == 0:  # params <- backups, bit for bit
                want = before[2][j]
            else:  # everything else untouched (params / state / grads)
                want = t
            assert s.dtype == want.dtype and torch.equal(_bits(s), _bits(want)), (i, j)
    if perturb:  # the norm is computed and returned as usual (here: not finite)
        assert got.dtype == out.dtype and torch.equal(got.isnan(), out.isnan())
        assert not torch.isfinite(got)


@pytest.mark.parametrize("flag", [0.0, 1.0])
@pytest.mark.parametrize("name,kw,perturb", GATED, ids=[g[0] for g in GATED])
def test_found_inf_through_the_dispatcher_matches_reference(name, kw, perturb, flag):
    """samkernels.ops(.vi_ops).<name>(..., found_inf=..., backend="triton") against the
    reference's found_inf semantics (finite gradients, so the norms compare)."""
    from samkernels import ops
    from samkernels.ops import vi_ops
    args = phase_args(name, MIXED, seed=24, **kw)
    ref_args = [_f64(a) for a in args]
    found_inf = torch.tensor(flag)
    want = getattr(R, name)(*ref_args, found_inf=found_inf)
    fn = getattr(vi_ops if name in VI_OPS else ops, name)
    got = fn(*args, found_inf=found_inf, backend="triton")
    for i, (a, r) in enumerate(zip(args, ref_args)):
        if _tensor_list(a):
            for j, (t, tr) in enumerate(zip(a, r)):
                _close(t, tr, f"{name} arg {i} tensor {j} ({t.dtype}, {tuple(t.shape)})")
    if want is not None:
        torch.testing.assert_close(got.to(F64), want, atol=0,
                                   rtol=1e-12 if got.dtype == F64 else 2e-5)


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
    from samkernels.triton import bisam_loss, bsam_step, sam_step
    out = set()
    for mod in (sam_step, bsam_step, vi_step, bisam_loss):
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
    """Review findings 2 and 3: each kernel of the package runs inside mt.device_guard (Triton
    launches on the current device and stream), and no scalar argument is a Python float (the
    binder types it fp32 on a GPU: an fp64 group or loss would lose its exact hyper-parameters)."""
    from samkernels.triton.bisam_loss import bisam_loss_fwd_triton
    spec = [((5,), F32), ((3,), F64)]
    flag = torch.zeros(1)
    for name in ["grad_sumsq", "sam_perturb_", "sam_restore_sgd_", "sam_restore_adam_",
                 "bsam_noise_", "bsam_perturb_", "bsam_update_"] + VI_OPS:
        getattr(T, name)(*phase_args(name, spec, seed=20))
    for name in ["sam_perturb_", "vsam_perturb_", "ebisam_perturb_"]:  # found_inf forms
        getattr(T, name)(*phase_args(name, spec, seed=21), flag)
    T.philox_probe(1, 2, 3, 8)
    logits, target = torch.randn(3, 10, dtype=F64), torch.tensor([1, -100, 4])
    bisam_loss_fwd_triton(logits, target, 2.0, 1, 1.5, -100, 0.25, True)
    seen = {(mod, name) for mod, name, _, _ in launches}
    assert seen == _kernels(), sorted(_kernels() - seen)
    for mod, name, guarded, types in launches:
        assert guarded, f"{mod}.{name} launched outside mt.device_guard"
        floats = {a: t for a, t in types.items() if _is_float_type(t)}
        assert not floats, f"{mod}.{name}: float arguments {floats} (pass mt.f64_bits)"
