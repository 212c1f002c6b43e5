"""Every fused op against the float64 reference (samkernels.ops.reference) on fresh random inputs:
odd sizes, many 1-element tensors, non-contiguous parameters, mixed dtypes in one list, and lists
large enough to take the multi-threaded path."""
import pytest
import torch

from samkernels import ops
from samkernels.ops import reference as ref

from conftest import needs_ext
from helpers import assert_close_list, f64, make_params, positive_like, state_like

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
CASES = {
    "odd": ([(1,), (3,), (5, 7), (4097,), (33, 65)], [F32] * 5, [0, 0, 0, 0, 1]),
    "tiny": ([(1,)] * 300, [F32] * 300, []),
    "threaded": ([(40000,), (70001,), (3, 5)], [F32] * 3, []),
    "mixed": ([(5, 7), (129,), (64,), (17, 3), (9, 11)], [F32, BF16, F64, F16, BF16], [0, 0, 0, 0, 1]),
    "f64": ([(7,), (300, 3), (1,)], [F64] * 3, [0, 1, 0]),
}
BACKENDS = [pytest.param("cpu", marks=needs_ext)]


def case(name, seed):
    shapes, dtypes, nc = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    params = make_params(shapes, dtypes, gen, nc)
    grads = make_params(shapes, dtypes, gen, nc)
    return gen, params, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("given_norm", [False, True])
def test_sam_perturb(backend, name, adaptive, given_norm):
    gen, p, g = case(name, 1)
    p64, g64 = f64(p), f64(g)
    b, b64 = [torch.full_like(t, float("nan")) for t in p], [torch.empty_like(t) for t in p64]
    eta = 0.01 if adaptive else 0.0
    norm = ref.grad_sumsq(p64, g64, adaptive, eta).sqrt() * 1.5 if given_norm else None
    n_ref = ref.sam_perturb_(p64, g64, b64, norm, 0.05, 1e-12, adaptive, eta)
    n = ops.sam_perturb_(p, g, b, norm, 0.05, 1e-12, adaptive, eta, backend=backend)
    torch.testing.assert_close(n.double(), n_ref, rtol=1e-6, atol=0)
    assert_close_list(p, p64, "params")
    assert_close_list(b, b64, "backups")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_grad_sumsq(backend, name):
    _, p, g = case(name, 2)
    for adaptive in (False, True):
        want = ref.grad_sumsq(f64(p), f64(g), adaptive, 0.01)
        got = ops.grad_sumsq(p, g, adaptive, 0.01, backend=backend)
        torch.testing.assert_close(got.double(), want, rtol=1e-9, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("momentum,dampening,nesterov,wd,first",
                         [(0.0, 0.0, False, 0.0, False), (0.9, 0.0, False, 5e-4, False),
                          (0.9, 0.0, True, 5e-4, False), (0.9, 0.1, False, 0.0, True),
                          (0.8, 0.0, True, 1e-2, True)])
def test_sam_restore_sgd(backend, name, momentum, dampening, nesterov, wd, first):
    gen, p, g = case(name, 3)
    b = make_params([t.shape for t in p], [t.dtype for t in p], gen)
    bufs = state_like(p, gen) if momentum else []
    args = (0.1, momentum, dampening, nesterov, wd, first)
    p64, bufs64 = f64(p), f64(bufs)
    ref.sam_restore_sgd_(p64, f64(g), f64(b), bufs64, *args)
    ops.sam_restore_sgd_(p, g, b, bufs, *args, backend=backend)
    assert_close_list(p, p64, "params")
    assert_close_list(bufs, bufs64, "momentum_bufs")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("decoupled,wd,step", [(False, 0.0, 1), (False, 1e-2, 7), (True, 5e-2, 3)])
def test_sam_restore_adam(backend, name, decoupled, wd, step):
    gen, p, g = case(name, 4)
    b = make_params([t.shape for t in p], [t.dtype for t in p], gen)
    m, v = state_like(p, gen), positive_like(p, gen, 0.01, 1.0)
    args = (step, 1e-2, 0.9, 0.99, 1e-8, wd, decoupled)
    p64, m64, v64 = f64(p), f64(m), f64(v)
    ref.sam_restore_adam_(p64, f64(g), f64(b), m64, v64, *args)
    ops.sam_restore_adam_(p, g, b, m, v, *args, backend=backend)
    assert_close_list(p, p64, "params")
    assert_close_list(m, m64, "exp_avgs")
    assert_close_list(v, v64, "exp_avg_sqs")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_bsam_noise(backend, name):
    gen, p, _ = case(name, 5)
    s = positive_like(p, gen)
    ids = [3 * i + 1 for i in range(len(p))]
    b, p64, b64 = [torch.empty_like(t) for t in p], f64(p), [torch.empty_like(t).double() for t in p]
    ref.bsam_noise_(p64, b64, f64(s), ids, 1234567891234, 5, 1000.0)
    ops.bsam_noise_(p, b, s, ids, 1234567891234, 5, 1000.0, backend=backend)
    assert_close_list(p, p64, "params")
    assert_close_list(b, b64, "backups")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("accumulate", [False, True])
def test_bsam_perturb(backend, name, accumulate):
    gen, p, g = case(name, 6)
    b = make_params([t.shape for t in p], [t.dtype for t in p], gen)
    s = positive_like(p, gen)
    acc = positive_like(p, gen, 0.0, 1.0) if accumulate else []
    p64, s64, acc64 = f64(p), f64(s), f64(acc)
    ref.bsam_perturb_(p64, f64(g), f64(b), s64, acc64, 0.05, 0.999, 1e-3, 0.1)
    ops.bsam_perturb_(p, g, b, s, acc, 0.05, 0.999, 1e-3, 0.1, backend=backend)
    assert_close_list(p, p64, "params")
    assert_close_list(s, s64, "precisions")
    assert_close_list(acc, acc64, "accums")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("accumulate,released", [(False, False), (True, False), (True, True)])
def test_bsam_update(backend, name, accumulate, released):
    gen, p, g = case(name, 7)
    b = make_params([t.shape for t in p], [t.dtype for t in p], gen)
    s, gm = positive_like(p, gen), state_like(p, gen)
    acc = positive_like(p, gen, 0.0, 2.0) if accumulate else []
    args = (0.05, 0.9, 0.999, 1e-3, 0.1, 0.5, released)
    p64, s64, gm64 = f64(p), f64(s), f64(gm)
    ref.bsam_update_(p64, f64(g), f64(b), s64, gm64, f64(acc), *args)
    ops.bsam_update_(p, g, b, s, gm, acc, *args, backend=backend)
    assert_close_list(p, p64, "params")
    assert_close_list(s, s64, "precisions")
    assert_close_list(gm, gm64, "momenta")


# --- the noise generator ------------------------------------------------------------------------
def test_philox_known_answers():
    """Random123's published Philox4x32-10 known-answer vectors."""
    t = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in kat:
        got = ref.philox4x32(*(t(c) for c in ctr), *key)
        assert tuple(int(x) for x in got) == want


def test_philox_normal_moments_and_independence():
    z = ref.philox_normal(seed=42, step=0, param_id=0, numel=400_000)
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1) < 0.01
    assert abs(((z[1:] * z[:-1]).mean()).item()) < 0.01  # neighbours (shared Philox blocks) uncorrelated
    kurt = (z ** 4).mean().item()
    assert abs(kurt - 3) < 0.05
    other = [ref.philox_normal(42, 1, 0, 1000), ref.philox_normal(42, 0, 1, 1000),
             ref.philox_normal(43, 0, 0, 1000)]
    for o in other:  # any change of step, parameter or seed gives different numbers
        assert (o - z[:1000]).abs().min() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_independent_of_list_partition(backend):
    """The same parameter gets the same noise whether it is noised alone or inside a long list."""
    gen = torch.Generator().manual_seed(0)
    p = make_params([(50000,), (3,)], [F32, F32], gen)
    s = positive_like(p, gen)
    alone = [p[0].clone()]
    ops.bsam_noise_(alone, [torch.empty_like(alone[0])], s[:1], [7], 99, 3, 10.0, backend=backend)
    both = [t.clone() for t in p]
    ops.bsam_noise_(both, [torch.empty_like(t) for t in both], s, [7, 8], 99, 3, 10.0, backend=backend)
    assert torch.equal(alone[0], both[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 3, 5, 33, 1023, 1025])
