"""The backend choice: auto by device, forced by SAMKERNELS_BACKEND or use_backend, clear errors."""
import pytest
import torch

import samkernels
from samkernels import _dispatch, ops

from conftest import needs_ext


def test_auto_on_cpu_uses_the_extension_when_built():
    want = "cpu" if _dispatch.extension() is not None else "reference"
    assert _dispatch.resolve(torch.device("cpu")) == want


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("SAMKERNELS_BACKEND", "reference")
    assert _dispatch.resolve(torch.device("cpu")) == "reference"
    monkeypatch.setenv("SAMKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown samkernels backend 'bogus'"):
        _dispatch.resolve(torch.device("cpu"))


def test_use_backend_context_and_errors():
    with samkernels.use_backend("reference"):
        assert _dispatch.resolve(torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="unknown"):
        samkernels.set_backend("fastest")
    with samkernels.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            ops.grad_sumsq([torch.ones(2)], [torch.ones(2)])


@needs_ext
def test_forced_backend_really_runs_that_implementation(monkeypatch):
    """The cpu path goes through torch.ops.samkernels; the reference path does not."""
    calls = []
    real = torch.ops.samkernels.grad_sumsq

    class Spy:
        def __call__(self, *a):
            calls.append(1)
            return real(*a)

    monkeypatch.setitem(_dispatch._LOOKUP, "cpu", lambda name: Spy())
    ops.grad_sumsq([torch.ones(3)], [torch.ones(3)], backend="cpu")
    ops.grad_sumsq([torch.ones(3)], [torch.ones(3)], backend="reference")
    assert calls == [1]


def test_auto_on_cuda_takes_the_measured_faster_backend(monkeypatch):
    """The choice logic, with the timing replaced (no GPU needed)."""
    monkeypatch.setattr(_dispatch, "triton_usable", lambda device: True)
    monkeypatch.delenv("SAMKERNELS_AUTOTUNE", raising=False)
    for t_cuda, t_triton, want in [(1.0, 2.0, "cuda"), (2.0, 1.0, "triton")]:
        monkeypatch.setattr(_dispatch, "_time_backend",
                            lambda b, i, tc=t_cuda, tt=t_triton: tc if b == "cuda" else tt)
        assert _dispatch._measure_cuda_vs_triton(0) == want
    monkeypatch.setenv("SAMKERNELS_AUTOTUNE", "0")
    assert _dispatch._measure_cuda_vs_triton(0) == "cuda"

    def broken(b, i):
        raise RuntimeError("no triton")
    monkeypatch.delenv("SAMKERNELS_AUTOTUNE")
    monkeypatch.setattr(_dispatch, "_time_backend", broken)
    with pytest.warns(RuntimeWarning, match="could not time"):
        assert _dispatch._measure_cuda_vs_triton(0) == "cuda"


def test_auto_falls_back_when_a_backend_lacks_an_op(monkeypatch):
    """A phase with no kernel on the chosen backend runs on the reference under auto (one warning);
    a forced backend raises."""
    def missing(name):
        raise AttributeError(name)
    monkeypatch.setitem(_dispatch._LOOKUP, "cpu", missing)
    monkeypatch.setattr(_dispatch, "resolve", lambda device: "cpu")
    with pytest.warns(RuntimeWarning, match="no 'cpu' kernel yet; using 'reference'"):
        impl = _dispatch.implementation("grad_sumsq", torch.device("cpu"))
    from samkernels.ops import reference
    assert impl is reference.grad_sumsq
    with pytest.raises(NotImplementedError, match="no 'cpu' implementation"):
        _dispatch.implementation("grad_sumsq", torch.device("cpu"), backend="cpu")
