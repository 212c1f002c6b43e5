"""The CUDA sources compile without a GPU: every ``csrc/cuda/*.cu`` with nvcc for sm_90 (to a cubin)
and sm_80 (to PTX), and every torch-facing family file ``csrc/ops/*.cpp`` (CPU kernels + CUDA
glue) with a syntax-only C++ pass as the CUDA build compiles it (``-DSAMKERNELS_WITH_CUDA``,
-Wall -Wextra), each starting from one precompiled header of the torch headers they include.

CI has no GPU and a CPU build of torch, so this is the only place the CUDA code is compiled there.
The flags are setup.py's own (build_flags.py: the C++ standard the installed torch needs, nvcc's
options) plus what torch's cpp_extension adds, so a flag change is tested as it is built.
The ``.cu`` files must be free of torch headers (the CPU torch lacks some of its CUDA headers); the
glue includes only light c10 CUDA headers, whose one missing piece in a CPU torch
(``c10/cuda/impl/cuda_cmake_macros.h``) is supplied as a stub here.  All compilations run at
once (threads driving nvcc / g++ subprocesses; 10-20 s per file), niced and beside the other tests
from collection on (conftest.background_job); a warning in our own sources fails too.  nvcc keeps its PTX (``--keep``), which must be IEEE fp32: no approximate
transcendental, division or sqrt instruction and no denormal flushing (what ``--use_fast_math``
would bring back).  The objects are then linked with a stub that takes the address of every
``launch_*`` function declared in ``csrc/cuda/*.h`` or, next to its caller, in ``csrc/ops/*.cpp``:
a definition whose signature drifted from its declaration (which compiles as a new overload) fails
here instead of at import on a GPU machine.
"""
from __future__ import annotations

import collections
import concurrent.futures
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
GLUES = sorted(glob.glob(os.path.join(CSRC, "ops", "*.cpp")))


