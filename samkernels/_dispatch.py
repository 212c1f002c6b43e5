"""The one place that decides which backend runs an op.

Backends: ``reference`` (pure PyTorch, :mod:`samkernels.ops.reference`), ``cpu`` (the C++ extension
``samkernels._C``), ``cuda`` (the CUDA kernels of the same extension), ``triton`` (Triton kernels;
on CPU tensors only under ``TRITON_INTERPRET=1``).  ``auto`` (the default) picks by device: CPU
tensors -> ``cpu``; CUDA tensors -> ``cuda`` if the extension was built with CUDA, else ``triton``.

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
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


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
            return _auto_cuda_choice.get(device.index or 0, "cuda")
        if triton_usable(device):
            return "triton"
    return "reference"


# --- op lookup ------------------------------------------------------------------------------
def _reference_impl(name: str) -> Callable:
    from samkernels.ops import reference
    return getattr(reference, name)


def _torch_op_impl(name: str) -> Callable:
    extension()
    return getattr(torch.ops.samkernels, name)


def _triton_impl(name: str) -> Callable:
    from samkernels import triton as triton_ops
    return getattr(triton_ops, name)


_LOOKUP = {"reference": _reference_impl, "cpu": _torch_op_impl, "cuda": _torch_op_impl,
           "triton": _triton_impl}


def implementation(name: str, device: torch.device, backend: Optional[str] = None) -> Callable:
    """The callable implementing op ``name`` for ``device`` (``backend`` overrides the choice)."""
    chosen = resolve(device) if backend is None else backend
    try:
        return _LOOKUP[chosen](name)
    except AttributeError:
        raise NotImplementedError(f"op {name!r} has no {chosen!r} implementation") from None
