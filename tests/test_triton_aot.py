"""The Triton GPU code path, checked without a GPU: every configuration the ops launch, compiled
ahead of time for sm_90 (the GPU machines' H100/H200), and each kernel also for sm_80.

The interpreter (how every other Triton test runs here) never runs Triton's compiler, and types
arguments differently from the GPU JIT (it keeps Python floats as doubles).  So:

1. The public Triton ops -- every ``samkernels.triton`` phase and the BiSAM loss through the
   dispatcher -- are driven over a matrix of dtypes (fp32 / bf16 / fp16 / fp64 parameters, fp32
   or low-precision state, mixed lists, a misaligned tensor), with and without ``found_inf`` and
   through every option that selects a constexpr branch.  tests/triton_launches.py records each
   launch as Triton's own JIT binder would specialise it for an NVIDIA GPU (argument types, 16-byte
   divisibility, int specialisation, constexprs, num_warps).  Nothing here lists a kernel's
   parameters, so kernel signature changes are followed automatically.
2. A subprocess without TRITON_INTERPRET compiles each distinct configuration with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``, and the first
   configuration of each kernel also for ``GPUTarget("cuda", 80, 32)`` (what differs between the
   two architectures is the instructions a kernel's code selects, which one configuration per
   kernel exercises; the whole matrix on both doubled this check's ~380 CPU-seconds).  Every
   sm_90 configuration is lowered to PTX; ptxas assembles those of ``assembled``: per kernel, a
   set that shows every element type and both values of every constexpr switch (ptxas is about
   a third of a compile's time, and the others have no instruction kind these do not)
   (tests/_aot_compile.py,
   2 niced processes, started when collection selects this module: it runs beside the other
   tests), with the GPU's multi-tensor BLOCK/CHUNK, and checks that the full chunks of the
   aligned multi-tensor kernels issue 16-byte vector loads, and that no kernel's PTX has a
   float add/sub/mul without its rounding (.rn), which ptxas could contract into an fma (the
   launches disable contraction: a GPU rounds as the interpreter).

Plus: every kernel was launched and every constexpr bool took both values (coverage), and no launch
passes a Python float (Triton types it fp32 on a GPU: an fp64 hyper-parameter would lose bits).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

import samkernels  # noqa: E402
import samkernels.triton as T  # noqa: E402
from samkernels.ops._spec import PHASES  # noqa: E402
from samkernels.triton import _multi_tensor as mt  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import conftest  # noqa: E402
import triton_launches as TL  # noqa: E402
from helpers import op_args  # noqa: E402
from oracles import CASES, case  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the launch recording needs the Triton interpreter")

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
ARCH, EXTRA_ARCH = 90, 80  # every configuration / the first one of each kernel
PROCESSES = 2
HERE = pathlib.Path(__file__).resolve().parent

# Constexpr bools (and 0/1 ints) that need not take both values, with the reason.  (None so far.)
BOOL_EXCEPTIONS = {}
# Kernels exempt from the 16-byte vector-load check when every list is 16-bit: their Philox
# [BLOCK/4, 4] tiles give a thread one row of 4 contiguous elements, 8 bytes of bf16/fp16.
VEC16_EXCEPTIONS = {("samkernels.triton.bsam", "_noise_kernel"),
                    ("samkernels.triton.vi", "_noise_kernel"),
                    ("samkernels.triton.vi", "_mfvi_kernel"),
                    ("samkernels.triton.ebisam", "_ebisam_kernel")}


# --- the matrix ----------------------------------------------------------------------------------
# Lists in op_args' form (tests/helpers.py): one (shape, parameter dtype[, layout]) per tensor, the
# state lists in the opmath dtype (what the optimizers hold: fp32 state for bf16/fp16 weights).
DTYPE_CASES = {
    "fp32": [((5,), F32)],
    "bf16": [((5,), BF16)],
    "fp16": [((5,), F16)],
    "fp64": [((5,), F64)],
    "mixed": [((5,), F32), ((8,), BF16), ((11,), F64), ((14,), F16)],  # a launch per dtype group
}
COMMON_CASES = ("fp32", "bf16", "fp64")  # fp16 differs from bf16 only in its conversions
MISALIGNED = [((5,), F32, "M")]  # one element in: a 4-byte offset, the kernels' ALIGNED=False


def _flag(on):
    return torch.zeros(1) if on else None


def _counter():
    """A device step counter 8 bytes into its storage: the kernels load it without an alignment
    specialisation, so it compiles nothing that the plan's own zero (aligned) did not."""
    return torch.full((3,), 2, dtype=torch.int64)[1:2]


