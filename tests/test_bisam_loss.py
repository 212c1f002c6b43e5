"""BiSAM ascent loss (samkernels.ops.bisam_loss): every backend against the float64 reference.

Backends on CPU tensors: ``reference``, ``cpu`` (needs the compiled samkernels._C) and ``triton``
(under TRITON_INTERPRET=1, set here before triton is imported; ~12 ms per row, so few rows).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import samkernels  # noqa: E402
from samkernels import _dispatch  # noqa: E402
from samkernels.ops.bisam_loss import (DEFAULT_MU, BiSAMLoss, TargetOutOfRangeError,  # noqa: E402
                                       bisam_loss, bisam_loss_reference)

CPU = torch.device("cpu")


def _cpu_skip_reason():
    if _dispatch.extension() is None:
        return f"samkernels._C is not importable ({_dispatch._ext_error}); build the extension"
    if not hasattr(torch.ops.samkernels, "bisam_loss_fwd"):
        return "samkernels._C has no bisam_loss_fwd op; rebuild the extension"
    return None


def _triton_skip_reason():
    return _dispatch._why_not("triton", CPU)


def _backend_param(name):
    reason = {"reference": None, "cpu": _cpu_skip_reason(), "triton": _triton_skip_reason()}[name]
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(name, marks=marks, id=name)


ALL = [_backend_param(b) for b in ("reference", "cpu", "triton")]
FUSED = [_backend_param(b) for b in ("cpu", "triton")]
GRADCHECKED = [_backend_param(b) for b in ("reference", "cpu")]


def _run(backend, logits, target, **kw):
    """(loss, d loss.sum() / d logits) with ``backend`` forced."""
    x = logits.detach().clone().requires_grad_(True)
    with samkernels.use_backend(backend):
        loss = bisam_loss(x, target, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def _ref(logits, target, **kw):
    """Float64 reference loss and gradient of the same (already rounded) logits."""
    x = logits.detach().double().requires_grad_(True)
    loss = bisam_loss_reference(x, target, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def _data(B, K, seed=0, scale=3.0, dtype=torch.float32, ignore=(1,)):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, K, generator=g) * scale).to(dtype)
    target = torch.randint(0, K, (B,), generator=g)
    for i in ignore:
        if i < B:
            target[i] = -100
    return logits, target


@pytest.fixture
def small_triton_block(monkeypatch):
    """Force the chunked (two-loop) Triton path on small rows."""
    tb = pytest.importorskip("samkernels.triton.bisam_loss")
    monkeypatch.setattr(tb, "MAX_BLOCK", 16)
    return tb


# --- values and gradients ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("phi", ["neglog", "tanh"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("K", [10, 37, 1000])
def test_matches_float64_reference(backend, phi, reduction, K):
    logits, target = _data(4, K, seed=K)
    loss, grad = _run(backend, logits, target, phi=phi, reduction=reduction)
    rloss, rgrad = _ref(logits, target, phi=phi, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == rloss.shape
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-4, atol=1e-6)
    assert torch.all(grad[1] == 0)  # the ignored row


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("phi", ["neglog", "tanh"])
def test_float64_logits_stay_float64(backend, phi):
    logits, target = _data(3, 37, seed=5, dtype=torch.float64)
    for mu in (None, 100.0):  # 100 > 50 takes the Triton kernel's online-max branch
        loss, grad = _run(backend, logits, target, phi=phi, mu=mu, reduction="none")
        rloss, rgrad = _ref(logits, target, phi=phi, mu=mu, reduction="none")
        assert loss.dtype == torch.float64 and grad.dtype == torch.float64
        torch.testing.assert_close(loss, rloss, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(grad, rgrad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("phi", ["neglog", "tanh"])
@pytest.mark.parametrize("mu", [None, 100.0], ids=["fixed_shift", "online_max"])
@pytest.mark.parametrize("K", [37, 100])
def test_triton_chunked_rows(small_triton_block, phi, mu, K):
    if _triton_skip_reason():
        pytest.skip(_triton_skip_reason())
    logits, target = _data(3, K, seed=K + 1)  # row 1 ignored: its zero gradient is chunked too
    target[0] = K - 1  # the label in the last, partial chunk
    loss, grad = _run("triton", logits, target, phi=phi, mu=mu, reduction="none")
    rloss, rgrad = _ref(logits, target, phi=phi, mu=mu, reduction="none")
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-4, atol=1e-7)


def test_triton_float_arguments_travel_as_f64_bits(monkeypatch):
    """Review finding 2: Triton's binder types a Python float argument fp32 on a GPU (the
    interpreter keeps the double, so an fp64 test passes here and fails there).  mu, log K,
    alpha and grad_scale must reach the kernel as int64 bit patterns of their doubles."""
    if _triton_skip_reason():
        pytest.skip(_triton_skip_reason())
    import inspect

    from triton.runtime.jit import mangle_type
    tb = pytest.importorskip("samkernels.triton.bisam_loss")
    real, launched = tb._bisam_loss_fwd_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(args)
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tb, "_bisam_loss_fwd_kernel", Spy())
    logits, target = _data(3, 10, seed=5, dtype=torch.float64)
    kw = dict(phi="tanh", mu=1 / 3, alpha=0.1, reduction="none")  # no float32 holds 1/3 or 0.1
    loss, grad = tb.bisam_loss_fwd_triton(logits, target, 1 / 3, 1, 0.1, -100, 0.3, True)
    assert launched
    params = inspect.signature(real.fn).parameters
    for name, value in zip(real.arg_names, launched[0]):
        ann = params[name].annotation
        bound = mangle_type(value) if ann is inspect.Parameter.empty else str(ann)
        assert "fp" not in bound and "float" not in bound or bound.startswith("*"), (name, bound)
    rloss, rgrad = _ref(logits, target, **kw)  # ... and the kernel rebuilds the exact doubles
    torch.testing.assert_close(loss, rloss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, 0.3 * rgrad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", FUSED)
def test_row_wider_than_default_triton_block(backend):
    logits, target = _data(2, 10_000, seed=7, ignore=())  # > MAX_BLOCK = 8192: two chunks
    target[1] = 9_999
    loss, grad = _run(backend, logits, target, reduction="none")
    rloss, rgrad = _ref(logits, target, reduction="none")
    # float32 sums of 10^4 terms: the order (SIMD lanes, chunks) moves the last digits
    torch.testing.assert_close(loss.double(), rloss, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("backend", GRADCHECKED)
@pytest.mark.parametrize("phi", ["neglog", "tanh"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(backend, phi, reduction):
    logits, target = _data(3, 7, seed=11, dtype=torch.float64)
    x = logits.requires_grad_(True)

    def f(inp):
        with samkernels.use_backend(backend):
            return bisam_loss(inp, target, phi=phi, reduction=reduction)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("phi", ["neglog", "tanh"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_triton(phi, reduction):
    # interpreted (TRITON_INTERPRET=1, set at the top of this file): two rows of five, ~1 s each
    if _triton_skip_reason():
        pytest.skip(_triton_skip_reason())
    logits, target = _data(2, 5, seed=12, dtype=torch.float64, ignore=())
    x = logits.requires_grad_(True)

    def f(inp):
        with samkernels.use_backend("triton"):
            return bisam_loss(inp, target, phi=phi, reduction=reduction)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("phi", ["neglog", "tanh"])
@pytest.mark.parametrize("mu", [None, 100.0], ids=["fixed_shift", "running_max"])
def test_cpu_wide_rows_match_float64_reference(phi, mu):
    """K = 131072 (> the 128000 classes of the benchmark), few rows: the CPU kernel's long-row path."""
    if _cpu_skip_reason():
        pytest.skip(_cpu_skip_reason())
    K = 131_072
    logits, target = _data(3, K, seed=21, ignore=(1,))
    target[0], target[2] = K - 1, 0  # labels at both ends of the row
    loss, grad = _run("cpu", logits, target, phi=phi, mu=mu, reduction="none")
    rloss, rgrad = _ref(logits, target, phi=phi, mu=mu, reduction="none")
    # float32 sums of 1.3e5 terms: the summation order moves the last digits
    torch.testing.assert_close(loss.double(), rloss, rtol=5e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-4, atol=1e-9)
    assert torch.all(grad[1] == 0)
    mean, gmean = _run("cpu", logits, target, phi=phi, mu=mu)
    torch.testing.assert_close(mean.double(), rloss.sum() / 2, rtol=5e-5, atol=1e-5)
    torch.testing.assert_close(gmean.double(), rgrad / 2, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mu", [None, 100.0], ids=["fixed_shift", "running_max"])
@pytest.mark.parametrize("K", [1, 2, 10, 32, 33])
def test_cpu_short_row_paths(dtype, mu, K):
    """K <= 32 with the fixed shift takes the CPU kernel's block-of-rows path; the rest the row
    path: contiguous and strided rows, a cast for bf16, ignored rows, every reduction."""
    if _cpu_skip_reason():
        pytest.skip(_cpu_skip_reason())
    logits, target = _data(70, K, seed=K, dtype=dtype, ignore=(1, 40))
    strided = torch.cat([logits, logits], 1)[:, :K]
    tol = dict(rtol=2.0 ** -7, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for phi in ("neglog", "tanh"):
        rloss, rgrad = _ref(logits, target, phi=phi, mu=mu, reduction="none")
        for x in (logits, strided):
            loss, grad = _run("cpu", x, target, phi=phi, mu=mu, reduction="none")
            assert loss.dtype == dtype and grad.dtype == dtype
            torch.testing.assert_close(loss.double(), rloss, **tol)
            torch.testing.assert_close(grad.double(), rgrad, **tol)
            assert torch.all(grad[1] == 0) and torch.all(grad[40] == 0)
        for reduction, scale in (("sum", 1.0), ("mean", 1.0 / 68)):
            loss, grad = _run("cpu", logits, target, phi=phi, mu=mu, reduction=reduction)
            torch.testing.assert_close(loss.double(), rloss.sum() * scale, **tol)
            torch.testing.assert_close(grad.double(), rgrad * scale, **tol)


# --- numerics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("phi", ["neglog", "tanh"])
@pytest.mark.parametrize("mu", [None, 100.0])
def test_huge_margins_stay_finite(backend, phi, mu):
    logits, target = _data(4, 50, seed=3, scale=1e4, ignore=())
    logits[0] = -1e4
    logits[0, target[0]] = 1e4  # hugely correct row: every F = -2e4
    logits[1] = 1e4
    logits[1, target[1]] = -1e4  # hugely wrong row: every other F = +2e4
    loss, grad = _run(backend, logits, target, phi=phi, mu=mu, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    rloss, rgrad = _ref(logits, target, phi=phi, mu=mu, reduction="none")
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [20, 300])
def test_low_precision_logits(backend, dtype, K):
    logits, target = _data(4, K, seed=4, dtype=dtype)
    for phi in ("neglog", "tanh"):
        loss, grad = _run(backend, logits, target, phi=phi, reduction="none")
        rloss, rgrad = _ref(logits, target, phi=phi, reduction="none")  # same rounded logits
        assert loss.dtype == dtype and grad.dtype == dtype
        # float32 maths inside: only the final roundings to the 8/11-bit mantissa differ
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
        torch.testing.assert_close(loss.double(), rloss, rtol=ulp, atol=1e-6)
        torch.testing.assert_close(grad.double(), rgrad, rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
def test_known_values(backend):
    # all logits equal: every F = 0, so logsumexp = log K and Q = 0 (both phi(0) = 0)
    x = torch.full((2, 9), 0.7)
    t = torch.tensor([0, 8])
    for phi in ("neglog", "tanh"):
        loss, grad = _run(backend, x, t, phi=phi, reduction="none")
        torch.testing.assert_close(loss, torch.zeros(2), atol=2e-7, rtol=0)
        # one class: Q = 0 and no gradient
        loss1, grad1 = _run(backend, x[:, :1], torch.zeros(2, dtype=torch.long), phi=phi)
        assert float(loss1) == pytest.approx(0.0, abs=1e-7) and torch.all(grad1 == 0)
    # gradient rows sum to zero: Q depends on the logits only through the differences F
    logits, target = _data(3, 20, seed=9, ignore=())
    _, grad = _run(backend, logits, target)
    torch.testing.assert_close(grad.sum(1), torch.zeros(3), atol=1e-7, rtol=0)


# --- reductions and ignore_index -----------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
def test_ignore_index_and_reductions(backend):
    logits, target = _data(5, 12, seed=6, ignore=(0, 3))
    rows, _ = _run(backend, logits, target, reduction="none")
    assert rows[0] == 0 and rows[3] == 0
    mean, gmean = _run(backend, logits, target, reduction="mean")
    total, gsum = _run(backend, logits, target, reduction="sum")
    torch.testing.assert_close(mean, rows.sum() / 3)  # ignored rows leave the denominator
    torch.testing.assert_close(total, rows.sum())
    torch.testing.assert_close(gmean * 3, gsum)
    # the -log(K)/mu constant is per row: the mean of the "none" rows equals the mean
    keep = target != -100
    sub, _ = _run(backend, logits[keep], target[keep], reduction="mean")
    torch.testing.assert_close(sub, mean)
    # a custom ignore_index that is also a valid class
    t2 = target.clone()
    t2[~keep] = 4
    rows2, _ = _run(backend, logits, t2, reduction="none", ignore_index=4)
    torch.testing.assert_close(rows2[keep & (t2 != 4)], rows[keep & (t2 != 4)])


@pytest.mark.parametrize("backend", ALL)
def test_all_rows_ignored_like_cross_entropy(backend):
    logits = torch.randn(3, 6)
    target = torch.full((3,), -100)
    mean, gmean = _run(backend, logits, target, reduction="mean")
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert torch.isnan(mean) and torch.isnan(ce)  # 0/0, as F.cross_entropy
    assert torch.all(gmean == 0)
    total, gsum = _run(backend, logits, target, reduction="sum")
    assert total == 0 and torch.all(gsum == 0)


@pytest.mark.parametrize("backend", ALL)
def test_grad_output_scaling_and_retain_graph(backend):
    logits, target = _data(4, 15, seed=8)
    _, g1 = _run(backend, logits, target)
    for reduction in ("mean", "sum", "none"):
        x = logits.clone().requires_grad_(True)
        with samkernels.use_backend(backend):
            loss = bisam_loss(x, target, reduction=reduction)
        w = torch.arange(1.0, 5.0) if reduction == "none" else torch.tensor(2.5)
        (loss * w).sum().backward(retain_graph=True)
        first = x.grad.clone()
        (loss * w).sum().backward()  # the saved buffer must not have been scaled in place
        torch.testing.assert_close(x.grad, 2 * first)
        xr = logits.double().requires_grad_(True)
        rloss = bisam_loss_reference(xr, target, reduction=reduction)
        (rgrad,) = torch.autograd.grad((rloss * w.double()).sum(), xr)
        torch.testing.assert_close(first.double(), rgrad, rtol=1e-4, atol=1e-7)
    x = logits.clone().requires_grad_(True)
    with samkernels.use_backend(backend):
        bisam_loss(x, target).backward()
    torch.testing.assert_close(x.grad, g1)


@pytest.mark.parametrize("backend", FUSED)
def test_no_grad_and_strided_inputs(backend):
    base = torch.randn(6, 40)
    logits = base[::2, 3:33]  # row stride 80, column stride 1
    target = torch.tensor([0, 29, 7])
    with samkernels.use_backend(backend):
        loss = bisam_loss(logits, target, reduction="none")
        lt = bisam_loss(base.t()[:30, :3].t(), target, reduction="none")  # column stride != 1
        with torch.no_grad():
            nograd = bisam_loss(base[:3, :30].requires_grad_(True), target)
    assert not loss.requires_grad and not nograd.requires_grad
    rloss, _ = _ref(logits, target, reduction="none")
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-6)
    rlt, _ = _ref(base.t()[:30, :3].t(), target, reduction="none")
    torch.testing.assert_close(lt.double(), rlt, rtol=1e-5, atol=1e-6)


def test_cpu_op_contract():
    if _cpu_skip_reason():
        pytest.skip(_cpu_skip_reason())
    logits, target = _data(3, 11, seed=2)
    rows, grad = torch.ops.samkernels.bisam_loss_fwd(logits, target, 1.5, 0, 0.1, -100, 0.5, True)
    rloss, rgrad = _ref(logits, target, reduction="none")
    torch.testing.assert_close(rows.double(), rloss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), 0.5 * rgrad, rtol=1e-4, atol=1e-7)
    rows2, nograd = torch.ops.samkernels.bisam_loss_fwd(logits, target, 1.5, 0, 0.1, -100, 1.0,
                                                        False)
    assert nograd.numel() == 0 and torch.equal(rows2, rows)
    with pytest.raises(IndexError, match=r"target\[0\] = 11"):
        torch.ops.samkernels.bisam_loss_fwd(logits, torch.tensor([11, 0, 0]), 1.5, 0, 0.1, -100,
                                            1.0, True)


def test_cpu_fused_op_contract():
    """The eager CPU path: bisam_loss_fwd_reduced (check, count, rows, reduction in one call) and
    bisam_loss (the same with a C++ autograd node)."""
    if _cpu_skip_reason():
        pytest.skip(_cpu_skip_reason())
    if not hasattr(torch.ops.samkernels, "bisam_loss"):
        pytest.skip("samkernels._C predates the bisam_loss op; rebuild the extension")
    ops = torch.ops.samkernels
    logits, target = _data(5, 11, seed=2, ignore=(1, 3))
    rloss, rgrad = _ref(logits, target, reduction="none")
    for code, red, scale in ((0, "none", None), (1, "mean", 1 / 3), (2, "sum", 1.0)):
        loss, grad = ops.bisam_loss_fwd_reduced(logits, target, 1.5, 0, 0.1, code, -100, True)
        want = rloss if scale is None else rloss.sum() * scale
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), rgrad * (1 if scale is None else scale),
                                   rtol=1e-4, atol=1e-7)
        _, nograd = ops.bisam_loss_fwd_reduced(logits, target, 1.5, 0, 0.1, code, -100, False)
        assert nograd.numel() == 0
    x = logits.clone().requires_grad_(True)
    loss = ops.bisam_loss(x, target, 1.5, 0, 0.1, 1, -100)
    assert "BiSAMLossFunction" in loss.grad_fn.name()  # the C++ autograd node
    loss.backward()
    torch.testing.assert_close(x.grad.double(), rgrad / 3, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        assert not ops.bisam_loss(x, target, 1.5, 0, 0.1, 1, -100).requires_grad
    with torch.inference_mode():  # no autograd key: the plain CPU kernel
        plain = ops.bisam_loss(logits, target, 1.5, 0, 0.1, 1, -100)
        torch.testing.assert_close(plain, loss.detach())
    with pytest.raises(IndexError, match=r"target\[2\] = -3"):
        ops.bisam_loss(x, torch.tensor([0, 1, -3, 0, 0]), 1.5, 0, 0.1, 1, -100)
    with pytest.raises(ValueError, match="reduction code"):
        ops.bisam_loss(x, target, 1.5, 0, 0.1, 3, -100)
    # shapes under FakeTensorMode (the fakes registered in samkernels/ops/bisam_loss.py)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fx, ft = mode.from_tensor(logits), mode.from_tensor(target)
        assert ops.bisam_loss(fx, ft, 1.5, 0, 0.1, 0, -100).shape == (5,)
        assert ops.bisam_loss(fx, ft, 1.5, 0, 0.1, 1, -100).shape == ()
        fl, fg = ops.bisam_loss_fwd_reduced(fx, ft, 1.5, 0, 0.1, 2, -100, True)
        assert fl.shape == () and fg.shape == (5, 11)


def test_cpu_backend_under_torch_compile():
    if _cpu_skip_reason():
        pytest.skip(_cpu_skip_reason())
    logits, target = _data(8, 20, seed=13)
    x = logits.clone().requires_grad_(True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(a, b):
        return bisam_loss(a, b, phi="tanh")

    with samkernels.use_backend("cpu"):
        loss = f(x, target)
    loss.backward()
    rloss, rgrad = _ref(logits, target, phi="tanh")
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), rgrad, rtol=1e-4, atol=1e-7)


