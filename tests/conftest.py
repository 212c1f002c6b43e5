"""Shared test setup.

TRITON_INTERPRET must be set before triton is first imported (the mode is fixed when @triton.jit
decorates a kernel), so it is set here, at collection time, for every test module.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# One intra-op thread, here and in the subprocesses the tests start: the tensors are tiny, the
# other core runs the background jobs below, and OpenMP's spinning workers on a busy core made the
# small steps several times slower (tests/test_ivon.py: 74 -> 18 CPU seconds).  The CPU kernels'
# threaded path keeps its own test (tests/test_contract.py ``test_long_lists``, with two threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import ctypes  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import samkernels  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _interpreter_builtins_looked_up_once():
    """Triton's interpreter patches triton.language before every launch and before every call of
    a @triton.jit helper inside a kernel, each time walking all members of five modules and
    classes with inspect.getmembers: most of the interpreter's time on these small tensors.  The
    names of their builtins are looked up once, here, before any launch has patched anything;
    every call still patches exactly the members the original would: those of these names that
    are builtins at the time (tests/test_triton_plans.py
    ``test_interpreter_patches_the_same_builtins`` checks it)."""
    try:
        import triton.language as tl
        from triton.language import core as tl_core
        from triton.runtime import interpreter
    except ImportError:  # no triton: its tests skip
        return
    original = getattr(interpreter, "_patch_builtin", None)
    if original is None or getattr(original, "looked_up_once", False):
        return
    pkgs = [tl, tl.tensor, tl.math, tl_core, getattr(tl_core, "tensor_descriptor_base", None)]
    names = {pkg: [n for n, m in inspect.getmembers(pkg) if tl_core.is_builtin(m)]
             for pkg in pkgs if pkg is not None}

    def _patch_builtin(pkg, builder, scope):
        if pkg not in names:
            return original(pkg, builder, scope)
        for name in names[pkg]:
            member = getattr(pkg, name)
            if tl_core.is_builtin(member):
                interpreter._patch_attr(pkg, name, member, builder, scope)

    _patch_builtin.looked_up_once = True
    _patch_builtin.original = original
    interpreter._patch_builtin = _patch_builtin


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_builtins_looked_up_once()

REPO = pathlib.Path(__file__).resolve().parents[1]


def pytest_report_header(config):
    where = pathlib.Path(samkernels.__file__).resolve().parent
    from samkernels import _dispatch
    ext = _dispatch.extension()
    return [f"samkernels imported from {where}",
            f"compiled extension: {'yes' if ext is not None else 'NO'}; "
            f"CUDA kernels: {_dispatch.cuda_kernels_built()}; torch {torch.__version__}"]


def pytest_sessionstart(session):
    # CI sets this: the tests must exercise the installed wheel, not the source tree.
    if os.environ.get("SAMKERNELS_TEST_INSTALLED") == "1":
        where = pathlib.Path(samkernels.__file__).resolve()
        # Compare with the package directory itself: the test venv may live inside the repo.
        if where.parent == (REPO / "samkernels").resolve():
            raise pytest.UsageError(f"samkernels was imported from the source tree ({where}), "
                                    "not from the installed wheel")
        from samkernels import _dispatch
        if _dispatch.extension() is None:
            raise pytest.UsageError(f"the installed samkernels has no compiled extension: "
                                    f"{_dispatch._ext_error}")


@pytest.fixture(autouse=True)
def _fresh_backend_choice():
    """No test leaks a forced backend into the next one."""
    samkernels.set_backend(None)
    yield
    samkernels.set_backend(None)


def has_extension() -> bool:
    from samkernels import _dispatch
    return _dispatch.extension() is not None


needs_ext = pytest.mark.skipif(not has_extension(), reason="samkernels._C is not built")


# --- long subprocess checks, run beside the other tests ----------------------------------------
# The Triton AOT compile, the GPU-session dry run ... are subprocesses that would keep the suite
# waiting for a minute each.  A test module registers such a job with ``background_job``; it starts
# (niced) as soon as collection has selected one of the module's tests, runs on the core the main
# process leaves free, and the module's fixture waits for it with ``job(name)``.
_JOBS = {}      # name -> (module file, start(workdir) -> handle)
_STARTED = {}   # name -> handle (anything with wait() and kill())
_WORKDIRS = []


def background_job(name):
    """Decorator: ``start(workdir)`` starts job ``name`` (a scratch directory of its own) and
    returns a handle with ``wait()`` and ``kill()``."""
    def register(start):
        _JOBS[name] = (str(pathlib.Path(inspect.getsourcefile(start)).resolve()), start)
        return start
    return register


def _start(name):
    workdir = tempfile.mkdtemp(prefix=f"samk_{name}_")
    _WORKDIRS.append(workdir)
    _STARTED[name] = _JOBS[name][1](pathlib.Path(workdir))


# the job modules, shortest job first (tests/test_cuda_compile.py's compiles take longest)
_JOB_ORDER = ["test_resume", "test_readme", "test_distributed", "test_fsdp", "test_gpu_session",
              "test_triton_aot", "test_cuda_compile"]


def _module(item) -> str:
    """The resolved path of a test's module file, as ``background_job`` records it."""
    return _resolved(str(item.fspath))


@functools.lru_cache(maxsize=None)
def _resolved(path: str) -> str:  # once per module file, not per test (~6,000 per hook)
    return str(pathlib.Path(path).resolve())


