"""What the default inf/NaN check costs: one SAM step with ``nonfinite="skip"`` against
``nonfinite="unchecked"``, for two source trees of samkernels (e.g. the main branch before a change
and the tree after it), on a 12-layer transformer encoder (d_model 256, 8 heads, feed-forward 1024:
144 tensors, 9,477,120 parameters), on the CPU.

A step is ``first_step()`` + ``second_step()`` of ``SAM(lr, rho, momentum=0.9)`` with the gradients
pre-filled (the optimizer's work only, as bench/cases.py).  Each round runs one worker process per
tree, in alternating order; a worker times skip and unchecked steps interleaved (one of each in
turn, so both see the same load) and reports the median of each and the median of the per-pair
ratios.  The overhead of the check is ratio - 1.

    python bench/bench_overhead.py --before /tmp/before --after . --rounds 6 --steps 15

``--before``/``--after``: directories that hold a ``samkernels`` package (with its built
``_C*.so``); ``--after`` defaults to this repository.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
POLICIES = ("skip", "unchecked")


def worker(steps: int, threads: int) -> dict:
    """Run in a process whose ``sys.path`` starts with the tree under test."""
    import torch
    import samkernels
    from samkernels import SAM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(256, 8, 1024, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    opts = {nf: SAM(params, lr=1e-3, rho=0.05, momentum=0.9, nonfinite=nf) for nf in POLICIES}
    times = {nf: [] for nf in POLICIES}
    for i in range(steps + 2):  # two warm-up rounds: state and backups allocated
        for nf in (POLICIES if i % 2 == 0 else POLICIES[::-1]):
            t0 = time.perf_counter()
            opts[nf].first_step()
            opts[nf].second_step()
            if i >= 2:
                times[nf].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times["skip"], times["unchecked"])]
    # the check's read alone, interleaved with the whole step's reduction for comparison:
    # grad_sumsq (the check before nonfinite_flag existed) and nonfinite_flag where the tree has it
    grads = [p.grad for p in params]
    reads = {"grad_sumsq": lambda: samkernels.ops.grad_sumsq(grads, grads)}
    if hasattr(samkernels.ops, "nonfinite_flag"):
        reads["nonfinite_flag"] = lambda: samkernels.ops.nonfinite_flag(grads)
    read_times = {k: [] for k in reads}
    for _ in range(steps):
        for k, fn in reads.items():
            t0 = time.perf_counter()
            fn()
            read_times[k].append(time.perf_counter() - t0)
    return {"tensors": len(params), "numel": sum(p.numel() for p in params),
            "samkernels": os.path.dirname(os.path.dirname(samkernels.__file__)),
            **{nf: statistics.median(ts) * 1e3 for nf, ts in times.items()},
            "ratio": statistics.median(ratios),
            "reads": {k: statistics.median(ts) * 1e3 for k, ts in read_times.items()}}


def run_worker(tree: str, steps: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    env.pop("SAMKERNELS_BACKEND", None)
    out = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(steps),
                          "--threads", str(threads)], env=env, check=True,
                         capture_output=True, text=True, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", help="tree of the version before (a directory with samkernels/)")
    ap.add_argument("--after", default=os.path.dirname(HERE))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.steps, args.threads)))
        return
    trees = {"after": args.after}
    if args.before:
        trees = {"before": args.before, **trees}
    print(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; "
          f"torch threads {args.threads}; load average before {os.getloadavg()[0]:.2f}")
    results = {name: [] for name in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for name in order:
            results[name].append(run_worker(trees[name], args.steps, args.threads))
    first = next(iter(results.values()))[0]
    print(f"SAM-SGD step (first_step + second_step, grads pre-filled), {first['tensors']} tensors, "
          f"{first['numel']:,} parameters; {args.rounds} rounds x {args.steps} steps; medians "
          "over rounds (min-max)\n")
    print("| tree | skip ms | unchecked ms | skip / unchecked | check overhead |")
    print("|---|---:|---:|---:|---:|")
    for name, rs in results.items():
        def col(key):
            vs = [x[key] for x in rs]
            return statistics.median(vs), min(vs), max(vs)
        s, u, q = col("skip"), col("unchecked"), col("ratio")
        print(f"| {name} | {s[0]:.2f} ({s[1]:.2f}-{s[2]:.2f}) | {u[0]:.2f} ({u[1]:.2f}-{u[2]:.2f}) "
              f"| {q[0]:.3f} ({q[1]:.3f}-{q[2]:.3f}) | {100 * (q[0] - 1):.1f} % |")
    print("\nThe check's read alone (median ms of the per-round medians):\n")
    print("| tree | op | ms |")
    print("|---|---|---:|")
    for name, rs in results.items():
        for op in rs[0]["reads"]:
            print(f"| {name} | `{op}` | {statistics.median(x['reads'][op] for x in rs):.3f} |")
    print(f"\nload average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