def _launch(name, values, spec, flag, counter=False):
    """Op ``name`` of the table through samkernels.triton on ``spec``'s lists, every other
    argument from ``values`` (a case of tests/oracles.py), found_inf when the op takes it, and
    its step tensors (device_step, debias_step: ``_counter``) when ``counter``."""
    op = PHASES[name]
    args = op_args(op, values, spec)
    args += [_flag(flag)] if op.takes_found_inf else []
    getattr(T, name)(*args, *([_counter() for _ in op.step_tensors] if counter else []))


def drive_multi_tensor():
    """Every multi-tensor op of the table (tests/oracles.py CASES): the base case, which selects
    the most code, in every dtype case, with and without the device skip flag in the common ones
    (the flag's skip branch comes on top of the normal one); each variant (another code path) in
    fp32, with the flag; the base case on a misaligned tensor; the base case with step counters
    where the op takes them (the same kernels: no configuration of their own)."""
    for name, op in PHASES.items():
        if not op.multi_tensor:
            continue
        flags = (True, False) if op.takes_found_inf else (False,)
        for dtypes, spec in DTYPE_CASES.items():
            for f in (flags if dtypes in COMMON_CASES else flags[:1]):
                _launch(name, case(name), spec, f)
        for i in range(1, len(CASES[name])):
            _launch(name, case(name, i), DTYPE_CASES["fp32"], flags[0])
        _launch(name, case(name), MISALIGNED, flags[0])
        if op.takes_device_step:
            _launch(name, case(name), DTYPE_CASES["fp32"], flags[0], counter=True)


def drive_philox_probe():
    for dt in (F32, F64, BF16, F16):
        T.philox_probe(1234, 5, 3, 10, dtype=dt)


def _loss(K, dtype, phi="neglog", mu=None, grad=True, rows=2, stride_pad=0):
    x = torch.zeros(rows, K + stride_pad, dtype=dtype)[:, :K]
    target = torch.zeros(rows, dtype=torch.int64)
    target[-1] = -100
    with samkernels.use_backend("triton"):
        if grad:
            samkernels.bisam_loss(x.requires_grad_(True), target, mu=mu, phi=phi)
        else:
            with torch.no_grad():
                samkernels.bisam_loss(x, target, mu=mu, phi=phi)


