"""The MFVI-family and E-BiSAM ops (samkernels.ops.vi_ops) against the float64 reference
(samkernels.ops.reference_vi) on fresh random inputs: odd sizes, many 1-element tensors,
non-contiguous parameters, mixed dtypes in one list, and lists that take the threaded path."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from samkernels.ops import reference as ref
from samkernels.ops import vi_ops

from conftest import needs_ext
from helpers import assert_close_list, f64, make_params, positive_like, state_like

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
CASES = {
    "odd": ([(1,), (3,), (5, 7), (4097,), (33, 65)], [F32] * 5, [0, 0, 0, 0, 1]),
    "tiny": ([(1,)] * 200, [F32] * 200, []),
    "threaded": ([(40001,), (3, 5)], [F32] * 2, []),
    "mixed": ([(5, 7), (129,), (64,), (17, 3), (9, 11)], [F32, BF16, F64, F32, BF16], [0, 0, 0, 0, 1]),
    "f64": ([(7,), (300, 3), (1,)], [F64] * 3, [0, 1, 0]),
}
BACKENDS = [pytest.param("cpu", marks=needs_ext)]
SEED = 1234567891234


def case(name, seed):
    shapes, dtypes, nc = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    return gen, make_params(shapes, dtypes, gen, nc), make_params(shapes, dtypes, gen, nc)


def ids_for(p):
    return [3 * i + 1 for i in range(len(p))]


def nan_like(ts):
    return [torch.full_like(t, float("nan")) for t in ts]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("learned", [False, True])
def test_vi_noise(backend, name, learned):
    gen, p, _ = case(name, 1)
    v = positive_like(p, gen, 1e-3, 0.5) if learned else []
    p64, b64, b = f64(p), f64(p), nan_like(p)
    ref.vi_noise_(p64, b64, f64(v), ids_for(p), SEED, 5, 0.03)
    vi_ops.vi_noise_(p, b, v, ids_for(p), SEED, 5, 0.03, backend=backend)
    assert_close_list(p, p64, "params")
    assert_close_list(b, b64, "backups")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_mfvi_update(backend, name, momentum):
    gen, p, g = case(name, 2)
    b = make_params([t.shape for t in p], [t.dtype for t in p], gen)
    v = positive_like(p, gen, 1e-3, 0.5)
    m = state_like(p, gen) if momentum else []
    args = (ids_for(p), SEED, 7, 0.1, 0.3, momentum, 0.5, 50.0)
    p64, v64, m64 = f64(p), f64(v), f64(m)
    ref.mfvi_update_(p64, f64(g), f64(b), v64, m64, *args)
    vi_ops.mfvi_update_(p, g, b, v, m, *args, backend=backend)
    assert_close_list(p, p64, "params")
    assert_close_list(v, v64, "variances")
    assert_close_list(m, m64, "momenta")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_vsam_sumsq(backend, name):
    gen, p, g = case(name, 3)
    v = positive_like(p, gen)
    want = ref.vsam_sumsq(f64(g), f64(v))
    got = vi_ops.vsam_sumsq(g, v, backend=backend)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("log_step", [True, False])
@pytest.mark.parametrize("given_norm", [False, True])
def test_vsam_perturb(backend, name, log_step, given_norm):
    gen, p, g = case(name, 4)
    v = positive_like(p, gen, 0.2, 1.0)
    norm = ref.vsam_sumsq(f64(g), f64(v)).sqrt() * 1.5 if given_norm else None
    dim = float(sum(t.numel() for t in p))
    # var_lr small enough that the linear step leaves some entries above the clamp
    args = (dim, 1e-12, 1e-3, 2.0, 40.0, log_step, 0.25)
    p64, b64, v64, b = f64(p), f64(p), f64(v), nan_like(p)
    n_ref = ref.vsam_perturb_(p64, f64(g), b64, v64, norm, *args)
    n = vi_ops.vsam_perturb_(p, g, b, v, norm, *args, backend=backend)
    torch.testing.assert_close(n.double(), n_ref, rtol=1e-6, atol=0)
    assert_close_list(p, p64, "params")
    assert_close_list(b, b64, "backups")
    assert_close_list(v, v64, "variances")
    assert all((t > 0).all() for t in v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("given_norm", [False, True])
def test_ebisam_perturb(backend, name, given_norm):
    gen, p, g = case(name, 5)
    norm = torch.tensor(0.7, dtype=F64) if given_norm else None
    args = (SEED, 11, 0.05, 0.5, 1e-12)
    p64, b64, b = f64(p), f64(p), nan_like(p)
    n_ref = ref.ebisam_perturb_(p64, f64(g), b64, ids_for(p), norm, *args)
    n = vi_ops.ebisam_perturb_(p, g, b, ids_for(p), norm, *args, backend=backend)
    torch.testing.assert_close(n.double(), n_ref, rtol=1e-6, atol=0)
    assert_close_list(p, p64, "params")
    assert_close_list(b, b64, "backups")
    if name == "threaded":
        frac = (p[0] != b[0]).double().mean().item()
        assert abs(frac - 0.5) < 0.01  # each coordinate chosen with probability beta


# --- noise contract ------------------------------------------------------------------------------
def test_philox_uniform_matches_the_normals_words():
    """Lane 0 of philox_normal is Box-Muller of (u0, u1) of the same block: reconstruct it."""
    u = ref.philox_uniform(42, 3, 9, 400)
    z = ref.philox_normal(42, 3, 9, 400)
    u0, u1 = u[0::4], u[1::4]
    want = torch.sqrt(-2 * torch.log(u0)) * torch.cos(2 * torch.pi * u1)
    torch.testing.assert_close(z[0::4], want)
    big = ref.philox_uniform(7, 0, 0, 200_000)
    assert 0 < big.min() and big.max() < 1
    assert abs(big.mean().item() - 0.5) < 0.005 and abs(big.var().item() - 1 / 12) < 0.002


@pytest.mark.parametrize("backend", BACKENDS)
def test_mfvi_update_regenerates_the_noise(backend):
    """With lr = 0 and no KL, the variance step depends on z only through g z: feeding g = 1 shows
    that mfvi_update_ regenerates exactly the z that vi_noise_ added."""
    p = [torch.randn(1001, dtype=F64)]
    v = [torch.full((1001,), 0.04, dtype=F64)]
    b = [torch.empty_like(p[0])]
    mu = p[0].clone()
    vi_ops.vi_noise_(p, b, v, [4], 99, 6, 0.0, backend=backend)
    z = (p[0] - mu) / 0.2
    vi_ops.mfvi_update_(p, [torch.ones(1001, dtype=F64)], b, v, [], [4], 99, 6, 0.0, 1.0, 0.0,
                        0.04, 1e300, backend=backend)
    torch.testing.assert_close(v[0], 0.04 * torch.exp(-0.5 * z * 0.2), rtol=1e-12, atol=0)
    assert torch.equal(p[0], mu)


# --- torch.compile shapes -------------------------------------------------------------------------
@needs_ext
def test_fake_kernels():
    with FakeTensorMode():
        g = [torch.randn(3), torch.randn(4, dtype=F64)]
        v = [torch.ones(3), torch.ones(4, dtype=F64)]
        out = torch.ops.samkernels.vsam_sumsq(g, v)
        assert out.shape == () and out.dtype == F64
        p, b = [torch.randn(3)], [torch.empty(3)]
        out = torch.ops.samkernels.vsam_perturb_(p, [torch.randn(3)], b, [torch.ones(3)], None,
                                                 3.0, 1e-12, 0.01, 1.0, 10.0, True, 1e-12)
        assert out.shape == () and out.dtype == F64  # the norm contract: float64 everywhere
        out = torch.ops.samkernels.ebisam_perturb_(p, [torch.randn(3)], b, [0], None, 1, 0, 0.05,
                                                 0.5, 1e-12)
        assert out.shape == () and out.dtype == F64
        torch.ops.samkernels.vi_noise_(p, b, [], [0], 1, 0, 0.1)
        torch.ops.samkernels.mfvi_update_(p, [torch.randn(3)], b, [torch.ones(3)], [], [0], 1, 0,
                                          0.1, 0.01, 0.0, 1.0, 10.0)


@needs_ext
def test_cpu_errors_name_the_argument():
    p = [torch.randn(4)]
    with pytest.raises(RuntimeError, match=r"variances\[0\] has dtype"):
        vi_ops.vi_noise_(p, [torch.empty(4)], [torch.ones(4, dtype=F64)], [0], 1, 0, 0.0,
                         backend="cpu")
    with pytest.raises(RuntimeError, match="param_ids has 2 entries"):
        vi_ops.vi_noise_(p, [torch.empty(4)], [], [0, 1], 1, 0, 0.1, backend="cpu")
    with pytest.raises(RuntimeError, match=r"grads\[0\] has 3 elements"):
        vi_ops.vsam_perturb_(p, [torch.randn(3)], [torch.empty(4)], [torch.ones(4)], None, 4.0,
                             1e-12, 0.01, 1.0, 10.0, True, 0.0, backend="cpu")
    with pytest.raises(RuntimeError, match="momenta has 0 tensors|momenta"):
        vi_ops.mfvi_update_(p, [torch.randn(4)], [torch.randn(4)], [torch.ones(4)],
                            [torch.ones(5)], [0], 1, 0, 0.1, 0.1, 0.9, 1.0, 10.0, backend="cpu")
    with pytest.raises(RuntimeError, match="beta"):
        vi_ops.ebisam_perturb_(p, [torch.randn(4)], [torch.empty(4)], [0], None, 1, 0, 0.05, 1.0,
                             1e-12, backend="cpu")


