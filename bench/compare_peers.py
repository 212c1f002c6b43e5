"""Check the README's comparison table by running samkernels beside two peers on the CPU.

    pip install pytorch_optimizer                       # the peer from PyPI (not a samkernels dependency)
    git clone https://github.com/davda54/sam /tmp/davda54   # or any copy of its sam.py
    python bench/compare_peers.py --davda54-sam /tmp/davda54/sam.py    # or DAVDA54_SAM=/path/sam.py

Nothing of either peer is vendored here: pytorch_optimizer is imported from the environment and
davda54's ``sam.py`` is loaded from the path given.  Sections (each prints its own numbers):

  restore     one SAM step with lr = 0 must leave the weights bit for bit as they were (fp32, bf16);
              whether the parameter keeps its storage (``data_ptr``)
  asam        with T = |w| (eta = 0) a weight that is exactly zero is never perturbed
  resume      save/load the optimizer's state_dict mid-run (SGD momentum) vs an uninterrupted run
  norm        the dtype of each global gradient norm, its error in float64, fp32 overflow
  float64     samkernels vs each peer after N steps, float64: SAM-SGD, ASAM (eta = 0), SAM-Adam
  bsam        one bSAM step on a quadratic, float64: each recorded quantity vs Algorithm 1 of
              Moellenhoff & Khan (2023) (docs: docs/spec.md's bSAM section) and vs the peer's own formula
  speed       CPU time per training step on a small MLP (interleaved rounds, ratio medians)

``--skip speed`` etc. leave sections out; ``--threads`` sets torch's intra-op threads (default 1:
less noise on a shared machine).  The whole run takes about a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import io
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import samkernels
from samkernels import BSAM as SkBSAM
from samkernels import SAM as SkSAM

try:
    from pytorch_optimizer import BSAM as PoBSAM
    from pytorch_optimizer import SAM as PoSAM
    from pytorch_optimizer.optimizer.utils.gradient import get_global_gradient_norm as po_norm_sq
except ImportError as exc:  # pragma: no cover - the script's precondition
    sys.exit(f"pytorch_optimizer is needed (pip install pytorch_optimizer): {exc}")


def load_davda54(path: str):
    spec = importlib.util.spec_from_file_location("davda54_sam", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SAM


# --------------------------------------------------------------------------- helpers
def mlp(din=20, hidden=64, dout=5, depth=2, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layers, d = [], din
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.Tanh()]
        d = hidden
    layers.append(nn.Linear(d, dout))
    return nn.Sequential(*layers).to(dtype)


def batches(n, din=20, dout=5, bs=32, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, din, generator=g).to(dtype), torch.randint(0, dout, (bs,), generator=g))
            for _ in range(n)]


def sam_step(model, opt, x, y):
    """The explicit two-phase loop every implementation here offers."""
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def flat(model):
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def maxdiff(a, b):
    return (flat(a) - flat(b)).abs().max().item()


def peers(dv):
    """name -> factory(params, kind, **hp) for the three implementations.  kind: sgd | asam | adam."""
    def sk(params, kind, lr, rho, momentum=0.0, weight_decay=0.0, eta=0.0):
        if kind == "adam":
            return SkSAM(params, lr=lr, rho=rho, base="adam", weight_decay=weight_decay)
        return SkSAM(params, lr=lr, rho=rho, momentum=momentum, weight_decay=weight_decay,
                     adaptive=kind == "asam", eta=eta)

    def davda(params, kind, lr, rho, momentum=0.0, weight_decay=0.0, eta=0.0):
        if kind == "adam":
            return dv(params, torch.optim.Adam, rho=rho, lr=lr, weight_decay=weight_decay)
        return dv(params, torch.optim.SGD, rho=rho, adaptive=kind == "asam", lr=lr,
                  momentum=momentum, weight_decay=weight_decay)

    def po(params, kind, lr, rho, momentum=0.0, weight_decay=0.0, eta=0.0):
        if kind == "adam":
            return PoSAM(params, torch.optim.Adam, rho=rho, lr=lr, weight_decay=weight_decay)
        return PoSAM(params, torch.optim.SGD, rho=rho, adaptive=kind == "asam", lr=lr,
                     momentum=momentum, weight_decay=weight_decay)

    return {"samkernels": sk, "davda54": davda, "pytorch_optimizer": po}


# --------------------------------------------------------------------------- sections
def sec_restore(impls):
    print("\n## restore: one SAM step with lr = 0, momentum = 0 (weights must come back bit for bit)")
    print("| impl | fp32 max abs(w1 - w0) | bf16 max abs(w1 - w0) | parameter storage kept |")
    print("|---|---|---|---|")
    (x, y), = batches(1)
    for name, make in impls.items():
        cells, kept = [], True
        for dt in (torch.float32, torch.bfloat16):
            model = mlp(dtype=dt)
            w0 = copy.deepcopy(model)
            ptrs = [p.data_ptr() for p in model.parameters()]
            opt = make(model.parameters(), "sgd", lr=0.0, rho=0.5)
            sam_step(model, opt, x.to(dt), y)
            cells.append(f"{maxdiff(model, w0):.1e}")
            kept &= ptrs == [p.data_ptr() for p in model.parameters()]
        print(f"| {name} | {cells[0]} | {cells[1]} | {'yes' if kept else 'no (new tensor each step)'} |")


def sec_asam(impls):
    print("\n## asam: T = abs(w) + eta; weights that are exactly zero (zero-initialised biases)")
    print("| impl | eta | zero weights | of them perturbed by first_step | max abs(e) on them |")
    print("|---|---|---|---|---|")
    (x, y), = batches(1)
    runs = [("samkernels", 0.01), ("samkernels", 0.0), ("davda54", None), ("pytorch_optimizer", None)]
    for name, eta in runs:
        model = mlp()
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    m.bias.zero_()
        w0 = [p.detach().clone() for p in model.parameters()]
        opt = impls[name](model.parameters(), "asam", lr=0.1, rho=0.5, eta=eta or 0.0)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        zero = torch.cat([(a == 0).reshape(-1) for a in w0])
        e = torch.cat([(p.detach() - a).reshape(-1) for p, a in zip(model.parameters(), w0)])
        moved = int((e[zero] != 0).sum())
        print(f"| {name} | {eta if eta is not None else '0 (T = abs(w), fixed)'} | {int(zero.sum())} "
              f"| {moved} | {e[zero].abs().max().item():.2e} |")


def sec_resume(impls, dv, steps=6, cut=3):
    print(f"\n## resume: SGD momentum 0.9, wd 5e-4, fp32; {cut} steps, state_dict saved and loaded into a "
          f"fresh model + optimizer, {steps - cut} more steps, vs {steps} uninterrupted steps")
    print("| impl | per-parameter keys in opt.state_dict() after a step | resumed max abs(w diff) |")
    print("|---|---|---|")
    data = batches(steps)
    hp = dict(lr=0.1, rho=0.05, momentum=0.9, weight_decay=5e-4)

    def run(make, with_base=False):
        ref = mlp()
        opt = make(ref.parameters(), "sgd", **hp)
        for x, y in data:
            sam_step(ref, opt, x, y)
        model = mlp()
        opt = make(model.parameters(), "sgd", **hp)
        for x, y in data[:cut]:
            sam_step(model, opt, x, y)
        saved = {"model": model.state_dict(), "opt": opt.state_dict()}
        if with_base:
            saved["base"] = opt.base_optimizer.state_dict()
        keys = sorted({k for s in saved["opt"]["state"].values() for k in s})
        buf = io.BytesIO()
        torch.save(saved, buf)
        buf.seek(0)
        saved = torch.load(buf)
        model2 = mlp(seed=123)
        model2.load_state_dict(saved["model"])
        opt2 = make(model2.parameters(), "sgd", **hp)
        if with_base:  # base first: davda54's load_state_dict re-links the groups afterwards
            opt2.base_optimizer.load_state_dict(saved["base"])
        opt2.load_state_dict(saved["opt"])
        for x, y in data[cut:]:
            sam_step(model2, opt2, x, y)
        return keys, maxdiff(model2, ref)

    for name, make in impls.items():
        keys, d = run(make)
        print(f"| {name} | {', '.join(keys) or '(none)'} | {d:.1e}{' (exact)' if d == 0 else ''} |")
    keys, d = run(impls["davda54"], with_base=True)
    print(f"| davda54 + opt.base_optimizer.state_dict() saved too | {', '.join(keys)} | "
          f"{d:.1e}{' (exact)' if d == 0 else ''} |")


def sec_norm(impls):
    print("\n## norm: the global gradient norm ||g|| each implementation perturbs with")
    print("| impl | dtype for fp64 params | rel. error vs exact, fp64 | dtype for bf16 params | "
          "fp32 grads of 1e20 (true norm 2e20) |")
    print("|---|---|---|---|---|")
    (x, y), = batches(1)

    def norms(name, dtype, big=False):
        model = mlp(dtype=dtype)
        opt = impls[name](model.parameters(), "sgd", lr=0.1, rho=0.05)
        F.cross_entropy(model(x.to(dtype)), y).backward()
        if big:
            for p in model.parameters():
                p.grad.zero_()
            p0 = next(model.parameters())
            p0.grad.view(-1)[:4] = 1e20
        exact = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
        if name == "samkernels":
            n = opt.first_step()
        elif name == "davda54":
            n = opt._grad_norm()
        else:  # what SAM.first_step computes: sqrt of the float32 sum of squared per-tensor norms
            n = po_norm_sq(opt.param_groups, weight_adaptive=True).sqrt_().squeeze_(0)
        return n, exact

    for name in impls:
        n64, e64 = norms(name, torch.float64)
        nbf, _ = norms(name, torch.bfloat16)
        nbig, _ = norms(name, torch.float32, big=True)
        rel = abs(n64.double().item() - e64.item()) / e64.item()
        print(f"| {name} | {str(n64.dtype).replace('torch.', '')} | {rel:.1e} | "
              f"{str(nbf.dtype).replace('torch.', '')} | {nbig.item():.3g} |")


def sec_float64(impls, steps=20):
    print(f"\n## float64: max abs(w diff) after {steps} steps, MLP 20-64-64-5 (tanh), batch 32, explicit phases")
    print("| algorithm | samkernels vs davda54 | samkernels vs pytorch_optimizer "
          "| davda54 vs pytorch_optimizer |")
    print("|---|---|---|---|")
    data = batches(steps, dtype=torch.float64)
    cases = [("SAM-SGD (lr 0.1, rho 0.05, momentum 0.9, wd 5e-4)", "sgd",
              dict(lr=0.1, rho=0.05, momentum=0.9, weight_decay=5e-4)),
             ("ASAM, eta = 0 (lr 0.1, rho 0.5, momentum 0.9)", "asam",
              dict(lr=0.1, rho=0.5, momentum=0.9, eta=0.0)),
             ("SAM-Adam (lr 1e-3, rho 0.05)", "adam", dict(lr=1e-3, rho=0.05))]
    for label, kind, hp in cases:
        models = {}
        for name, make in impls.items():
            model = mlp(dtype=torch.float64)
            opt = make(model.parameters(), kind, **hp)
            for x, y in data:
                sam_step(model, opt, x, y)
            models[name] = model
        moved = maxdiff(models["samkernels"], mlp(dtype=torch.float64))
        s, d, p = models["samkernels"], models["davda54"], models["pytorch_optimizer"]
        print(f"| {label} (weights moved {moved:.2f}) | {maxdiff(s, d):.1e} | {maxdiff(s, p):.1e} "
              f"| {maxdiff(d, p):.1e} |")


def sec_bsam(n=200_000, N=100.0, lr=0.1, rho=0.05, delta=0.01, gamma=0.1, b1=0.9, b2=0.999):
    print(f"\n## bsam: one step from s = 1, gm = 0 on L(w) = sum(a w^2)/2 (a > 0), float64, "
          f"{n} weights, N = {N:g}, lr {lr}, rho {rho}, delta {delta}, gamma {gamma}")
    print("Algorithm 1: theta = w + z, z ~ N(0, 1/(N s)); g = grad(theta); eps = rho g / s; "
          "g_e = grad(w + eps); s' = b2 s + (1-b2)(sqrt(s) abs(g) + delta + gamma); "
          "gm' = b1 gm + (1-b1)(g_e + delta w); w' = w - lr gm'/s'")
    torch.manual_seed(0)
    a = torch.rand(n, dtype=torch.float64) + 0.5
    results = {}
    v = nn.Parameter(torch.randn(10))  # pytorch_optimizer's BSAM.step(closure) on a fresh parameter
    po = PoBSAM([v], num_data=100)

    def fresh():
        po.zero_grad()
        (v * v).sum().backward()

    try:
        po.step(fresh)
        first_call = "pytorch_optimizer runs"
    except Exception as exc:  # noqa: BLE001 - report whatever it raises
        first_call = f"pytorch_optimizer raises {type(exc).__name__}: {exc}"
    for name in ("samkernels", "pytorch_optimizer"):
        w = nn.Parameter(torch.randn(n, dtype=torch.float64))
        w0 = w.detach().clone()
        if name == "samkernels":
            opt = SkBSAM([w], lr=lr, num_data=N, rho=rho, weight_decay=delta, gamma=gamma,
                         betas=(b1, b2), seed=0)
        else:
            opt = PoBSAM([w], num_data=int(N), lr=lr, betas=(b1, b2), weight_decay=delta, rho=rho,
                         damping=gamma)
        seen = []

        def closure():
            opt.zero_grad()
            loss = 0.5 * (a * w * w).sum()
            loss.backward()
            seen.append((w.detach().clone(), w.grad.detach().clone()))
            return loss

        closure()  # pytorch_optimizer creates its state only for parameters that have a gradient
        seen.clear()
        opt.step(closure)
        (th1, g1), (th2, g2) = seen
        st = opt.state[w]
        s_new = st["s"] if "s" in st else st["precision"]
        gm_new = st["momentum"] if "momentum" in st else st["momentum_buffer"]
        z = th1 - w0
        eps = rho * g1  # s = 1

        def d(u, v):
            return (u - v).abs().max().item()

        sq = 1.0  # sqrt(s) before the step (s = 1)
        cands = {
            "noise std = sqrt(1/(N s))  [Alg. 1 line 1]": abs(z.std().item() - (1 / N) ** 0.5),
            "noise std = 1/(N s)": abs(z.std().item() - 1 / N),
            "2nd pass at w + eps  [Alg. 1 line 4]": d(th2, w0 + eps),
            "2nd pass at theta + eps = w + z + eps": d(th2, th1 + eps),
            "s' = b2 s + (1-b2)(sqrt(s) abs(g) + delta + gamma)  [line 5]":
                d(s_new, b2 + (1 - b2) * (sq * g1.abs() + delta + gamma)),
            "s' = ... (sqrt(s) abs(g) + delta + gamma)^2  (squared)":
                d(s_new, b2 + (1 - b2) * (sq * g1.abs() + delta + gamma) ** 2),
            "s' = ... (sqrt(s) abs(g_e) + delta + gamma)  (2nd-pass gradient)":
                d(s_new, b2 + (1 - b2) * (sq * g2.abs() + delta + gamma)),
            "s' = ... (sqrt(s) abs(g_e) + delta + gamma)^2  (both)":
                d(s_new, b2 + (1 - b2) * (sq * g2.abs() + delta + gamma) ** 2),
            "gm' = (1-b1)(g_e + delta w)  [line 6]": d(gm_new, (1 - b1) * (g2 + delta * w0)),
            "gm' = (1-b1) delta g_e": d(gm_new, (1 - b1) * delta * g2),
            "w' = w - lr gm'/s'  [line 7, with the impl's gm', s']": d(w.detach(), w0 - lr * gm_new / s_new),
            "w' = theta + eps - lr gm'/s'  (noise, eps kept)": d(w.detach(), th2 - lr * gm_new / s_new),
        }
        results[name] = cands
    print(f"first step without a prior backward: {first_call}")
    print("| recorded quantity vs formula (max abs residual; 0 / ~1e-16 = this formula) "
          "| samkernels | pytorch_optimizer |")
    print("|---|---|---|")
    for key in results["samkernels"]:
        print(f"| {key} | {results['samkernels'][key]:.1e} | {results['pytorch_optimizer'][key]:.1e} |")


def sec_speed(impls, rounds=25, steps=8, width=512, depth=3, bs=128):
    print(f"\n## speed: CPU time per training step (2 forward + 2 backward + optimizer), MLP "
          f"256-{'-'.join([str(width)] * depth)}-10 (ReLU), batch {bs}, SGD momentum 0.9 wd 5e-4, fp32, "
          f"torch threads {torch.get_num_threads()}; {rounds} interleaved rounds of {steps} steps")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    torch.manual_seed(0)
    layers, d = [], 256
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    base = nn.Sequential(*layers, nn.Linear(d, 10))
    nparams = sum(p.numel() for p in base.parameters())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(bs, 256, generator=g), torch.randint(0, 10, (bs,), generator=g)
    impls = dict(impls)
    impls["samkernels, nonfinite='unchecked'"] = lambda params, kind, **hp: SkSAM(
        params, nonfinite="unchecked", **hp)
    setups = {}
    for name, make in impls.items():
        model = copy.deepcopy(base)
        hp = dict(lr=0.01, rho=0.05, momentum=0.9, weight_decay=5e-4)
        setups[name] = (model, make(model.parameters(), "sgd", **hp))
        for _ in range(3):
            sam_step(*setups[name], x, y)
    cpu = {n: [] for n in impls}
    wall = {n: [] for n in impls}
    for r in range(rounds):
        order = list(impls) if r % 2 == 0 else list(impls)[::-1]
        for name in order:
            model, opt = setups[name]
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(steps):
                sam_step(model, opt, x, y)
            cpu[name].append((time.process_time() - c0) / steps)
            wall[name].append((time.perf_counter() - w0) / steps)
    print(f"load average after:  {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {nparams} parameters")
    print("| impl | CPU ms/step (median, min-max) | wall ms/step (median) | peer / samkernels CPU time, "
          "median of per-round ratios (min-max) | same, wall |")
    print("|---|---|---|---|---|")
    for name in impls:
        rc = [a / b for a, b in zip(cpu[name], cpu["samkernels"])]
        rw = [a / b for a, b in zip(wall[name], wall["samkernels"])]
        print(f"| {name} | {1e3 * statistics.median(cpu[name]):.2f} ({1e3 * min(cpu[name]):.2f}-"
              f"{1e3 * max(cpu[name]):.2f}) | {1e3 * statistics.median(wall[name]):.2f} | "
              f"{statistics.median(rc):.3f} ({min(rc):.3f}-{max(rc):.3f}) | "
              f"{statistics.median(rw):.3f} ({min(rw):.3f}-{max(rw):.3f}) |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--davda54-sam", default=os.environ.get("DAVDA54_SAM"),
                    help="path to davda54/sam's sam.py (or env DAVDA54_SAM)")
    ap.add_argument("--davda54-commit", default=os.environ.get("DAVDA54_COMMIT", "?"),
                    help="the commit that sam.py was taken from, for the header")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=25, help="interleaved timing rounds per model")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["restore", "asam", "resume", "norm", "float64", "bsam", "speed"])
    args = ap.parse_args()
    if not args.davda54_sam:
        ap.error("give --davda54-sam PATH (davda54/sam's sam.py) or set DAVDA54_SAM")
    torch.set_num_threads(args.threads)
    dv = load_davda54(args.davda54_sam)
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip() or "?"
    except OSError:
        rev = "?"
    from samkernels import _dispatch
    print(f"# compare_peers  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs; "
          f"samkernels {getattr(samkernels, '__version__', '?')} @ {rev} (CPU backend "
          f"{_dispatch.resolve(torch.device('cpu'))}); "
          f"pytorch_optimizer {importlib.metadata.version('pytorch_optimizer')}; "
          f"davda54/sam sam.py @ {args.davda54_commit} ({args.davda54_sam})")
    impls = peers(dv)
    t0 = time.perf_counter()
    sections = [("restore", lambda: sec_restore(impls)), ("asam", lambda: sec_asam(impls)),
                ("resume", lambda: sec_resume(impls, dv)), ("norm", lambda: sec_norm(impls)),
                ("float64", lambda: sec_float64(impls)), ("bsam", sec_bsam),
                ("speed", lambda: [sec_speed(impls, rounds=args.rounds, bs=bs) for bs in (128, 16)])]
    for name, fn in sections:
        if name not in args.skip:
            fn()
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