def _build_flags():
    # by path: CI runs the tests against the installed wheel with the source tree off sys.path
    spec = importlib.util.spec_from_file_location("samkernels_build_flags",
                                                  os.path.join(ROOT, "build_flags.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_flags = _build_flags()
CXX_STD = build_flags.cxx_std()  # for the torch this test runs with, as setup.py decides it
try:  # what torch's cpp_extension adds to every nvcc call (the __CUDA_NO_HALF* set, ...)
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
except ImportError:  # pragma: no cover - depends on the install
    COMMON_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                         "--expt-relaxed-constexpr"]
# sm_90 (the GPU machines) assembled to a cubin; sm_80 lowered to its PTX, which the IEEE check
# below reads, without ptxas (the same source's second assembly: 15 % of the nvcc time)
NVCC_FLAGS = (build_flags.nvcc_flags(CXX_STD) + list(COMMON_NVCC_FLAGS) +
              ["-gencode", "arch=compute_80,code=compute_80",
               "-gencode", "arch=compute_90,code=sm_90"])
TIMEOUT_S = 900
# A warning that points into our sources, from nvcc ("x.cu(12): warning") or the host compiler
# ("x.cu:12:3: warning").
OWN_WARNING = re.compile(r"csrc[/\\][^\s:(]*[(:]\d+.*warning", re.IGNORECASE)


def _nvcc():
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc"),
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                  "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


NVCC = _nvcc()


def _glue_flags(tmp):
    """(g++ and the flags of the CUDA build, which every ops file's pass and the precompiled
    header share; None) or (None, the reason it cannot run here)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None, "no C++ compiler"
    try:
        from torch.utils import cpp_extension
        includes = cpp_extension.include_paths()
    except Exception as exc:  # pragma: no cover - depends on the install
        return None, f"torch include paths unavailable: {exc}"
    # nvcc may be a link or wrapper outside the toolkit (e.g. /usr/local/bin/nvcc)
    homes = [os.path.dirname(os.path.dirname(os.path.realpath(NVCC))),
             os.path.dirname(os.path.dirname(NVCC)), os.environ.get("CUDA_HOME", ""),
             "/usr/local/cuda"]
    cuda_inc = next((os.path.join(h, "include") for h in homes
                     if h and os.path.isfile(os.path.join(h, "include", "cuda_runtime.h"))), None)
    if cuda_inc is None:
        return None, "CUDA headers (cuda_runtime.h) not found"
    if not any(os.path.isfile(os.path.join(d, "c10", "cuda", "CUDAStream.h")) for d in includes):
        return None, "this torch ships no c10/cuda headers"
    stub = os.path.join(tmp, "stub", "c10", "cuda", "impl")
    os.makedirs(stub, exist_ok=True)
    macros = os.path.join(stub, "cuda_cmake_macros.h")
    with open(macros, "w") as f:  # generated by CMake in CUDA builds of torch only
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [cxx] + build_flags.cxx_flags(CXX_STD) + [build_flags.CUDA_DEFINE, "-Wall", "-Wextra",
                                                     "-I", os.path.join(tmp, "stub"), "-I", CSRC,
                                                     "-I", cuda_inc]
    for d in includes:  # torch's own headers: their warnings are not ours
        cmd += ["-isystem", d]
    return cmd, None


# Every torch header the ops files include (the CUDA glue's c10/cuda ones among them); our own
# headers are not in it, so each file's pass still parses and checks all of our code.
PCH_HEADERS = ["torch/library.h", "torch/autograd.h", "ATen/ATen.h", "ATen/Dispatch.h",
               "ATen/MemoryOverlap.h", "ATen/OpMathType.h", "ATen/Parallel.h",
               "c10/cuda/CUDAGuard.h", "c10/cuda/CUDAStream.h"]


def _pch_command(flags, pch):
    """The g++ call that writes ``pch`` (PCH_HEADERS) precompiled, with the passes' ``flags``."""
    os.makedirs(os.path.dirname(pch), exist_ok=True)
    with open(pch, "w") as f:
        f.write("#pragma once\n" + "".join(f"#include <{h}>\n" for h in PCH_HEADERS))
    return flags + ["-x", "c++-header", pch, "-o", pch + ".gch"]


def _glue_command(flags, pch, glue):
    """g++ -fsyntax-only for one ops file as the CUDA build sees it, starting from the precompiled
    torch headers (-Werror=invalid-pch: a PCH g++ would not use fails instead of silently parsing
    them again)."""
    return flags + ["-include", pch, "-Werror=invalid-pch", "-fsyntax-only", glue]


def _object(tmp, cu):
    return os.path.join(tmp, os.path.basename(cu) + ".o")


def _keep_dir(tmp, cu):  # nvcc's intermediates of one file, the PTX of each arch among them
    return os.path.join(tmp, "keep", os.path.basename(cu))


def _run(cmd, cwd, procs=None):
    """(rc, output, seconds) of one niced compile; ``procs`` collects it for kill()."""
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=conftest.niced)
        if procs is not None:
            procs.append(proc)
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = -1
        log.seek(0)
        out = log.read() if rc != -1 else f"timed out after {TIMEOUT_S} s\n{log.read()}"
    return rc, out, time.monotonic() - start


