"""The one place that decides which backend runs an op.

Backends: ``reference`` (pure PyTorch, :mod:`samkernels.ops.reference`), ``cpu`` (the C++ extension
``samkernels._C``), ``cuda`` (the CUDA kernels of the same extension), ``triton`` (Triton kernels;
on CPU tensors only under ``TRITON_INTERPRET=1``).  ``auto`` (the default) picks by device: CPU
tensors -> ``cpu``; CUDA tensors -> the faster of ``cuda`` and ``triton``, measured once per device
(``cuda`` if Triton is missing or ``SAMKERNELS_AUTOTUNE=0``; ``triton`` if no CUDA kernels were built).

Force one with the environment variable ``SAMKERNELS_BACKEND`` or, in code, with
``samkernels.use_backend(name)`` (a context manager; ``set_backend`` sets it for good).  A forced
backend that cannot run raises a ``RuntimeError`` that says why.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
_forced: Optional[str] = None
_warned_fallback = False


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown samkernels backend {name!r}; expected one of {BACKENDS}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force ``name`` for every op from now on (``None`` goes back to ``SAMKERNELS_BACKEND``)."""
    global _forced
    _forced = None if name is None else _check(name)


@contextlib.contextmanager
def use_backend(name: str):
    """``with samkernels.use_backend("reference"): ...`` forces a backend inside the block."""
    global _forced
    previous, _forced = _forced, _check(name)
    try:
        yield
    finally:
        _forced = previous


def requested() -> str:
    if _forced is not None:
        return _forced
    return _check(os.environ.get("SAMKERNELS_BACKEND", "auto").strip().lower() or "auto")


# --- availability ---------------------------------------------------------------------------
_ext_error: Optional[BaseException] = None
_ext = None


def extension():
    """The compiled ``samkernels._C`` module, or None (the import error is kept for messages)."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            _ext = importlib.import_module("samkernels._C")
        except ImportError as exc:  # pragma: no cover - depends on the install
            _ext_error = exc
    return _ext


def cuda_kernels_built() -> bool:
    ext = extension()
    return bool(ext is not None and getattr(ext, "has_cuda", lambda: False)())


def triton_usable(device: torch.device) -> bool:
    return _why_not("triton", device) is None


def _why_not(backend: str, device: torch.device) -> Optional[str]:
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, got {device}"
        if extension() is None:
            return f"the compiled extension samkernels._C failed to import ({_ext_error})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device}"
        if not cuda_kernels_built():
            return "samkernels._C was built without CUDA kernels (rebuild with SAMKERNELS_CUDA=1)"
        return None
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            return "triton runs on CPU tensors only with TRITON_INTERPRET=1 set before import"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device}"
        return None
    raise AssertionError(backend)


_auto_cuda_choice: Dict[int, str] = {}


def resolve(device: torch.device) -> str:
    """The backend that runs an op on tensors of ``device``."""
    global _warned_fallback
    want = requested()
    if want != "auto":
        why = _why_not(want, device)
        if why is not None:
            raise RuntimeError(f"samkernels backend {want!r} is not available: {why}")
        return want
    if device.type == "cpu":
        if extension() is not None:
            return "cpu"
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"samkernels._C is not importable ({_ext_error}); using the slow "
                          "reference backend", RuntimeWarning, stacklevel=3)
        return "reference"
    if device.type == "cuda":
        if cuda_kernels_built():
            index = device.index if device.index is not None else torch.cuda.current_device()
            if index not in _auto_cuda_choice:
                _auto_cuda_choice[index] = _measure_cuda_vs_triton(index)
            return _auto_cuda_choice[index]
        if triton_usable(device):
            return "triton"
    return "reference"


def _time_backend(backend: str, index: int) -> float:
    """Median ms of one SAM perturbation + SGD restore over a 64M-element, 100-tensor list (larger
    than L2), timed with CUDA events after a warm-up."""
    from samkernels import ops
    dev = torch.device("cuda", index)
    sizes = [640_000 + 17 * i for i in range(100)]
    p = [torch.randn(n, device=dev) for n in sizes]
    g = [torch.randn(n, device=dev) for n in sizes]
    b = [torch.empty(n, device=dev) for n in sizes]
    m = [torch.zeros(n, device=dev) for n in sizes]

    def run():
        ops.sam_perturb_(p, g, b, None, 0.05, 1e-12, False, 0.0, backend=backend)
        ops.sam_restore_sgd_(p, g, b, m, 0.1, 0.9, 0.0, False, 0.0, False, backend=backend)

    run()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _measure_cuda_vs_triton(index: int) -> str:
    """``auto`` on CUDA: the faster of the CUDA and Triton kernels, measured once per device
    (``SAMKERNELS_AUTOTUNE=0`` skips the measurement and takes CUDA)."""
    if os.environ.get("SAMKERNELS_AUTOTUNE", "1") == "0" or not triton_usable(torch.device("cuda")):
        return "cuda"
    try:
        t_cuda, t_triton = _time_backend("cuda", index), _time_backend("triton", index)
    except Exception as exc:  # a broken Triton install must not break the CUDA path
        warnings.warn(f"samkernels: could not time the triton backend ({exc}); using cuda",
                      RuntimeWarning, stacklevel=3)
        return "cuda"
    return "triton" if t_triton < t_cuda else "cuda"


# --- op lookup ------------------------------------------------------------------------------
def _reference_impl(name: str) -> Callable:
    from samkernels.ops import reference
    return getattr(reference, name)


def _torch_op_impl(name: str) -> Callable:
    extension()
    return getattr(torch.ops.samkernels, name)


def _cuda_op_impl(name: str) -> Callable:
    """The CUDA kernel of op ``name``; AttributeError when the op has none (e.g. CPU-only phases)."""
    op = _torch_op_impl(name)
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"samkernels::{name}", "CUDA"):
        raise AttributeError(name)
    return op


def _triton_impl(name: str) -> Callable:
    from samkernels import triton as triton_ops
    return getattr(triton_ops, name)


_LOOKUP = {"reference": _reference_impl, "cpu": _torch_op_impl, "cuda": _cuda_op_impl,
           "triton": _triton_impl}
_warned_missing: set = set()


def implementation(name: str, device: torch.device, backend: Optional[str] = None) -> Callable:
    """The callable implementing op ``name`` for ``device`` (``backend`` overrides the choice).

    Under ``auto``, an op the chosen backend lacks (e.g. a phase with only a CPU kernel so far, on
    CUDA tensors) runs on the other GPU backend or the reference, with one warning; a forced
    backend that lacks it raises ``NotImplementedError``."""
    chosen = resolve(device) if backend is None else backend
    try:
        return _LOOKUP[chosen](name)
    except AttributeError:
        if backend is not None or requested() != "auto":
            raise NotImplementedError(f"op {name!r} has no {chosen!r} implementation") from None
    fallbacks = (["triton"] if chosen == "cuda" and triton_usable(device) else []) + ["reference"]
    for other in fallbacks:
        try:
            impl = _LOOKUP[other](name)
        except AttributeError:
            continue
        if (name, chosen) not in _warned_missing:
            _warned_missing.add((name, chosen))
            warnings.warn(f"samkernels: op {name!r} has no {chosen!r} kernel yet; using {other!r}",
                          RuntimeWarning, stacklevel=3)
        return impl
    raise NotImplementedError(f"op {name!r} has no implementation for {device}")
