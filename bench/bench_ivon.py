"""CPU step time of samkernels' IVON beside the reference package ivon-opt, in one run.

    pip install ivon-opt                     # the peer from PyPI (not a samkernels dependency)
    python bench/bench_ivon.py [--threads 1] [--rounds 15] [--steps 10]

Two workloads, each timed in interleaved rounds (the order alternates every round; the ratio is
the median of the per-round ratios, so load drifting on a shared machine cancels):

  optimizer  the optimizer alone, gradients pre-filled: one sample drawn into the weights, the
             weights restored and the update (ivon-opt: ``sampled_params(train=True)`` + ``step()``;
             samkernels: ``noise_step()`` + ``second_step()``)
  train      a whole training step, forward and backward at the sample included (``step(closure)``)

on an MLP 256-512-512-512-10 (0.66 M parameters, 8 tensors) and on 1,000 tensors of 64 elements
(``tiny-1000``; optimizer only), fp32, ``mc_samples`` 1 and 2.  samkernels runs with its default
``nonfinite="skip"`` (one fused inf/NaN check per pass, which ivon-opt does not make) and with
``nonfinite="unchecked"``.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import samkernels
from samkernels.optim import IVON

try:
    import ivon as ivon_opt
except ImportError as exc:  # pragma: no cover - the script's precondition
    raise SystemExit(f"ivon-opt is needed (pip install ivon-opt): {exc}")

HP = dict(lr=0.1, ess=50_000.0, hess_init=0.5, weight_decay=1e-4)


def mlp():
    torch.manual_seed(0)
    layers, d = [], 256
    for _ in range(3):
        layers += [nn.Linear(d, 512), nn.ReLU()]
        d = 512
    return nn.Sequential(*layers, nn.Linear(d, 10))


def tiny():
    torch.manual_seed(0)
    return nn.ParameterList([nn.Parameter(torch.randn(64)) for _ in range(1000)])


def make(kind, model, mc):
    if kind == "ivon-opt":
        return ivon_opt.IVON(model.parameters(), mc_samples=mc, beta1=0.9, beta2=0.99999, **HP)
    nonfinite = "unchecked" if kind.endswith("unchecked") else "skip"
    return IVON(model.parameters(), mc_samples=mc, seed=0, nonfinite=nonfinite, **HP)


def optimizer_step(kind, opt, mc):
    """One step with the gradients already in .grad."""
    if kind == "ivon-opt":
        for _ in range(mc):
            with opt.sampled_params(train=True):
                pass
        opt.step()
        return
    for k in range(mc):
        opt.noise_step()
        if k < mc - 1:
            opt.accumulate_step()
    opt.second_step()


def train_step(kind, opt, model, x, y, mc):
    if kind == "ivon-opt":
        for _ in range(mc):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
        opt.step()
        return

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    opt.zero_grad()
    opt.step(closure)


def bench(workload, shape, mc, rounds, steps):
    kinds = ["ivon-opt", "samkernels", "samkernels unchecked"]
    base = mlp() if shape == "mlp" else tiny()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 256, generator=g), torch.randint(0, 10, (128,), generator=g)
    setups = {}
    for kind in kinds:
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        opt = make(kind, model, mc)
        run = (lambda k=kind, o=opt: optimizer_step(k, o, mc)) if workload == "optimizer" else \
            (lambda k=kind, o=opt, m=model: train_step(k, o, m, x, y, mc))
        for _ in range(3):
            run()
        setups[kind] = run
    cpu = {k: [] for k in kinds}
    for r in range(rounds):
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            c0 = time.process_time()
            for _ in range(steps):
                setups[kind]()
            cpu[kind].append((time.process_time() - c0) / steps)
    ref = cpu["ivon-opt"]
    rows = []
    for kind in kinds:
        ratio = [a / b for a, b in zip(ref, cpu[kind])]
        ms = [1e3 * c for c in cpu[kind]]
        rows.append(f"| {workload} | {shape} | {mc} | {kind} | {statistics.median(ms):.3f} "
                    f"({min(ms):.3f}-{max(ms):.3f}) | "
                    f"{statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f}) |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peer = importlib.metadata.version("ivon-opt")
    print(f"torch {torch.__version__}, samkernels {samkernels.__version__}, ivon-opt {peer}, "
          f"{platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}; {args.rounds} "
          f"interleaved rounds of {args.steps} steps; load average before: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| workload | params | mc_samples | impl | CPU ms/step, median (min-max) | "
          "ivon-opt / this, median of per-round ratios (min-max) |")
    print("|---|---|---|---|---|---|")
    for workload, shape in (("optimizer", "mlp"), ("optimizer", "tiny-1000"), ("train", "mlp")):
        for mc in (1, 2):
            for row in bench(workload, shape, mc, args.rounds, args.steps):
                print(row, flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