class _Compiles:
    """Every compile of this module at once (threads driving nvcc / g++ subprocesses), started
    when collection selects one of its tests (conftest.background_job): they run while the
    other tests do.  ``wait()`` maps file -> (rc, output, seconds)."""

    def __init__(self, workdir):
        self.tmp, self.procs, self.results = str(workdir), [], {}
        self.thread = threading.Thread(target=self._compile_all, daemon=True)
        if NVCC is not None:
            self.thread.start()

    def _compile_all(self):
        tmp, jobs, results = self.tmp, {}, {}
        for path in CU_FILES:
            obj, keep = _object(tmp, path), _keep_dir(tmp, path)
            os.makedirs(keep, exist_ok=True)
            jobs[path] = [NVCC] + NVCC_FLAGS + ["--keep", "--keep-dir", keep, "-I", CSRC, "-c",
                                                path, "-o", obj]
        flags, glue_skip = _glue_flags(tmp)
        pch_path = os.path.join(tmp, "pch", "torch_headers.h")  # torch's headers, parsed once
        glues = {} if flags is None else {g: _glue_command(flags, pch_path, g) for g in GLUES}
        if flags is None:
            results.update({g: (None, glue_skip, 0.0) for g in GLUES})
        workers = max(1, min(len(jobs) + len(glues), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            # the precompiled header first; the file passes queue behind the nvcc jobs, so none
            # waits in a worker for it
            pch = pool.submit(_run, _pch_command(flags, pch_path), ROOT,
                              self.procs) if glues else None

            def glue_pass(cmd):
                rc, out, secs = pch.result()
                if rc != 0:
                    return rc, f"the precompiled torch header failed:\n{out}", secs
                return _run(cmd, ROOT, self.procs)

            futures = {pool.submit(_run, cmd, ROOT, self.procs): path
                       for path, cmd in jobs.items()}
            futures.update({pool.submit(glue_pass, cmd): path for path, cmd in glues.items()})
            for fut in concurrent.futures.as_completed(futures):
                results[futures[fut]] = fut.result()
        self.results = results

    def wait(self):
        if self.thread.is_alive() or self.thread.ident is not None:
            self.thread.join()
            for proc in self.procs:  # the tests wait now: full priority back
                try:
                    os.setpriority(os.PRIO_PROCESS, proc.pid, 0)
                except OSError:
                    pass
        for path, (rc, _, secs) in sorted(self.results.items()):
            print(f"[compile] {os.path.relpath(path, ROOT)}: rc={rc} {secs:.1f} s",
                  file=sys.stderr)
        return self.results

    def kill(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()


conftest.background_job("cuda_compile")(_Compiles)


@pytest.fixture(scope="module")
def compile_job():
    return conftest.job("cuda_compile")


@pytest.fixture(scope="module")
def nvcc_tmp(compile_job):
    return compile_job.tmp


@pytest.fixture(scope="module")
def compiled(compile_job):
    """Every compile's result, file -> (rc, output, seconds)."""
    return compile_job.wait()


def _check(result, path):
    rc, out, secs = result
    rel = os.path.relpath(path, ROOT)
    assert rc == 0, f"{rel} failed to compile ({secs:.1f} s):\n{out}"
    own = [line for line in out.splitlines() if OWN_WARNING.search(line)]
    assert not own, f"{rel} compiles with warnings in our sources:\n{out}"


# tests/install_and_test.sh (the CI command) sets SAMKERNELS_REQUIRE_NVCC=1: there a missing nvcc
# is a failure, not a silent skip, so CI always compiles the CUDA sources.
REQUIRE_NVCC = os.environ.get("SAMKERNELS_REQUIRE_NVCC", "0") == "1"
needs_nvcc = pytest.mark.skipif(NVCC is None and not REQUIRE_NVCC,
                                reason="nvcc not found (set NVCC or CUDA_HOME)")


def test_nvcc_found_when_required():
    if REQUIRE_NVCC:
        assert NVCC is not None, ("SAMKERNELS_REQUIRE_NVCC=1 but nvcc was not found (set NVCC or "
                                  "CUDA_HOME, or SAMKERNELS_REQUIRE_NVCC=0 to skip the CUDA checks)")


@needs_nvcc
@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: os.path.basename(p))
def test_cu_compiles(compiled, path):
    _check(compiled[path], path)


@needs_nvcc
@pytest.mark.parametrize("glue", GLUES, ids=lambda p: os.path.basename(p))
def test_glue_syntax(compiled, glue):
    rc, out, _ = compiled[glue]
    if rc is None:
        pytest.skip(out)
    _check(compiled[glue], glue)


# PTX opcodes that --use_fast_math (or an intrinsic such as __logf, __sinf, __fdividef, __expf)
# brings: approximate lg2/sin/cos/sqrt/rsqrt/rcp/div, div.full, and .ftz (denormals flushed) on
# fp32 arithmetic.  Two approximate instructions are part of nvcc's precise maths and are
# allowed: ex2.approx.ftz.f32 inside expf (on an argument reduced with fma, then scaled by 2^n
# with a plain mul: 2 ulp, denormal results kept; __expf is ex2.approx.f32 on x log2(e)) and the
# rcp.approx.ftz.f64 seed that fp64 division / log refine with Newton steps.
PRECISE_APPROX = {"ex2.approx.ftz.f32", "rcp.approx.ftz.f64"}
PTX_OPCODE = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+)\s")
PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)")
PTX_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')


