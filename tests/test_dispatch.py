"""The backend choice: auto by device, forced by SAMKERNELS_BACKEND or use_backend, clear errors."""
import warnings

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


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A CUDA device as far as the choice logic sees it (no GPU needed): kernels built, triton
    usable, a device name, an empty cache directory, and a measurement that must never run."""
    monkeypatch.setattr(_dispatch, "cuda_kernels_built", lambda: True)
    monkeypatch.setattr(_dispatch, "_why_not", lambda backend, device: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU 80GB")
    monkeypatch.setenv("SAMKERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_dispatch, "_auto_cuda_choice", {})

    def never(*args):
        raise AssertionError("auto measured a backend")
    monkeypatch.setattr(_dispatch, "_time_backend", never)
    return tmp_path


def test_auto_on_cuda_never_measures_and_defaults_to_cuda(fake_gpu):
    """auto allocates nothing, launches nothing, draws no random numbers: it only looks up."""
    assert _dispatch.resolve(torch.device("cuda", 0)) == "cuda"


def test_auto_on_cuda_takes_the_shipped_then_the_saved_choice(fake_gpu, monkeypatch):
    import json
    monkeypatch.setitem(_dispatch.SHIPPED_CHOICE, "Fake GPU 80GB", "triton")
    assert _dispatch.resolve(torch.device("cuda", 0)) == "triton"
    key = _dispatch._versions_key("Fake GPU 80GB")
    (fake_gpu / "backend.json").write_text(json.dumps({key: {"choice": "cuda"}}))
    _dispatch._auto_cuda_choice.clear()
    assert _dispatch.resolve(torch.device("cuda", 0)) == "cuda"  # the machine's own measurement
    # a saved choice for other torch/triton versions does not apply
    (fake_gpu / "backend.json").write_text(json.dumps({"Fake GPU 80GB | torch 0 | triton 0":
                                                       {"choice": "cuda"}}))
    _dispatch._auto_cuda_choice.clear()
    assert _dispatch.resolve(torch.device("cuda", 1)) == "triton"
    # a recorded triton choice is dropped when triton cannot run
    monkeypatch.setattr(_dispatch, "_why_not",
                        lambda backend, device: "no triton" if backend == "triton" else None)
    _dispatch._auto_cuda_choice.clear()
    assert _dispatch.resolve(torch.device("cuda", 0)) == "cuda"
    # a corrupt cache file is ignored, not an error in the user's step
    (fake_gpu / "backend.json").write_text("{not json")
    _dispatch._auto_cuda_choice.clear()
    assert _dispatch.resolve(torch.device("cuda", 0)) == "cuda"


def test_tune_backend_picks_triton_only_beyond_the_margin_and_saves(fake_gpu, monkeypatch):
    import contextlib
    import json
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    for t_cuda, t_triton, want in [(1.0, 2.0, "cuda"), (1.0, 0.97, "cuda"), (1.0, 0.9, "triton")]:
        monkeypatch.setattr(_dispatch, "_time_backend",
                            lambda b, d, n, r, tc=t_cuda, tt=t_triton: tc if b == "cuda" else tt)
        out = samkernels.tune_backend(save=True)
        assert out["choice"] == want and out["cuda_ms"] == t_cuda and out["triton_ms"] == t_triton
        saved = json.loads((fake_gpu / "backend.json").read_text())
        assert saved[_dispatch._versions_key("Fake GPU 80GB")]["choice"] == want
        assert _dispatch.resolve(torch.device("cuda", 0)) == want  # effective at once
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
        samkernels.tune_backend()
    with pytest.raises(ValueError, match="device must be a CUDA device"):
        samkernels.tune_backend(device="cpu")


def test_tune_backend_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        samkernels.tune_backend()


def test_triton_is_not_usable_on_cuda_under_the_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 runs CPU tensors only: CUDA tensors must not be routed to triton."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _dispatch.triton_usable(torch.device("cuda", 0))
    assert "TRITON_INTERPRET=1" in _dispatch._why_not("triton", torch.device("cuda", 0))
    assert _dispatch.triton_usable(torch.device("cpu"))


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


def test_auto_on_cuda_without_fused_kernels_warns_once(monkeypatch):
    """CUDA tensors with neither the CUDA kernels nor a usable Triton run on the reference, which
    reads flags and counters on the host: auto says so once (as on the CPU without samkernels._C),
    naming why each fused backend is missing."""
    monkeypatch.setattr(_dispatch, "cuda_kernels_built", lambda: False)
    monkeypatch.setattr(_dispatch, "_warned_fallback_cuda", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton cannot run CUDA tensors then
    with pytest.warns(RuntimeWarning, match=r"no fused kernels for cuda tensors \(cuda: .*"
                                            r"triton: .*\); using the slow reference"):
        assert _dispatch.resolve(torch.device("cuda", 0)) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.resolve(torch.device("cuda", 0)) == "reference"
