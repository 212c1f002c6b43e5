"""Shared test setup.

TRITON_INTERPRET must be set before triton is first imported (the mode is fixed when @triton.jit
decorates a kernel), so it is set here, at collection time, for every test module.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import samkernels  # noqa: E402

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