# --- module and defaults -------------------------------------------------------------------------
def test_module_and_default_mu():
    assert DEFAULT_MU == {"neglog": 1.5, "tanh": 10.0}
    logits, target = _data(4, 10, seed=1)
    for phi, mu in DEFAULT_MU.items():
        m = BiSAMLoss(phi=phi)
        assert m.mu == mu and f"phi='{phi}'" in repr(m)
        with samkernels.use_backend("reference"):
            torch.testing.assert_close(m(logits, target),
                                       bisam_loss(logits, target, phi=phi, mu=mu))
    explicit = BiSAMLoss(phi="tanh", mu=20.0, alpha=0.5, reduction="sum")
    with samkernels.use_backend("reference"):
        torch.testing.assert_close(explicit(logits, target),
                                   bisam_loss(logits, target, phi="tanh", mu=20.0, alpha=0.5,
                                              reduction="sum"))
    # the reference is the paper's formula, written out directly (eq. 11, 17, 18)
    x = logits.double()
    F = x - x.gather(1, target.clamp(min=0)[:, None])
    gamma = math.log(math.e - 1)
    phis = (("neglog", -torch.log1p(torch.exp(gamma - F)) + 1), ("tanh", torch.tanh(0.1 * F)))
    for phi, ph in phis:
        mu = DEFAULT_MU[phi]
        rows = torch.logsumexp(mu * ph, 1) / mu - math.log(10) / mu
        rows[target == -100] = 0
        torch.testing.assert_close(bisam_loss_reference(x, target, phi=phi, reduction="none"), rows)