def _approximate_ptx(ptx_text):
    """{opcode: [source locations]} of the non-IEEE fp instructions in one PTX file."""
    files, where, bad = {}, ("?", "?"), collections.defaultdict(list)
    for line in ptx_text.splitlines():
        m = PTX_FILE.match(line)  # the .file table comes after the code
        if m:
            files[m.group(1)] = os.path.basename(m.group(2))
            continue
        m = PTX_LOC.match(line)
        if m:
            where = m.groups()
            continue
        m = PTX_OPCODE.match(line)
        if m is None:
            continue
        op = m.group(1)
        parts = op.split(".")
        if op not in PRECISE_APPROX and ("approx" in parts or "ftz" in parts or "full" in parts):
            bad[op].append(where)
    return {op: [f"{files.get(f, f)}:{n}" for f, n in locs] for op, locs in bad.items()}


@needs_nvcc
@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: os.path.basename(p))
def test_ptx_is_ieee(compiled, nvcc_tmp, path):
    """What setup.py builds keeps IEEE fp32: no fast-math instruction in our kernels' PTX."""
    if compiled[path][0] != 0:
        pytest.skip("does not compile (test_cu_compiles reports it)")
    ptx_files = sorted(glob.glob(os.path.join(_keep_dir(nvcc_tmp, path), "*.ptx")))
    assert len(ptx_files) == 2, f"expected the sm_80 and sm_90 PTX from --keep, got {ptx_files}"
    report = []
    for ptx in ptx_files:
        with open(ptx) as f:
            bad = _approximate_ptx(f.read())
        for op, locs in sorted(bad.items()):
            first = ", ".join(sorted(set(locs))[:5])
            report.append(f"{os.path.basename(ptx)}: {op} x{len(locs)} (at {first})")
    assert not report, ("approximate / flush-to-zero fp instructions (fast math?) in "
                        f"{os.path.basename(path)} built with {NVCC_FLAGS}:\n" + "\n".join(report))


# CUDA's approximate fp32 intrinsics (the __fadd_rn family is IEEE rounding, not listed)
FAST_INTRINSIC = re.compile(r"\b__(?:expf|exp10f|logf|log2f|log10f|powf|sinf|cosf|sincosf|tanf|"
                            r"tanhf|fdividef)\s*\(")


# the per-element maths nvcc compiles into the kernels (shared with the CPU build)
MATH_HEADERS = sorted(glob.glob(os.path.join(CSRC, "math", "*.h")))


@pytest.mark.parametrize("path", CU_FILES + sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cuh")))
                         + [os.path.join(CSRC, "philox.h")] + MATH_HEADERS,
                         ids=lambda p: os.path.relpath(p, CSRC))
def test_no_fast_math_intrinsics(path):
    # the PTX check cannot tell __expf from exp2f; the sources name none of these approximations
    with open(path) as f:
        src = re.sub(r"//[^\n]*", "", f.read())
    found = sorted(set(FAST_INTRINSIC.findall(src)))
    assert not found, f"{os.path.basename(path)} uses fast-math intrinsics: {found}"


HEADERS = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.h")))
LAUNCH_DECL = re.compile(r"^cudaError_t\s+(launch_\w+)\s*\(", re.MULTILINE)
# a whole declaration (no body) at the start of a line of an ops file, in namespace cuda
LAUNCH_PROTO = re.compile(r"^cudaError_t\s+(launch_\w+)\s*\([^;{}]*\)\s*;", re.MULTILINE)


