"""The CUDA kernels (``backend="cuda"``) against the float64 reference and the triton backend.

Needs a CUDA device and ``samkernels._C`` built with its CUDA kernels; skipped otherwise (its CPU
half runs in tests/test_gpu_ops_cpu.py).  Every case of every multi-tensor op (the op table with
the argument values of tests/oracles.py) runs on lists that mix odd sizes,
chunk boundaries (65,536 elements), non-contiguous views (transposed, strided), misaligned views
(storage offset: the kernels' scalar path), channels_last tensors (used in place), and,
separately, more tiny tensors than one launch's table holds.  Every list is compared afterwards,
written or not.  The ``found_inf`` contract (skip form decided on the device) is checked bit for
bit for every gated phase.

The helpers take the device and the callable under test, so they run on any backend.
"""
from __future__ import annotations

import gc
import json
import math
import os
import re
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

import samkernels
from samkernels import _dispatch
from samkernels.ops import reference
from samkernels.ops._spec import PHASES, STEP_TENSORS

from helpers import EMPTY, clone_args, hard_tensor, op_args, param_ids
from helpers import same_bits as _same_bits
from oracles import CASES as ARG_CASES
from oracles import case as case_values


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and _dispatch.cuda_kernels_built()


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda_ready(),
                       reason="needs a CUDA device and samkernels._C built with CUDA kernels"),
]

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
MIXED = "mixed"  # per-tensor parameter dtypes cycle through these:
MIXED_CYCLE = (F32, BF16, F16, F64)

# (rtol, atol) for a result stored in this dtype, against float64 maths.  bf16/fp16 outputs are
# rounded from fp32 (<= 1/2 ulp).  fp32: the kernels are built without --use_fast_math (IEEE
# division, sqrt, log, sin/cos), so only fp32 rounding of a few chained operations remains; the
# bound stays at 2e-5 because Adam's and bSAM's divisions by small denominators amplify it.
TOL = {F64: (1e-10, 1e-12), F32: (2e-5, 2e-5), F16: (2e-3, 1e-3), BF16: (1.6e-2, 1e-2)}

# (shape, layout): odd sizes, the chunk size and its neighbours, views of every kind.
SPECS: List[Tuple[Tuple[int, ...], str]] = [
    ((1,), "contig"), ((3,), "contig"), ((5,), "offset"), ((17, 3), "transposed"),
    ((65536,), "contig"), ((65537,), "contig"), ((131075,), "offset"), ((33, 1001), "transposed"),
    ((4097,), "strided"), ((2, 3, 5, 7), "channels_last"), ((250, 401), "contig"),
    ((7, 5), "mixed"), ((0,), "contig"),
]
# More tensors than one launch holds even with 32 KB arguments (about 500 for six lists).
TINY_SPECS = [((i % 7 + 1,), "contig") for i in range(1100)] + [((65537,), "offset")]


def _state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return F64 if param_dtype == F64 else F32  # reference.py `opmath`


def _param_dtypes(dtype, n: int) -> List[torch.dtype]:
    if dtype == MIXED:
        return [MIXED_CYCLE[i % len(MIXED_CYCLE)] for i in range(n)]
    return [dtype] * n


# SPECS' layouts as tests/helpers.py hard_tensor names them ("mixed": the parameter transposed,
# its other lists contiguous)
LAYOUTS = {"contig": None, "offset": "M", "transposed": "T", "strided": "S",
           "channels_last": "CL", "mixed": "P"}


def op_spec(specs, dtype) -> list:
    """``specs`` with ``dtype``'s per-tensor parameter dtypes, in tests/helpers.py op_args' form."""
    return [(shape, dt, LAYOUTS[layout])
            for (shape, layout), dt in zip(specs, _param_dtypes(dtype, len(specs)))]


class Maker:
    """Tensor lists with the same layouts and seeded values on any device, for the tests that
    call one op by hand (the per-op cases build theirs with op_args)."""

    def __init__(self, specs, dtype, device, seed: int = 0):
        self.spec, self.device = op_spec(specs, dtype), torch.device(device)
        self.specs = specs
        self.gen = torch.Generator().manual_seed(seed)

    def _list(self, values: str, role: str) -> List[torch.Tensor]:
        out = []
        for shape, dt, layout in self.spec:
            if layout == "P":
                layout = "T" if role == "param" else None
            dt = dt if role != "state" else _state_dtype(dt)
            out.append(hard_tensor(shape, dt, layout, self.gen, self.device,
                                   positive=values == "positive"))
        return out

    def params(self, values: str = "normal") -> List[torch.Tensor]:
        return self._list(values, "param")

    def like_params(self, values: str = "normal") -> List[torch.Tensor]:
        return self._list(values, "grad")

    def state(self, values: str = "normal") -> List[torch.Tensor]:
        return self._list(values, "state")


def _ids(m: Maker) -> List[int]:
    return param_ids(len(m.specs))  # beyond 32 bits: only the low word keys the noise


# The per-op cases: every case of every multi-tensor op of the table (tests/oracles.py CASES, a
# code path each: 64-bit seeds and steps among them), as "<op>-<i>".
CASES: Dict[str, Tuple[str, int]] = {f"{name}-{i}": (name, i) for name, op in PHASES.items()
                                     if op.multi_tensor for i in range(len(ARG_CASES[name]))}
# The cases of the ops gated by found_inf and their skip form: "perturb" (an op that writes the
# backups) = backups <- params, every other list untouched; "restore" = params <- backups, every
# state list untouched.
GATED: Dict[str, str] = {c: "perturb" if "backups" in PHASES[n].written else "restore"
                         for c, (n, _) in CASES.items() if PHASES[n].takes_found_inf}
BASES = [f"{name}-0" for name, op in PHASES.items() if op.multi_tensor]
# On more tiny tensors than one launch's table holds: the base cases and the cases that pass an
# optional list empty (a launch with fewer lists holds more tensors).
TINY_CASES = BASES + [c for c, (n, i) in CASES.items()
                      if i and EMPTY in ARG_CASES[n][i].values()]
# The skip form: every gated case with a one-element flag, the bases with a 0-dim one too.
SKIP_FORMS = [(c, (1,)) for c in GATED] + [(c, ()) for c in GATED if c in BASES]


def build(case: str, specs, dtype, device, seed: int = 0) -> Tuple[str, list]:
    """(op name, its positional arguments without found_inf) for ``case`` on ``specs``."""
    name, i = CASES[case]
    return name, op_args(PHASES[name], case_values(name, i), op_spec(specs, dtype), seed, device)


def _lists_of(name: str, args) -> Tuple[int, int, int]:
    """Where params, grads and backups are in op ``name``'s arguments."""
    names = PHASES[name].arg_names
    return names.index("params"), names.index("grads"), names.index("backups")


