"""The CPU half of tests/test_gpu_ops.py, which skips without a GPU: its per-op cases (derived from
the op table and tests/oracles.py), its input builders, the float64 expectations and the checks'
own code run here on CPU tensors (the cpu backend, or the reference without the extension), on
small lists with every layout of its SPECS, so that none of it is dead code until a GPU comes.
"""
import pytest
import torch

from samkernels.ops import reference
from samkernels.ops._spec import PHASES

import test_gpu_ops as G
from conftest import has_extension
from oracles import CASES as ARG_CASES

BACKEND = "cpu" if has_extension() else "reference"
RUN = G._backend(BACKEND)
# every layout of G.SPECS once, an empty tensor too, at toy sizes
SMALL = [((3,), "contig"), ((5,), "offset"), ((4, 3), "transposed"), ((9,), "strided"),
         ((2, 3, 2, 2), "channels_last"), ((3, 2), "mixed"), ((0,), "contig")]


def test_cases_come_from_the_table():
    """A case per code path of every multi-tensor op; the gated ones with the skip form the
    table implies; the tiny-tensor and non-current-device tests reach every op."""
    ops = {n for n, op in PHASES.items() if op.multi_tensor}
    assert {n for n, _ in G.CASES.values()} == ops
    assert sum(len(ARG_CASES[n]) for n in ops) == len(G.CASES)
    assert {G.CASES[c][0] for c in G.GATED} == {n for n in ops if PHASES[n].takes_found_inf}
    assert {G.CASES[c][0] for c in G.BASES} == ops
    assert G.GATED["sam_perturb_-0"] == "perturb" and G.GATED["sam_restore_sgd_-0"] == "restore"
    # more tensors than one launch's argument table holds, one of them large and misaligned
    assert len(G.TINY_SPECS) > 1000 and G.TINY_SPECS[-1] == ((65537,), "offset")


@pytest.mark.parametrize("case", list(G.CASES))
def test_case_against_the_reference_on_the_cpu(case):
    """check_against_reference, check_two_backends and (gated ops) the skip-form check, as the GPU
    tests run them, with the CPU op in place of the CUDA one."""
    G.check_against_reference(case, G.MIXED, "cpu", RUN, specs=SMALL)
    G.check_two_backends(case, G.F32, "cpu", RUN, G._backend("reference"), specs=SMALL)
    if case in G.GATED:
        G.check_skip_form(case, G.MIXED, (1,), "cpu", RUN, specs=SMALL)


def test_builders_on_the_cpu():
    """Maker gives every layout in every dtype; the no-sync calls cover every case (gated ones
    with both flags; a given norm also as float32)."""
    for dtype in (G.F32, G.F64, G.F16, G.BF16, G.MIXED):
        m = G.Maker(SMALL, dtype, "cpu")
        p, s = m.params(), m.state("positive")
        assert [tuple(t.shape) for t in p] == [shape for shape, _ in SMALL]
        assert all(t.dtype == G._state_dtype(q.dtype) and bool((t >= 0.5).all())
                   for t, q in zip(s, p))
        assert p[1].storage_offset() == 1 and not p[2].is_contiguous()  # offset, transposed
        assert p[5].stride() == (1, 3) and m.like_params()[5].is_contiguous()  # "mixed"
    calls = G._no_sync_calls("cpu", SMALL)
    assert {name for name, _, _ in calls} == {n for n, _ in G.CASES.values()}
    assert any("device_step" in kw for _, _, kw in calls)
    for name, args, kw in calls:
        RUN(name, *args, **kw)


def test_philox_helpers_match_the_reference():
    """The index-based normals of the 2^31-element and tail tests equal reference.philox_normal."""
    idx = torch.arange(4099, dtype=torch.int64)
    torch.testing.assert_close(G._philox_normal_at(7, 1, 5, idx),
                               reference.philox_normal(7, 1, 5, 4099), rtol=0, atol=0)
    seed, step, pid = G.TAIL_SEED, G.TAIL_STEP, G.TAIL_PID
    torch.testing.assert_close(G._philox_normal_at(seed, step, pid, idx[:64]),
                               reference.philox_normal(seed, step, pid, 64), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [G.F64, G.F32, G.BF16], ids=str)
def test_loss_checks_on_the_cpu(dtype):
    """The BiSAM loss checks (data, float64 reference, tolerances) with the CPU op."""
    if BACKEND != "cpu":
        pytest.skip("the BiSAM loss has no reference backend to force")
    logits, target = G._loss_data(6, 37, dtype, seed=2)
    _, grad = G._check_loss("cpu", logits, target, f"cpu {dtype}", device="cpu",
                            reduction="none")
    assert torch.all(grad[1] == 0)
    G._check_loss("cpu", logits, target, "cpu tanh", device="cpu", phi="tanh", mu=100.0,
                  reduction="mean")
