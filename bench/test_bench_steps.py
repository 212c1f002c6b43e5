"""pytest-benchmark: one optimizer step (grads pre-filled) per implementation and shape set.

    pytest bench/test_bench_steps.py --benchmark-only --benchmark-columns=median,iqr,rounds

On the CPU the fused implementations are the ``cpu`` and ``reference`` backends; on a GPU the
``cuda`` and ``triton`` backends (see report.py for the table with the bandwidth floor)."""
import pytest
import torch

import cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = ["cuda", "triton"] if DEVICE == "cuda" else ["cpu", "reference"]
SHAPE_SETS = ["resnet50", "tiny-1000"] if DEVICE == "cpu" else ["resnet50", "gpt2-small", "tiny-2000"]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


CASES = [(algo, impl) for algo, impls in cases.IMPLS.items()
         for impl in [f"fused-{b}" for b in FUSED] + [k for k in ("foreach", "loop") if k in impls]]


@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("algo,impl", CASES)
def test_step(benchmark, shapes, algo, impl):
    params = cases.make_params(cases.SHAPES[shapes](), device=DEVICE)
    if impl.startswith("fused-"):
        step = cases.IMPLS[algo]["fused"](params, impl.split("-", 1)[1])
    else:
        step = cases.IMPLS[algo][impl](params)
    step()  # warm-up: allocates state and buffers

    def run():
        step()
        _sync()

    benchmark.pedantic(run, rounds=7 if DEVICE == "cpu" else 50, warmup_rounds=1, iterations=1)


# --- the plain-PyTorch baselines compute the fused optimizer's step ------------------------------
def _philox_noise(params, seed=0):
    """The normals the fused MFVI/RandomSAM draw at step t (parameter id = list index)."""
    from samkernels.ops.reference import philox_normal
    return lambda t: [philox_normal(seed, t, i, p.numel(), p.device, torch.float32).view(p.shape)
                      for i, p in enumerate(params)]


EQUAL = [(algo, impl) for algo in ("sam", "sam_adam", "mfvi", "vsam", "ivon")
         for impl in ("foreach", "loop")]


@pytest.mark.parametrize("algo,impl", EQUAL)
def test_baseline_equals_fused(algo, impl):
    """Three steps of the foreach/loop baseline and of the fused optimizer (cpu backend, same
    hyper-parameters, the same Philox normals for MFVI): weights and Sigma's steps agree to
    float32 rounding (the fused norms are accumulated in float64)."""
    shapes = cases.tiny_shapes(30) + [(17, 5), (64,)]
    mine, theirs = cases.make_params(shapes), cases.make_params(shapes)
    fused = cases.IMPLS[algo]["fused"](mine, "cpu", nonfinite="skip")
    kw = {"noise": _philox_noise(theirs)} if algo in ("mfvi", "ivon") else {}
    base = cases.IMPLS[algo][impl](theirs, **kw)
    v0 = [v.clone() for v in getattr(base, "variances", [])]
    for _ in range(3):
        fused()
        base()
    assert any(not torch.equal(p, q) for p, q in
               zip(mine, cases.make_params(shapes)))  # the steps moved the weights
    for p, q in zip(mine, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    if v0:  # Sigma moves by ~1e-6 of itself in three steps: compare the moves
        fused_moves = [fused.optimizer.state[p]["variance"] - v for p, v in zip(mine, v0)]
        moves = [w - v for w, v in zip(base.variances, v0)]
        scale = max(m.abs().max() for m in moves)
        assert scale > 0
        for a, b in zip(fused_moves, moves):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * scale)
