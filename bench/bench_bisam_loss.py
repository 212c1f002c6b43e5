"""BiSAM ascent loss Q, forward + backward: fused vs F.cross_entropy vs the naive PyTorch formula.

    python bench/bench_bisam_loss.py                   # markdown table (the one in RESULTS.md)
    python bench/bench_bisam_loss.py --sizes 128x10,128x100 --rounds 500
    python bench/bench_bisam_loss.py --md loss.md --json loss.json   # also write table / numbers
    python bench/bench_bisam_loss.py --dry-run     # toy sizes (bench/gpu_session.sh --cpu-dry-run)
    pytest bench/bench_bisam_loss.py --benchmark-columns=median,iqr,rounds   # pytest-benchmark

Implementations: ``fused-<backend>`` (samkernels.bisam_loss: one kernel reads the logits once and
writes the gradient; backward returns that buffer), ``cross_entropy`` (F.cross_entropy, the
training loss BiSAM pairs Q with; a floor for "one softmax pass"), ``naive`` (the same Q as
bisam_loss_reference written in PyTorch ops, autograd backward).  One round: forward, then
``backward()`` into fresh logits' ``.grad`` (then a device sync on CUDA).

Sizes B x K (the benchmark's five): 128x10, 128x100, 8192x1000, 4096x32000, 1024x128000, on every device;
float32 (and bf16 on CUDA).  Fused backends: ``cpu`` on the CPU (Triton runs only interpreted
there); ``cuda`` (when the extension has CUDA kernels) and ``triton`` on CUDA.

GB/s = bytes / median time, bytes = logits read + gradient written + int64 labels read
(``2 B K elt_size + 8 B``), the least any fused forward+backward must move.  The table mode runs
the implementations of a size round-robin (one round of each, in a shuffled order), so a machine
shared with other jobs slows them alike (and none always runs right after the same other one:
after a parallel ATen op the OpenMP workers keep spinning for a while); the median of the rounds
is reported.  On CUDA each round is timed
with CUDA events.  The copy bandwidth (a large tensor copy, bytes read + written) is measured in
the same run: the table gives each time as a fraction of it, and the target is >= 80 % at
large K (K >= 32000) for the fused kernels.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys

import pytest
import torch
import torch.nn.functional as F

try:  # the installed samkernels (what bench/gpu_session.sh measures), else this checkout's
    import samkernels  # noqa: E402
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import samkernels  # noqa: E402
from samkernels import _dispatch  # noqa: E402
from samkernels.ops.bisam_loss import bisam_loss, bisam_loss_reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: the shared timer and options
from report import add_output_options, time_once, write_whole  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [(128, 10), (128, 100), (8192, 1000), (4096, 32000), (1024, 128000)]
if DEVICE == "cuda":
    DTYPES = [torch.float32, torch.bfloat16]
    FUSED = ["cuda", "triton"]
else:
    DTYPES = [torch.float32]
    FUSED = ["cpu"]
IMPLS = [f"fused-{b}" for b in FUSED] + ["cross_entropy", "naive"]
DRY_SIZES = [(4, 10), (3, 300)]
LARGE_K = 32000  # the bandwidth target is for rows at least this wide
BW_TARGET = 0.80


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


def bytes_moved(B, K, dtype) -> int:
    """Logits read + gradient written + int64 labels read."""
    return 2 * B * K * torch.empty((), dtype=dtype).element_size() + 8 * B


def default_rounds(B, K) -> int:
    n = B * K
    if DEVICE == "cuda":
        return 100 if n < 1_000_000 else 30
    return 400 if n < 1_000_000 else (10 if n < 20_000_000 else 3)


def copy_bandwidth(numel: int = 64 * 2 ** 20, rounds: int = 20) -> float:
    """Bytes/s of a tensor copy (read + write), median of ``rounds`` after a warm-up."""
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = statistics.median(time_once(lambda: dst.copy_(src)) for _ in range(rounds))
    del src, dst
    return 2 * 4 * numel / t


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
def measure(sizes, dtypes, impls, rounds=None, out=print, progress=None):
    """{(B, K, dtype, impl): median seconds}, implementations of a size run round-robin;
    ``progress(res)`` after each size (a session cut short keeps its table)."""
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
                    t = time_once(steps[i])
                    if r >= warmup:
                        times[i].append(t)
            for i in live:
                res[(B, K, dtype, i)] = statistics.median(times[i])
            out(f"# {B}x{K} {str(dtype).replace('torch.', '')}: " + ", ".join(
                f"{i} {res[(B, K, dtype, i)] * 1e3:.3f} ms" for i in live) + f" ({n} rounds)")
            del logits, target, steps
            if progress is not None:
                progress(res)
    return res


def rows_of(res, bw=None) -> list:
    out = []
    for (B, K, dtype, impl), t in res.items():
        ce = res.get((B, K, dtype, "cross_entropy"))
        naive = res.get((B, K, dtype, "naive"))
        gbps = bytes_moved(B, K, dtype) / t / 1e9
        out.append(dict(B=B, K=K, dtype=str(dtype).replace("torch.", ""), impl=impl,
                        median_ms=t * 1e3, GBps=gbps,
                        bw_fraction=gbps * 1e9 / bw if bw else None,
                        x_cross_entropy=t / ce if ce else None,
                        vs_naive=naive / t if naive else None))
    return out


def targets(rows, large_k=LARGE_K) -> list:
    """Fused rows at large K against >= BW_TARGET of the copy bandwidth."""
    out = []
    for r in rows:
        if r["impl"].startswith("fused-") and r["K"] >= large_k and r["bw_fraction"] is not None:
            out.append(dict(what=f"{r['impl']} {r['B']}x{r['K']} {r['dtype']}: fraction of copy bw",
                            measured=r["bw_fraction"], target=f">= {BW_TARGET}",
                            met=r["bw_fraction"] >= BW_TARGET))
    return out


def table(res, bw=None, target_rows=()) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["| B × K | dtype | impl | median ms | GB/s | × copy bw | × cross_entropy | "
             "speed-up vs naive |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows_of(res, bw):
        lines.append(f"| {r['B']}×{r['K']} | {r['dtype']} | {r['impl']} | {r['median_ms']:.3f} | "
                     f"{r['GBps']:.2f} | {f(r['bw_fraction'])} | {f(r['x_cross_entropy'])} | "
                     f"{f(r['vs_naive'])} |")
    if target_rows:
        lines += ["", "Targets (fused forward + backward at large K; on the CPU dry run "
                  "the toy sizes stand in and prove nothing):", "",
                  "| what | measured | target | met |", "|---|---:|---|---|"]
        lines += [f"| {t['what']} | {t['measured']:.2f} | {t['target']} | "
                  f"{'yes' if t['met'] else 'NO'} |" for t in target_rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None,
                    help="comma-separated BxK (default: the five benchmark sizes; --dry-run: two toy sizes)")
    ap.add_argument("--impls", default=None)
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds per implementation (default by size and device)")
    ap.add_argument("--dry-run", action="store_true",
                    help="toy sizes, 2 rounds; on CPU tensors also the interpreted triton kernel")
    add_output_options(ap)
    args = ap.parse_args(argv)
    if args.sizes:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    else:
        sizes = DRY_SIZES if args.dry_run else SIZES
    impls = list(IMPLS)
    if args.dry_run and DEVICE == "cpu" and _why_unavailable("fused-triton") is None:
        impls.insert(1, "fused-triton")  # the interpreter on CPU tensors: the same kernel source
    if args.impls:
        impls = args.impls.split(",")
    rounds = args.rounds or (2 if args.dry_run else None)
    bw = copy_bandwidth(2 ** 20 if args.dry_run and DEVICE == "cpu" else 64 * 2 ** 20,
                        rounds=3 if args.dry_run else 20)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    header = (f"# device: {device}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
              f"copy bandwidth {bw / 1e9:.1f} GB/s; {datetime.date.today()}"
              + ("; CPU DRY RUN (toy sizes)" if args.dry_run else ""))
    print(header)
    missing = {i: _why_unavailable(i) for i in impls if _why_unavailable(i) is not None}
    for i, why in missing.items():
        print(f"# {i} unavailable: {why}")
    large_k = max(k for _, k in sizes) if args.dry_run else LARGE_K

    def write(res, final=False):
        rows = rows_of(res, bw)
        target_rows = targets(rows, large_k)
        md = table(res, bw, target_rows)
        if args.md:
            write_whole(args.md, header + ("" if final else "; PARTIAL (still running or cut short)")
                        + "\n\n" + "".join(f"{i} unavailable: {w}\n" for i, w in missing.items())
                        + ("\n" if missing else "") + md + "\n")
        if args.json:
            write_whole(args.json, json.dumps(
                dict(device=device, torch=torch.__version__, dry_run=args.dry_run, complete=final,
                     copy_bandwidth_GBps=bw / 1e9, impls=impls, unavailable=missing, rows=rows,
                     targets=target_rows), indent=1))
        return md

    res = measure(sizes, DTYPES, impls, rounds, progress=write)
    print(write(res, final=True))


if __name__ == "__main__":
    main()