def test_noise_of_a_short_tensor_is_a_prefix_of_a_long_ones(backend, n):
    """A tensor's noise depends only on (seed, step, param id, element index): a short tensor gets
    exactly the first elements of a long one's (the CPU kernel sizes its Philox block to the run)."""
    gen = torch.Generator().manual_seed(n)
    long_ = make_params([(5000,)], [F32], gen)
    s = positive_like(long_, gen)
    short = [long_[0][:n].clone()]
    ops.bsam_noise_(long_, [torch.empty_like(long_[0])], s, [7], 123, 4, 10.0, backend=backend)
    ops.bsam_noise_(short, [torch.empty_like(short[0])], [s[0][:n].clone()], [7], 123, 4, 10.0,
                    backend=backend)
    assert torch.equal(long_[0][:n], short[0])


@needs_ext
def test_cpu_errors_name_the_argument():
    p = [torch.randn(4)]
    with pytest.raises(RuntimeError, match=r"grads\[0\] has 3 elements"):
        ops.sam_perturb_(p, [torch.randn(3)], [torch.empty(4)], None, 0.1, 1e-12, False, 0.0,
                         backend="cpu")
    with pytest.raises(RuntimeError, match=r"precisions\[0\] has dtype"):
        ops.bsam_noise_(p, [torch.empty(4)], [torch.ones(4, dtype=F64)], [0], 1, 0, 10.0,
                        backend="cpu")
    with pytest.raises(RuntimeError, match="backups has 0 tensors"):
        ops.sam_perturb_(p, [torch.randn(4)], [], None, 0.1, 1e-12, False, 0.0, backend="cpu")


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_released_order_without_accums_is_an_error(backend):
    """Without accums line 5 already ran in bsam_perturb_, so the released-code order (omega
    updated with the old s) cannot be honoured: an error, on every path, not a silent paper order."""
    p, g = [torch.randn(5)], [torch.randn(5)]
    args = (p, g, [torch.randn(5)], [torch.ones(5)], [torch.zeros(5)], [], 0.1, 0.9, 0.999, 0.01,
            0.1, 1.0, True)
    with pytest.raises(ValueError, match="released_order=True needs accums"):
        ops.bsam_update_(*args, backend=backend)
    if backend == "cpu":  # the op itself, called without the Python wrapper
        with pytest.raises(RuntimeError, match="released_order=True needs accums"):
            torch.ops.samkernels.bsam_update_(*args)
