"""CPU step time of samkernels' GSAM, WSAM, LookSAM and FriendlySAM against pytorch_optimizer's.

One optimizer step as each library documents it, with the forward/backward replaced by a closure
that copies fixed gradients into ``.grad`` (so the time is the optimizer's, plus that copy, the
same for both): samkernels ``opt.step(closure)``; pytorch_optimizer ``opt.step(closure)`` (GSAM,
WSAM) or ``closure(); opt.step(closure)`` (LookSAM, FriendlySAM, as their docstrings show).
SGD with momentum 0.9 as the base, float32, the two implementations interleaved round by round
in one process; medians over rounds.

    python bench/bench_sam_variants.py [--rounds 15] [--steps 6] [--threads 2]
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch

import samkernels
from samkernels.optim import GSAM, WSAM, FriendlySAM, LookSAM

SHAPES = {
    # a 2.1 M-parameter MLP (8 tensors) and 400 tiny tensors (the per-tensor overhead)
    "mlp-2M": [(1024, 1024), (1024,), (1024, 1024), (1024,), (64, 1024), (64,), (10, 64), (10,)],
    "tiny-400": [(32,)] * 200 + [(4, 8)] * 200,
}


class _Rho:
    def __init__(self, rho):
        self.rho = rho

    def step(self):
        return self.rho


def make(lib: str, method: str, params):
    kw = dict(lr=0.01, momentum=0.9)
    if lib == "samkernels":
        return {"gsam": lambda: GSAM(params, rho=0.05, alpha=0.4, **kw),
                "wsam": lambda: WSAM(params, rho=0.05, gamma=0.8, **kw),
                "looksam": lambda: LookSAM(params, rho=0.05, k=5, alpha=0.7, **kw),
                "friendlysam": lambda: FriendlySAM(params, rho=0.05, sigma=1.0, lmbda=0.9,
                                                   **kw)}[method]()
    import pytorch_optimizer as po
    if method == "gsam":
        return po.GSAM(params, torch.optim.SGD(params, **kw), torch.nn.Module(), _Rho(0.05),
                       alpha=0.4)
    if method == "wsam":
        return po.WSAM(torch.nn.Module(), params, torch.optim.SGD, rho=0.05, gamma=0.8, **kw)
    if method == "looksam":
        return po.LookSAM(params, torch.optim.SGD, rho=0.05, k=5, alpha=0.7, **kw)
    return po.FriendlySAM(params, torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.9, **kw)


def setup(lib, method, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(2)]
    opt = make(lib, method, params)
    calls = [0]

    def closure():
        gs = grads[calls[0] % 2]
        calls[0] += 1
        for p, x in zip(params, gs):
            if p.grad is None:
                p.grad = x.clone()
            else:
                p.grad.copy_(x)
        return (None, torch.zeros(())) if (lib, method) == ("pytorch_optimizer", "gsam") \
            else torch.zeros(())

    if lib == "pytorch_optimizer" and method in ("looksam", "friendlysam"):
        def step():
            closure()
            opt.step(closure)
    else:
        def step():
            opt.step(closure)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--methods", default="gsam,wsam,looksam,friendlysam")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from importlib.metadata import version
    print(f"date {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
          f"pytorch_optimizer {version('pytorch_optimizer')}; samkernels backend "
          f"{samkernels._dispatch.resolve(torch.device('cpu'))}; threads {args.threads}; "
          f"{os.cpu_count()} CPUs; load average before {os.getloadavg()[0]:.2f}")
    print(f"{args.rounds} interleaved rounds of {args.steps} steps; ms per step, median (min-max)\n")
    print("| method | params | samkernels ms | pytorch_optimizer ms | peer / samkernels (median of "
          "per-round ratios) |")
    print("|---|---|---:|---:|---:|")
    for shape in args.shapes.split(","):
        shapes = SHAPES[shape]
        for method in args.methods.split(","):
            steps = {lib: setup(lib, method, shapes) for lib in ("samkernels", "pytorch_optimizer")}
            for s in steps.values():  # warm-up (state created, LookSAM's g_v exists)
                for _ in range(6):
                    s()
            times = {lib: [] for lib in steps}
            for r in range(args.rounds):
                for lib in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        steps[lib]()
                    times[lib].append((time.perf_counter() - t0) / args.steps * 1e3)
            a, b = times["samkernels"], times["pytorch_optimizer"]
            ratio = statistics.median(y / x for x, y in zip(a, b))
            print(f"| {method} | {shape} | {statistics.median(a):.2f} ({min(a):.2f}-{max(a):.2f}) | "
                  f"{statistics.median(b):.2f} ({min(b):.2f}-{max(b):.2f}) | {ratio:.2f} |")
    print(f"\nload average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
