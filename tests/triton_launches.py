"""Record the Triton kernel launches of samkernels.triton, typed as the GPU JIT would type them.

Used by tests/test_triton_aot.py.  Under TRITON_INTERPRET=1 every ``@triton.jit`` object is an
``InterpretedFunction``; ``recording()`` shadows the ``run`` method of each *kernel* (a jit
function that some module of the package launches as ``name[grid](...)``) so that a launch is
bound and specialised by Triton's own JIT binder for an NVIDIA target -- the code a GPU run goes
through before it compiles -- instead of by the interpreter, which keeps Python floats as doubles
and never specialises.  Each launch becomes a JSON-able dict:

  module, kernel     where the kernel lives (for the compiling worker to import it)
  signature          {param: '*fp32' | 'i32' | 'i64' | 'fp32' | 'constexpr' ...}
  constexprs, attrs  Triton's ASTSource arguments, paths as lists and dtypes as {"dtype": name}
  options            the launch's compile options (num_warps ...)
  consts             {constexpr param: value} (dtypes as their names), for coverage checks
  specialized        the params in consts that Triton made constexprs by value (an int 1)
  floats             the non-constexpr params that received a Python float

Nothing here names a kernel or a parameter: kernels and signatures are read from the package, so
the recording follows any change of the kernels' signatures.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import json
import os
import pkgutil
from typing import Dict, List, Tuple

import triton
import triton.language as tl

PACKAGE = "samkernels.triton"


def triton_modules():
    pkg = importlib.import_module(PACKAGE)
    mods = [pkg] + [importlib.import_module(f"{PACKAGE}.{m.name}")
                    for m in pkgutil.iter_modules(pkg.__path__)]
    return mods


def _is_jit(obj) -> bool:
    from triton.runtime.jit import JITFunction
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        InterpretedFunction = ()
    return isinstance(obj, (JITFunction, InterpretedFunction))


def jit_functions() -> Dict[Tuple[str, str], object]:
    """{(module, name): jit object} of every @triton.jit function defined in the package."""
    out = {}
    for mod in triton_modules():
        for name, obj in vars(mod).items():
            if _is_jit(obj) and obj.fn.__module__ == mod.__name__:
                out[(mod.__name__, obj.fn.__name__)] = obj
    return out


def kernels() -> Dict[Tuple[str, str], object]:
    """The jit functions the package launches: those named in host code (a module-level function
    that is not itself a jit function, e.g. ``NAME[grid](...)`` or ``_multi_tensor.launch(op,
    NAME, ...)``); the others are device functions, compiled as part of the kernels that call
    them."""
    jits = jit_functions()
    launched = set()
    for mod in triton_modules():
        tree = ast.parse(inspect.getsource(mod))
        host = [f for f in tree.body if isinstance(f, ast.FunctionDef)
                and not any("jit" in ast.unparse(d) for d in f.decorator_list)]
        for node in (n for f in host for n in ast.walk(f)):
            if isinstance(node, ast.Name):
                obj = getattr(mod, node.id, None)
                if obj is not None and _is_jit(obj):
                    launched.add((obj.fn.__module__, obj.fn.__name__))
    return {k: v for k, v in jits.items() if k in launched}


def gpu_backend(capability: int = 90):
    """Triton's NVIDIA compiler backend (None if this triton has no nvidia backend)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        return None
    return make_backend(GPUTarget("cuda", capability, 32))


def _encode(v):
    if isinstance(v, tl.dtype):
        return {"dtype": str(v)}
    if isinstance(v, tl.constexpr):
        return _encode(v.value)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot record constexpr value {v!r} of type {type(v).__name__}")


def decode(v):
    """Inverse of the recorder's value encoding (a dtype comes back as a tl.dtype)."""
    if isinstance(v, dict) and set(v) == {"dtype"}:
        return tl.dtype(v["dtype"])
    return v


class _Spec:
    """Triton's JIT binder of one kernel, built for an NVIDIA backend (what ``JITFunction.run``
    calls on a GPU before it compiles)."""

    def __init__(self, fn, backend):
        from triton.runtime.jit import JITFunction, create_function_from_signature
        self.jf = JITFunction(fn.fn, **getattr(fn, "kwargs", {}))
        self.backend = backend
        self.binder = create_function_from_signature(self.jf.signature, self.jf.params, backend)
        self.names = [p.name for p in self.jf.params]

    def launch(self, module, args, kwargs) -> dict:
        bound, spec, opts = self.binder(*args, **kwargs)
        # _pack_args is what JITFunction.run hands to ASTSource (Triton 3.6 and 3.9 alike)
        _, signature, constexprs, attrs = self.jf._pack_args(self.backend, kwargs, bound, spec,
                                                             opts)
        params = {p.name: p for p in self.jf.params}
        consts = {n: _encode(bound[n]) for n in self.names if params[n].is_constexpr}
        # specialisation may turn an int argument into a constexpr (value 1): keep those too
        specialized = [n for n in self.names if signature[n] == "constexpr" and n not in consts]
        consts.update({n: _encode(bound[n]) for n in specialized})
        return {
            "module": module,
            "kernel": self.jf.fn.__name__,
            "signature": dict(signature),
            "constexprs": [[list(k), _encode(v)] for k, v in constexprs.items()],
            "attrs": [[list(k), v] for k, v in attrs.items()],
            "options": {k: v for k, v in kwargs.items() if k not in params},
            "consts": consts,
            "specialized": specialized,
            "floats": [n for n in self.names
                       if not params[n].is_constexpr and isinstance(bound[n], float)],
        }


class Recorder:
    def __init__(self):
        self.launches: List[dict] = []

    def unique(self) -> List[dict]:
        """The distinct configurations (one compile each), in first-launch order."""
        seen, out = set(), []
        for r in self.launches:
            key = config_key(r)
            if key not in seen:
                seen.add(key)
                out.append(r)
        return out


def config_key(r: dict) -> str:
    return json.dumps([r["module"], r["kernel"], r["signature"], r["constexprs"], r["attrs"],
                       r["options"]], sort_keys=True)


@contextlib.contextmanager
def recording(execute: bool = False):
    """Record every kernel launch of the package while the block runs.

    ``execute=False`` (default) records without running the interpreter: the ops never read a
    kernel's output on the host before their next launch, so the launches are the same, the
    matrix runs in seconds, and an interpreter fault cannot hide a configuration."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("recording() needs TRITON_INTERPRET=1 (set before triton is imported)")
    backend = gpu_backend()
    if backend is None:
        raise RuntimeError("triton has no nvidia backend")
    rec = Recorder()
    patched = []
    for (module, _), fn in kernels().items():
        spec = _Spec(fn, backend)
        original = fn.run

        def run(*args, grid, warmup, __spec=spec, __module=module, __orig=original, **kwargs):
            rec.launches.append(__spec.launch(__module, args, kwargs))
            if execute:
                return __orig(*args, grid=grid, warmup=warmup, **kwargs)
            return None

        fn.run = run  # instance attribute: shadows the method KernelInterface.__getitem__ calls
        patched.append(fn)
    try:
        yield rec
    finally:
        for fn in patched:
            del fn.run
