"""Triton backend vs the executable spec (samkernels/ops/reference.py run in float64).

Runs on the CPU through the Triton interpreter (TRITON_INTERPRET=1, set here before anything
imports triton).  The interpreter costs ~12 ms per program instance, so tensors are small and
BLOCK/CHUNK large; tests that need several chunks per tensor or several launches per group lower
the module constants with monkeypatch.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

import samkernels  # noqa: E402
import samkernels.triton as T  # noqa: E402
from samkernels.ops import reference as R  # noqa: E402
from samkernels.triton import _multi_tensor as mt  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU tests need the Triton interpreter")

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
ODD = [((1,), F32), ((3,), F32), ((1000,), F32), ((4097,), F32), ((7, 5), F32)]
MIXED = [((1000,), F32), ((33,), BF16), ((129,), F64), ((3,), F16), ((5, 3), BF16), ((17,), F64)]
# layouts: "T" transposed view, "CL" channels_last (both dense: processed in memory order, no
# copy), "S" every other column (not dense: copied and written back)
NONCONTIG = [((6, 5), F32, "T"), ((2, 5), F32), ((4, 3), BF16, "T"), ((2, 3, 2, 2), F32, "CL"),
             ((3, 4), F32, "S"), ((5, 3), F64, "S")]

# tolerance of a Triton result (its dtype) against the float64 reference
TOL = {F64: dict(rtol=1e-12, atol=1e-14), F32: dict(rtol=2e-5, atol=2e-6),
       BF16: dict(rtol=1.6e-2, atol=1e-5), F16: dict(rtol=2e-3, atol=1e-5)}


# --- inputs ----------------------------------------------------------------------------------
def _state_dtype(dt):
    return F64 if dt == F64 else F32


def _make(spec, kind, gen):
    """One tensor list: kind 'w' (param dtype, normal), 'state' (state dtype, normal),
    'pos' (state dtype, uniform in [0.5, 1.5): precisions, second moments, accums)."""
    out = []
    for entry in spec:
        shape, dt = entry[0], entry[1]
        layout = entry[2] if len(entry) > 2 else None
        full = {"T": tuple(reversed(shape)), "S": shape[:-1] + (2 * shape[-1],)}.get(layout, shape)
        if kind == "pos":
            t = torch.rand(full, generator=gen, dtype=F64) + 0.5
        else:
            t = torch.randn(full, generator=gen, dtype=F64)
        t = t.to(dt if kind == "w" else _state_dtype(dt))
        if layout == "T":
            t = t.t()
        elif layout == "S":
            t = t[..., ::2]
        elif layout == "CL":
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t)
    return out


def phase_args(name, spec, seed=0, **kw):
    """Fresh random arguments of phase ``name`` (keyword overrides for the scalars)."""
    gen = torch.Generator().manual_seed(seed)
    w = lambda: _make(spec, "w", gen)  # noqa: E731
    st = lambda: _make(spec, "state", gen)  # noqa: E731
    pos = lambda: _make(spec, "pos", gen)  # noqa: E731
    if name == "grad_sumsq":
        a = dict(params=w(), grads=w(), adaptive=False, eta=0.01)
    elif name == "sam_perturb_":
        a = dict(params=w(), grads=w(), backups=w(), grad_norm=None, rho=0.05, eps=1e-12,
                 adaptive=False, eta=0.01)
    elif name == "sam_restore_sgd_":
        a = dict(params=w(), grads=w(), backups=w(), momentum_bufs=st(), lr=0.1, momentum=0.9,
                 dampening=0.0, nesterov=False, weight_decay=0.0, first=False)
    elif name == "sam_restore_adam_":
        a = dict(params=w(), grads=w(), backups=w(), exp_avgs=st(), exp_avg_sqs=pos(), step=3,
                 lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)
    elif name == "bsam_noise_":
        a = dict(params=w(), backups=w(), precisions=pos(), param_ids=list(range(len(spec))),
                 seed=1234, step=5, num_data=10.0)
    elif name == "bsam_perturb_":
        a = dict(params=w(), grads=w(), backups=w(), precisions=pos(), accums=[], rho=0.05,
                 beta2=0.999, delta=0.4, gamma=0.1)
    elif name == "bsam_update_":
        a = dict(params=w(), grads=w(), backups=w(), precisions=pos(), momenta=st(), accums=[],
                 lr=0.5, beta1=0.9, beta2=0.999, delta=0.4, gamma=0.1, accum_scale=0.5,
                 released_order=False)
    else:
        raise KeyError(name)
    for k, v in kw.items():
        assert k in a, k
        a[k] = pos() if v == "pos" else v
    return list(a.values())


def _f64(x):
    if isinstance(x, torch.Tensor):
        return x.detach().to(F64).clone()
    if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
        return [_f64(t) for t in x]
    return x


def _close(got, want, what):
    torch.testing.assert_close(got.to(F64), want, **TOL[got.dtype], msg=lambda m: f"{what}: {m}")


def check(name, args, via_ops=False):
    """Run phase ``name`` with Triton on ``args`` and the reference in float64 on copies; compare
    every tensor (mutated or not) and the return value.  Returns the Triton return value."""
    ref_args = [_f64(a) for a in args]
    want = getattr(R, name)(*ref_args)
    if via_ops:
        got = getattr(samkernels.ops, name)(*args, backend="triton")
    else:
        got = getattr(T, name)(*args)
    for i, (a, r) in enumerate(zip(args, ref_args)):
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            for j, (t, tr) in enumerate(zip(a, r)):
                _close(t, tr, f"{name} arg {i} tensor {j} ({t.dtype}, {tuple(t.shape)})")
    if want is not None:
        torch.testing.assert_close(got.to(F64), want, rtol=2e-5, atol=1e-6)
    return got


# --- Philox contract -------------------------------------------------------------------------
@pytest.mark.parametrize("seed,step,pid", [(0, 0, 0), (1234, 5, 3),
                                           (2**64 - 3, 2**33 + 7, 2**32 - 1),
                                           (0x0123456789ABCDEF, 2**32 - 1, 2**31 + 5)])
def test_philox_words_and_normals(seed, step, pid):
    numel = 203
    words, z32 = T.philox_probe(seed, step, pid, numel, torch.float32)
    q = torch.arange(words.shape[0], dtype=torch.int64)
    full = lambda v: torch.full_like(q, v)  # noqa: E731
    lo = lambda v: v & 0xFFFFFFFF  # noqa: E731
    ref = R.philox4x32(q, full(lo(pid)), full(lo(step)), full(lo(step >> 32)), lo(seed),
                       lo(seed >> 32))
    assert torch.equal(words, torch.stack(ref, dim=1)), "Philox words differ from philox.h"
    want = R.philox_normal(seed, step, pid, numel)
    torch.testing.assert_close(z32.double(), want, rtol=1e-5, atol=2e-6)
    _, z64 = T.philox_probe(seed, step, pid, numel, torch.float64)
    torch.testing.assert_close(z64, want, rtol=1e-12, atol=1e-13)


def test_philox_known_answer():
    # Random123 known-answer vector for Philox4x32-10 (counter = key = 0)
    words, _ = T.philox_probe(0, 0, 0, 4)
    assert words[0].tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


# --- SAM / ASAM ------------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_sumsq(adaptive):
    got = check("grad_sumsq", phase_args("grad_sumsq", ODD, adaptive=adaptive), via_ops=True)
    assert got.dtype == F64 and got.dim() == 0  # the norm contract (tests/test_norm_contract.py)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("given_norm", [False, True])
def test_sam_perturb(adaptive, given_norm):
    norm = torch.tensor(2.5) if given_norm else None
    args = phase_args("sam_perturb_", ODD, seed=1, adaptive=adaptive, grad_norm=norm)
    got = check("sam_perturb_", args)
    if given_norm:
        assert got is norm  # returned as passed, like the reference


def test_sam_perturb_rho_zero_is_exact():
    args = phase_args("sam_perturb_", MIXED, seed=2, rho=0.0)
    before = [p.clone() for p in args[0]]
    T.sam_perturb_(*args)
    for p, b, w in zip(args[0], args[2], before):
        assert torch.equal(p, w) and torch.equal(b, w)


SGD_CASES = [dict(momentum=0.0, momentum_bufs=[]),
             dict(momentum=0.9, first=True),
             dict(momentum=0.9, nesterov=True),
             dict(momentum=0.9, dampening=0.1, weight_decay=5e-4),
             dict(momentum=0.9, nesterov=True, first=True, weight_decay=1e-2),
             dict(momentum=0.0, momentum_bufs=[], weight_decay=1e-2)]


@pytest.mark.parametrize("case", range(len(SGD_CASES)))
def test_sam_restore_sgd(case):
    check("sam_restore_sgd_", phase_args("sam_restore_sgd_", ODD, seed=3, **SGD_CASES[case]),
          via_ops=case == 0)


@pytest.mark.parametrize("decoupled,wd", [(False, 0.0), (False, 1e-2), (True, 1e-2)])
def test_sam_restore_adam(decoupled, wd):
    check("sam_restore_adam_",
          phase_args("sam_restore_adam_", ODD, seed=4, decoupled=decoupled, weight_decay=wd))


# --- bSAM ------------------------------------------------------------------------------------
def test_bsam_noise():
    args = phase_args("bsam_noise_", ODD, seed=5, param_ids=[7, 0, 3, 2**32 + 1, 11])
    mean = [p.clone() for p in args[0]]
    check("bsam_noise_", args, via_ops=True)
    for p, b, m in zip(args[0], args[1], mean):
        assert torch.equal(b, m) and not torch.equal(p, m)


def test_bsam_noise_fp64_matches_reference_tightly():
    spec = [((1001,), F64), ((4,), F64)]
    check("bsam_noise_", phase_args("bsam_noise_", spec, seed=6, step=2**40 + 3))


@pytest.mark.parametrize("accum", [False, True])
def test_bsam_perturb(accum):
    check("bsam_perturb_", phase_args("bsam_perturb_", ODD, seed=7,
                                      accums="pos" if accum else []), via_ops=accum)


@pytest.mark.parametrize("accum,released", [(False, False), (True, False), (True, True)])
def test_bsam_update(accum, released):
    check("bsam_update_", phase_args("bsam_update_", ODD, seed=8, accums="pos" if accum else [],
                                     released_order=released), via_ops=released)


# --- multi-tensor machinery ------------------------------------------------------------------
PHASES = [("grad_sumsq", dict(adaptive=True)), ("sam_perturb_", dict(adaptive=True)),
          ("sam_restore_sgd_", dict(weight_decay=1e-3, nesterov=True)),
          ("sam_restore_adam_", dict(decoupled=True, weight_decay=1e-2)),
          ("bsam_noise_", {}), ("bsam_perturb_", dict(accums="pos")),
          ("bsam_update_", dict(accums="pos", released_order=True))]


@pytest.mark.parametrize("name,kw", PHASES, ids=[p[0] for p in PHASES])
def test_mixed_dtypes_in_one_list(name, kw):
    got = check(name, phase_args(name, MIXED, seed=9, **kw))
    if name == "grad_sumsq":
        assert got.dtype == F64  # an fp64 parameter in the list


@pytest.mark.parametrize("name,kw", PHASES, ids=[p[0] for p in PHASES])
def test_non_contiguous(name, kw):
    args = phase_args(name, NONCONTIG, seed=10, **kw)
    # one parameter stored transposed while its grads and state are contiguous: copied
    p = args[0][1]
    args[0][1] = torch.empty(p.shape[::-1], dtype=p.dtype).t().copy_(p)
    check(name, args)  # mutated views are checked in place, through their strides


def test_dense_layouts_are_not_copied():
    lists = [_make(NONCONTIG, "w", torch.Generator().manual_seed(0)) for _ in range(2)]
    with mt.contiguous(lists, mutated=(0,)) as flat:
        same = [a.data_ptr() == b.data_ptr() for a, b in zip(lists[0], flat[0])]
    assert same == [True, True, True, True, False, False]  # T, contiguous, T, CL views; S copies
    with mt.contiguous(lists, mutated=(0,), elementwise=False) as flat:  # the noise's view
        same = [a.data_ptr() == b.data_ptr() for a, b in zip(lists[0], flat[0])]
    assert same == [False, True, False, False, False, False]


@pytest.mark.parametrize("name,kw", [PHASES[1], PHASES[3], PHASES[4]], ids=["sam", "adam", "noise"])
def test_many_tiny_tensors_split_launches(monkeypatch, name, kw):
    monkeypatch.setattr(mt, "MAX_CHUNKS_PER_LAUNCH", 6)  # 25 tensors -> 5 launches per phase
    spec = [((1,), F32)] * 22 + [((2,), F32), ((5,), BF16), ((1,), F64)]
    check(name, phase_args(name, spec, seed=11, **kw))


@pytest.mark.parametrize("name,kw", [PHASES[0], PHASES[2], PHASES[4], PHASES[6]],
                         ids=["sumsq", "sgd", "noise", "bsam_update"])
def test_several_chunks_per_tensor(monkeypatch, name, kw):
    # full chunks (unmasked path, 2 blocks each) and tails; noise quads across chunk borders
    monkeypatch.setattr(mt, "BLOCK", 256)
    monkeypatch.setattr(mt, "CHUNK", 512)
    monkeypatch.setattr(mt, "MAX_CHUNKS_PER_LAUNCH", 5)
    spec = [((1000,), F32), ((4097,), F32), ((3,), F32), ((512,), BF16)]
    check(name, phase_args(name, spec, seed=12, **kw))


def test_noise_independent_of_partition(monkeypatch):
    spec = [((3001,), F32), ((5,), F32)]
    a = phase_args("bsam_noise_", spec, seed=13)
    b = [[t.clone() for t in x] if isinstance(x, list) and isinstance(x[0], torch.Tensor) else x
         for x in a]
    T.bsam_noise_(*a)
    monkeypatch.setattr(mt, "BLOCK", 256)
    monkeypatch.setattr(mt, "CHUNK", 1024)
    T.bsam_noise_(*b)
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)


def test_plan_cache():
    mt.clear_cache()
    args = phase_args("sam_restore_sgd_", ODD, seed=14)
    T.sam_restore_sgd_(*args)
    T.sam_restore_sgd_(*args)
    assert len(mt._cache) == 1  # same storages: the tables are reused
    args[0][0] = args[0][0].clone()  # a new storage: a new plan
    T.sam_restore_sgd_(*args)
    assert len(mt._cache) == 2
    lists = [args[0], args[1]]
    assert mt.plan_for(lists) is mt.plan_for(lists)


def test_empty_inputs():
    assert T.grad_sumsq([], [], False, 0.0).item() == 0.0
    T.sam_restore_sgd_([], [], [], [], 0.1, 0.9, 0.0, False, 0.0, True)
    e = torch.empty(0)
    args = phase_args("bsam_update_", [((0,), F32), ((3,), F32)], seed=15)
    check("bsam_update_", args)
    assert T.grad_sumsq([e], [e], True, 0.01).item() == 0.0


def test_torch_compile_traces_custom_ops():
    spec = [((10,), F32), ((3,), F32)]
    args = phase_args("sam_restore_sgd_", spec, seed=16)
    ref_args = [_f64(a) for a in args]

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(p, g, b, m):
        T.sam_restore_sgd_(p, g, b, m, 0.1, 0.9, 0.0, True, 1e-3, False)
        return T.grad_sumsq(p, g, False, 0.0)

    got = step(*args[:4])
    R.sam_restore_sgd_(*ref_args[:4], 0.1, 0.9, 0.0, True, 1e-3, False)
    for t, r in zip(args[0] + args[3], ref_args[0] + ref_args[3]):
        _close(t, r, "compiled sgd")
    torch.testing.assert_close(got.double(), R.grad_sumsq(ref_args[0], ref_args[1], False, 0.0),
                               rtol=2e-5, atol=1e-6)


# --- the GPU code path, without a GPU: tests/test_triton_aot.py compiles every launched
# configuration ahead of time for sm_80 and sm_90.


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
