"""pytest-benchmark: BiSAM ascent loss Q, forward + backward, fused vs F.cross_entropy vs naive.

    pytest bench/bench_bisam_loss.py --benchmark-columns=median,iqr,rounds

Implementations: ``fused-<backend>`` (samkernels.bisam_loss: one kernel reads the logits once and
writes the gradient; backward returns that buffer), ``cross_entropy`` (F.cross_entropy, the
training loss BiSAM pairs Q with; a floor for "one softmax pass"), ``naive`` (the same Q as
bisam_loss_reference written in PyTorch ops, autograd backward).  Each round: forward, then
``backward()`` into fresh logits' ``.grad``.

Sizes B x K: 128x10, 128x100, 8192x1000, 4096x32000, 1024x128000 on CUDA (fp32 and bf16; the
fused backends are ``cuda`` when the extension has CUDA kernels, and ``triton``).  On the CPU the
last two shrink to 256x32000 and 64x128000 (same K, 8M logits) so the default run stays well under
two minutes; fused backend ``cpu`` (Triton runs only interpreted there).  On CUDA, besides the
wall time of a synchronised round, ``extra_info`` holds the median of CUDA-event timings
(``cuda_median_ms``) and the effective bandwidth for one logits read + one gradient write.
"""
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import samkernels
from samkernels import _dispatch
from samkernels.ops.bisam_loss import bisam_loss, bisam_loss_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":
    SIZES = [(128, 10), (128, 100), (8192, 1000), (4096, 32000), (1024, 128000)]
    DTYPES = [torch.float32, torch.bfloat16]
    FUSED = ["cuda", "triton"]
else:
    SIZES = [(128, 10), (128, 100), (8192, 1000), (256, 32000), (64, 128000)]
    DTYPES = [torch.float32]
    FUSED = ["cpu"]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _cuda_event_median_ms(fn, repeat=25):
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _loss_fn(impl):
    if impl == "cross_entropy":
        return F.cross_entropy
    if impl == "naive":
        return bisam_loss_reference
    backend = impl.split("-", 1)[1]
    why = _dispatch._why_not(backend, torch.device(DEVICE))
    if why is None and backend in ("cpu", "cuda") and not hasattr(torch.ops.samkernels,
                                                                  "bisam_loss_fwd"):
        why = "samkernels._C has no bisam_loss_fwd op (rebuild the extension)"
    if why is not None:
        pytest.skip(f"backend {backend!r} unavailable: {why}")

    def fused(logits, target):
        with samkernels.use_backend(backend):
            return bisam_loss(logits, target)

    return fused


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", [f"fused-{b}" for b in FUSED] + ["cross_entropy", "naive"])
def test_bisam_loss_fwd_bwd(benchmark, impl, size, dtype):
    B, K = size
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, K, generator=gen) * 2).to(device=DEVICE, dtype=dtype)
    logits.requires_grad_(True)
    target = torch.randint(0, K, (B,), generator=gen).to(DEVICE)
    loss_fn = _loss_fn(impl)

    def step():
        logits.grad = None
        loss_fn(logits, target).backward()

    def run():
        step()
        _sync()

    run()  # warm-up (Triton compiles, allocator settles)
    big = B * K >= 4_000_000
    rounds = (3 if big else 20) if DEVICE == "cpu" else 30
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    bytes_moved = 2 * B * K * logits.element_size()  # read logits, write the gradient
    benchmark.extra_info["B"], benchmark.extra_info["K"] = B, K
    if DEVICE == "cuda":
        ms = _cuda_event_median_ms(step)
        benchmark.extra_info["cuda_median_ms"] = ms
        benchmark.extra_info["GBps_read_logits_write_grad"] = bytes_moved / ms / 1e6
    else:
        t0 = time.perf_counter()
        run()
        benchmark.extra_info["GBps_read_logits_write_grad"] = bytes_moved / (
            time.perf_counter() - t0) / 1e9