def _to_reference(args):
    """float64 CPU copies of every tensor argument (the reference's exact inputs)."""
    def conv(a):
        if isinstance(a, torch.Tensor):
            return a.detach().to("cpu", F64, copy=True)
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            return [conv(t) for t in a]
        return a
    return [conv(a) for a in args]


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, scale: float = 1.0,
           dtype: torch.dtype = None):
    rtol, atol = TOL[dtype or actual.dtype]
    torch.testing.assert_close(actual.detach().to("cpu", F64), expected.detach().to("cpu", F64),
                               rtol=rtol * scale, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def _compare_outputs(args_a, args_b, out_a, out_b, scale=1.0):
    for k, (a, b) in enumerate(zip(args_a, args_b)):
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            for i, (x, y) in enumerate(zip(a, b)):
                _close(x, y, f"argument {k}, tensor {i} ({tuple(x.shape)}, {x.dtype})", scale)
    if isinstance(out_a, torch.Tensor):
        all_f64 = all(t.dtype == F64 for t in args_a[0])
        _close(out_a, out_b, "returned tensor", scale, dtype=F64 if all_f64 else F32)


def check_against_reference(case: str, dtype, device, run: Callable, specs=SPECS):
    """run(name, *args) mutates args in place like reference.<name>; compare in float64."""
    name, args = build(case, specs, dtype, device)
    ref_args = _to_reference(args)
    out = run(name, *args)
    ref_out = getattr(reference, name)(*ref_args)
    _compare_outputs(args, ref_args, out, ref_out)


def check_two_backends(case: str, dtype, device, run_a: Callable, run_b: Callable, specs=SPECS,
                       **kwargs):
    (name, args_a), (_, args_b) = (build(case, specs, dtype, device) for _ in range(2))
    out_a, out_b = run_a(name, *args_a, **kwargs), run_b(name, *args_b, **kwargs)
    _compare_outputs(args_a, args_b, out_a, out_b, scale=2.0)


def _op(name: str) -> Callable:
    """The public multi-tensor op samkernels.ops.<name>."""
    return getattr(samkernels.ops, name)


def _backend(name: str) -> Callable:
    return lambda op, *args, **kw: _op(op)(*args, backend=name, **kw)


def _triton_has(name: str) -> bool:
    try:
        from samkernels import triton as triton_ops
    except ImportError:
        return False
    return hasattr(triton_ops, name)


def _triton_on_cuda_why() -> Optional[str]:
    """Why the triton backend cannot run on CUDA tensors here (None: it can).  Under
    TRITON_INTERPRET=1 (tests/conftest.py's default) the dispatcher says triton is unusable on
    CUDA (the interpreter needs CPU tensors): run with TRITON_INTERPRET=0 on a GPU machine."""
    why = _dispatch._why_not("triton", torch.device("cuda"))
    if why is None and os.environ.get("TRITON_INTERPRET", "0") == "1":  # an older dispatcher
        why = "TRITON_INTERPRET=1: triton kernels are interpreted and need CPU tensors"
    return why


def _skip_unless_triton_on_cuda() -> None:
    why = _triton_on_cuda_why()
    if why is not None:
        pytest.skip(f"triton backend on CUDA tensors: {why}")


def _skip_unless_triton_runs(name: str) -> None:
    _skip_unless_triton_on_cuda()
    if not _triton_has(name):
        pytest.skip(f"samkernels.triton has no {name}")


def _tensor_lists(args) -> List[Tuple[int, List[torch.Tensor]]]:
    return [(k, a) for k, a in enumerate(args)
            if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)]


run_cuda = _backend("cuda")


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16, MIXED], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_matches_reference(case, dtype):
    check_against_reference(case, dtype, "cuda", run_cuda)


@pytest.mark.parametrize("dtype", [F32, MIXED], ids=str)
@pytest.mark.parametrize("case", TINY_CASES)
def test_cuda_many_tiny_tensors(case, dtype):
    # several launches per phase: the table fills up
    check_against_reference(case, dtype, "cuda", run_cuda, specs=TINY_SPECS)


