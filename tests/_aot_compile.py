"""Worker of tests/test_triton_aot.py: compile recorded Triton launch configurations ahead of time.

    python tests/_aot_compile.py CONFIGS.json RESULTS.json

CONFIGS.json: {"configs": [launch dicts of tests/triton_launches.py], "tasks": [[index, arch,
assemble]], "processes": 2, "interpreter_sizes": {"BLOCK": b, "CHUNK": c}}.  A task with
``assemble`` false runs every stage up to the PTX and not ptxas (the cubin stage, about a third
of a compile's time, is replaced by an empty one).  Runs WITHOUT TRITON_INTERPRET
(the kernels must be real JITFunctions; no GPU is needed: ``triton.compile`` with an explicit
``GPUTarget`` only runs the compiler and its bundled ptxas).  The interpreter's multi-tensor
BLOCK/CHUNK are not the GPU's (see _multi_tensor.py): a configuration recorded with exactly the
interpreter's values of both is compiled with this process's (the GPU) values.
RESULTS.json: one entry per (configuration, arch): ok, assembled, seconds, error, for aligned
multi-tensor kernels whether the PTX has 16-byte vector loads, and the float add/sub/mul
instructions without a rounding modifier (``contractible``: ptxas may fuse those into an fma).
"""
import json
import multiprocessing
import os
import re
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("_aot_compile.py must run without TRITON_INTERPRET=1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import importlib  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from samkernels.triton import _multi_tensor as mt  # noqa: E402
from triton_launches import decode  # noqa: E402

_JOB = {}
_PTX_ONLY = [False]  # this task stops at the PTX (set per task: a pool worker runs one at once)


def _stages_up_to_ptx(add_stages):
    """CUDABackend.add_stages, with the cubin stage (ptxas) made empty while ``_PTX_ONLY``: the
    compile then checks Triton's whole lowering (TTIR, TTGIR, LLVM IR, PTX) and assembles nothing.
    (make_cubin adds no metadata, so the rest of triton.compile is unchanged.)"""
    def wrapped(self, stages, *args, **kwargs):
        add_stages(self, stages, *args, **kwargs)
        if _PTX_ONLY[0]:
            stages["cubin"] = lambda src, metadata: b""
    return wrapped


CUDABackend.add_stages = _stages_up_to_ptx(CUDABackend.add_stages)
# 16-byte global loads (fp32/bf16/fp16 as v4.b32, fp64 as v2.b64), cached (.nc) or not
_VEC16 = ("ld.global.v4.", "ld.global.nc.v4.", "ld.global.v2.b64", "ld.global.nc.v2.b64",
          "ld.global.v2.f64", "ld.global.nc.v2.f64")
# a float add/sub/mul without a rounding modifier, which ptxas may contract into an fma (PTX ISA):
# none may be left where the launch disabled contraction (enable_fp_fusion=False)
_CONTRACTIBLE = re.compile(r"\b(?:add|sub|mul)(?:\.ftz)?(?:\.sat)?\.f(?:16|32|64)\b")


def _source(cfg):
    fn = getattr(importlib.import_module(cfg["module"]), cfg["kernel"])
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{cfg['module']}.{cfg['kernel']} is {type(fn).__name__}, not a "
                        "JITFunction (is TRITON_INTERPRET set?)")
    consts = {tuple(p): decode(v) for p, v in cfg["constexprs"]}
    names = fn.arg_names
    multi = "BLOCK" in names and "CHUNK" in names
    if multi:
        b, c = (names.index("BLOCK"),), (names.index("CHUNK"),)
        interp = _JOB["interpreter_sizes"]
        if consts.get(b) == interp["BLOCK"] and consts.get(c) == interp["CHUNK"]:
            consts[b], consts[c] = mt.BLOCK, mt.CHUNK
    attrs = {tuple(p): v for p, v in cfg["attrs"]}
    aligned = cfg["consts"].get("ALIGNED") is True
    return ASTSource(fn, dict(cfg["signature"]), consts, attrs), multi and aligned


def _message(e):
    """The exception and its causes, each as Triton words it (a CompilationError shows the
    kernel source line; its cause says what is wrong there)."""
    parts = []
    while e is not None and len(parts) < 4:
        parts.append("".join(traceback.format_exception_only(type(e), e)).strip()[-1500:])
        e = e.__cause__ or e.__context__
    return "\n  caused by: ".join(parts)


def _compile(task):
    i, arch, assemble = task
    cfg = _JOB["configs"][i]
    t0 = time.perf_counter()
    out = {"index": i, "arch": arch, "assembled": bool(assemble), "ok": False, "error": None,
           "vec16": None, "contractible": None}
    try:
        src, check_vec = _source(cfg)
        _PTX_ONLY[0] = not assemble
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(cfg["options"]))
        if assemble and not k.asm["cubin"]:
            raise RuntimeError("ptxas produced no cubin")
        ptx = k.asm["ptx"]
        if check_vec:  # full chunks are unmasked and 16-byte aligned: vectorised accesses
            out["vec16"] = any(v in ptx for v in _VEC16)
        out["contractible"] = sorted(set(_CONTRACTIBLE.findall(ptx)))
        out["ok"] = True
    except Exception as e:  # report every failing configuration, not only the first
        out["error"] = _message(e)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def main(cfg_path, out_path):
    with open(cfg_path) as f:
        _JOB.update(json.load(f))
    tasks = [tuple(t) for t in _JOB["tasks"]]
    procs = max(1, min(int(_JOB.get("processes", 2)), len(tasks)))
    t0 = time.perf_counter()
    if procs == 1:
        results = [_compile(t) for t in tasks]
    else:
        # fork: the children inherit the imported triton and samkernels (nothing has run on a
        # device); chunksize 1 balances the uneven compile times
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            results = list(pool.imap_unordered(_compile, tasks, chunksize=1))
    results.sort(key=lambda r: (r["index"], r["arch"]))
    with open(out_path, "w") as f:
        json.dump({"results": results, "wall_s": round(time.perf_counter() - t0, 2),
                   "triton": triton.__version__,
                   "gpu_sizes": {"BLOCK": mt.BLOCK, "CHUNK": mt.CHUNK}}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
