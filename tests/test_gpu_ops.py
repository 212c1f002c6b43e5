"""The CUDA kernels (``backend="cuda"``) against the float64 reference and the triton backend.

Needs a CUDA device and ``samkernels._C`` built with its CUDA kernels; skipped otherwise.  Every
phase of ``samkernels/ops/reference.py`` runs on lists that mix odd sizes, chunk boundaries
(65,536 elements), non-contiguous views (transposed, strided), misaligned views (storage offset:
the kernels' scalar path), channels_last tensors (used in place), and, separately, more tiny
tensors than one launch's table holds.  Every list is compared afterwards, written or not.

The helpers take the device and the callable under test, so they run on any backend.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, List, Sequence, Tuple

import pytest
import torch

import samkernels
from samkernels import _dispatch
from samkernels.ops import reference


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
# rounded from fp32 (<= 1/2 ulp); fp32 uses approximate division/sqrt (--use_fast_math).
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


class Maker:
    """Builds tensor lists with the same layouts and seeded values on any device."""

    def __init__(self, specs, dtype, device, seed: int = 0):
        self.specs, self.device = specs, torch.device(device)
        self.dtypes = _param_dtypes(dtype, len(specs))
        self.gen = torch.Generator().manual_seed(seed)

    def _one(self, shape, layout, dtype, values: str, is_param: bool) -> torch.Tensor:
        n = math.prod(shape)
        base_shape = {"transposed": tuple(reversed(shape)), "strided": (2 * n,),
                      "offset": (n + 1,)}.get(layout, shape)
        if layout == "mixed" and is_param:
            base_shape = tuple(reversed(shape))
        v = torch.randn(base_shape, generator=self.gen, dtype=F64)
        if values == "positive":
            v = 0.5 + v.abs()
        t = v.to(device=self.device, dtype=dtype)
        if layout == "transposed" or (layout == "mixed" and is_param):
            t = t.t()
        elif layout == "strided":
            t = t[::2]
        elif layout == "offset":
            t = t[1:]  # contiguous but not 16-byte aligned
        elif layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        assert t.shape == torch.Size(shape)
        return t

    def params(self, values: str = "normal") -> List[torch.Tensor]:
        return [self._one(s, l, d, values, True) for (s, l), d in zip(self.specs, self.dtypes)]

    def like_params(self, values: str = "normal") -> List[torch.Tensor]:
        return [self._one(s, l, d, values, False) for (s, l), d in zip(self.specs, self.dtypes)]

    def state(self, values: str = "normal") -> List[torch.Tensor]:
        return [self._one(s, l, _state_dtype(d), values, False)
                for (s, l), d in zip(self.specs, self.dtypes)]


# Each case: op name -> variants; a variant builds the op's positional arguments from a Maker.
def _sam_perturb(adaptive: bool, given: bool):
    def build(m: Maker):
        norm = torch.tensor(3.7, device=m.device) if given else None
        return [m.params(), m.like_params(), m.like_params(), norm, 0.05, 1e-12, adaptive, 0.01]
    return build


def _sgd(momentum, dampening, nesterov, weight_decay, first):
    def build(m: Maker):
        return [m.params(), m.like_params(), m.like_params(), m.state(), 0.1, momentum, dampening,
                nesterov, weight_decay, first]
    return build


def _adam(step, weight_decay, decoupled):
    def build(m: Maker):
        return [m.params(), m.like_params(), m.like_params(), m.state(), m.state("positive"), step,
                1e-3, 0.9, 0.999, 1e-8, weight_decay, decoupled]
    return build


def _noise(seed, step):
    def build(m: Maker):
        ids = [7 * i + 3 + (2 ** 32 if i % 3 == 0 else 0) for i in range(len(m.specs))]
        return [m.params(), m.like_params(), m.state("positive"), ids, seed, step, 100.0]
    return build


def _bsam_perturb(accumulate: bool):
    def build(m: Maker):
        acc = m.state("positive") if accumulate else []
        return [m.params(), m.like_params(), m.like_params(), m.state("positive"), acc, 0.05,
                0.999, 0.4, 0.1]
    return build


def _bsam_update(accumulate: bool, released: bool):
    def build(m: Maker):
        acc = m.state("positive") if accumulate else []
        return [m.params(), m.like_params(), m.like_params(), m.state("positive"), m.state(), acc,
                0.5, 0.9, 0.999, 0.4, 0.1, 0.25, released]
    return build


CASES: Dict[str, Callable] = {
    "grad_sumsq-sam": ("grad_sumsq", lambda m: [m.params(), m.like_params(), False, 0.0]),
    "grad_sumsq-asam": ("grad_sumsq", lambda m: [m.params(), m.like_params(), True, 0.01]),
    "sam_perturb": ("sam_perturb_", _sam_perturb(False, False)),
    "sam_perturb-asam": ("sam_perturb_", _sam_perturb(True, False)),
    "sam_perturb-given": ("sam_perturb_", _sam_perturb(False, True)),
    "sam_perturb-asam-given": ("sam_perturb_", _sam_perturb(True, True)),
    "sgd-plain": ("sam_restore_sgd_", _sgd(0.0, 0.0, False, 0.0, False)),
    "sgd-momentum": ("sam_restore_sgd_", _sgd(0.9, 0.1, False, 5e-4, False)),
    "sgd-nesterov-first": ("sam_restore_sgd_", _sgd(0.9, 0.0, True, 5e-4, True)),
    "sgd-nesterov": ("sam_restore_sgd_", _sgd(0.9, 0.0, True, 0.0, False)),
    "adam-step1": ("sam_restore_adam_", _adam(1, 0.0, False)),
    "adam-l2": ("sam_restore_adam_", _adam(7, 1e-2, False)),
    "adamw": ("sam_restore_adam_", _adam(7, 1e-2, True)),
    "noise": ("bsam_noise_", _noise(1234, 0)),
    "noise-64bit": ("bsam_noise_", _noise(2 ** 40 + 5, 2 ** 33 + 7)),
    "bsam_perturb": ("bsam_perturb_", _bsam_perturb(False)),
    "bsam_perturb-accum": ("bsam_perturb_", _bsam_perturb(True)),
    "bsam_update": ("bsam_update_", _bsam_update(False, False)),
    "bsam_update-released": ("bsam_update_", _bsam_update(False, True)),
    "bsam_update-accum": ("bsam_update_", _bsam_update(True, False)),
    "bsam_update-accum-released": ("bsam_update_", _bsam_update(True, True)),
}


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
    name, build = CASES[case]
    args = build(Maker(specs, dtype, device))
    ref_args = _to_reference(args)
    out = run(name, *args)
    ref_out = getattr(reference, name)(*ref_args)
    _compare_outputs(args, ref_args, out, ref_out)


def check_two_backends(case: str, dtype, device, run_a: Callable, run_b: Callable, specs=SPECS):
    name, build = CASES[case]
    args_a, args_b = build(Maker(specs, dtype, device)), build(Maker(specs, dtype, device))
    out_a, out_b = run_a(name, *args_a), run_b(name, *args_b)
    _compare_outputs(args_a, args_b, out_a, out_b, scale=2.0)


def _backend(name: str) -> Callable:
    return lambda op, *args: getattr(samkernels.ops, op)(*args, backend=name)


run_cuda = _backend("cuda")


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16, MIXED], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_matches_reference(case, dtype):
    check_against_reference(case, dtype, "cuda", run_cuda)


@pytest.mark.parametrize("dtype", [F32, MIXED], ids=str)
@pytest.mark.parametrize("case", ["grad_sumsq-asam", "sam_perturb-asam", "sgd-momentum", "adamw",
                                  "noise", "bsam_perturb-accum", "bsam_update-accum-released"])
def test_cuda_many_tiny_tensors(case, dtype):
    # several launches per phase: the table fills up
    check_against_reference(case, dtype, "cuda", run_cuda, specs=TINY_SPECS)


@pytest.mark.parametrize("dtype", [F32, BF16, MIXED], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_matches_triton(case, dtype):
    if not _dispatch.triton_usable(torch.device("cuda")):
        pytest.skip("triton is not usable")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # tests/conftest.py defaults it to 1; the interpreter cannot run on CUDA tensors
        # (KERNEL-NOTES): run with TRITON_INTERPRET=0 on a GPU machine for this comparison
        pytest.skip("TRITON_INTERPRET=1: triton kernels are interpreted and need CPU tensors")
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
    for dtype, want in ((F32, F32), (BF16, F32), (MIXED, F64)):
        m = Maker(SPECS, dtype, "cuda")
        p, g, b = m.params(), m.like_params(), m.like_params()
        before = [t.clone() for t in p]
        norm = run_cuda("sam_perturb_", p, g, b, None, 0.0, 1e-12, False, 0.0)
        assert norm.dtype == want and norm.dim() == 0
        for x, y, z in zip(p, before, b):  # rho = 0: exactly the base optimizer's weights
            assert torch.equal(x, y) and torch.equal(z, y)


def test_no_host_sync():
    m = Maker(SPECS, MIXED, "cuda")
    p, g, b, s, acc = m.params(), m.like_params(), m.like_params(), m.state("positive"), m.state()
    norm = torch.tensor(2.0, device="cuda")
    ids = list(range(len(p)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_cuda("grad_sumsq", p, g, True, 0.01)
        run_cuda("sam_perturb_", p, g, b, None, 0.05, 1e-12, True, 0.01)
        run_cuda("sam_perturb_", p, g, b, norm, 0.05, 1e-12, False, 0.0)
        run_cuda("sam_restore_sgd_", p, g, b, s, 0.1, 0.9, 0.0, True, 1e-4, False)
        run_cuda("sam_restore_adam_", p, g, b, acc, s, 3, 1e-3, 0.9, 0.999, 1e-8, 1e-2, True)
        run_cuda("bsam_noise_", p, b, s, ids, 1, 2, 100.0)
        run_cuda("bsam_perturb_", p, g, b, s, acc, 0.05, 0.999, 0.4, 0.1)
        run_cuda("bsam_update_", p, g, b, s, acc, [], 0.5, 0.9, 0.999, 0.4, 0.1, 1.0, False)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cuda_graph_capture():
    specs = [s for s in SPECS if s[1] == "contig"]
    m = Maker(specs, F32, "cuda")
    p, g, b, buf = m.params(), m.like_params(), m.like_params(), m.state()
    p0, buf0 = [t.clone() for t in p], [t.clone() for t in buf]

    def step():
        run_cuda("sam_perturb_", p, g, b, None, 0.05, 1e-12, True, 0.01)
        run_cuda("sam_restore_sgd_", p, g, b, buf, 0.1, 0.9, 0.0, False, 5e-4, False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    eager_p, eager_buf = [t.clone() for t in p], [t.clone() for t in buf]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(2):  # replays start from the same state and give the eager result
        for t, t0 in zip(p + buf, p0 + buf0):
            t.copy_(t0)
        graph.replay()
        torch.cuda.synchronize()
        for x, y in zip(p + buf, eager_p + eager_buf):
            assert torch.equal(x, y)


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