# --- the offline GPU checks: a tier of their own ------------------------------------------------
# The CUDA sources compiled with nvcc, every Triton kernel configuration compiled for sm_90, the GPU
# session's CPU dry run: checks of code for a GPU this machine lacks, whose compilers take about
# 360 CPU-seconds, as much as all the other tests together.  ``pytest`` leaves them out (reported
# as deselected) so that the suite stays a few minutes; ``--offline-gpu-checks`` adds them, and a
# module named on the command line runs anyway.  CI runs them (tests/install_and_test.sh).
OFFLINE_GPU_CHECKS = ("test_cuda_compile", "test_triton_aot", "test_gpu_session")


def pytest_addoption(parser):
    parser.addoption("--offline-gpu-checks", action="store_true",
                     help="also run " + ", ".join(f"{m}.py" for m in OFFLINE_GPU_CHECKS) +
                          " (nvcc, Triton's sm_90 compiler, the GPU session's dry run: minutes "
                          "of CPU); a module named on the command line runs without it")


def _offline_gpu_checks_left_out(config, items) -> None:
    if config.getoption("offline_gpu_checks"):
        return
    here = config.invocation_params.dir
    named = {str((here / arg.split("::")[0]).resolve()) for arg in config.args}
    out = [item for item in items if _module(item) not in named
           and pathlib.Path(_module(item)).stem in OFFLINE_GPU_CHECKS]
    if out:
        left = set(map(id, out))
        items[:] = [item for item in items if id(item) not in left]
        config.hook.pytest_deselected(items=out)


def pytest_collection_modifyitems(session, config, items):
    """The modules that wait for a background job run last, the longest jobs last of all: the
    main process runs every other test while the jobs run (a job module early in the order left
    the main process waiting two minutes for the CUDA compiles with most of the suite still to
    run).  Otherwise the order is collection's."""
    _offline_gpu_checks_left_out(config, items)
    stems = {path: pathlib.Path(path).stem for path, _ in _JOBS.values()}
    rank = {path: 1 + (_JOB_ORDER.index(stem) + 1 if stem in _JOB_ORDER else 0)
            for path, stem in stems.items()}
    items.sort(key=lambda item: rank.get(_module(item), 0))


# --- pytest -n N (pytest-xdist) -----------------------------------------------------------------
# Modules whose tests spread one by one over the workers (see pytest_xdist_make_scheduler).
SPREAD = ("test_compile",)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which may be missing
def pytest_xdist_make_scheduler(config, log):
    """``pytest -n N`` (xdist's default ``--dist load``): a module's tests run on one worker, so
    that its warm-ups (Triton parsing each kernel it launches, module fixtures, background jobs)
    run once, except the modules of ``SPREAD``: each of test_compile's tests compiles from
    scratch, and together they are the longest module.  xdist hands out the modules with the most
    tests first, so these one-test units come last and keep the workers' loads even.  An explicit
    ``--dist`` (the GPU session's loadgroup) keeps xdist's own scheduler."""
    if config.getoption("dist") != "load":
        return None  # xdist's own scheduler for an explicit --dist
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if pathlib.Path(module).stem in SPREAD else module

    return ByModule(config, log)


def pytest_collection_finish(session):
    # Under pytest-xdist every worker collects every test but runs only some modules: a worker
    # starts a module's job when the module's fixture first asks for it (``job``), so each job
    # runs once, beside the other worker's tests.
    if session.config.option.collectonly or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    selected = {_module(item) for item in session.items}
    for name, (path, _) in _JOBS.items():
        if path in selected:
            _start(name)


def job(name):
    """The handle of job ``name`` (started now if collection did not start it)."""
    if name not in _STARTED:
        _start(name)
    return _STARTED[name]


def orphan_safe():
    """preexec_fn of a background subprocess: it dies with this process, even a killed one."""
    try:  # Linux prctl(PR_SET_PDEATHSIG, SIGKILL)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def niced():
    """preexec_fn of a background subprocess that should yield: the main process's tests come
    first."""
    orphan_safe()
    os.nice(10)


class ProcessJob:
    """A background job around one subprocess (``start``) in a process group of its own (so that
    its children share its fate and its priority), its output kept in files."""
    proc = None

    def start(self, args, workdir, **popen):
        self.logs = pathlib.Path(workdir)
        with open(self.logs / "stdout", "w") as out, open(self.logs / "stderr", "w") as err:
            self.proc = subprocess.Popen(args, stdout=out, stderr=err, text=True,
                                         start_new_session=True, **popen)

    def finish(self, timeout):
        """The subprocess waited for: a CompletedProcess with its output.  A niced job gets its
        priority back first: the tests wait for it now (where this user may raise priority)."""
        try:
            os.setpriority(os.PRIO_PGRP, self.proc.pid, 0)
        except OSError:
            pass
        rc = self.proc.wait(timeout=timeout)
        return subprocess.CompletedProcess(self.proc.args, rc,
                                           (self.logs / "stdout").read_text(),
                                           (self.logs / "stderr").read_text())

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the job and its children


def pytest_sessionfinish(session):
    for handle in _STARTED.values():
        handle.kill()  # a no-op for a finished job
    for workdir in _WORKDIRS:
        shutil.rmtree(workdir, ignore_errors=True)
