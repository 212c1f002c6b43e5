"""Markdown table of one optimizer step (grads pre-filled) per implementation, with the bandwidth floor.

    python bench/report.py                       # every shape set for this device
    python bench/report.py --shapes resnet50 --algos sam --repeat 20
    python bench/report.py --md steps.md --json steps.json     # also write the tables / the numbers
    python bench/report.py --dry-run             # toy shape sets (bench/gpu_session.sh --cpu-dry-run)

Implementations: ``fused-<backend>[:<nonfinite>]`` (our optimizer with that backend forced and
that ``nonfinite`` policy; default ``skip_on_device`` on a GPU, the configuration to measure there:
the inf/NaN check stays on the device), ``foreach`` (torch._foreach_*), ``loop`` (per tensor).

floor = bytes the step must move (cases.BYTES_PER_ELEMENT x elements) / copy bandwidth measured in
the same run (a large tensor copy, bytes read + written).  Times are medians of ``--repeat`` runs
after a warm-up; on CUDA they are taken with CUDA events around each step and the inputs (the
parameter lists) are larger than L2 except for the tiny-tensor sets.  Kernel launches per step and
per phase are counted with the torch profiler on CUDA.  The last table compares the measurements
with the GPU targets (cases.TARGETS).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def time_once(fn) -> float:
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


# Each measurement stops after about this many seconds (at least 3 runs): a per-tensor loop over
# 2,000 tensors or the interpreted Triton kernels would otherwise dominate the session.
BUDGET_S = 3.0


def _runs(warmup_s: float, repeat: int) -> int:
    return max(min(3, repeat), min(repeat, int(BUDGET_S / max(warmup_s, 1e-9))))


def timed(fn, repeat: int) -> float:
    """Median seconds of fn() over ``repeat`` runs (one warm-up; fewer runs for slow steps).
    ``repeat`` 1 (the dry run): the run that sizes the others is the measurement."""
    fn()
    first = time_once(fn)
    if repeat == 1:
        return first
    n = _runs(first, repeat)
    return statistics.median(time_once(fn) for _ in range(n))


def timed_phases(phases, repeat: int) -> dict:
    """Median seconds of each phase of a step, the phases run in order ``repeat`` times."""
    t0 = time.perf_counter()
    for _, fn in phases:
        fn()
    repeat = _runs(time.perf_counter() - t0, repeat)
    out = {name: [] for name, _ in phases}
    for _ in range(repeat):
        for name, fn in phases:
            out[name].append(time_once(fn))
    return {name: statistics.median(ts) for name, ts in out.items()}


def copy_bandwidth(repeat: int, numel: int = 64 * 2 ** 20) -> float:
    """Bytes/s of a tensor copy (read + write); 256 MiB of fp32 by default."""
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), repeat)
    return 2 * 4 * numel / t


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


def parse_impl(impl: str):
    """'fused-cuda:unchecked' -> ('fused', 'cuda', 'unchecked'); 'foreach' -> ('foreach', None, None)."""
    if impl.startswith("fused-"):
        backend, _, nonfinite = impl[len("fused-"):].partition(":")
        return "fused", backend, nonfinite or cases.NONFINITE
    return impl, None, None


def default_impls(dry_run: bool) -> list:
    if DEVICE == "cuda":
        fused = [f"fused-{b}:{nf}" for nf in ("skip_on_device", "unchecked") for b in ("cuda", "triton")]
    elif dry_run:  # the GPU configuration on CPU tensors: C++ kernels and interpreted Triton
        fused = ["fused-cpu:skip_on_device", "fused-triton:skip_on_device", "fused-cpu:unchecked"]
    else:
        fused = ["fused-cpu", "fused-reference"]
    return fused + ["foreach", "loop"]


def _free():
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _speedups(rows):
    for row in rows:  # speed-ups against the baselines of the same step and shapes
        base = {r["impl"]: r["median_ms"] for r in rows
                if r["algo"] == row["algo"] and r["shapes"] == row["shapes"]}
        t = row["median_ms"]
        row["vs_foreach"] = base["foreach"] / t if t and base.get("foreach") else None
        row["vs_loop"] = base["loop"] / t if t and base.get("loop") else None


def write_whole(path: str, text: str) -> None:
    """``text`` into ``path`` by a rename: a session cut while writing leaves the last whole
    table, never a truncated one."""
    tmp = f"{path}.part"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _counted(count, what, log):
    """``count(what)``, the launches the profiler saw; None (and a log line) when the profiler
    fails or sees none: the row keeps its timings."""
    try:
        n = count(what)
    except Exception as exc:
        log(f"# launch count failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return None
    zero = n == 0 or (isinstance(n, dict) and n and all(v == 0 for v in n.values()))
    if zero:  # a profiler that dropped the kernel events, not a step without launches
        log("# the profiler saw no kernel launch: not counted")
        return None
    return n


def measure(shape_sets, algos, impls, repeat, phases=True, log=print, progress=None):
    """(bandwidth, rows, phase_rows): dicts with every number of the tables.  ``progress(bw, rows,
    phase_rows)`` is called after each step and shape set (a session cut short keeps its tables)."""
    rows, phase_rows = [], []
    bw = copy_bandwidth(repeat, numel=2 ** 20 if DEVICE == "cpu" and repeat <= 3 else 64 * 2 ** 20)
    for algo in algos:
        for shape_name in shape_sets:
            shapes = cases.SHAPES[shape_name]()
            numel = sum(torch.Size(s).numel() for s in shapes)
            floor = cases.BYTES_PER_ELEMENT[algo] * numel / bw
            for impl in impls:
                kind, backend, nonfinite = parse_impl(impl)
                row = dict(algo=algo, shapes=shape_name, n_tensors=len(shapes), numel=numel,
                           impl=impl, backend=backend, nonfinite=nonfinite, median_ms=None,
                           x_floor=None, launches=None, error=None)
                t0 = time.perf_counter()
                params = cases.make_params(shapes, device=DEVICE)
                try:
                    if kind == "fused":
                        step = cases.IMPLS[algo]["fused"](params, backend, nonfinite)
                    else:
                        step = cases.IMPLS[algo][impl](params)
                    t = timed(step, repeat)
                    row.update(median_ms=t * 1e3, x_floor=t / floor)
                    if kind != "fused" or not phases:
                        row["launches"] = _counted(launches, step, log)
                    else:
                        ts = timed_phases(step.phases, repeat)
                        ns = _counted(phase_launches, step.phases, log) or {}
                        if DEVICE == "cuda" and ns:  # the step's launches: its phases' (one profile each)
                            row["launches"] = sum(ns.values())
                        for name, tp in ts.items():
                            ph_floor = cases.BYTES_PER_PHASE[algo][name] * numel / bw
                            phase_rows.append(dict(algo=algo, shapes=shape_name, impl=impl,
                                                   phase=name, median_ms=tp * 1e3,
                                                   x_floor=tp / ph_floor, launches=ns.get(name)))
                except Exception as exc:  # a backend not available here: a row that says why
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                del params
                _free()
                rows.append(row)
                log(f"# {algo} {shape_name} {impl}: "
                    + (f"{row['median_ms']:.3f} ms" if row["error"] is None else row["error"])
                    + f" ({time.perf_counter() - t0:.1f} s)")
            _speedups(rows)  # after every shape set, so a partial table has them too
            if progress is not None:
                progress(bw, rows, phase_rows)
    return bw, rows, phase_rows


def targets(rows, phase_rows) -> list:
    """Measured vs cases.TARGETS: the fused rows on the shape sets each target is about."""
    T, out = cases.TARGETS, []

    def add(what, measured, op, target):
        met = None if measured is None else (measured <= target if op == "<=" else measured >= target)
        out.append(dict(what=what, measured=measured, target=f"{op} {target}", met=met))

    for r in rows:
        if not r["impl"].startswith("fused-"):
            continue
        role = cases.ROLE.get(r["shapes"])
        name = f"{r['algo']} {r['shapes']} {r['impl']}"
        # the floor (cases.BYTES_PER_PHASE) counts the algorithm's own traffic, no inf/NaN check:
        # the kernels' efficiency target is judged on the unchecked step; the checked step's
        # extra reads (a flag pass, bSAM's deferred line 5) show in its own row
        if role == "gpt2" and r["nonfinite"] == "unchecked":
            add(f"{name}: x floor", r["x_floor"], "<=", T["gpt2_x_floor_max"])
        elif role == "tiny" and r["nonfinite"] != "unchecked":
            add(f"{name}: speed-up vs foreach", r["vs_foreach"], ">=", T["tiny_vs_foreach_min"])
            add(f"{name}: speed-up vs loop", r["vs_loop"], ">=", T["tiny_vs_loop_min"])
    for p in phase_rows:
        if p["launches"] is not None and not p["impl"].endswith(":unchecked"):
            add(f"{p['algo']} {p['shapes']} {p['impl']} {p['phase']}: launches", p["launches"], "<=",
                T["launches_per_phase_max"])
    return out


def _f(v, fmt="{:.2f}"):
    return "n/a" if v is None else (fmt.format(v) if isinstance(v, float) else str(v))


def markdown(header, rows, phase_rows, target_rows) -> str:
    out = [header, "",
           "| step | params | impl | median ms | x floor | speed-up vs foreach | vs loop | launches |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        params = f"{r['shapes']} ({r['n_tensors']} tensors, {r['numel'] / 1e6:.2f}M)"
        if r["error"] is not None:
            out.append(f"| {r['algo']} | {params} | {r['impl']} | n/a ({r['error'][:60]}) | | | | |")
            continue
        out.append(f"| {r['algo']} | {params} | {r['impl']} | {r['median_ms']:.3f} | "
                   f"{_f(r['x_floor'])} | {_f(r['vs_foreach'])} | {_f(r['vs_loop'])} | "
                   f"{'' if r['launches'] is None else r['launches']} |")
    if phase_rows:
        out += ["", "Per phase (fused steps; floor = the phase's own bytes, see cases.BYTES_PER_PHASE):",
                "", "| step | params | impl | phase | median ms | x floor | launches |",
                "|---|---|---|---|---:|---:|---:|"]
        out += [f"| {p['algo']} | {p['shapes']} | {p['impl']} | {p['phase']} | {p['median_ms']:.3f} | "
                f"{p['x_floor']:.2f} | {'' if p['launches'] is None else p['launches']} |"
                for p in phase_rows]
    if target_rows:
        out += ["", "Targets (GPU; on the CPU dry run the toy sets stand in and prove nothing):", "",
                "| what | measured | target | met |", "|---|---:|---|---|"]
        out += [f"| {t['what']} | {_f(t['measured'])} | {t['target']} | "
                f"{'n/a' if t['met'] is None else ('yes' if t['met'] else 'NO')} |" for t in target_rows]
    return "\n".join(out) + "\n"


def add_output_options(ap: argparse.ArgumentParser) -> None:
    """--md and --json, the files a report is also written to (also bench_bisam_loss.py's)."""
    ap.add_argument("--md", default=None, help="also write the markdown table(s) here")
    ap.add_argument("--json", default=None, help="also write every number here")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma list of cases.SHAPES names")
    ap.add_argument("--algos", default="sam,bsam")
    ap.add_argument("--impls", default=None,
                    help="comma list; default: fused backends (GPU: skip_on_device and unchecked), "
                         "foreach, loop")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--no-phases", action="store_true", help="skip the per-phase table of the fused steps")
    ap.add_argument("--dry-run", action="store_true",
                    help="toy shape sets, one timed run (it checks the tables, not the times)")
    add_output_options(ap)
    args = ap.parse_args(argv)

    if args.shapes:
        shape_sets = args.shapes.split(",")
    elif args.dry_run:
        shape_sets = list(cases.DRY_SETS)
    else:
        shape_sets = ["resnet50", "tiny-1000"] if DEVICE == "cpu" else list(cases.GPU_SETS)
    repeat = args.repeat or (1 if args.dry_run else 7 if DEVICE == "cpu" else 30)
    impls = args.impls.split(",") if args.impls else default_impls(args.dry_run)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"

    def write(bw, rows, phase_rows, final=False):
        header = (f"device: {device}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
                  f"copy bandwidth {bw / 1e9:.1f} GB/s; median of {repeat} runs (fewer for steps "
                  f"over {BUDGET_S:.0f} s)" + ("; CPU DRY RUN (toy sizes)" if args.dry_run else "")
                  + ("" if final else "; PARTIAL (still running or cut short)"))
        target_rows = targets(rows, phase_rows)
        md = markdown(header, rows, phase_rows, target_rows)
        if args.md:
            write_whole(args.md, md)
        if args.json:
            write_whole(args.json, json.dumps(
                dict(device=device, torch=torch.__version__, dry_run=args.dry_run,
                     complete=final, copy_bandwidth_GBps=bw / 1e9, repeat=repeat, rows=rows,
                     phases=phase_rows, targets=target_rows, target_values=cases.TARGETS),
                indent=1))
        return md

    bw, rows, phase_rows = measure(shape_sets, args.algos.split(","), impls, repeat,
                                   phases=not args.no_phases, progress=write)
    print(write(bw, rows, phase_rows, final=True))


if __name__ == "__main__":
    main()
