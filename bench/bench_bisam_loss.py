"""BiSAM ascent loss Q, forward + backward: fused vs F.cross_entropy vs the naive PyTorch formula.

    python bench/bench_bisam_loss.py                   # markdown table (the one in RESULTS.md)
    python bench/bench_bisam_loss.py --sizes 128x10,128x100 --rounds 500
    pytest bench/bench_bisam_loss.py --benchmark-columns=median,iqr,rounds   # pytest-benchmark

Implementations: ``fused-<backend>`` (samkernels.bisam_loss: one kernel reads the logits once and
writes the gradient; backward returns that buffer), ``cross_entropy`` (F.cross_entropy, the
training loss BiSAM pairs Q with; a floor for "one softmax pass"), ``naive`` (the same Q as
bisam_loss_reference written in PyTorch ops, autograd backward).  One round: forward, then
``backward()`` into fresh logits' ``.grad`` (then a device sync on CUDA).

Sizes B x K (the issue's): 128x10, 128x100, 8192x1000, 4096x32000, 1024x128000, on every device;
float32 (and bf16 on CUDA).  Fused backends: ``cpu`` on the CPU (Triton runs only interpreted
there); ``cuda`` (when the extension has CUDA kernels) and ``triton`` on CUDA.

GB/s = bytes / median time, bytes = logits read + gradient written + int64 labels read
(``2 B K elt_size + 8 B``), the least any fused forward+backward must move.  The table mode runs
the implementations of a size round-robin (one round of each, in a shuffled order), so a machine
shared with other jobs slows them alike (and none always runs right after the same other one:
after a parallel ATen op the OpenMP workers keep spinning for a while); the median of the rounds
is reported.  On CUDA each round is timed
with CUDA events.
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import samkernels  # noqa: E402
from samkernels import _dispatch  # noqa: E402
from samkernels.ops.bisam_loss import bisam_loss, bisam_loss_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [(128, 10), (128, 100), (8192, 1000), (4096, 32000), (1024, 128000)]
if DEVICE == "cuda":
    DTYPES = [torch.float32, torch.bfloat16]
    FUSED = ["cuda", "triton"]
else:
    DTYPES = [torch.float32]
    FUSED = ["cpu"]
IMPLS = [f"fused-{b}" for b in FUSED] + ["cross_entropy", "naive"]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _why_unavailable(impl):
    if not impl.startswith("fused-"):
        return None
    backend = impl.split("-", 1)[1]
    why = _dispatch._why_not(backend, torch.device(DEVICE))
    if why is None and backend in ("cpu", "cuda") and not hasattr(torch.ops.samkernels,
                                                                  "bisam_loss_fwd"):
        why = "samkernels._C has no bisam_loss_fwd op (rebuild the extension)"
    return why


def _loss_fn(impl):
    if impl == "cross_entropy":
        return F.cross_entropy
    if impl == "naive":
        return bisam_loss_reference
    backend = impl.split("-", 1)[1]
    if _dispatch.resolve(torch.device(DEVICE)) == backend:
        return bisam_loss  # what a user calls (the default backend: no use_backend block)

    def fused(logits, target):
        with samkernels.use_backend(backend):
            return bisam_loss(logits, target)

    return fused


def _inputs(B, K, dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, K, generator=gen) * 2).to(device=DEVICE, dtype=dtype)
    logits.requires_grad_(True)
    target = torch.randint(0, K, (B,), generator=gen).to(DEVICE)
    return logits, target


def _step(loss_fn, logits, target):
    def step():
        logits.grad = None
        loss_fn(logits, target).backward()
    return step


def _time_once(step) -> float:
    """Seconds of one round: CUDA events on the GPU, wall clock (after a sync) on the CPU."""
    if DEVICE == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def bytes_moved(B, K, dtype) -> int:
    """Logits read + gradient written + int64 labels read."""
    return 2 * B * K * torch.empty((), dtype=dtype).element_size() + 8 * B


def default_rounds(B, K) -> int:
    n = B * K
    return 400 if n < 1_000_000 else (10 if n < 20_000_000 else 3)


# --- pytest-benchmark ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", IMPLS)
def test_bisam_loss_fwd_bwd(benchmark, impl, size, dtype):
    why = _why_unavailable(impl)
    if why is not None:
        pytest.skip(f"{impl} unavailable: {why}")
    B, K = size
    logits, target = _inputs(B, K, dtype)
    step = _step(_loss_fn(impl), logits, target)

    def run():
        step()
        _sync()

    run()  # warm-up (Triton compiles, allocator settles)
    benchmark.pedantic(run, rounds=default_rounds(B, K), warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(B=B, K=K, median_ms=median_s * 1e3,
                                GBps=bytes_moved(B, K, dtype) / median_s / 1e9)


# --- markdown table ------------------------------------------------------------------------------
def measure(sizes, dtypes, impls, rounds=None, out=print):
    """{(B, K, dtype, impl): median seconds}, implementations of a size run round-robin."""
    rng = random.Random(0)
    res = {}
    for dtype in dtypes:
        for B, K in sizes:
            live = [i for i in impls if _why_unavailable(i) is None]
            logits, target = _inputs(B, K, dtype)
            steps = {i: _step(_loss_fn(i), logits, target) for i in live}
            n = rounds or default_rounds(B, K)
            warmup = 1 if B * K >= 20_000_000 else 5
            times = {i: [] for i in live}
            order = list(live)
            for r in range(warmup + n):
                rng.shuffle(order)  # no implementation always runs right after the same other one
                for i in order:
                    t = _time_once(steps[i])
                    if r >= warmup:
                        times[i].append(t)
            for i in live:
                res[(B, K, dtype, i)] = statistics.median(times[i])
            out(f"# {B}x{K} {str(dtype).replace('torch.', '')}: " + ", ".join(
                f"{i} {res[(B, K, dtype, i)] * 1e3:.3f} ms" for i in live) + f" ({n} rounds)")
            del logits, target, steps
    return res


def table(res) -> str:
    rows = ["| B × K | dtype | impl | median ms | GB/s | × cross_entropy | speed-up vs naive |",
            "|---|---|---|---:|---:|---:|---:|"]
    for (B, K, dtype, impl), t in res.items():
        ce = res.get((B, K, dtype, "cross_entropy"))
        naive = res.get((B, K, dtype, "naive"))
        vs_ce = f"{t / ce:.2f}" if ce else "n/a"
        vs_naive = f"{naive / t:.2f}" if naive else "n/a"
        rows.append(f"| {B}×{K} | {str(dtype).replace('torch.', '')} | {impl} | {t * 1e3:.3f} | "
                    f"{bytes_moved(B, K, dtype) / t / 1e9:.2f} | {vs_ce} | {vs_naive} |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(f"{b}x{k}" for b, k in SIZES),
                    help="comma-separated BxK (default: the issue's five)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds per implementation (default: 400 / 10 / 3 by size)")
    args = ap.parse_args(argv)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    impls = args.impls.split(",")
    print(f"# device: {DEVICE}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{datetime.date.today()}")
    res = measure(sizes, DTYPES, impls, args.rounds)
    print(table(res))


if __name__ == "__main__":
    main()
