"""The norm contract, one for every backend.

Every norm a backend computes -- ``grad_sumsq``, ``vsam_sumsq``, and the norm that
``sam_perturb_`` / ``vsam_perturb_`` / ``ebisam_perturb_`` return when they compute it -- squares and
sums in float64 and comes back as a 0-dim float64 tensor on the parameters' device, as the
executable spec (samkernels/ops/reference.py) does, whatever the parameters'
dtypes.  A float32 accumulator would differ from the reference in the 7th digit on a large model
and overflow to inf on finite gradients above ~1.8e19 (then the optimizers' on-device check of
the norm takes a finite step for a non-finite one and skips it).

Backends: reference, cpu (the compiled extension), triton (through the interpreter on CPU
tensors; TRITON_INTERPRET=1 is set here before triton is imported), and cuda (on CUDA tensors)
when a GPU and the CUDA kernels are present.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from samkernels import _dispatch, ops  # noqa: E402
from samkernels.ops import reference as R  # noqa: E402

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
SHAPES = [(1000,), (33,), (7, 5), (4097,), (3,)]
DTYPES = {"fp32": [F32], "bf16": [BF16], "fp16": [F16], "fp64": [F64],
          "mixed": [F32, BF16, F64, F16, F32]}  # one list of tensors of several dtypes
# every norm-producing op; the norm is computed by the op (no norm passed in)
OPS = ["grad_sumsq", "grad_sumsq_asam", "vsam_sumsq", "sam_perturb_", "asam_perturb_",
       "vsam_perturb_", "ebisam_perturb_"]


def _backend_params():
    out = []
    for name in ("reference", "cpu", "triton", "cuda"):
        # triton runs on CPU tensors in the interpreter, else (a GPU run) on CUDA tensors
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        on_cuda = name == "cuda" or (name == "triton" and not interpreted)
        if on_cuda and not torch.cuda.is_available():
            reason = "needs a CUDA device"
        else:
            reason = _dispatch._why_not(name, torch.device("cuda" if on_cuda else "cpu"))
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


BACKENDS = _backend_params()


def _device(backend):
    if backend == "cuda" or (backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1"):
        return torch.device("cuda")
    return torch.device("cpu")


def _lists(dtypes, device, seed, scale=1.0):
    """params, grads (param dtype), backups, variances (fp32, fp64 for fp64 params, in
    [0.5, 1.5)), param ids."""
    gen = torch.Generator().manual_seed(seed)
    ps, gs, vs = [], [], []
    for i, shape in enumerate(SHAPES):
        dt = dtypes[i % len(dtypes)]
        ps.append(torch.randn(shape, generator=gen, dtype=F64).to(dt).to(device))
        gs.append((torch.randn(shape, generator=gen, dtype=F64) * scale).to(dt).to(device))
        vs.append((torch.rand(shape, generator=gen, dtype=F64) + 0.5)
                  .to(F64 if dt == F64 else F32).to(device))
    bs = [torch.empty_like(p) for p in ps]
    return ps, gs, bs, vs, [3 * i + 1 for i in range(len(ps))]


def _run(op, ps, gs, bs, vs, ids, backend):
    """The norm (or squared norm) op ``op`` computes, with ``backend``."""
    kw = dict(backend=backend)
    if op in ("grad_sumsq", "grad_sumsq_asam"):
        return ops.grad_sumsq(ps, gs, op == "grad_sumsq_asam", 0.01, **kw)
    if op == "vsam_sumsq":
        return ops.vsam_sumsq(gs, vs, **kw)
    if op in ("sam_perturb_", "asam_perturb_"):
        return ops.sam_perturb_(ps, gs, bs, None, 0.05, 1e-12, op == "asam_perturb_", 0.01, **kw)
    if op == "vsam_perturb_":
        dim = float(sum(p.numel() for p in ps))
        return ops.vsam_perturb_(ps, gs, bs, vs, None, dim, 1e-12, 1e-3, 2.0, 40.0, True,
                                    1e-8, **kw)
    if op == "ebisam_perturb_":
        return ops.ebisam_perturb_(ps, gs, bs, ids, None, 5, 7, 0.05, 0.5, 1e-12, **kw)
    raise KeyError(op)


def _want(op, ps, gs, vs):
    """The float64 reference value of the same (already rounded) inputs."""
    ps, gs, vs = ([t.detach().cpu().double() for t in x] for x in (ps, gs, vs))
    if op in ("grad_sumsq", "grad_sumsq_asam"):
        return R.grad_sumsq(ps, gs, op == "grad_sumsq_asam", 0.01)
    if op == "vsam_sumsq":
        return R.vsam_sumsq(gs, vs)
    if op in ("sam_perturb_", "asam_perturb_"):
        return R.grad_sumsq(ps, gs, op == "asam_perturb_", 0.01).sqrt()
    if op == "vsam_perturb_":
        return R.vsam_sumsq(gs, vs).sqrt()
    if op == "ebisam_perturb_":
        return R.grad_sumsq(gs, gs, False, 0.0).sqrt()
    raise KeyError(op)


def _check(op, backend, dtypes, seed, scale):
    device = _device(backend)
    ps, gs, bs, vs, ids = _lists(dtypes, device, seed, scale)
    want = _want(op, ps, gs, vs)  # before the perturbations move ps and vs
    got = _run(op, ps, gs, bs, vs, ids, backend)
    assert isinstance(got, torch.Tensor) and got.dim() == 0, got
    assert math.isfinite(want.item()), want  # the inputs are finite, and so is the float64 sum
    assert math.isfinite(got.item()), f"{backend} {op}: {got.item()} for a finite norm"
    assert got.dtype == F64, f"{backend} {op}: returned {got.dtype}, the contract is float64"
    assert got.device.type == device.type, (got.device, device)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=0,
                               msg=lambda m: f"{backend} {op}: {m}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_norms_are_float64(backend, dtype, op):
    _check(op, backend, DTYPES[dtype], seed=OPS.index(op), scale=1.0)


# vsam_perturb_'s variance step squares g in the parameters' maths (fp32), as the reference does:
# inf there is expected, and numpy (the Triton interpreter) warns about it
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_of_huge_finite_gradients_is_finite(backend, dtype, op):
    """|g| ~ 1e20 is finite in fp32 and bf16 but its square (1e40) is not: the squares must be
    taken in float64 (fp16 cannot hold such a gradient)."""
    _check(op, backend, DTYPES[dtype], seed=100 + OPS.index(op), scale=1e20)