def drive_bisam_loss():
    from samkernels.triton import bisam_loss as TB
    wide = TB.MAX_BLOCK + 1  # rows wider than one block: the two-loop kernel
    for dt in (F32, F64, BF16, F16):
        online_mu = 2 * (500.0 if dt == F64 else TB.FIXED_SHIFT_MAX_MU)  # past the fixed shift
        for phi in ("neglog", "tanh"):
            _loss(37, dt, phi)  # one block
            _loss(wide, dt, phi)  # two loops, fixed shift
        _loss(37, dt, grad=False)
        if dt in (F32, F64):  # bf16/fp16 only differ from fp32 in the loads and stores
            _loss(wide, dt, grad=False)
        _loss(wide, dt, mu=online_mu)  # two loops, online max
    # block sizes and int specialisations the GPU picks for other widths (fp32)
    _loss(1, F32)  # K = row stride = 1: Triton makes both constexprs
    _loss(1024, F32)  # 16-divisible K and stride
    _loss(1024, F32, stride_pad=3)  # strided rows
    _loss(TB.MAX_BLOCK // 2 + 1, F32)  # the widest single block (16 warps)
    _loss(wide, F32, phi="tanh", mu=2 * TB.FIXED_SHIFT_MAX_MU, grad=False)


def features(cfg):
    """What selects a configuration's instructions beyond its kernel: its element types (typed
    pointers and dtype constexprs) and the value of each constexpr switch."""
    f = {("dtype", v["dtype"]) for v in cfg["consts"].values()
         if isinstance(v, dict) and "dtype" in v}
    f |= {("dtype", t[1:]) for t in cfg["signature"].values() if t.startswith("*")}
    return f | {(name, v) for name, v in cfg["consts"].items() if isinstance(v, bool)}


def by_kernel(configs):
    """{(module, kernel): the indices of its configurations, in recording order}."""
    out = {}
    for i, cfg in enumerate(configs):
        out.setdefault((cfg["module"], cfg["kernel"]), []).append(i)
    return out


def assembled(configs):
    """The indices of the sm_90 configurations ptxas assembles: per kernel, a few that together
    show every feature (``features``) any of its configurations has, chosen greedily (the one
    adding most, the first on ties).  Every configuration is lowered to PTX; assembling all of
    them would add about a third of each compile's time for ptxas runs on instructions these
    already assemble."""
    chosen = set()
    for idx in by_kernel(configs).values():
        need = set().union(*(features(configs[i]) for i in idx))
        while need:
            best = max(idx, key=lambda i: len(features(configs[i]) & need))
            chosen.add(best)
            need -= features(configs[best])
    return chosen


class _Compile(conftest.ProcessJob):
    """The recording and, in a subprocess without TRITON_INTERPRET, the compile of every distinct
    configuration with a cold cache (a real compile) of the very samkernels that was recorded.
    Started when collection selects a test of this module (conftest.background_job): the compile
    runs while the other tests do."""

    def __init__(self, workdir):
        self.skip = None
        if os.environ.get("TRITON_INTERPRET") != "1" or TL.gpu_backend() is None:
            self.skip = "the recording needs the interpreter and triton's nvidia backend"
            return
        t0 = time.perf_counter()
        with TL.recording() as rec:
            drive_multi_tensor()
            drive_philox_probe()
            drive_bisam_loss()
        rec.seconds = time.perf_counter() - t0
        self.launches, self.configs, self.workdir = rec, rec.unique(), workdir
        self.assembled = assembled(self.configs)
        tasks = [[i, ARCH, i in self.assembled] for i in range(len(self.configs))] + \
            [[idx[0], EXTRA_ARCH, True] for idx in by_kernel(self.configs).values()]
        self.job = {"configs": self.configs, "tasks": tasks, "processes": PROCESSES,
                    "interpreter_sizes": {"BLOCK": mt.BLOCK, "CHUNK": mt.CHUNK}}
        (workdir / "configs.json").write_text(json.dumps(self.job))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = str(pathlib.Path(samkernels.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
        env["TRITON_CACHE_DIR"] = str(workdir / "cache")
        self.t0 = time.perf_counter()
        self.start([sys.executable, str(HERE / "_aot_compile.py"), str(workdir / "configs.json"),
                    str(workdir / "results.json")], workdir, env=env, preexec_fn=conftest.niced)

    def wait(self):
        """(the worker's CompletedProcess, seconds since the start)."""
        return self.finish(timeout=1500), time.perf_counter() - self.t0


conftest.background_job("triton_aot")(_Compile)


@pytest.fixture(scope="module")
def compile_job():
    handle = conftest.job("triton_aot")
    if handle.skip:
        pytest.skip(handle.skip)
    return handle


@pytest.fixture(scope="module")
def launches(compile_job):
    return compile_job.launches


def _describe(cfg):
    consts = ", ".join(f"{k}={v['dtype'] if isinstance(v, dict) else v}"
                       for k, v in cfg["consts"].items())
    sig = ", ".join(f"{k}:{v}" for k, v in cfg["signature"].items() if v != "constexpr")
    return f"{cfg['kernel']} ({cfg['module']}) [{consts}] ({sig}) {cfg['options']}"


def _vec16_exempt(cfg):
    dts = [v["dtype"] for k, v in cfg["consts"].items()
           if isinstance(v, dict) and k.endswith("_DT")]
    return ((cfg["module"], cfg["kernel"]) in VEC16_EXCEPTIONS
            and all(d in ("bf16", "fp16") for d in dts))


# --- (a) every recorded configuration compiles for sm_90, each kernel also for sm_80 ------------
def test_every_launched_configuration_compiles(compile_job):
    configs, launches = compile_job.configs, compile_job.launches
    proc, wall = compile_job.wait()
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = json.loads((compile_job.workdir / "results.json").read_text())
    results = out["results"]
    tasks = compile_job.job["tasks"]
    assert sorted((r["index"], r["arch"]) for r in results) == sorted((i, a) for i, a, _ in tasks)
    assert {r["index"] for r in results if r["arch"] == ARCH} == set(range(len(configs)))
    assert out["gpu_sizes"] != compile_job.job["interpreter_sizes"], \
        "the worker ran in interpreter mode"
    assert {(r["index"], r["arch"]) for r in results if r["assembled"]} == \
        {(i, a) for i, a, full in tasks if full}
    kernels = sum(1 for _, a, _ in tasks if a == EXTRA_ARCH)
    print(f"\n{len(configs)} configurations ({len(launches.launches)} launches recorded in "
          f"{launches.seconds:.1f} s) for sm_{ARCH} ({len(compile_job.assembled)} of them "
          f"assembled), the first of each of {kernels} kernels for sm_{EXTRA_ARCH}, compiled by "
          "Triton "
          f"{out['triton']} in {wall:.1f} s (worker pool {out['wall_s']} s, beside the other "
          "tests)")
    failed = [f"sm_{r['arch']}: {_describe(configs[r['index']])}\n{r['error']}"
              for r in results if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(results)} compiles failed:\n" + "\n".join(failed)
    scalar = [f"sm_{r['arch']}: {_describe(configs[r['index']])}" for r in results
              if r["vec16"] is False and not _vec16_exempt(configs[r["index"]])]
    assert not scalar, ("aligned multi-tensor kernels without 16-byte vector loads:\n"
                        + "\n".join(scalar))
    # every kernel is launched without multiply-add contraction (as the CPU and the interpreter
    # round): each float product and sum carries its rounding (.rn), which ptxas keeps as is
    fused = [f"sm_{r['arch']}: {_describe(configs[r['index']])}: {r['contractible']}"
             for r in results if r["contractible"]]
    assert not fused, "kernels whose PTX ptxas may contract into fma:\n" + "\n".join(fused)


def test_assembled_configurations_show_every_feature(compile_job):
    """Per kernel, the configurations ptxas assembles show every element type and both sides of
    every switch that any of its configurations has; and only what is needed for that."""
    configs, chosen = compile_job.configs, compile_job.assembled
    for kernel, idx in by_kernel(configs).items():
        every = set().union(*(features(configs[i]) for i in idx))
        picked = [i for i in idx if i in chosen]
        assert set().union(*(features(configs[i]) for i in picked)) == every, kernel
        assert len(picked) <= len(every), kernel
    assert len(chosen) < len(configs)


# --- (b) the matrix reaches every kernel and both sides of every constexpr bool -----------------
def test_matrix_covers_every_kernel_and_branch(launches):
    seen = {}
    for r in launches.launches:
        seen.setdefault((r["module"], r["kernel"]), []).append(r)
    missing = sorted(f"{m}.{k}" for m, k in TL.kernels() if (m, k) not in seen)
    assert not missing, f"kernels the matrix never launched: {missing}"
    problems = []
    for (module, kernel), recs in seen.items():
        values, declared = {}, set()
        for r in recs:
            declared |= set(r["consts"]) - set(r["specialized"])
            for name, v in r["consts"].items():
                values.setdefault(name, set()).add(json.dumps(v, sort_keys=True))
        for name, vals in values.items():
            # a bool, or a declared 0/1 switch (the loss's PHI), must take both values
            switch = vals <= {"true", "false"} or (name in declared and vals <= {"0", "1"})
            one_sided = switch and len(vals) < 2
            if one_sided and (kernel, name) not in BOOL_EXCEPTIONS:
                problems.append(f"{module}.{kernel}.{name} only took {vals}")
        # every parameter dtype reaches every kernel: as an element-type constexpr (the
        # multi-tensor tables) or as a typed pointer argument
        dts = {json.loads(v)["dtype"] for vals in values.values() for v in vals
               if v.startswith('{"dtype"')}
        dts |= {t[1:] for r in recs for t in r["signature"].values() if t.startswith("*")}
        if not {"fp32", "bf16", "fp16", "fp64"} <= dts:
            problems.append(f"{module}.{kernel}: dtypes seen {sorted(dts)}")
        # multi-tensor kernels: recorded with the interpreter's BLOCK/CHUNK (the worker swaps in
        # the GPU's); a patched size would be compiled as is
        if "CHUNK" in values:
            if values["CHUNK"] != {str(mt.CHUNK)} or values.get("BLOCK") != {str(mt.BLOCK)}:
                problems.append(f"{module}.{kernel}: BLOCK/CHUNK "
                                f"{values.get('BLOCK')}/{values['CHUNK']}")
    assert not problems, "\n".join(problems)


# --- (c) no Python float reaches a kernel (review finding 2) ------------------------------------
def test_no_python_float_reaches_a_kernel(launches):
    """Triton types a Python float argument fp32 on a GPU (the interpreter keeps the double), so
    an fp64 computation would silently use rounded hyper-parameters: floats must travel as f64
    bits (``_multi_tensor.f64_bits``)."""
    bad = sorted({f"{r['module']}.{r['kernel']}({', '.join(r['floats'])})"
                  for r in launches.launches if r["floats"]})
    assert not bad, f"Python floats passed to kernels (typed fp32 on a GPU): {bad}"
