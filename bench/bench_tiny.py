"""Host time per tensor: one optimizer step on many tiny tensors with the CPU backend, fused against
the plain-PyTorch foreach and per-tensor-loop versions of bench/cases.py (gradients pre-filled).

On tiny tensors the arithmetic is nothing; what is timed is the per-call and per-tensor work on the
host (Python, dispatch, list checks), the cost that a GPU step on small tensors consists of.
Rounds are interleaved (every implementation once per round, the order rotating), each timing
``--steps`` steps; reported: the median over rounds of the time per step, and the median over
rounds of the per-round ratios (baseline / fused).

    python bench/bench_tiny.py --tensors 2000 --rounds 7 --steps 5
    python bench/bench_tiny.py --in-process    # every optimizer in one process (order effects)
    python bench/bench_tiny.py --profile sam      # where a fused step's time goes (cProfile)
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases  # noqa: E402

IMPLS = ("fused", "foreach", "loop")


def build(algo: str, impl: str, n: int):
    params = cases.make_params(cases.tiny_shapes(n))
    make = cases.IMPLS[algo][impl]
    step = make(params, "cpu", nonfinite="skip") if impl == "fused" else make(params)
    step()  # state and buffers allocated
    return step


def timed(step, steps: int, clock) -> float:
    t0 = clock()
    for _ in range(steps):
        step()
    return (clock() - t0) / steps


HEADER = ("| optimizer | fused ms | foreach ms | loop ms | foreach / fused | loop / fused |\n"
          "|---|---:|---:|---:|---:|---:|")


def isolated(algos, argv) -> None:
    """Each optimizer in a fresh process: in one process, whichever optimizer is benchmarked
    later measures slower (its 2,000 tensors allocated among the freed ones of the earlier
    optimizers: every implementation's per-tensor host work, fused or not, slows by 10-50 %)."""
    print(HEADER, flush=True)
    for algo in algos:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--algos", algo,
                              "--in-process", "--rows-only"], check=True, capture_output=True,
                             text=True)
        print(out.stdout.strip(), flush=True)


def bench(algos, n: int, rounds: int, steps: int, clock, header: bool = True) -> None:
    if header:
        print(HEADER)
    for algo in algos:
        impls = [i for i in IMPLS if i in cases.IMPLS[algo]]
        steps_of = {i: build(algo, i, n) for i in impls}
        times = {i: [] for i in impls}
        for r in range(rounds):
            for i in impls[r % len(impls):] + impls[:r % len(impls)]:
                times[i].append(timed(steps_of[i], steps, clock))

        def ms(i):
            return f"{statistics.median(times[i]) * 1e3:.2f}" if i in times else "-"

        def ratio(i):
            if i not in times:
                return "-"
            return f"{statistics.median(b / f for b, f in zip(times[i], times['fused'])):.2f}"
        print(f"| {algo} | {ms('fused')} | {ms('foreach')} | {ms('loop')} | {ratio('foreach')} "
              f"| {ratio('loop')} |", flush=True)


def profile(algo: str, n: int, steps: int) -> None:
    step = build(algo, "fused", n)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=2000)
    ap.add_argument("--algos", default=",".join(cases.IMPLS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("process", "wall"), default="process",
                    help="process: CPU time of this process (robust on a shared machine)")
    ap.add_argument("--profile", metavar="ALGO", help="cProfile the fused step of ALGO instead")
    ap.add_argument("--in-process", action="store_true",
                    help="every optimizer in this process (default: one fresh process each)")
    ap.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    args, argv = ap.parse_args(), list(sys.argv[1:])
    if "--algos" in argv:  # the workers get their own
        k = argv.index("--algos")
        del argv[k:k + 2]
    argv = [a for a in argv if not a.startswith("--algos=")]
    torch.set_num_threads(args.threads)
    if args.profile:
        return profile(args.profile, args.tensors, args.steps)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    if args.rows_only:
        return bench(args.algos.split(","), args.tensors, args.rounds, args.steps, clock, False)
    print(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}; "
          f"threads {args.threads}; {os.cpu_count()} CPUs; {args.clock} time; "
          f"load average before {os.getloadavg()[0]:.2f}")
    print(f"{args.tensors} tiny tensors (1-7 elements), CPU backend, nonfinite='skip'; "
          f"{args.rounds} interleaved rounds of {args.steps} steps; medians over rounds; "
          f"{'one process' if args.in_process else 'a fresh process per optimizer'}\n")
    if args.in_process:
        bench(args.algos.split(","), args.tensors, args.rounds, args.steps, clock)
    else:
        isolated(args.algos.split(","), argv)
    print(f"\nload average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
