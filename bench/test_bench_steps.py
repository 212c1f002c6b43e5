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
