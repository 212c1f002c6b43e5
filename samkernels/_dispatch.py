"""The one place that decides which backend runs an op.

Backends: ``reference`` (pure PyTorch, :mod:`samkernels.ops.reference`), ``cpu`` (the C++ extension
``samkernels._C``), ``cuda`` (the CUDA kernels of the same extension), ``triton`` (Triton kernels;
on CPU tensors only under ``TRITON_INTERPRET=1``).  ``auto`` (the default) picks by device: CPU
tensors -> ``cpu``; CUDA tensors -> a *recorded* choice between ``cuda`` and ``triton`` (saved on
this machine by ``tune_backend(save=True)``, else shipped per GPU model, else ``cuda``; ``triton``
if no CUDA kernels were built).  ``auto`` never measures, allocates or draws random numbers by
itself: see ``_auto_choice_for``.

Force one with the environment variable ``SAMKERNELS_BACKEND`` or, in code, with
``samkernels.use_backend(name)`` (a context manager; ``set_backend`` sets it for good).  A forced
backend that cannot run raises a ``RuntimeError`` that says why.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
_forced: Optional[str] = None
_warned_fallback = False
_warned_fallback_cuda = False


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


# SAMKERNELS_BACKEND is read on every op call (it may change at run time).  os.environ.get of a
# missing key raises and catches a KeyError inside, about 0.7 us: more than all the rest of an op
# call's Python.  CPython's os.environ keeps its items, encoded, in the dict ``_data`` (updated in
# place by every change through os.environ); read that where it exists.
_ENV_KEY = "SAMKERNELS_BACKEND"
_env_items = getattr(os.environ, "_data", None)
_env_key = os.environ.encodekey(_ENV_KEY) if _env_items is not None else None


def _env_backend() -> Optional[str]:
    if _env_items is None:
        return os.environ.get(_ENV_KEY)
    raw = _env_items.get(_env_key)
    return None if raw is None else os.environ.decodevalue(raw)


def requested() -> str:
    if _forced is not None:
        return _forced
    raw = _env_backend()
    return "auto" if raw is None else _check(raw.strip().lower() or "auto")


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
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device.type == "cpu" and not interpret:
            return "triton runs on CPU tensors only with TRITON_INTERPRET=1 set before import"
        if device.type == "cuda" and interpret:
            return ("TRITON_INTERPRET=1 is set: triton's interpreter runs on CPU tensors only "
                    "(unset it before triton is imported to run on CUDA)")
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device}"
        return None
    raise AssertionError(backend)


def resolve(device: torch.device) -> str:
    """The backend that runs an op on tensors of ``device``."""
    global _warned_fallback, _warned_fallback_cuda
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
            choice = _auto_cuda_choice.get(index)
            if choice is None:
                choice = _auto_cuda_choice[index] = _auto_choice_for(index)
            return choice
        if triton_usable(device):
            return "triton"
        if not _warned_fallback_cuda:  # the reference syncs with the host and is slow: say so
            _warned_fallback_cuda = True
            warnings.warn(f"samkernels has no fused kernels for {device.type} tensors (cuda: "
                          f"{_why_not('cuda', device)}; triton: {_why_not('triton', device)}); "
                          "using the slow reference backend, which reads flags and counters on "
                          "the host (no skip_on_device, no CUDA-graph capture)", RuntimeWarning,
                          stacklevel=3)
    return "reference"


# --- auto on CUDA: a recorded choice, never a measurement inside the user's step ---------------
# ``auto`` must not allocate, launch, touch the RNG or sync on the first op (it may run near the
# memory limit, inside a CUDA graph capture, or in a seeded run), and must not flip between two
# backends that round differently from one run to the next.  So it only *looks up* a choice:
#   1. a choice saved on this machine by ``tune_backend(save=True)`` for this GPU model and these
#      torch / triton versions (``$SAMKERNELS_CACHE_DIR/backend.json``, default
#      ``~/.cache/samkernels``);
#   2. the choice shipped in ``SHIPPED_CHOICE`` for this GPU model (measured by
#      ``bench/gpu_session.sh``);
#   3. ``cuda``: compiled ahead of time, no JIT warm-up, no dependency on triton.
# A recorded ``triton`` is used only while triton is usable; otherwise ``cuda``.
SHIPPED_CHOICE: Dict[str, str] = {}  # torch.cuda.get_device_name() -> "cuda" | "triton"
# triton is chosen only when it is faster by more than this fraction: two backends that tie do not
# swap places (and results) between tuning runs.
TUNE_MARGIN = 0.05
_auto_cuda_choice: Dict[int, str] = {}


def _cache_path() -> str:
    root = os.environ.get("SAMKERNELS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "samkernels")
    return os.path.join(root, "backend.json")


def _versions_key(device_name: str) -> str:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"{device_name} | torch {torch.__version__} | triton {triton_version}"


def _load_saved() -> Dict[str, dict]:
    try:
        with open(_cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _auto_choice_for(index: int) -> str:
    """The recorded choice for CUDA device ``index`` (see above); reads no tensor."""
    name = torch.cuda.get_device_name(index)
    saved = _load_saved().get(_versions_key(name))
    choice = saved.get("choice") if isinstance(saved, dict) else None
    if choice not in ("cuda", "triton"):
        choice = SHIPPED_CHOICE.get(name, "cuda")
    if choice == "triton" and not triton_usable(torch.device("cuda", index)):
        choice = "cuda"
    return choice


def tune_backend(device=None, save: bool = False, numel: int = 1 << 24, repeat: int = 15) -> dict:
    """Measure the CUDA and Triton kernels on ``device`` and return the faster (the explicit,
    opt-in counterpart of ``auto``, which never measures by itself).

    Times one SAM perturbation + SGD restore (the library's most common step) over four fp32
    lists of ``numel`` elements in 100 tensors (default 4 x 64 MiB: larger than L2), medians of
    ``repeat`` CUDA-event timings after a warm-up.  Allocates those buffers (freed on return),
    draws no random numbers (the values come from ``arange``), and refuses to run inside a CUDA
    graph capture.  ``triton`` is chosen only when faster by more than ``TUNE_MARGIN``.  With
    ``save=True`` the choice is written to the cache file that ``auto`` reads for this GPU model
    and these torch/triton versions, and takes effect at once in this process.

    Returns ``{"device", "key", "cuda_ms", "triton_ms", "choice", "saved_to"}``."""
    if not torch.cuda.is_available():
        raise RuntimeError("tune_backend needs a CUDA device")
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else \
        torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"tune_backend: device must be a CUDA device, got {dev}")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    dev = torch.device("cuda", index)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("tune_backend cannot run inside a CUDA graph capture")
    if not cuda_kernels_built():
        raise RuntimeError(f"tune_backend: {_why_not('cuda', dev)}")
    name = torch.cuda.get_device_name(index)
    result = {"device": name, "key": _versions_key(name), "cuda_ms": None, "triton_ms": None,
              "choice": "cuda", "saved_to": None}
    with torch.cuda.device(index):
        result["cuda_ms"] = _time_backend("cuda", dev, numel, repeat)
        why = _why_not("triton", dev)
        if why is None:
            result["triton_ms"] = _time_backend("triton", dev, numel, repeat)
            if result["triton_ms"] < result["cuda_ms"] * (1.0 - TUNE_MARGIN):
                result["choice"] = "triton"
        else:
            result["triton_unusable"] = why
    if save:
        path = _cache_path()
        data = _load_saved()
        data[result["key"]] = {k: result[k] for k in ("device", "cuda_ms", "triton_ms", "choice")}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        result["saved_to"] = path
        _auto_cuda_choice[index] = result["choice"]
    return result


def _time_backend(backend: str, dev: torch.device, numel: int, repeat: int) -> float:
    """Median ms of one SAM perturbation + SGD restore on ``backend`` (see ``tune_backend``)."""
    perturb = implementation("sam_perturb_", dev, backend)
    restore = implementation("sam_restore_sgd_", dev, backend)
    n_tensors = 100
    size = max(1, numel // n_tensors)
    sizes = [size + 17 * (i % 7) for i in range(n_tensors)]  # uneven, like real layers

    def values(n, scale):  # deterministic, RNG-free, bounded
        return (torch.arange(n, device=dev, dtype=torch.float32) % 97 - 48) * scale

    p = [values(n, 1e-2) for n in sizes]
    g = [values(n, 1e-3) for n in sizes]
    b = [torch.empty(n, device=dev) for n in sizes]
    m = [torch.zeros(n, device=dev) for n in sizes]

    def run():
        perturb(p, g, b, None, 0.05, 1e-12, False, 0.0)
        restore(p, g, b, m, 0.1, 0.9, 0.0, False, 0.0, False)

    run()
    torch.cuda.synchronize(dev)
    times = []
    for _ in range(max(1, repeat)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del p, g, b, m
    return sorted(times)[len(times) // 2]


# --- op lookup ------------------------------------------------------------------------------
# Every op is named by the op table (samkernels.ops._spec).  Each backend finds its implementation
# by that name: the reference through the table's ``reference`` field, the compiled kernels as
# ``torch.ops.samkernels.<name>``, Triton as ``samkernels.triton.<name>``.  The table and the
# packages that hold implementations are imported on first use, never here: samkernels.ops
# imports this module.
def _reference_impl(name: str) -> Callable:
    from samkernels.ops._spec import OPS
    if name not in OPS:
        raise AttributeError(name)
    module, function = OPS[name].reference.split(":")
    return getattr(importlib.import_module(module), function)


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
# Python implementations that stand in for a backend's own lookup (``register``).
_REGISTERED: Dict[Tuple[str, str], Callable] = {}
_warned_missing: set = set()


def register(name: str, *backends: str) -> Callable[[Callable], Callable]:
    """Decorator: the function implements op ``name`` on ``backends`` (for an op whose backends
    need Python around their kernels, e.g. the BiSAM loss: a C++ op in eager CPU mode, the fused
    row forward plus a PyTorch reduction elsewhere)."""
    for b in backends:
        _check(b)

    def add(fn: Callable) -> Callable:
        for b in backends:
            _REGISTERED[(name, b)] = fn
        return fn
    return add


def _lookup(backend: str, name: str) -> Callable:
    return _REGISTERED.get((name, backend)) or _LOOKUP[backend](name)


def implementation(name: str, device: torch.device, backend: Optional[str] = None) -> Callable:
    """The callable implementing op ``name`` for ``device`` (``backend`` overrides the choice).

    Under ``auto``, an op the chosen backend lacks (e.g. a phase with only a CPU kernel so far, on
    CUDA tensors) runs on the other GPU backend or the reference, with one warning; a forced
    backend that lacks it raises ``NotImplementedError``."""
    chosen = resolve(device) if backend is None else backend
    try:
        return _REGISTERED.get((name, chosen)) or _LOOKUP[chosen](name)  # _lookup, inlined
    except AttributeError:
        if backend is not None or requested() != "auto":
            raise NotImplementedError(f"op {name!r} has no {chosen!r} implementation") from None
    fallbacks = (["triton"] if chosen == "cuda" and triton_usable(device) else []) + ["reference"]
    for other in fallbacks:
        try:
            impl = _lookup(other, name)
        except AttributeError:
            continue
        if (name, chosen) not in _warned_missing:
            _warned_missing.add((name, chosen))
            warnings.warn(f"samkernels: op {name!r} has no {chosen!r} kernel yet; using {other!r}",
                          RuntimeWarning, stacklevel=3)
        return impl
    raise NotImplementedError(f"op {name!r} has no implementation for {device}")