def _launch_declarations():
    """(source, function name, declaration or None) of every launch function declared in the
    torch-free headers (None: the stub includes the header) or in the ops files (the stub repeats
    the declaration: the file itself needs torch)."""
    out = []
    for h in HEADERS:
        with open(h) as f:
            out += [(os.path.basename(h), name, None) for name in LAUNCH_DECL.findall(f.read())]
    for path in GLUES:
        with open(path) as f:
            src = f.read()
        out += [(os.path.relpath(path, CSRC), m.group(1), m.group(0))
                for m in LAUNCH_PROTO.finditer(src)]
        # a launch declaration the pattern missed would escape the link check
        assert len(LAUNCH_DECL.findall(src)) == len(LAUNCH_PROTO.findall(src)), path
    return out


def test_every_launch_is_declared():
    """Each launch function a .cu defines is declared where the link check below finds it."""
    defined = set()
    for path in CU_FILES:
        with open(path) as f:
            defined |= set(LAUNCH_DECL.findall(f.read()))
    declared = [name for _, name, _ in _launch_declarations()]
    assert sorted(declared) == sorted(defined), (
        f"defined in csrc/cuda/*.cu but not declared: {sorted(defined - set(declared))}; "
        f"declared but not defined: {sorted(set(declared) - defined)}; declared twice: "
        f"{sorted(n for n in set(declared) if declared.count(n) > 1)}")


@needs_nvcc
def test_launch_functions_link(compiled, nvcc_tmp):
    """Every declared launch function has a definition with the declared signature."""
    failed = [os.path.basename(p) for p in CU_FILES if compiled[p][0] != 0]
    if failed:
        pytest.skip(f"not every .cu compiled: {failed}")
    decls = _launch_declarations()
    assert decls, "no launch_* declarations found in csrc/cuda/*.h or csrc/ops/*.cpp"
    stub = os.path.join(nvcc_tmp, "link_stub.cpp")
    with open(stub, "w") as f:
        f.write('#include "cuda/launch.h"\n')
        for h in sorted({h for h, _, decl in decls if decl is None}):
            f.write(f'#include "cuda/{h}"\n')
        f.write("namespace samkernels {\nnamespace cuda {\n")
        for src, _, decl in decls:
            if decl is not None:
                f.write(f"// {src}\n{decl}\n")
        f.write("}  // namespace cuda\n}  // namespace samkernels\n")
        f.write("int main() {\n  const void* volatile sink = nullptr;\n")
        for _, name, _ in decls:  # the address: an undefined (or overloaded-away) symbol fails
            f.write(f"  sink = reinterpret_cast<const void*>(&samkernels::cuda::{name});\n")
        f.write("  return sink == nullptr;\n}\n")
    exe = os.path.join(nvcc_tmp, "link_stub")
    cmd = [NVCC, f"-std={CXX_STD}", "-I", CSRC, stub] + [_object(nvcc_tmp, p) for p in CU_FILES] + \
        ["-o", exe]
    rc, out, secs = _run(cmd, ROOT)
    assert rc == 0, f"linking the launch functions failed ({secs:.1f} s):\n{out}"


# csrc/cuda/glue.h is the one torch-facing header there (the shared CUDA glue of csrc/ops/*.cpp)
TORCH_FREE = CU_FILES + sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cuh"))) + [
    h for h in HEADERS if os.path.basename(h) != "glue.h"] + MATH_HEADERS + [
    os.path.join(CSRC, "philox.h")]


@pytest.mark.parametrize("path", TORCH_FREE, ids=lambda p: os.path.relpath(p, CSRC))
def test_cu_is_torch_free(path):
    # The CPU build of torch lacks some of its CUDA headers: .cu files including them do not
    # compile against the CPU torch; csrc/ops/*.cpp (with cuda/glue.h) hold everything torch.
    with open(path) as f:
        src = f.read()
    bad = re.findall(r'#\s*include\s*[<"]((?:torch|ATen|c10)/[^>"]+)[>"]', src)
    assert not bad, f"{os.path.basename(path)} includes torch headers: {bad}"