# --- bad inputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("bad", [10, -1, -7])
def test_target_out_of_range_raises(backend, bad):
    logits, target = _data(3, 10, seed=0, ignore=())
    target[2] = bad
    with samkernels.use_backend(backend):
        for x in (logits, logits.clone().requires_grad_(True)):  # with and without autograd
            with pytest.raises(TargetOutOfRangeError,
                               match=rf"^bisam_loss: target\[2\] = {bad} is out of range for "
                                     r"10 classes \(and is not ignore_index = -100\)"):
                bisam_loss(x, target)
            with pytest.raises(ValueError):  # TargetOutOfRangeError is both
                bisam_loss(x, target)
    assert issubclass(TargetOutOfRangeError, IndexError)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(phi="relu"), ValueError, "phi"),
    (dict(mu=0.0), ValueError, "mu"),
    (dict(mu=-1.0), ValueError, "mu"),
    (dict(mu=float("inf")), ValueError, "mu"),
    (dict(phi="tanh", alpha=0.0), ValueError, "alpha"),
    (dict(reduction="avg"), ValueError, "reduction"),
])
def test_bad_arguments_raise(kwargs, exc, pattern):
    logits, target = _data(2, 5)
    with pytest.raises(exc, match=pattern):
        bisam_loss(logits, target, **kwargs)
    if set(kwargs) <= {"phi", "mu", "alpha", "reduction"}:
        with pytest.raises(exc, match=pattern):
            BiSAMLoss(**kwargs)


def test_bad_shapes_and_dtypes_raise():
    logits, target = _data(2, 5)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        bisam_loss(logits[0], target)
    with pytest.raises(ValueError, match="target must have shape"):
        bisam_loss(logits, target[:1])
    with pytest.raises(TypeError, match="target must hold int64"):
        bisam_loss(logits, target.int())
    with pytest.raises(TypeError, match="logits must be float"):
        bisam_loss(logits.long(), target)
    with pytest.raises(ValueError, match="at least one class"):
        bisam_loss(logits[:, :0], target)
