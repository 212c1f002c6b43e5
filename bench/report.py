"""Markdown table of one optimizer step (grads pre-filled) per implementation, with the bandwidth floor.

    python bench/report.py                       # every shape set for this device
    python bench/report.py --shapes resnet50 --algos sam --repeat 20

floor = bytes the step must move (cases.BYTES_PER_ELEMENT x elements) / copy bandwidth measured in
the same run (a large tensor copy, bytes read + written).  Times are medians of ``--repeat`` runs
after a warm-up; on CUDA they are taken with CUDA events around each step and the inputs (the
parameter lists) are larger than L2 except for the tiny-tensor sets.  Kernel launches per step are
counted with the torch profiler on CUDA.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _once(fn) -> float:
    """Seconds of one fn() call: CUDA events on the GPU, wall clock on the CPU."""
    if DEVICE == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed(fn, repeat: int) -> float:
    """Median seconds of fn() over ``repeat`` runs (one warm-up)."""
    fn()
    return statistics.median(_once(fn) for _ in range(repeat))


def timed_phases(phases, repeat: int) -> dict:
    """Median seconds of each phase of a step, the phases run in order ``repeat`` times."""
    for _, fn in phases:
        fn()
    out = {name: [] for name, _ in phases}
    for _ in range(repeat):
        for name, fn in phases:
            out[name].append(_once(fn))
    return {name: statistics.median(ts) for name, ts in out.items()}


def copy_bandwidth(repeat: int) -> float:
    """Bytes/s of a 256 MiB tensor copy (read + write)."""
    n = 64 * 2 ** 20
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), repeat)
    return 2 * 4 * n / t


def launches(step) -> int | None:
    """Kernels launched by one step() (torch profiler, CUDA only)."""
    if DEVICE != "cuda":
        return None
    return phase_launches([("step", step)])["step"]


def phase_launches(phases) -> dict:
    """Kernels launched by each phase (the sequence is run once per phase, profiling only that one)."""
    if DEVICE != "cuda":
        return {name: None for name, _ in phases}
    from torch.profiler import ProfilerActivity, profile
    out = {}
    for i, (name, _) in enumerate(phases):
        for j, (_, fn) in enumerate(phases):
            if j != i:
                fn()
                continue
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            out[name] = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_shapes = "resnet50,tiny-1000" if DEVICE == "cpu" else "resnet50,gpt2-small,tiny-2000"
    ap.add_argument("--shapes", default=default_shapes)
    ap.add_argument("--algos", default="sam,bsam")
    ap.add_argument("--impls", default=None, help="comma list; default: fused backends, foreach, loop")
    ap.add_argument("--repeat", type=int, default=7 if DEVICE == "cpu" else 50)
    ap.add_argument("--no-phases", action="store_true", help="skip the per-phase table of the fused steps")
    args = ap.parse_args(argv)

    fused = ["cuda", "triton"] if DEVICE == "cuda" else ["cpu", "reference"]
    impls = args.impls.split(",") if args.impls else [f"fused-{b}" for b in fused] + ["foreach", "loop"]
    bw = copy_bandwidth(args.repeat)
    print(f"device: {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}; "
          f"torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s\n")
    phase_rows = []
    print("| step | params | impl | median ms | x floor | speed-up vs foreach | vs loop | launches |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for algo in args.algos.split(","):
        for shape_name in args.shapes.split(","):
            shapes = cases.SHAPES[shape_name]()
            numel = sum(torch.Size(s).numel() for s in shapes)
            floor = cases.BYTES_PER_ELEMENT[algo] * numel / bw
            rows = {}
            for impl in impls:
                params = cases.make_params(shapes, device=DEVICE)
                try:
                    if impl.startswith("fused-"):
                        step = cases.IMPLS[algo]["fused"](params, impl.split("-", 1)[1])
                    else:
                        step = cases.IMPLS[algo][impl](params)
                    rows[impl] = (timed(step, args.repeat), launches(step))
                    if impl.startswith("fused-") and not args.no_phases:
                        ts = timed_phases(step.phases, args.repeat)
                        ns = phase_launches(step.phases)
                        for name, t in ts.items():
                            ph_floor = cases.BYTES_PER_PHASE[algo][name] * numel / bw
                            phase_rows.append(f"| {algo} | {shape_name} | {impl} | {name} | "
                                              f"{t * 1e3:.3f} | {t / ph_floor:.2f} | "
                                              f"{'' if ns[name] is None else ns[name]} |")
                except (RuntimeError, NotImplementedError) as exc:  # backend not available here
                    rows[impl] = (None, str(exc).splitlines()[0][:60])
                del params
            for impl, (t, n) in rows.items():
                if t is None:
                    print(f"| {algo} | {shape_name} | {impl} | n/a ({n}) | | | | |")
                    continue
                fe, lp = rows.get("foreach", (None,))[0], rows.get("loop", (None,))[0]
                ratio = lambda other: f"{other / t:.2f}" if other else "n/a"  # noqa: E731
                print(f"| {algo} | {shape_name} ({len(shapes)} tensors, {numel / 1e6:.2f}M) | {impl} | "
                      f"{t * 1e3:.3f} | {t / floor:.2f} | {ratio(fe)} | {ratio(lp)} | "
                      f"{'' if n is None else n} |")
    if phase_rows:
        print("\nPer phase (fused steps; floor = the phase's own bytes, see cases.BYTES_PER_PHASE):\n")
        print("| step | params | impl | phase | median ms | x floor | launches |")
        print("|---|---|---|---|---:|---:|---:|")
        print("\n".join(phase_rows))


if __name__ == "__main__":
    main()