@pytest.mark.parametrize("dtype", [F32, BF16, MIXED], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_matches_triton(case, dtype):
    _skip_unless_triton_runs(CASES[case][0])
    run_triton = _backend("triton")
    try:  # a backend without this op or dtype is not what this test checks
        check_two_backends(case, dtype, "cuda", run_cuda, run_triton,
                           specs=[s for s in SPECS if s[1] in ("contig", "offset")])
    except (NotImplementedError, ImportError) as exc:
        pytest.skip(f"triton backend: {exc}")


def test_grad_sumsq_is_deterministic():
    m = Maker(SPECS, MIXED, "cuda")
    p, g = m.params(), m.like_params()
    a = run_cuda("grad_sumsq", p, g, True, 0.01)
    b = run_cuda("grad_sumsq", p, g, True, 0.01)
    assert a.dtype == F64 and a.dim() == 0
    assert torch.equal(a, b)


def test_sam_perturb_norm_dtype_and_rho_zero():
    # the norm contract (every backend): a computed norm is float64 whatever the params
    for dtype, want in ((F32, F64), (BF16, F64), (MIXED, F64)):
        m = Maker(SPECS, dtype, "cuda")
        p, g, b = m.params(), m.like_params(), m.like_params()
        before = [t.clone() for t in p]
        norm = run_cuda("sam_perturb_", p, g, b, None, 0.0, 1e-12, False, 0.0)
        assert norm.dtype == want and norm.dim() == 0
        for x, y, z in zip(p, before, b):  # rho = 0: exactly the base optimizer's weights
            assert torch.equal(x, y) and torch.equal(z, y)


def _no_sync_calls(device, specs=SPECS) -> list:
    """(op, arguments, keyword arguments) of every case of every op, built beforehand: each gated
    op with no flag, a zero flag and a set one, each op with a step also with a device_step (the
    kernels read them, never the host); a given norm also as float32."""
    calls = []
    for case, (name, _) in CASES.items():
        _, args = build(case, specs, MIXED, device)
        op = PHASES[name]
        extras = [{}]
        if op.takes_found_inf:
            extras += [{"found_inf": torch.zeros((), device=device)},
                       {"found_inf": torch.ones(1, device=device)}]
        for t in op.step_tensors:  # device_step, debias_step
            extras.append({t: torch.tensor(3, dtype=torch.int64, device=device)})
        calls += [(name, args, kw) for kw in extras]
        given = [k for k, a in enumerate(op.args) if a.type == "Tensor?" and
                 a.name != "found_inf" and a.name not in STEP_TENSORS and args[k] is not None]
        for k in given:
            calls.append((name, args[:k] + [args[k].float()] + args[k + 1:], {}))
    return calls


def test_no_host_sync():
    calls = _no_sync_calls("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name, args, kw in calls:
            run_cuda(name, *args, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_vi_norm_dtypes_and_determinism():
    # the norm contract (every backend, the fakes too): a computed norm is float64, 0-dim
    for dtype, want in ((F32, F64), (BF16, F64), (F64, F64), (MIXED, F64)):
        m = Maker(SPECS, dtype, "cuda")
        p, g, b, v = m.params(), m.like_params(), m.like_params(), m.state("positive")
        ids = list(range(len(p)))
        for given in (None, torch.tensor([2.5], device="cuda", dtype=F64)):
            n = run_cuda("vsam_perturb_", p, g, b, v, given, 1e4, 1e-12, 0.05, 2.0, 1000.0, True,
                         1e-8)
            assert n.dtype == want and n.dim() == 0 and n.device == p[0].device
            n = run_cuda("ebisam_perturb_", p, g, b, ids, given, 1, 2, 0.05, 0.5, 1e-12)
            assert n.dtype == want and n.dim() == 0 and n.device == p[0].device
            if given is not None:
                assert n.item() == 2.5 and n.data_ptr() != given.data_ptr()
        a, c = run_cuda("vsam_sumsq", g, v), run_cuda("vsam_sumsq", g, v)
        assert a.dtype == F64 and a.dim() == 0 and torch.equal(a, c)


def test_ebisam_rho_zero_and_beta_zero_keep_weights():
    m = Maker(SPECS, MIXED, "cuda")
    p, g, b = m.params(), m.like_params(), m.like_params()
    ids = list(range(len(p)))
    before = [t.clone() for t in p]
    for rho, beta in ((0.0, 0.5), (0.05, 0.0)):  # e = 0, or no coordinate chosen
        run_cuda("ebisam_perturb_", p, g, b, ids, None, 1, 2, rho, beta, 1e-12)
        for x, y, z in zip(p, before, b):
            assert _same_bits(x, y) and _same_bits(z, y)


def test_vi_noise_and_mfvi_draw_the_same_z():
    # vi_noise_ applies sqrt(Sigma) z with z = reference.philox_normal(seed, step, param_id) and
    # backs mu up exactly; mfvi_update_ with lr = var_lr = 0 then gives back mu and Sigma bit for
    # bit (w = mu - 0 * d, Sigma * exp(0)).
    m = Maker([s for s in SPECS if s[1] == "contig"], F32, "cuda")
    p, g, b, v = m.params(), m.like_params(), m.like_params(), m.state("positive")
    ids = _ids(m)
    mu = [t.clone() for t in p]
    run_cuda("vi_noise_", p, b, v, ids, 11, 3, 0.0)
    for w, m0, bk, var, pid in zip(p, mu, b, v, ids):
        assert _same_bits(bk, m0)
        z = reference.philox_normal(11, 3, pid, w.numel(), "cuda", F64).view(w.shape)
        _close(w, m0.double() + var.double().sqrt() * z, "vi_noise_ weights")
    v0 = [t.clone() for t in v]
    run_cuda("mfvi_update_", p, g, b, v, [], ids, 11, 3, 0.0, 0.0, 0.0, 2.0, 1000.0)
    for w, m0, var, var0 in zip(p, mu, v, v0):
        assert _same_bits(w, m0) and _same_bits(var, var0)  # lr = 0: mu; var_lr = 0: exp(0) = 1


# ---------------------------------------------------------------------------------------------
# found_inf: the skip form, decided on the device
# ---------------------------------------------------------------------------------------------
def _poison(grads: Sequence[torch.Tensor]) -> None:
    """Non-finite gradients (as when found_inf is set for real): inf and -inf in two tensors."""
    big = sorted((i for i, t in enumerate(grads) if t.numel() > 0),
                 key=lambda i: -grads[i].numel())[:2]
    for i, val in zip(big, (math.inf, -math.inf)):
        t = grads[i]
        t[(0,) * t.dim()] = val


@pytest.mark.parametrize("dtype", [F32, BF16, MIXED], ids=str)
@pytest.mark.parametrize("case,shape", SKIP_FORMS, ids=[f"{c}-{len(s)}dim" for c, s in SKIP_FORMS])
def test_found_inf_set_takes_the_skip_form(case, shape, dtype):
    check_skip_form(case, dtype, shape, "cuda", run_cuda)


def check_skip_form(case, dtype, shape, device, run, specs=SPECS):
    """A set flag over non-finite gradients: exactly the skip form, bit for bit; the norm is
    the reference's."""
    name, args = build(case, specs, dtype, device)
    kind = GATED[case]
    p, g, b = _lists_of(name, args)
    _poison(args[g])
    ref_args = _to_reference(args)
    before = {k: [t.clone() for t in lst] for k, lst in _tensor_lists(args)}
    flag = torch.ones(shape, device=device)
    out = run(name, *args, found_inf=flag)
    for k, lst in _tensor_lists(args):
        for i, t in enumerate(lst):
            if kind == "perturb" and k == b:
                want, what = before[p][i], "backups <- params"
            elif kind == "restore" and k == p:
                want, what = before[b][i], "params <- backups"
            else:
                want, what = before[k][i], "untouched"
            assert _same_bits(t, want), f"{case}: argument {k}, tensor {i}: expected {what}"
    assert flag.tolist() == torch.ones(shape).tolist()  # the flag is only read
    # the norm is still computed (non-finite here) and returned: as the reference's skip form
    ref_out = getattr(reference, name)(*ref_args, found_inf=torch.ones(shape))
    _compare_outputs(args, ref_args, out, ref_out)


@pytest.mark.parametrize("case", list(GATED))
def test_found_inf_zero_is_the_normal_form(case):
    (name, a), (_, b) = (build(case, SPECS, MIXED, "cuda") for _ in range(2))
    out_a = run_cuda(name, *a)
    out_b = run_cuda(name, *b, found_inf=torch.zeros(1, device="cuda"))
    for (k, la), (_, lb) in zip(_tensor_lists(a), _tensor_lists(b)):
        for i, (x, y) in enumerate(zip(la, lb)):
            assert _same_bits(x, y), f"{case}: argument {k}, tensor {i}"
    if isinstance(out_a, torch.Tensor):
        assert _same_bits(out_a, out_b)


@pytest.mark.parametrize("case", [c for c in TINY_CASES if c in GATED])
def test_found_inf_on_many_tiny_tensors(case):
    # the skip copy runs in every block of every launch (several tables per phase)
    name, args = build(case, TINY_SPECS, MIXED, "cuda")
    before = {k: [t.clone() for t in lst] for k, lst in _tensor_lists(args)}
    run_cuda(name, *args, found_inf=torch.full((), 3.0, device="cuda"))
    p, _, b = _lists_of(name, args)
    src, dst = (p, b) if GATED[case] == "perturb" else (b, p)
    for k, lst in _tensor_lists(args):
        for i, t in enumerate(lst):
            assert _same_bits(t, before[src][i] if k == dst else before[k][i])


@pytest.mark.parametrize("flag", [0.0, 1.0])
@pytest.mark.parametrize("case", list(GATED))
def test_found_inf_cuda_matches_triton(case, flag):
    name = CASES[case][0]
    _skip_unless_triton_runs(name)
    try:
        check_two_backends(case, MIXED, "cuda", run_cuda, _backend("triton"),
                           specs=[s for s in SPECS if s[1] in ("contig", "offset")],
                           found_inf=torch.full((), flag, device="cuda"))
    except (NotImplementedError, ImportError, TypeError) as exc:
        pytest.skip(f"triton backend without found_inf for {name}: {exc}")


def _warmed_up_and_captured(step, warm_ups=1):
    """``step()`` ``warm_ups`` times on a side stream (allocations, Triton compiles: outside the
    capture), then captured: the CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warm_ups):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def test_found_inf_graph_replay_decides_on_the_device():
    # One captured step; the flag's value at replay time picks the form (the host never reads it).
    specs = [s for s in SPECS if s[1] == "contig"]
    m = Maker(specs, F32, "cuda")
    p, g, b, v, mom = m.params(), m.like_params(), m.like_params(), m.state("positive"), m.state()
    ids = _ids(m)
    flag = torch.zeros((), device="cuda")
    p0, v0, mom0 = [t.clone() for t in p], [t.clone() for t in v], [t.clone() for t in mom]

    def step():
        run_cuda("vi_noise_", p, b, v, ids, 1, 2, 0.0)
        run_cuda("mfvi_update_", p, g, b, v, mom, ids, 1, 2, 0.1, 0.05, 0.9, 2.0, 1000.0,
                 found_inf=flag)

    def reset():
        for t, t0 in zip(p + v + mom, p0 + v0 + mom0):
            t.copy_(t0)

    # the warm-up is the eager step (a capture runs nothing: every replay resets first)
    graph = _warmed_up_and_captured(step)
    eager_p, eager_v = [t.clone() for t in p], [t.clone() for t in v]
    for value in (0.0, 1.0, 0.0):
        reset()
        flag.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        if value == 0.0:
            assert all(_same_bits(x, y) for x, y in zip(p + v, eager_p + eager_v))
        else:  # skipped: w back at mu exactly, variances and momenta untouched
            assert all(_same_bits(x, y) for x, y in zip(p + v + mom, p0 + v0 + mom0))


def test_cuda_graph_capture():
    specs = [s for s in SPECS if s[1] == "contig"]
    m = Maker(specs, F32, "cuda")
    p, g, b, buf = m.params(), m.like_params(), m.like_params(), m.state()
    p0, buf0 = [t.clone() for t in p], [t.clone() for t in buf]

    def step():
        run_cuda("sam_perturb_", p, g, b, None, 0.05, 1e-12, True, 0.01)
        run_cuda("sam_restore_sgd_", p, g, b, buf, 0.1, 0.9, 0.0, False, 5e-4, False)

    graph = _warmed_up_and_captured(step)  # the warm-up is the eager step
    eager_p, eager_buf = [t.clone() for t in p], [t.clone() for t in buf]
    for _ in range(2):  # replays start from the same state and give the eager result
        for t, t0 in zip(p + buf, p0 + buf0):
            t.copy_(t0)
        graph.replay()
        torch.cuda.synchronize()
        for x, y in zip(p + buf, eager_p + eager_buf):
            assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["bsam_noise_", "sam_restore_adam_"])
def test_device_step_graph_replay(name):
    """One op call with ``device_step=counter`` captured in a CUDA graph: after ``counter += k``
    a replay is, bit for bit, the eager op at ``step + counter`` (the last one crosses Philox's high
    step word; Adam forms its bias corrections on the device)."""
    _, start = build(f"{name}-0", [s for s in SPECS if s[1] in ("contig", "offset")], MIXED, "cuda")
    at = PHASES[name].arg_names.index("step")
    args, counter = clone_args(start), torch.zeros((), dtype=torch.int64, device="cuda")
    graph = _warmed_up_and_captured(lambda: run_cuda(name, *args, device_step=counter))
    for k in (1, 6, 2 ** 32 - 1):
        counter += k
        for (_, xs), (_, ys) in zip(_tensor_lists(args), _tensor_lists(start)):
            for x, y in zip(xs, ys):
                x.copy_(y)
        graph.replay()
        want = clone_args(start)
        want[at] += int(counter.item())
        run_cuda(name, *want)
        torch.cuda.synchronize()
        for (i, xs), (_, ys) in zip(_tensor_lists(args), _tensor_lists(want)):
            assert all(_same_bits(x, y) for x, y in zip(xs, ys)), (name, i, counter.item())


def test_argument_errors():
    m = Maker(SPECS[:3], F32, "cuda")
    p, g, b = m.params(), m.like_params(), m.like_params()
    with pytest.raises(RuntimeError, match="grads has 2 tensors but params has 3"):
        run_cuda("sam_perturb_", p, g[:2], b, None, 0.05, 1e-12, False, 0.0)
    with pytest.raises(RuntimeError, match="expected"):
        s16 = [t.to(F16) for t in m.state()]
        run_cuda("sam_restore_sgd_", p, g, b, s16, 0.1, 0.9, 0.0, False, 0.0, False)
    with pytest.raises(RuntimeError, match="is on cpu"):
        run_cuda("sam_perturb_", p, [g[0].cpu()] + g[1:], b, None, 0.05, 1e-12, False, 0.0)
    with pytest.raises(RuntimeError, match="elements"):
        run_cuda("sam_perturb_", p, [g[1], g[0], g[2]], b, None, 0.05, 1e-12, False, 0.0)
    s = m.state("positive")
    for bad, why in ((torch.zeros((), device="cuda", dtype=F64), "float32"),
                     (torch.zeros(2, device="cuda"), "one element"),
                     (torch.zeros(1, 1, device="cuda"), "one element"),
                     (torch.zeros(()), "found_inf is on cpu")):
        with pytest.raises(RuntimeError, match="found_inf") as info:
            run_cuda("sam_restore_sgd_", p, g, b, s, 0.1, 0.9, 0.0, False, 0.0, False,
                     found_inf=bad)
        assert why in str(info.value)
        with pytest.raises(RuntimeError, match="found_inf"):
            run_cuda("vsam_perturb_", p, g, b, s, None, 1e4, 1e-12, 0.05, 2.0, 1000.0, True,
                     1e-8, found_inf=bad)
    with pytest.raises(RuntimeError, match="beta must be in"):
        run_cuda("ebisam_perturb_", p, g, b, [0, 1, 2], None, 1, 2, 0.05, 1.0, 1e-12)
    with pytest.raises(RuntimeError, match="param_ids has 2 entries"):
        run_cuda("mfvi_update_", p, g, b, s, [], [0, 1], 1, 2, 0.1, 0.05, 0.0, 2.0, 1000.0)


# --- whole optimizer steps on the GPU -------------------------------------------------------------
def _gpu_model_and_grads(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(37, 129), torch.nn.Tanh(),
                                torch.nn.Linear(129, 11)).cuda()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", ["sam", "sam_adam", "bsam", "mfvi", "vsam", "ebisam", "gsam",
                                  "wsam", "looksam", "friendlysam"])
def test_skip_on_device_step_never_syncs(backend, name):
    """nonfinite='skip_on_device': a whole step (grads given) runs with CUDA's sync debug mode set
    to error, including a step whose gradients hold a NaN; the NaN step changes no weight.  (The
    SAM variants' direction coefficients once wrote Python numbers into a GPU tensor: a
    host-to-device copy per step.)"""
    from samkernels.optim import (BSAM, GSAM, MFVI, SAM, WSAM, EBiSAM, FriendlySAM, LookSAM,
                                  VariationalSAM)
    if backend == "triton":
        _skip_unless_triton_on_cuda()
    makers = {
        "gsam": lambda ps: GSAM(ps, lr=0.1, momentum=0.9, nonfinite="skip_on_device"),
        "wsam": lambda ps: WSAM(ps, lr=0.1, momentum=0.9, nonfinite="skip_on_device"),
        "looksam": lambda ps: LookSAM(ps, lr=0.1, momentum=0.9, k=1, nonfinite="skip_on_device"),
        "friendlysam": lambda ps: FriendlySAM(ps, lr=0.1, momentum=0.9,
                                              nonfinite="skip_on_device"),
        "sam": lambda ps: SAM(ps, lr=0.1, momentum=0.9, nonfinite="skip_on_device"),
        "sam_adam": lambda ps: SAM(ps, lr=1e-3, base="adam", nonfinite="skip_on_device"),
        "bsam": lambda ps: BSAM(ps, lr=0.1, num_data=1000, seed=1, nonfinite="skip_on_device"),
        "mfvi": lambda ps: MFVI(ps, lr=0.1, num_data=1000, seed=1, nonfinite="skip_on_device"),
        "vsam": lambda ps: VariationalSAM(ps, lr=0.1, num_data=1000, nonfinite="skip_on_device"),
        "ebisam": lambda ps: EBiSAM(ps, lr=0.1, seed=1, nonfinite="skip_on_device"),
    }
    model = _gpu_model_and_grads()
    opt = makers[name](model.parameters())
    phases = {"bsam": ["noise_step", "first_step", "second_step"],
              "mfvi": ["noise_step", "second_step"]}.get(name, ["first_step", "second_step"])

    def step():
        for ph in phases:
            getattr(opt, ph)()
    with samkernels.use_backend(backend):
        step()  # state and backups exist
        torch.cuda.synchronize()
        before = [p.detach().clone() for p in model.parameters()]
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            # a fill kernel: ``grad[3, 5] = nan`` would copy a host scalar (a sync, an error here)
            model[0].weight.grad[3:4, 5:6].fill_(float("nan"))
            before = [p.detach().clone() for p in model.parameters()]
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert opt.step_skipped
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_cuda_generator_seeds_the_noise():
    """A CUDA torch.Generator is a valid ``seed`` (one draw on its device), as a CPU one is."""
    from samkernels.optim.utils import draw_seed
    g = torch.Generator(device="cuda").manual_seed(3)
    s = draw_seed(g)
    assert isinstance(s, int) and 0 <= s < 2 ** 62
    assert draw_seed(torch.Generator(device="cuda").manual_seed(3)) == s


_CAPTURABLE = {  # capturable=True: counters on the device (tests/test_capturable.py on the CPU)
    # SAM with SGD momentum has no counter: capturable or not, a captured step replays exactly
    "sam_sgd_host_counters": ("SAM", dict(lr=0.1, rho=0.05, momentum=0.9, weight_decay=5e-4,
                                          capturable=False), ["first_step", "second_step"]),
    "sam_adam": ("SAM", dict(lr=1e-3, base="adam"), ["first_step", "second_step"]),
    "asam_adamw": ("ASAM", dict(lr=1e-3, base="adamw", weight_decay=1e-2),
                   ["first_step", "second_step"]),
    "bisam_adam": ("BiSAM", dict(lr=1e-3, base="adam"), ["first_step", "second_step"]),
    "wsam_adam": ("WSAM", dict(lr=1e-3, base="adam"), ["first_step", "second_step"]),
    "friendlysam_adam": ("FriendlySAM", dict(lr=1e-3, base="adam"), ["first_step", "second_step"]),
    "gsam_adam": ("GSAM", dict(lr=1e-3, base="adam"), ["first_step", "second_step"]),
    "vsam_adam": ("VariationalSAM", dict(lr=1e-3, num_data=1000, base="adam"),
                  ["first_step", "second_step"]),
    "bsam": ("BSAM", dict(lr=0.1, num_data=1000, seed=1), ["noise_step", "first_step",
                                                            "second_step"]),
    "randomsam_adam": ("RandomSAM", dict(lr=1e-3, sigma=0.05, base="adam", seed=2),
                       ["noise_step", "second_step"]),
    "mfvi": ("MFVI", dict(lr=0.1, num_data=1000, seed=3), ["noise_step", "second_step"]),
    "ebisam": ("EBiSAM", dict(lr=0.1, seed=4), ["first_step", "second_step"]),
    "ivon": ("IVON", dict(lr=0.1, ess=1000, seed=5), ["noise_step", "second_step"]),
}


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", list(_CAPTURABLE))
def test_capturable_step_replays(backend, name):
    """capturable=True: a whole step (norm, perturb, restore + base step, on-device inf/NaN
    check) captured once and replayed three times equals three eager steps bit for bit, noise
    counters and Adam's step count included (they advance on the device, so each replay draws
    new noise and takes the next bias correction).  SGD-based SAM needs no capturable=True."""
    import samkernels.optim as optim
    if backend == "triton":
        _skip_unless_triton_on_cuda()
    cls, kw, phases = _CAPTURABLE[name]
    kw = {"nonfinite": "skip_on_device", "capturable": True, **kw}
    eager_model, model = _gpu_model_and_grads(), _gpu_model_and_grads()
    eager, opt = (getattr(optim, cls)(m.parameters(), **kw) for m in (eager_model, model))

    def step(o):
        for ph in phases:
            getattr(o, ph)()
    with samkernels.use_backend(backend):
        graph = _warmed_up_and_captured(lambda: step(opt), warm_ups=2)
        for _ in range(2):  # the two warm-ups ran (a capture records its kernels, runs none)
            step(eager)
        for _ in range(3):
            graph.replay()
            step(eager)
        torch.cuda.synchronize()
    for p, q in zip(model.parameters(), eager_model.parameters()):
        assert torch.equal(p, q), name
    assert opt.state_dict()["samkernels"] == eager.state_dict()["samkernels"]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_capturable_looksam_replays_both_kinds_of_step(backend):
    """LookSAM: the host picks the kind of step (full every k steps, else one pass), so each kind
    is captured once (first_step + second_step; reuse_step) and the caller replays them on its
    own schedule: equal to the eager steps bit for bit, Adam's step count on the device."""
    from samkernels.optim import LookSAM
    if backend == "triton":
        _skip_unless_triton_on_cuda()
    kw = dict(lr=1e-3, rho=0.05, k=2, base="adam", nonfinite="skip_on_device", capturable=True)
    eager_model, model = _gpu_model_and_grads(), _gpu_model_and_grads()
    eager, opt = (LookSAM(m.parameters(), **kw) for m in (eager_model, model))

    def full(o):
        o.first_step()
        o.second_step()
    with samkernels.use_backend(backend):
        g_full = _warmed_up_and_captured(lambda: full(opt))  # one warm-up each ran
        g_reuse = _warmed_up_and_captured(opt.reuse_step)
        full(eager)
        eager.reuse_step()
        for i in range(4):
            if i % 2 == 0:
                g_full.replay()
                full(eager)
            else:
                g_reuse.replay()
                eager.reuse_step()
        torch.cuda.synchronize()
    for p, q in zip(model.parameters(), eager_model.parameters()):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():  # exp_avg(_sq), g_v and the float32 step tensor
            if torch.is_tensor(v):
                assert torch.equal(v, eager.state[q][k]), k


# ---------------------------------------------------------------------------------------------
# Noise tails: 2^25 elements, u0 near 1 (fast-math __logf made such normals 0, wrong or NaN)
# ---------------------------------------------------------------------------------------------
TAIL_N = 2 ** 25  # 2^23 Philox blocks
# Checked on the CPU with reference.philox4x32: with these words, lanes 0 and 2 both reach the
# largest uniform, u = 1 - 2^-24 (|log u| = 6e-8), and 50 blocks have u0 or u2 within 16 * 2^-23
# of 1.  The 64-bit seed and step also exercise the high key/counter words.
TAIL_SEED, TAIL_STEP, TAIL_PID = 2 ** 40 + 5, 2 ** 33 + 7, 3
_MASK32 = 0xFFFFFFFF


def _philox_words(seed: int, step: int, pid: int, blocks: torch.Tensor):
    """The four uint32 words (int64 tensors) of the given Philox blocks (reference.philox4x32)."""
    full = lambda v: torch.full_like(blocks, v)  # noqa: E731
    return reference.philox4x32(blocks, full(pid & _MASK32), full(step & _MASK32),
                                full((step >> 32) & _MASK32), seed & _MASK32,
                                (seed >> 32) & _MASK32)


def _philox_normal_at(seed: int, step: int, pid: int, idx: torch.Tensor) -> torch.Tensor:
    """reference.philox_normal's float64 normals at the element indices ``idx`` only."""
    x = _philox_words(seed, step, pid, idx >> 2)
    u = [((w >> 9).to(F64) + 0.5) * 2.0 ** -23 for w in x]
    r01, r23 = torch.sqrt(-2.0 * torch.log(u[0])), torch.sqrt(-2.0 * torch.log(u[2]))
    t01, t23 = 2.0 * math.pi * u[1], 2.0 * math.pi * u[3]
    lanes = torch.stack([r01 * torch.cos(t01), r01 * torch.sin(t01),
                         r23 * torch.cos(t23), r23 * torch.sin(t23)])
    return lanes.gather(0, (idx & 3).unsqueeze(0)).squeeze(0)


def _draw_noise(op: str, backend: str, n: int, seed: int, step: int, pid: int, dtype=F32):
    """The op's z alone: weights 0 and a scale of exactly 1 (bsam: N s = 1; vi: sigma = 1)."""
    p = [torch.zeros(n, device="cuda", dtype=dtype)]
    b = [torch.full((n,), math.nan, device="cuda", dtype=dtype)]  # every backup must be written
    if op == "bsam_noise_":
        _op(op)(p, b, [torch.ones(n, device="cuda", dtype=_state_dtype(dtype))], [pid], seed, step,
                1.0, backend=backend)
    else:
        _op(op)(p, b, [], [pid], seed, step, 1.0, backend=backend)
    assert torch.equal(b[0], torch.zeros_like(b[0]))
    return p[0]


@pytest.mark.parametrize("op", ["bsam_noise_", "vi_noise_"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_noise_tails_on_2_25_elements(backend, op):
    if backend == "triton":
        _skip_unless_triton_runs(op)
    n = TAIL_N
    z = _draw_noise(op, backend, n, TAIL_SEED, TAIL_STEP, TAIL_PID).double()
    assert bool(torch.isfinite(z).all()), f"{int((~torch.isfinite(z)).sum())} non-finite normals"
    ref = reference.philox_normal(TAIL_SEED, TAIL_STEP, TAIL_PID, n, "cuda", F64)
    # Every element: float32 Box-Muller with IEEE log/sqrt/sin/cos is off by a few ulp in the radius
    # and ~1 ulp of 2 pi in the angle, so |dz| <= ~1e-6 r (r = the pair's radius, <= 5.8).
    r_ref = ref.view(-1, 2).norm(dim=1).repeat_interleave(2)
    err = (z - ref).abs()
    bad = err > 4e-6 * r_ref + 1e-9
    assert not bool(bad.any()), (
        f"{int(bad.sum())} normals off; worst at {int(err.argmax())}: {z[err.argmax()].item()!r} vs "
        f"{ref[err.argmax()].item()!r}")
    # The tail: pairs whose first uniform is within 2^-16 of 1 (radius < 6e-3) keep their
    # radius to float32 accuracy (fast-math logf gave 0, NaN or errors of ~1e-3 there).
    words = _philox_words(TAIL_SEED, TAIL_STEP, TAIL_PID,
                          torch.arange(n // 4, dtype=torch.int64, device="cuda"))
    top = 2 ** 23 - 1
    checked = 0
    for lane, w in ((0, words[0]), (2, words[2])):
        k = w >> 9
        assert int(k.max()) == top  # the largest uniform 1 - 2^-24 is among these blocks
        blocks = torch.nonzero(k > top - 128).squeeze(1)
        u = ((k[blocks]).to(F64) + 0.5) * 2.0 ** -23
        r_want = torch.sqrt(-2.0 * torch.log(u))
        pair = z.view(-1, 4)[blocks][:, lane:lane + 2]
        r_got = pair.norm(dim=1)
        torch.testing.assert_close(r_got, r_want, rtol=2e-6, atol=0,
                                   msg=lambda m: f"{op}/{backend} tail radius (lane {lane}): {m}")
        checked += blocks.numel()
    assert checked > 100


# ---------------------------------------------------------------------------------------------
# BiSAM loss on CUDA tensors: both GPU backends against the float64 reference
# ---------------------------------------------------------------------------------------------
LOSS_KS = [1, 37, 1024, 1025, 4097, 50257, 128000]


def _skip_unless_loss_backend(backend: str) -> None:
    if backend == "triton":
        _skip_unless_triton_on_cuda()
        return
    if not (hasattr(torch.ops.samkernels, "bisam_loss_fwd") and
            torch._C._dispatch_has_kernel_for_dispatch_key("samkernels::bisam_loss_fwd", "CUDA")):
        pytest.skip("samkernels._C has no CUDA kernel for bisam_loss_fwd")


def _loss_data(B: int, K: int, dtype, seed: int = 0, ignore=(1,)):
    """CPU logits (already rounded to dtype) and labels; row 1 ignored by default."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, K, generator=gen, dtype=F64) * 3).to(dtype)
    target = torch.randint(0, K, (B,), generator=gen)
    for i in ignore:
        if i < B:
            target[i] = -100
    return logits, target


def _loss_cuda(backend, logits, target, device="cuda", **kw):
    """(loss, d loss.sum() / d logits) of the fused loss on ``device`` copies, ``backend``
    forced."""
    from samkernels.ops.bisam_loss import bisam_loss
    x = logits.detach().to(device).requires_grad_(True)
    with samkernels.use_backend(backend):
        loss = bisam_loss(x, target.to(device), **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach().cpu(), grad.cpu()


def _loss_ref(logits, target, **kw):
    """The float64 reference (CPU autograd) on the same, already rounded logits."""
    from samkernels.ops.bisam_loss import bisam_loss_reference
    x = logits.detach().double().requires_grad_(True)
    loss = bisam_loss_reference(x, target, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def _loss_tols(dtype, rgrad):
    big = float(rgrad.abs().max()) if rgrad.numel() else 0.0
    if dtype == F64:
        return dict(rtol=1e-12, atol=1e-13), dict(rtol=1e-10, atol=1e-13 * max(big, 1e-3))
    if dtype == F32:
        return dict(rtol=2e-5, atol=2e-6), dict(rtol=1e-4, atol=1e-6 * big)
    ulp = 2.0 ** -7 if dtype == BF16 else 2.0 ** -10  # fp32 maths, then one rounding
    return dict(rtol=ulp, atol=1e-5), dict(rtol=ulp, atol=1e-6 + ulp * 1e-3 * big)


def _check_loss(backend, logits, target, what, device="cuda", **kw):
    loss, grad = _loss_cuda(backend, logits, target, device, **kw)
    rloss, rgrad = _loss_ref(logits, target, **kw)
    assert loss.dtype == logits.dtype and grad.dtype == logits.dtype
    ltol, gtol = _loss_tols(logits.dtype, rgrad)
    torch.testing.assert_close(loss.double(), rloss, **ltol, msg=lambda m: f"{what} loss: {m}")
    torch.testing.assert_close(grad.double(), rgrad, **gtol, msg=lambda m: f"{what} grad: {m}")
    return loss, grad


# fp16/bf16 on fewer widths: each (dtype, block size) is one more Triton compilation
LOSS_CASES = [(K, d) for d in (F64, F32) for K in LOSS_KS] + \
    [(K, d) for d in (BF16, F16) for K in (1, 1025, 128000)]


@pytest.mark.parametrize("K,dtype", LOSS_CASES, ids=[f"{K}-{d}" for K, d in LOSS_CASES])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bisam_loss_on_cuda_matches_reference(backend, K, dtype):
    _skip_unless_loss_backend(backend)
    B = 16 if K <= 4097 else 4
    logits, target = _loss_data(B, K, dtype, seed=K)
    _, grad = _check_loss(backend, logits, target, f"{backend} K={K} {dtype}", reduction="none")
    assert torch.all(grad[1] == 0)  # the ignored row


@pytest.mark.parametrize("phi,mu", [("tanh", None), ("neglog", 100.0), ("tanh", 100.0)])
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("K", [37, 128000])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bisam_loss_on_cuda_phi_and_large_mu(backend, K, dtype, phi, mu):
    # mu = 100 > 50 takes the kernels' online-max path; fp64 keeps rtol 1e-12 there too (the
    # Triton scalars mu, log K, alpha, grad_scale must reach the kernel as float64)
    _skip_unless_loss_backend(backend)
    logits, target = _loss_data(4, K, dtype, seed=K + 1)
    for reduction in ("none", "mean", "sum"):
        _check_loss(backend, logits, target, f"{backend} K={K} {dtype} {phi} mu={mu} {reduction}",
                    phi=phi, mu=mu, reduction=reduction)


@pytest.mark.parametrize("K", [37, 4097])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bisam_loss_on_cuda_strided_rows(backend, K):
    _skip_unless_loss_backend(backend)
    gen = torch.Generator().manual_seed(K)
    base = torch.randn(12, K + 9, generator=gen) * 3
    target = torch.randint(0, K, (6,), generator=gen)
    for name, view in (("row stride", lambda t: t[::2, 5:5 + K]),  # rows K + 9 apart, offset 5
                       ("column stride", lambda t: t.t().contiguous().t()[1:7, 2:2 + K])):
        logits = view(base)
        x = view(base.to("cuda")).requires_grad_(True)
        with samkernels.use_backend(backend):
            from samkernels.ops.bisam_loss import bisam_loss
            loss = bisam_loss(x, target.to("cuda"), reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), x)
        rloss, rgrad = _loss_ref(logits, target, reduction="none")
        ltol, gtol = _loss_tols(F32, rgrad)
        torch.testing.assert_close(loss.detach().cpu().double(), rloss, **ltol,
                                   msg=lambda m: f"{name} loss: {m}")
        torch.testing.assert_close(grad.cpu().double(), rgrad, **gtol,
                                   msg=lambda m: f"{name} grad: {m}")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bisam_loss_on_cuda_ignore_index(backend):
    _skip_unless_loss_backend(backend)
    K = 1025
    logits, target = _loss_data(6, K, F32, seed=3, ignore=())
    target[1] = target[4] = 7  # a valid class index used as ignore_index
    target[2] = 5
    for reduction in ("mean", "sum", "none"):
        loss, grad = _check_loss(backend, logits, target, f"ignore_index=7 {reduction}",
                                 reduction=reduction, ignore_index=7)
        assert torch.all(grad[[1, 4]] == 0) and bool(grad[2].abs().sum() > 0)
        if reduction == "none":
            assert loss[1] == 0 and loss[4] == 0
    # every row ignored: the mean is NaN (0/0, as F.cross_entropy) and the gradient zero
    allign = torch.full((6,), -100)
    loss, grad = _loss_cuda(backend, logits, allign)
    assert math.isnan(loss.item()) and torch.all(grad == 0)


def _child_env() -> dict:
    """The environment of a child python: the samkernels this process imports, no forced backend."""
    env = dict(os.environ)
    env.pop("SAMKERNELS_BACKEND", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(samkernels.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_child(code: str, tmp_path, env_extra=None, timeout=240, args=()) -> dict:
    """Run ``code`` in a fresh python (its first CUDA work is its own); it prints 'RESULT <json>'."""
    env = _child_env()
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)
    found = re.findall(r"^RESULT (.*)$", proc.stdout, re.M)
    assert found, f"child failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(found[-1])  # the last report: a child may report before a fatal step


_BAD_LABEL_CHILD = r'''
import json, torch, samkernels
from samkernels.ops.bisam_loss import bisam_loss
samkernels._dispatch.extension()  # registers the C++/CUDA ops (loaded on first use otherwise)
gen = torch.Generator().manual_seed(0)
x = (torch.randn(4, 37, generator=gen) * 3).cuda()
t = torch.tensor([0, 36, 37, 5], device="cuda")  # row 2: label 37 of 37 classes
res = {}
for backend in BACKENDS:
    if backend == "triton":
        from samkernels.triton.bisam_loss import bisam_loss_fwd_triton as fwd
    else:
        fwd = torch.ops.samkernels.bisam_loss_fwd
    # the kernel alone (no label check): the bad row is NaN, nothing read outside it
    rows, grad = fwd(x, t, 1.5, 0, 0.1, -100, 1.0, True)
    torch.cuda.synchronize()
    res[backend] = {"rows": rows.cpu().tolist(), "grad": grad.cpu().double().tolist()}
print("RESULT " + json.dumps(res), flush=True)
# the public op: an asynchronous device-side assert (this CUDA context is lost afterwards)
try:
    with samkernels.use_backend(BACKENDS[-1]):
        loss = bisam_loss(x, t)
    res["public"] = "value: " + repr(loss.item())
except RuntimeError as exc:
    res["public"] = "error: " + str(exc)[:500]
print("RESULT " + json.dumps(res), flush=True)
'''


def test_bisam_loss_on_cuda_out_of_range_label(tmp_path):
    """The documented CUDA contract: the kernels write NaN for a label outside [0, K) (reading
    nothing outside the row) and the op asserts on the device (torch._assert_async), which kills
    the CUDA context: hence a child process (one for both backends)."""
    backends = []
    for backend in ("cuda", "triton"):
        try:
            _skip_unless_loss_backend(backend)
            backends.append(backend)
        except pytest.skip.Exception:
            pass
    if not backends:
        pytest.skip("no GPU backend of the BiSAM loss here")
    res = _run_child(_BAD_LABEL_CHILD.replace("BACKENDS", repr(backends)), tmp_path)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 37, generator=gen) * 3
    good = [0, 1, 3]
    rloss, rgrad = _loss_ref(x[good], torch.tensor([0, 36, 5]), reduction="none")
    for backend in backends:
        rows, grad = (torch.tensor(res[backend][k], dtype=F64) for k in ("rows", "grad"))
        assert math.isnan(rows[2]) and bool(torch.isnan(grad[2]).all()), backend
        torch.testing.assert_close(rows[good], rloss, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(grad[good], rgrad, rtol=1e-4, atol=1e-7)
    public = res.get("public", "")
    # a device-side assert (the contract); builds without device asserts must still give NaN
    assert re.search(r"device-side assert|CUDA error", public) or public == "value: nan", public


# ---------------------------------------------------------------------------------------------
# A first SAM step skipped on the device with NaN already in the allocator's memory
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_first_step_skipped_on_device_over_nan_memory(backend):
    """nonfinite='skip_on_device': a NaN in the very first step's gradients skips it on the device,
    so the momentum buffers are created but never written; they must not hold whatever the
    caching allocator hands back (here: NaN).  After that step and a finite one, the weights are
    finite and equal a run of the finite step alone."""
    from samkernels.optim import SAM
    if backend == "triton":
        _skip_unless_triton_on_cuda()
    kw = dict(lr=0.1, rho=0.05, momentum=0.9, weight_decay=5e-4, nonfinite="skip_on_device")
    alone = _gpu_model_and_grads(seed=3)
    grads = [p.grad.clone() for p in alone.parameters()]
    opt_alone = SAM(alone.parameters(), **kw)
    with samkernels.use_backend(backend):
        opt_alone.first_step()
        opt_alone.second_step()
    torch.cuda.synchronize()

    model = _gpu_model_and_grads(seed=3)
    ps = list(model.parameters())
    w0 = [p.detach().clone() for p in ps]
    # Fill the caching allocator's free blocks with NaN: small-pool segments (tensors < 1 MB) and
    # blocks of each parameter's size, then free them all.
    junk = [torch.full((2 ** 16,), math.nan, device="cuda") for _ in range(64)]
    junk += [torch.full_like(p, math.nan) for p in ps for _ in range(8)]
    junk += [torch.full((2 ** 22,), math.nan, device="cuda") for _ in range(4)]
    del junk
    opt = SAM(ps, **kw)
    with samkernels.use_backend(backend):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        ps[0].grad[0, 0] = math.nan
        opt.first_step()
        opt.second_step()  # the NaN was found on the device: both passes take their skip form
        for p, w in zip(ps, w0):
            assert torch.equal(p, w)
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.first_step()
        opt.second_step()
    torch.cuda.synchronize()
    for p, q in zip(ps, alone.parameters()):
        assert bool(torch.isfinite(p).all()), "the skipped first step left garbage momentum"
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# More than 2^31 elements in one bf16 tensor (32-bit element offsets would wrap)
# ---------------------------------------------------------------------------------------------
BIG_N = 2 ** 31 + 2 ** 20 + 5


def _needs_free_gib(gib: float) -> None:
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2 ** 30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2 ** 30:.1f} GiB free")


def _big_positions(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    return torch.cat([torch.arange(0, 64), torch.arange(2 ** 30 - 8, 2 ** 30 + 8),
                      torch.arange(2 ** 31 - 64, 2 ** 31 + 64), torch.arange(n - 4096, n),
                      torch.randint(0, n, (2048,), generator=gen)]).to("cuda")


@pytest.fixture
def _gpu_memory_back():
    """The test's cached blocks go back to the GPU (other test workers check free memory)."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.xdist_group("most_of_the_gpu_memory")  # never two at once (--dist loadgroup)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_more_than_2_31_elements_bf16(backend, _gpu_memory_back):
    """sam_perturb_ (its norm over every element too) and bsam_noise_ on one bf16 tensor of
    2^31 + 2^20 + 5 elements (4.3 GB per tensor, about 26 GB in all)."""
    if backend == "triton":
        _skip_unless_triton_on_cuda()
    _needs_free_gib(30)
    n, chunk = BIG_N, 2 ** 28
    # the index-based reference agrees with reference.philox_normal where both can run
    small = torch.arange(4099, dtype=torch.int64)
    torch.testing.assert_close(_philox_normal_at(7, 1, 5, small),
                               reference.philox_normal(7, 1, 5, 4099), rtol=0, atol=0)
    p = torch.empty(n, device="cuda", dtype=BF16).uniform_(-1, 1)
    g = torch.empty(n, device="cuda", dtype=BF16).normal_()
    b = torch.full_like(p, math.nan)
    p0 = p.clone()
    norm = _op("sam_perturb_")([p], [g], [b], None, 0.05, 1e-12, False, 0.0, backend=backend)
    torch.cuda.synchronize()
    want_sq = sum(c.double().square().sum() for c in g.split(chunk))
    torch.testing.assert_close(norm.double(), want_sq.sqrt(), rtol=1e-5, atol=0)
    assert torch.equal(b, p0)  # every backup written, the last 2^20 + 5 included
    scale = 0.05 / (norm.float() + 1e-12)
    for lo in range(0, n, chunk):  # all of w + e, float32 maths then one bf16 rounding
        want = (p0[lo:lo + chunk].float() + g[lo:lo + chunk].float() * scale).to(BF16)
        torch.testing.assert_close(p[lo:lo + chunk].float(), want.float(), rtol=2 ** -7, atol=1e-6,
                                   msg=lambda m: f"sam_perturb_ elements from {lo}: {m}")
    del g, want
    # bsam_noise_: w <- w + z / sqrt(N s), z from Philox at element i (counter i // 4 > 2^29)
    s = torch.empty(n, device="cuda", dtype=F32).uniform_(0.5, 1.5)
    p0.copy_(p)
    b.fill_(math.nan)
    _op("bsam_noise_")([p], [b], [s], [TAIL_PID], TAIL_SEED, TAIL_STEP, 100.0, backend=backend)
    torch.cuda.synchronize()
    assert torch.equal(b, p0)
    idx = _big_positions(n)
    z = _philox_normal_at(TAIL_SEED, TAIL_STEP, TAIL_PID, idx)
    want = (p0[idx].double() + z / torch.sqrt(100.0 * s[idx].double())).to(BF16)
    torch.testing.assert_close(p[idx].double(), want.double(), rtol=2 ** -7, atol=1e-6,
                               msg=lambda m: f"bsam_noise_ at sampled positions: {m}")
    assert bool(torch.isfinite(p[-2 ** 20:]).all())


# ---------------------------------------------------------------------------------------------
# Tensors on a device that is not the current one
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("case", BASES)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_tensors_on_a_non_current_device(backend, case):
    if backend == "triton":
        _skip_unless_triton_runs(CASES[case][0])
    with torch.cuda.device(0):  # cuda:0 current, every tensor on cuda:1
        check_against_reference(case, MIXED, "cuda:1", _backend(backend))
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0


# ---------------------------------------------------------------------------------------------
# auto on CUDA: the first op of a process (child processes: the choice is made once per process)
# ---------------------------------------------------------------------------------------------
_AUTO_CHILD = r'''
import json, torch, samkernels
from samkernels import _dispatch, ops
dev = torch.device("cuda")
torch.cuda.manual_seed(1234)
gen = torch.Generator().manual_seed(0)
sizes = [1000, 70000, 3]
p = [torch.randn(n, generator=gen).to(dev) for n in sizes]
g = [torch.randn(n, generator=gen).to(dev) for n in sizes]
b = [torch.empty(n, device=dev) for n in sizes]
torch.cuda.synchronize()
cuda_rng, cpu_rng = torch.cuda.get_rng_state(), torch.get_rng_state()
torch.cuda.reset_peak_memory_stats()
before = torch.cuda.memory_allocated()
ops.sam_perturb_(p, g, b, None, 0.05, 1e-12, False, 0.0)  # auto: the first samkernels op
torch.cuda.synchronize()
print("RESULT " + json.dumps({
    "choice": _dispatch.resolve(dev),
    "cuda_rng_same": torch.equal(cuda_rng, torch.cuda.get_rng_state()),
    "cpu_rng_same": torch.equal(cpu_rng, torch.get_rng_state()),
    "extra_peak_bytes": torch.cuda.max_memory_allocated() - before}))
'''


@pytest.mark.parametrize("recorded", ["none", "triton"])
def test_auto_choice_leaves_rng_and_memory_alone(recorded, tmp_path):
    env = {"SAMKERNELS_CACHE_DIR": str(tmp_path / "cache")}
    if recorded == "triton":  # a choice saved by tune_backend(save=True) for this GPU
        _skip_unless_triton_on_cuda()
        if not (hasattr(_dispatch, "_versions_key") and hasattr(_dispatch, "_cache_path")):
            pytest.skip("this samkernels has no saved backend choice")
        old = os.environ.get("SAMKERNELS_CACHE_DIR")
        os.environ["SAMKERNELS_CACHE_DIR"] = env["SAMKERNELS_CACHE_DIR"]
        try:
            path = _dispatch._cache_path()
        finally:
            if old is None:
                del os.environ["SAMKERNELS_CACHE_DIR"]
            else:
                os.environ["SAMKERNELS_CACHE_DIR"] = old
        os.makedirs(os.path.dirname(path), exist_ok=True)
        name = torch.cuda.get_device_name()
        with open(path, "w") as f:
            json.dump({_dispatch._versions_key(name): {"device": name, "cuda_ms": 1.0,
                                                       "triton_ms": 0.5, "choice": "triton"}}, f)
    res = _run_child(_AUTO_CHILD, tmp_path, env)
    assert res["cuda_rng_same"] and res["cpu_rng_same"], res
    assert res["extra_peak_bytes"] <= 16 * 2 ** 20, res  # no timing buffers in the user's op
    if recorded == "triton":
        assert res["choice"] == "triton"
    else:
        assert res["choice"] in ("cuda", "triton")


_CAPTURE_CHILD = r'''
import json, torch, samkernels
from samkernels import _dispatch, ops
dev = torch.device("cuda")
gen = torch.Generator().manual_seed(0)
sizes = [1000, 70000, 3]
p = [torch.randn(n, generator=gen).to(dev) for n in sizes]
g = [torch.randn(n, generator=gen).to(dev) for n in sizes]
b = [torch.empty(n, device=dev) for n in sizes]
m = [torch.randn(n, generator=gen).to(dev) for n in sizes]
p0, m0 = [t.clone() for t in p], [t.clone() for t in m]
# Warm the kernels up (module loading, Triton compilation) with forced backends, which leave the
# auto choice unmade: what the capture below sees first is the choice itself.
for backend in ("cuda", "triton"):
    if _dispatch._why_not(backend, dev) is None:
        w = [torch.ones(5, device=dev) for _ in range(4)]
        ops.sam_perturb_(w[:1], w[1:2], w[2:3], None, 0.05, 1e-12, False, 0.0, backend=backend)
        ops.sam_restore_sgd_(w[:1], w[1:2], w[2:3], w[3:], 0.1, 0.9, 0.0, False, 1e-4, False,
                             backend=backend)
torch.cuda.synchronize()
made_before = dict(getattr(_dispatch, "_auto_cuda_choice", {}))
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):  # the first auto-backend op of the process
    ops.sam_perturb_(p, g, b, None, 0.05, 1e-12, False, 0.0)
    ops.sam_restore_sgd_(p, g, b, m, 0.1, 0.9, 0.0, False, 1e-4, False)
untouched = all(torch.equal(x, y) for x, y in zip(p + m, p0 + m0))  # capture runs nothing
graph.replay()
torch.cuda.synchronize()
got = [t.clone() for t in p + m]
choice = _dispatch.resolve(dev)
for t, t0 in zip(p + m, p0 + m0):
    t.copy_(t0)
ops.sam_perturb_(p, g, b, None, 0.05, 1e-12, False, 0.0, backend=choice)
ops.sam_restore_sgd_(p, g, b, m, 0.1, 0.9, 0.0, False, 1e-4, False, backend=choice)
torch.cuda.synchronize()
print("RESULT " + json.dumps({"choice": choice, "untouched": untouched, "made_before": made_before,
                              "replay_equals_eager": all(torch.equal(x, y)
                                                         for x, y in zip(got, p + m))}))
'''


def test_auto_choice_survives_a_capture_as_first_op(tmp_path):
    res = _run_child(_CAPTURE_CHILD, tmp_path, {"SAMKERNELS_CACHE_DIR": str(tmp_path / "cache")})
    assert res["made_before"] == {}, res  # the choice was made inside the capture
    assert res["untouched"] and res["replay_equals_eager"], res


# ---------------------------------------------------------------------------------------------
# Triton plans and graph capture: a plan's tables come from a host copy, so none is built inside
# a capture (clear error); a plan built by the eager warm-up replays correctly after the host
# allocator reuses memory
# ---------------------------------------------------------------------------------------------
_PLAN_CHILD = r'''
import json, sys, torch, samkernels
from samkernels import ops
dev = torch.device("cuda")

def lists(seed, sizes):
    gen = torch.Generator().manual_seed(seed)
    p = [torch.randn(n, generator=gen).to(dev) for n in sizes]
    g = [torch.randn(n, generator=gen).to(dev) for n in sizes]
    m = [torch.randn(n, generator=gen).to(dev) * 0.1 for n in sizes]
    return p, g, [torch.empty(n, device=dev) for n in sizes], m

def step(p, g, b, m):
    ops.sam_perturb_(p, g, b, None, 0.05, 1e-12, False, 0.0, backend="triton")
    ops.sam_restore_sgd_(p, g, b, m, 0.1, 0.9, 0.0, False, 1e-4, False, backend="triton")

step(*lists(1, [5, 70000]))  # compile outside the capture; the plans below are new
torch.cuda.synchronize()
sizes = [1 + 37 * i for i in range(300)] + [70001]  # several KB of tables
p, g, b, m = lists(2, sizes)
p0, m0 = [t.clone() for t in p], [t.clone() for t in m]
if sys.argv[-1] == "cold":  # no warm-up on these tensors: the capture must refuse, clearly
    error = None
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            step(p, g, b, m)
    except RuntimeError as exc:
        error = str(exc)
    print("RESULT " + json.dumps({"error": error}))
    sys.exit(0)
# the eager result (its own plans, on other tensors), then the warm-up on the captured tensors
pe, me = [t.clone() for t in p0], [t.clone() for t in m0]
step(pe, g, [torch.empty_like(t) for t in pe], me)
s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    step(p, g, b, m)
torch.cuda.current_stream().wait_stream(s)
torch.cuda.synchronize()
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    step(p, g, b, m)
samkernels.triton._multi_tensor.clear_cache()  # the graph keeps its plans alive by itself
ok = []
for r in range(3):
    # pinned host memory of every size class, allocated and overwritten between replays
    junk = [torch.empty(2 ** k, dtype=torch.uint8, pin_memory=True) for k in range(6, 22)
            for _ in range(4)]
    for t in junk:
        t.fill_(0xA5 ^ r)
    del junk
    more = [torch.empty(2 ** k, dtype=torch.uint8, pin_memory=True).fill_(0x3C) for k in range(6, 22)]
    for t, t0 in zip(p + m, p0 + m0):
        t.copy_(t0)
    graph.replay()
    torch.cuda.synchronize()
    ok.append(all(torch.equal(x, y) for x, y in zip(p + m, pe + me)))
    del more
print("RESULT " + json.dumps({"replays_equal_eager": ok}))
'''


def test_triton_plan_is_not_built_inside_a_capture(tmp_path):
    _skip_unless_triton_on_cuda()
    res = _run_child(_PLAN_CHILD, tmp_path, args=["cold"])
    assert res["error"] and "once eagerly before capturing" in res["error"], res


def test_triton_plan_from_the_warm_up_survives_host_memory_reuse(tmp_path):
    _skip_unless_triton_on_cuda()
    res = _run_child(_PLAN_CHILD, tmp_path)
    assert res["replays_equal_eager"] == [True, True, True], res
