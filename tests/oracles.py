"""Independent oracles for every fused phase of ``samkernels.ops._spec.PHASES``.

Nothing here imports the package's maths (``samkernels.ops.reference*``) or another backend: a bug
copied into the executable spec and every kernel would pass a backend-vs-reference test, but not
these.  Three kinds of oracle (docs/spec.md holds the equations):

  * the worked bSAM example of docs/spec.md, computed by hand (``BSAM_WORKED``);
  * equality with ``torch.optim`` (SGD, Adam, AdamW) for the restore phases;
  * a float64 formula written here, for everything else, with the noise drawn from a plain-int
    Philox4x32-10 (``philox4x32_10``) checked against the Random123 known-answer vectors.

Each ``case_<op>(dtype, path, gen)`` returns a ``Case``: the op's arguments by name and, for each
list the op writes (and ``"return"``), the expected float64 values.  ``PATHS`` lists the code paths
of each op (deferred / non-deferred bSAM line 5, each ``found_inf`` value, ...).

The other per-op test data lives here too: ``CASES``, each op's argument values (a base case and
the variants that select another code path), from which tests/test_contract.py,
tests/test_triton_aot.py and tests/test_gpu_ops.py build every op's inputs with the op table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from helpers import EMPTY

F32, F64 = torch.float32, torch.float64
MASK = 0xFFFFFFFF


# --- Philox4x32-10 on plain Python ints (Salmon et al. 2011) ----------------------------------
def philox4x32_10(ctr, key):
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c3 ^ k1) & MASK, \
            p0 & MASK
        k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
    return c0, c1, c2, c3


# Random123's kat_vectors for philox4x32_10: (counter, key, output)
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((MASK,) * 4, (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


def _words(seed: int, step: int, pid: int, numel: int) -> List[int]:
    """docs/spec.md "Noise": element i is word i % 4 of Philox(counter (first + i // 4 mod 2^32,
    pid's low 32 bits, step_lo, step_hi), key (seed_lo, seed_hi)), first = pid's high 32 bits
    (the tensor is a part of its parameter starting at element 4 first)."""
    first = (pid >> 32) & MASK
    out = []
    for q in range((numel + 3) // 4):
        out += philox4x32_10(((first + q) & MASK, pid & MASK, step & MASK, (step >> 32) & MASK),
                             (seed & MASK, (seed >> 32) & MASK))
    return out[:numel]


def _u(word: int) -> float:
    return ((word >> 9) + 0.5) * 2.0 ** -23  # 23 bits: exact in float32, never 0 or 1


def uniforms(seed: int, step: int, pid: int, numel: int) -> torch.Tensor:
    return torch.tensor([_u(w) for w in _words(seed, step, pid, numel)], dtype=F64)


def normals(seed: int, step: int, pid: int, numel: int) -> torch.Tensor:
    """Box-Muller of each block: (u0, u1) -> lanes 0, 1, (u2, u3) -> lanes 2, 3."""
    w = _words(seed, step, pid, (numel + 3) // 4 * 4)
    out = []
    for q in range(0, len(w), 4):
        u0, u1, u2, u3 = (_u(x) for x in w[q:q + 4])
        r01, r23 = math.sqrt(-2 * math.log(u0)), math.sqrt(-2 * math.log(u2))
        out += [r01 * math.cos(2 * math.pi * u1), r01 * math.sin(2 * math.pi * u1),
                r23 * math.cos(2 * math.pi * u3), r23 * math.sin(2 * math.pi * u3)]
    return torch.tensor(out[:numel], dtype=F64)


# steps whose high word matters: a kernel that drops it draws step 2^32 - 1's neighbours' noise
GOLDEN_STEPS = (0, 2 ** 32 - 1, 2 ** 33 + 7)
SEED = (0x1234567 << 32) | 0x9ABCDEF  # a key with both words set


# --- inputs ------------------------------------------------------------------------------------
SHAPES = [(7,), (2, 3)]  # 13 elements: several Philox blocks, a partial one
# the second tensor starts at Philox block 2^32 - 1 of its parameter (int64 -2^32 + ...): its
# block counter wraps to 0 after its first four elements
IDS = [5, ((2 ** 32 - 1) << 32 | 2 ** 31 + 3) - 2 ** 64]


# fp32 tolerances: REL for state whose size says nothing (exp_avg_sq ~ 1e-3, small precisions):
# a relative error of 1.3e-5 (1 - beta2 taken from the float32-rounded beta2) must show
REL = dict(rtol=2e-6, atol=0.0)
NOISY = {"*": dict(rtol=1e-5, atol=1e-6)}  # fp32 transcendental functions (log, sin, exp)


@dataclass
class Case:
    args: Dict[str, object]
    expect: Dict[str, object]          # written list -> list of float64 tensors; "return" -> float
    # fp32 tolerance per written list ("*": the others): rtol and atol (times max(1, |want|))
    tol: Dict[str, Dict[str, float]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def _state_dt(dtype):
    return F64 if dtype == F64 else F32


def rand(gen, dtype, lo=None, hi=None):
    """One list over SHAPES, drawn in float64 and cast (the float64 oracle sees the same bits)."""
    out = []
    for s in SHAPES:
        t = torch.randn(s, generator=gen, dtype=F64) if lo is None else \
            torch.rand(s, generator=gen, dtype=F64) * (hi - lo) + lo
        out.append(t.to(dtype))
    return out


def d(ts):
    """float64 copies (what the oracle computes with)."""
    return [t.double().clone() for t in ts]


def _flag(path: str, device="cpu"):
    """found_inf for a path: "none" (nonfinite="unchecked"), "finite" (0), "skip" (1)."""
    if path.endswith("skip"):
        return torch.ones(1, device=device)
    if path.endswith("finite"):
        return torch.zeros(1, device=device)
    return None


def _skipped_perturb(args, norm):
    """Skip form of a perturbation: backups <- w, w unchanged, no state change; returns the norm."""
    return {"params": d(args["params"]), "backups": d(args["params"]), "return": norm}


def _skipped_update(args, state_names=()):
    """Skip form of an update: w <- backups, no state change."""
    out = {"params": d(args["backups"])}
    for n in state_names:
        if args[n]:
            out[n] = d(args[n])
    return out


def _sumsq(ts):
    return float(sum((t.double() ** 2).sum() for t in ts))


# --- SAM / ASAM (docs/spec.md "SAM", "ASAM") ---------------------------------------------------
def case_grad_sumsq(dtype, path, gen):
    p, g = rand(gen, dtype), rand(gen, dtype)
    eta = 0.01 if path == "asam" else 0.0
    t = [gg * (pp.abs() + eta) if path == "asam" else gg for pp, gg in zip(d(p), d(g))]
    return Case(dict(params=p, grads=g, adaptive=path == "asam", eta=eta), {"return": _sumsq(t)})


def case_nonfinite_flag(dtype, path, gen):
    """1.0 iff some element is inf/NaN (plain Python's math.isfinite); the largest finite values
    are finite (a check by squares in the gradient dtype overflows there)."""
    g = rand(gen, dtype)
    big = max(range(len(g)), key=lambda i: g[i].numel())
    if path == "huge":
        for t in g:
            t.fill_(torch.finfo(dtype).max).neg_()
    elif path == "inf":  # the last element of the last tensor: a chunk's tail
        g[-1].view(-1)[-1] = math.inf
    elif path == "neg-inf":
        g[0].view(-1)[0] = -math.inf
    elif path == "nan":
        g[big].view(-1)[g[big].numel() // 2] = math.nan
    bad = any(not math.isfinite(v) for t in g for v in t.double().flatten().tolist())
    return Case(dict(grads=g), {"return": 1.0 if bad else 0.0})


def case_sam_perturb_(dtype, path, gen):
    """e = rho T^2 g / (||T g|| + eps), T = |w| + eta (ASAM) or 1; w <- w + e; returns ||T g||."""
    p, g, b = rand(gen, dtype), rand(gen, dtype), rand(gen, dtype)
    adaptive = path.startswith("asam")
    rho, eps, eta = 0.3, 1e-12, 0.01 if adaptive else 0.0
    w64, g64 = d(p), d(g)
    t = [(w.abs() + eta) if adaptive else torch.ones_like(w) for w in w64]
    norm = math.sqrt(_sumsq([gg * tt for gg, tt in zip(g64, t)]))
    given = path.startswith("asam")  # the optimizer passes the norm of all groups
    args = dict(params=p, grads=g, backups=b,
                grad_norm=torch.tensor(norm, dtype=F64) if given else None, rho=rho, eps=eps,
                adaptive=adaptive, eta=eta, found_inf=_flag(path))
    if path.endswith("skip"):
        return Case(args, _skipped_perturb(args, norm))
    new = [w + rho * tt * tt * gg / (norm + eps) for w, gg, tt in zip(w64, g64, t)]
    return Case(args, {"params": new, "backups": w64, "return": norm})


def _torch_opt_step(make, w0, grads, state_init=None):
    """One float64 step of a torch.optim optimizer from weights ``w0``: (weights, state)."""
    ws = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = make(ws)
    for w, g in zip(ws, grads):
        w.grad = g.clone()
    if state_init:
        for w, st in zip(ws, state_init):
            opt.state[w].update({k: v.clone() for k, v in st.items()})
    opt.step()
    return [w.detach() for w in ws], [opt.state[w] for w in ws]


SGD_PATHS = {  # path: (momentum, dampening, nesterov, weight_decay, first)
    "plain": (0.0, 0.0, False, 0.0, True), "nesterov-first": (0.9, 0.0, True, 1e-2, True),
    "momentum-damp": (0.9, 0.1, False, 5e-4, False),
    "momentum-damp-finite": (0.9, 0.1, False, 5e-4, False),
    "momentum-damp-skip": (0.9, 0.1, False, 5e-4, False)}


def case_sam_restore_sgd_(dtype, path, gen):
    """w <- backup, then torch.optim.SGD's step with the perturbed gradient."""
    mom, damp, nest, wd, first = SGD_PATHS[path]
    p, g, b = rand(gen, dtype), rand(gen, dtype), rand(gen, dtype)
    bufs = rand(gen, _state_dt(dtype)) if mom else []
    lr = 0.1
    args = dict(params=p, grads=g, backups=b, momentum_bufs=bufs, lr=lr, momentum=mom,
                dampening=damp, nesterov=nest, weight_decay=wd, first=first,
                found_inf=_flag(path))
    if path.endswith("skip"):
        return Case(args, _skipped_update(args, ["momentum_bufs"]))
    init = None if first or not mom else [{"momentum_buffer": t} for t in d(bufs)]
    new, st = _torch_opt_step(lambda ws: torch.optim.SGD(ws, lr=lr, momentum=mom, dampening=damp,
                                                         nesterov=nest, weight_decay=wd,
                                                         foreach=False), d(b), d(g), init)
    out = {"params": new}
    if mom:
        out["momentum_bufs"] = [s["momentum_buffer"] for s in st]
    return Case(args, out)


ADAM_PATHS = {"adam-l2": (1e-2, False, 1), "adamw": (1e-1, True, 1), "adamw-step7": (1e-1, True, 7),
              "adam-l2-finite": (1e-2, False, 1), "adamw-skip": (1e-1, True, 3)}


def case_sam_restore_adam_(dtype, path, gen):
    """w <- backup, then torch.optim.Adam (L2 decay) / AdamW (decoupled) with the gradient.  Step
    1 from zero state makes exp_avg_sq = (1 - beta2) g^2: any rounding of 1 - beta2 shows."""
    wd, decoupled, step = ADAM_PATHS[path]
    p, g, b = rand(gen, dtype), rand(gen, dtype), rand(gen, dtype)
    sdt = _state_dt(dtype)
    if step == 1:
        m, v = ([torch.zeros(s, dtype=sdt) for s in SHAPES] for _ in range(2))
    else:
        m, v = rand(gen, sdt, -0.1, 0.1), rand(gen, sdt, 0.0, 1e-2)
    lr, betas, eps = 1e-2, (0.9, 0.999), 1e-8
    args = dict(params=p, grads=g, backups=b, exp_avgs=m, exp_avg_sqs=v, step=step, lr=lr,
                beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=wd, decoupled=decoupled,
                found_inf=_flag(path))
    if path.endswith("skip"):
        return Case(args, _skipped_update(args, ["exp_avgs", "exp_avg_sqs"]))
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    init = [{"step": torch.tensor(float(step - 1)), "exp_avg": mm, "exp_avg_sq": vv}
            for mm, vv in zip(d(m), d(v))]
    new, st = _torch_opt_step(lambda ws: cls(ws, lr=lr, betas=betas, eps=eps, weight_decay=wd,
                                             foreach=False), d(b), d(g), init)
    return Case(args, {"params": new, "exp_avgs": [s["exp_avg"] for s in st],
                       "exp_avg_sqs": [s["exp_avg_sq"] for s in st]},
                tol={"exp_avgs": REL, "exp_avg_sqs": REL})


# --- bSAM (docs/spec.md, Algorithm 1) ----------------------------------------------------------
# The worked example of docs/spec.md, by hand: L = w^2, omega = 1, s = 1, N = 100, rho = 0.01,
# z = 0.5, delta = 0.4, gamma = 0.1, beta1 = 0.9, beta2 = 0.999, lr 0.5.
BSAM_WORKED = dict(theta=1.05, g=2.1, perturbed=1.021, g_eps=2.042, s=1.0016, gm=0.2442,
                   omega_paper=1 - 0.5 * 0.2442 / 1.0016, omega_released=0.8779,
                   rho=0.01, beta1=0.9, beta2=0.999, delta=0.4, gamma=0.1, lr=0.5)


def _one(x, dtype):
    return [torch.tensor([x], dtype=dtype)]


def case_bsam_noise_(dtype, path, gen):
    """Line 1: backup <- omega; w <- omega + z / sqrt(N s), z the Philox normals; ``path`` is the
    noise step (docs/spec.md "Noise")."""
    step = int(path)
    p, s = rand(gen, dtype), rand(gen, _state_dt(dtype), 0.5, 3.0)
    b = [torch.zeros_like(t) for t in p]
    n = 50.0
    z = [normals(SEED, step, pid, t.numel()).view(t.shape) for pid, t in zip(IDS, p)]
    args = dict(params=p, backups=b, precisions=s, param_ids=IDS, seed=SEED, step=step, num_data=n)
    new = [w + zz / torch.sqrt(n * ss) for w, zz, ss in zip(d(p), z, d(s))]
    return Case(args, {"params": new, "backups": d(p)}, tol=NOISY)


def case_bsam_perturb_(dtype, path, gen):
    """Line 3 (w <- omega + rho g / s) and line 5 here (non-deferred) or sqrt(s)|g| added to the
    accumulator (deferred).  "worked-*": the docs/spec.md example."""
    deferred = "deferred" in path
    sdt = _state_dt(dtype)
    if path.startswith("worked"):
        k = BSAM_WORKED
        p, g, b, s = _one(9.0, dtype), _one(k["g"], dtype), _one(1.0, dtype), _one(1.0, sdt)
        acc = _one(0.0, sdt) if deferred else []
        rho, beta2, delta, gamma = k["rho"], k["beta2"], k["delta"], k["gamma"]
        args = dict(params=p, grads=g, backups=b, precisions=s, accums=acc, rho=rho, beta2=beta2,
                    delta=delta, gamma=gamma, found_inf=_flag(path))
        out = {"params": _one(k["perturbed"], F64)}
        out.update({"accums": _one(k["g"], F64), "precisions": _one(1.0, F64)} if deferred
                   else {"precisions": _one(k["s"], F64)})
        return Case(args, out)
    p, g, b = rand(gen, dtype), rand(gen, dtype), rand(gen, dtype)
    # s small and gamma large: line 5's (1 - beta2) term carries s, so its rounding shows
    s = rand(gen, sdt, 1e-3, 1e-2)
    acc = rand(gen, sdt, 0.0, 2.0) if deferred else []
    rho, beta2, delta, gamma = 1e-4, 0.999, 1e-3, 10.0
    args = dict(params=p, grads=g, backups=b, precisions=s, accums=acc, rho=rho, beta2=beta2,
                delta=delta, gamma=gamma, found_inf=_flag(path))
    if path.endswith("skip"):
        return Case(args, _skipped_update(args, ["precisions", "accums"]))
    om, gg, ss = d(b), d(g), d(s)
    h = [x.sqrt() * y.abs() for x, y in zip(ss, gg)]
    out = {"params": [o + rho * y / x for o, y, x in zip(om, gg, ss)]}
    if deferred:
        out.update(accums=[a + hh for a, hh in zip(d(acc), h)], precisions=ss)
    else:
        out["precisions"] = [beta2 * x + (1 - beta2) * (hh + delta + gamma) for x, hh in zip(ss, h)]
    return Case(args, out, tol={"precisions": REL, "accums": REL})


def case_bsam_update_(dtype, path, gen):
    """Lines 5 (deferred only), 6 and 7; "released" uses the s from before line 5 in line 7."""
    deferred = "deferred" in path or "released" in path
    released = "released" in path
    sdt = _state_dt(dtype)
    if path.startswith("worked"):
        k = BSAM_WORKED
        # non-deferred: line 5 already ran in the perturb phase, s = 1.0016 comes in
        s0 = 1.0 if deferred else k["s"]
        args = dict(params=_one(1.021, dtype), grads=_one(k["g_eps"], dtype),
                    backups=_one(1.0, dtype), precisions=_one(s0, sdt), momenta=_one(0.0, sdt),
                    accums=_one(k["g"], sdt) if deferred else [], lr=k["lr"], beta1=k["beta1"],
                    beta2=k["beta2"], delta=k["delta"], gamma=k["gamma"], accum_scale=1.0,
                    released_order=released, found_inf=_flag(path))
        omega = k["omega_released"] if released else k["omega_paper"]
        return Case(args, {"params": _one(omega, F64), "precisions": _one(k["s"], F64),
                           "momenta": _one(k["gm"], F64)})
    p, g, b = rand(gen, dtype), rand(gen, dtype), rand(gen, dtype)
    s, gm = rand(gen, sdt, 1e-3, 1e-2), rand(gen, sdt)  # small s, large gamma: as in the perturb
    acc = rand(gen, sdt, 0.0, 2.0) if deferred else []
    lr, beta1, beta2, delta, gamma, scale = 1e-4, 0.9, 0.999, 1e-3, 10.0, 0.5
    args = dict(params=p, grads=g, backups=b, precisions=s, momenta=gm, accums=acc, lr=lr,
                beta1=beta1, beta2=beta2, delta=delta, gamma=gamma, accum_scale=scale,
                released_order=released, found_inf=_flag(path))
    if path.endswith("skip"):
        return Case(args, _skipped_update(args, ["precisions", "momenta"]))
    om, ge, s_old = d(b), d(g), d(s)
    s_new = [beta2 * x + (1 - beta2) * (a * scale + delta + gamma) for x, a in zip(s_old, d(acc))] \
        if deferred else s_old
    m = [beta1 * mm + (1 - beta1) * (y + delta * o) for mm, y, o in zip(d(gm), ge, om)]
    div = s_old if released else s_new
    return Case(args, {"params": [o - lr * mm / x for o, mm, x in zip(om, m, div)],
                       "precisions": s_new, "momenta": m}, tol={"precisions": REL})


# --- RandomSAM / MFVI / VariationalSAM (docs/spec.md) ------------------------------------------
def case_vi_noise_(dtype, path, gen):
    """backup <- mu; w <- mu + std z: std = sqrt(Sigma) (MFVI) or sigma (RandomSAM).  ``path`` is
    "<mfvi|sigma>-<step>"; Sigma spans 1e-2 .. 9 so std = Sigma would not pass."""
    kind, step = path.split("-")
    step = int(step)
    p = rand(gen, dtype)
    var = rand(gen, _state_dt(dtype), 0.01, 9.0) if kind == "mfvi" else []
    b = [torch.zeros_like(t) for t in p]
    sigma = 0.3
    z = [normals(SEED, step, pid, t.numel()).view(t.shape) for pid, t in zip(IDS, p)]
    std = [v.sqrt() for v in d(var)] if var else [sigma] * len(p)
    args = dict(params=p, backups=b, variances=var, param_ids=IDS, seed=SEED, step=step,
                sigma=0.0 if var else sigma)
    return Case(args, {"params": [w + sd * zz for w, sd, zz in zip(d(p), std, z)],
                       "backups": d(p)}, tol=NOISY)


def case_mfvi_update_(dtype, path, gen):
    """docs/spec.md MFVI: d = g + mu / (N sigma_p^2) (+ heavy ball); mu <- mu - lr d;
    u = log Sigma <- u - var_lr (g z sqrt(Sigma) / 2 + (Sigma / sigma_p^2 - 1) / (2N))."""
    step = 2 ** 32 + 5
    p, g, b = rand(gen, dtype), rand(gen, dtype), rand(gen, dtype)
    sdt = _state_dt(dtype)
    var = rand(gen, sdt, 0.01, 2.0)
    mom = rand(gen, sdt) if "momentum" in path else []
    lr, var_lr, beta, prior, n = 0.1, 0.05, 0.9, 2.0, 40.0
    args = dict(params=p, grads=g, backups=b, variances=var, momenta=mom, param_ids=IDS, seed=SEED,
                step=step, lr=lr, var_lr=var_lr, momentum=beta if mom else 0.0, prior_var=prior,
                num_data=n, found_inf=_flag(path))
    if path.endswith("skip"):
        return Case(args, _skipped_update(args, ["variances", "momenta"]))
    mu, gg, vv = d(b), d(g), d(var)
    z = [normals(SEED, step, pid, t.numel()).view(t.shape) for pid, t in zip(IDS, p)]
    dd = [y + m / (n * prior) for y, m in zip(gg, mu)]
    out = {}
    if mom:
        dd = [beta * q + x for q, x in zip(d(mom), dd)]
        out["momenta"] = dd
    du = [0.5 * y * zz * v.sqrt() + (v / prior - 1) / (2 * n) for y, zz, v in zip(gg, z, vv)]
    out["variances"] = [v * torch.exp(-var_lr * u) for v, u in zip(vv, du)]
    out["params"] = [m - lr * x for m, x in zip(mu, dd)]
    return Case(args, out, tol=NOISY)


def case_vsam_sumsq(dtype, path, gen):
    g, v = rand(gen, dtype), rand(gen, _state_dt(dtype), 0.01, 2.0)
    return Case(dict(grads=g, variances=v),
                {"return": float(sum((x * y * y).sum() for x, y in zip(d(v), d(g))))})


def case_vsam_perturb_(dtype, path, gen):
    """Eq. 2: w <- mu + sqrt(p) Sigma g / (sqrt(g^T Sigma g) + eps); then eq. 42's Sigma step on
    log Sigma ("log") or on Sigma clamped at min_var ("linear")."""
    p, g, b = rand(gen, dtype), rand(gen, dtype), rand(gen, dtype)
    var = rand(gen, _state_dt(dtype), 0.01, 2.0)
    dim, eps, var_lr, prior, n, min_var = 13.0, 1e-12, 0.05, 2.0, 40.0, 0.02
    mu, gg, vv = d(p), d(g), d(var)
    norm = math.sqrt(sum(float((v * y * y).sum()) for v, y in zip(vv, gg)))
    log_step = path.startswith("log")
    args = dict(params=p, grads=g, backups=b, variances=var,
                sigma_norm=torch.tensor(norm, dtype=F64) if path == "linear" else None, dim=dim,
                eps=eps, var_lr=var_lr, prior_var=prior, num_data=n, log_step=log_step,
                min_var=min_var, found_inf=_flag(path))
    if path.endswith("skip"):
        return Case(args, _skipped_perturb(args, norm))
    sq = math.sqrt(dim)
    dsig = [sq * y * y / (2 * (norm + eps)) + 1 / (2 * n * prior) - 1 / (2 * n * v)
            for y, v in zip(gg, vv)]
    if log_step:
        new_var = [v * torch.exp(-var_lr * v * ds) for v, ds in zip(vv, dsig)]
    else:
        new_var = [torch.clamp(v - var_lr * ds, min=min_var) for v, ds in zip(vv, dsig)]
    return Case(args, {"params": [m + sq * v * y / (norm + eps) for m, v, y in zip(mu, vv, gg)],
                       "backups": mu, "variances": new_var, "return": norm},
                tol=NOISY)


def case_ebisam_perturb_(dtype, path, gen):
    """BiSAM Alg. 3: coordinate i moves by rho / (1 - beta) g_i / (||g|| + eps) iff u_i < beta,
    u the Philox uniforms of (seed, step, param id, i)."""
    step = 2 ** 33 + 7 if path.endswith("skip") or path.endswith("finite") else int(path)
    p, g, b = rand(gen, dtype), rand(gen, dtype), rand(gen, dtype)
    rho, beta, eps = 0.2, 0.5, 1e-12
    norm = math.sqrt(_sumsq(g))
    args = dict(params=p, grads=g, backups=b, param_ids=IDS, grad_norm=None, seed=SEED, step=step,
                rho=rho, beta=beta, eps=eps, found_inf=_flag(path))
    if path.endswith("skip"):
        return Case(args, _skipped_perturb(args, norm))
    u = [uniforms(SEED, step, pid, t.numel()).view(t.shape) for pid, t in zip(IDS, p)]
    new = [torch.where(uu < beta, w + rho / (1 - beta) * y / (norm + eps), w)
           for w, y, uu in zip(d(p), d(g), u)]
    return Case(args, {"params": new, "backups": d(p), "return": norm})


# --- SAM variants (docs/spec.md "SAM variants") -------------------------------------------------
def case_samv_dots(dtype, path, gen):
    """[<u,u>, <u,b>, <b,b>] with u = a - shift b, as dot products of the flattened lists."""
    a, b = rand(gen, dtype), rand(gen, _state_dt(dtype))
    shift = 0.7 if path == "shift" else 0.0
    fa, fb = torch.cat([t.flatten() for t in d(a)]), torch.cat([t.flatten() for t in d(b)])
    u = fa - shift * fb
    return Case(dict(lhs=a, rhs=b, shift=shift),
                {"return": [float(torch.dot(u, u)), float(torch.dot(u, fb)),
                            float(torch.dot(fb, fb))]})


SAMV_PERTURB_PATHS = ("keep", "asam-keep", "friendly", "friendly-first", "keep-finite",
                      "friendly-skip")


def case_samv_perturb_(dtype, path, gen):
    """GSAM / WSAM / LookSAM: SAM's ascent e = rho T^2 g / (||T g|| + eps) with g0 = g kept;
    FriendlySAM: e = rho u / (||u|| + eps), u = g - sigma m_old, m = lmbda m_old + (1 - lmbda) g
    (first step: u = g, m = g)."""
    p, g, b = rand(gen, dtype), rand(gen, dtype), rand(gen, dtype)
    sdt = _state_dt(dtype)
    friendly = path.startswith("friendly")
    first = path == "friendly-first"
    adaptive = path.startswith("asam")
    rho, eps, eta, sigma, lmbda = 0.3, 1e-12, 0.01 if adaptive else 0.0, 0.8, 0.9
    m = rand(gen, sdt) if friendly else []
    saved = [] if friendly else [torch.full(shape, float("nan"), dtype=sdt) for shape in SHAPES]
    w64, g64 = d(p), d(g)
    if friendly and not first:
        u = [gg - sigma * mm for gg, mm in zip(g64, d(m))]
        m_new = [lmbda * mm + (1 - lmbda) * gg for gg, mm in zip(g64, d(m))]
    else:
        u = g64
        m_new = g64
    t = [(w.abs() + eta) if adaptive else torch.ones_like(w) for w in w64]
    norm = math.sqrt(_sumsq([uu * tt for uu, tt in zip(u, t)]))
    args = dict(params=p, grads=g, backups=b, saved=saved, momenta=m,
                norm=torch.tensor(norm, dtype=F64), rho=rho, eps=eps, adaptive=adaptive, eta=eta,
                sigma=sigma, lmbda=lmbda, first=first, found_inf=_flag(path))
    if path.endswith("skip"):
        out = _skipped_perturb(args, norm)
        out.pop("return")
        out["momenta"] = d(m)
        return Case(args, out)
    out = {"params": [w + rho * tt * tt * uu / (norm + eps) for w, uu, tt in zip(w64, u, t)],
           "backups": w64}
    if friendly:
        out["momenta"] = m_new
    else:
        out["saved"] = g64
    return Case(args, out, tol={"momenta": REL})


# path: (coefficients as a function of lr, what they stand for)
SAMV_COEFF_PATHS = {
    # GSAM: d = g_p - alpha (g_0 - a g_p) = (1 + alpha a) g_p - alpha g_0 (alpha 0.3, a 0.7)
    "gsam": lambda lr: [1.0 + 0.3 * 0.7, -0.3, 0.0, 0.0, 0.0, 0.0],
    # WSAM, not decoupled: d = k g_p + (1 - k) g_0 (k = gamma / (1 - gamma), gamma 0.4)
    "wsam": lambda lr: [2 / 3, 1 / 3, 0.0, 0.0, 0.0, 0.0],
    # WSAM decoupled: the base step with g_0, then w <- w - lr k (g_p - g_0)
    "wsam-decoupled": lambda lr: [0.0, 1.0, -lr * 2 / 3, lr * 2 / 3, 0.0, 0.0],
    # LookSAM, a full step: d = g_p, g_v = g_p - c g_0 written (c 0.45)
    "looksam-full": lambda lr: [1.0, 0.0, 0.0, 0.0, 1.0, -0.45],
}


def _samv_expect(path, g, s, lr):
    c = SAMV_COEFF_PATHS[path.split("/")[0]](lr)
    d_ = [c[0] * gg + c[1] * ss for gg, ss in zip(g, s)]
    post = [c[2] * gg + c[3] * ss for gg, ss in zip(g, s)]
    outs = [c[4] * gg + c[5] * ss for gg, ss in zip(g, s)] if c[4] or c[5] else None
    return c, d_, post, outs


SAMV_SGD_PATHS = ("gsam/momentum", "wsam/plain", "wsam-decoupled/momentum-wd",
                  "looksam-full/nesterov-first", "gsam/momentum-finite", "wsam-decoupled/skip")


def case_samv_restore_sgd_(dtype, path, gen):
    """w <- backup, then torch.optim.SGD's step with the mixed direction, then the decoupled
    correction; the written combination (LookSAM's g_v)."""
    kind = path.split("/")[1]
    mom, damp, nest, wd, first = {"momentum": (0.9, 0.1, False, 0.0, False),
                                  "momentum-finite": (0.9, 0.1, False, 0.0, False),
                                  "plain": (0.0, 0.0, False, 0.0, True),
                                  "momentum-wd": (0.9, 0.0, False, 5e-4, False),
                                  "nesterov-first": (0.9, 0.0, True, 1e-2, True),
                                  "skip": (0.9, 0.0, False, 5e-4, False)}[kind]
    p, g, b = rand(gen, dtype), rand(gen, dtype), rand(gen, dtype)
    sdt = _state_dt(dtype)
    s = rand(gen, sdt)
    bufs = rand(gen, sdt) if mom else []
    lr = 0.1
    c, d_, post, outs = _samv_expect(path, d(g), d(s), lr)
    out_lists = [torch.zeros(t, dtype=sdt) for t in SHAPES] if outs is not None else []
    args = dict(params=p, grads=g, backups=b, saved=s, momentum_bufs=bufs, outs=out_lists,
                coeffs=torch.tensor(c, dtype=F64), lr=lr, momentum=mom, dampening=damp,
                nesterov=nest, weight_decay=wd, first=first, found_inf=_flag(path))
    if path.endswith("skip"):
        return Case(args, _skipped_update(args, ["momentum_bufs", "outs"]))
    init = None if first or not mom else [{"momentum_buffer": t} for t in d(bufs)]
    new, st = _torch_opt_step(lambda ws: torch.optim.SGD(ws, lr=lr, momentum=mom, dampening=damp,
                                                         nesterov=nest, weight_decay=wd,
                                                         foreach=False), d(b), d_, init)
    expect = {"params": [w + x for w, x in zip(new, post)]}
    if mom:
        expect["momentum_bufs"] = [x["momentum_buffer"] for x in st]
    if outs is not None:
        expect["outs"] = outs
    return Case(args, expect)


SAMV_ADAM_PATHS = ("gsam/adam-l2", "wsam-decoupled/adamw", "looksam-full/adamw-step7",
                   "wsam/adam-l2-finite", "gsam/adamw-skip")


def case_samv_restore_adam_(dtype, path, gen):
    """w <- backup, then torch.optim.Adam / AdamW with the mixed direction, then the decoupled
    correction; the written combination."""
    wd, decoupled, step = ADAM_PATHS[path.split("/")[1]]
    p, g, b = rand(gen, dtype), rand(gen, dtype), rand(gen, dtype)
    sdt = _state_dt(dtype)
    s = rand(gen, sdt)
    if step == 1:
        m, v = ([torch.zeros(x, dtype=sdt) for x in SHAPES] for _ in range(2))
    else:
        m, v = rand(gen, sdt, -0.1, 0.1), rand(gen, sdt, 0.0, 1e-2)
    lr, betas, eps = 1e-2, (0.9, 0.999), 1e-8
    c, d_, post, outs = _samv_expect(path, d(g), d(s), lr)
    out_lists = [torch.zeros(t, dtype=sdt) for t in SHAPES] if outs is not None else []
    args = dict(params=p, grads=g, backups=b, saved=s, exp_avgs=m, exp_avg_sqs=v, outs=out_lists,
                coeffs=torch.tensor(c, dtype=F64), step=step, lr=lr, beta1=betas[0],
                beta2=betas[1], eps=eps, weight_decay=wd, decoupled=decoupled,
                found_inf=_flag(path))
    if path.endswith("skip"):
        return Case(args, _skipped_update(args, ["exp_avgs", "exp_avg_sqs", "outs"]))
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    init = [{"step": torch.tensor(float(step - 1)), "exp_avg": mm, "exp_avg_sq": vv}
            for mm, vv in zip(d(m), d(v))]
    new, st = _torch_opt_step(lambda ws: cls(ws, lr=lr, betas=betas, eps=eps, weight_decay=wd,
                                             foreach=False), d(b), d_, init)
    expect = {"params": [w + x for w, x in zip(new, post)],
              "exp_avgs": [x["exp_avg"] for x in st], "exp_avg_sqs": [x["exp_avg_sq"] for x in st]}
    if outs is not None:
        expect["outs"] = outs
    # exp_avg: the mix of two fp32 terms may cancel to ~1e-4 (absolute error ~ ulp of the terms)
    return Case(args, expect, tol={"exp_avgs": dict(rtol=2e-6, atol=2e-7), "exp_avg_sqs": REL})
# --- IVON (docs/spec.md "IVON"; Shen et al. 2024, Alg. 1) ----------------------------------------
# Written as the paper states it: sigma^2 = 1 / (lambda (h + delta)), theta = m + sigma z,
# h_hat = g (theta - m) / sigma^2 averaged over the samples (plain means, not running ones).
IVON = dict(ess=40.0, wd=1e-2, beta1=0.9, beta2=0.95, lr=0.05, bc=1 - 0.9 ** 3)


def _ivon_sigma(h, ess, wd):
    return [1.0 / torch.sqrt(ess * (x + wd)) for x in h]


def case_ivon_noise_(dtype, path, gen):
    """Line 2: backup <- m; w <- theta = m + sigma z, sigma = (lambda (h + delta))^-1/2; ``path``
    is the noise step."""
    step = int(path)
    p, h = rand(gen, dtype), rand(gen, _state_dt(dtype), 0.1, 3.0)
    b = [torch.zeros_like(t) for t in p]
    k = IVON
    z = [normals(SEED, step, pid, t.numel()).view(t.shape) for pid, t in zip(IDS, p)]
    sig = _ivon_sigma(d(h), k["ess"], k["wd"])
    args = dict(params=p, backups=b, hessians=h, param_ids=IDS, seed=SEED, step=step,
                ess=k["ess"], weight_decay=k["wd"])
    return Case(args, {"params": [w + s * zz for w, s, zz in zip(d(p), sig, z)], "backups": d(p)},
                tol=NOISY)


def _ivon_sample(step, p, g, h, ess, wd):
    """One sample's (g, h_hat = g (theta - m) / sigma^2) with theta - m = sigma z."""
    z = [normals(SEED, step, pid, t.numel()).view(t.shape) for pid, t in zip(IDS, p)]
    sig = _ivon_sigma(h, ess, wd)
    return [y * (s * zz) / s ** 2 for y, s, zz in zip(g, sig, z)]


def case_ivon_accumulate_(dtype, path, gen):
    """Sample ``count`` of a step: the running means of g and of g sigma z become the plain means
    over the samples so far (the earlier ones given as their mean, times count - 1); w <- m."""
    step = 2 ** 32 + 9
    first = path == "first"
    count = 1 if first else 3
    p, g, b = rand(gen, dtype), rand(gen, dtype), rand(gen, dtype)
    sdt = _state_dt(dtype)
    h = rand(gen, sdt, 0.1, 3.0)
    ag, an = rand(gen, sdt), rand(gen, sdt)
    k = IVON
    args = dict(params=p, grads=g, backups=b, hessians=h, avg_grads=ag, avg_nxgs=an,
                param_ids=IDS, seed=SEED, step=step, ess=k["ess"], weight_decay=k["wd"],
                count=count, found_inf=_flag(path))
    if path.endswith("skip"):
        return Case(args, _skipped_update(args, ["avg_grads", "avg_nxgs"]))
    gg, hh = d(g), d(h)
    hhat = _ivon_sample(step, p, gg, hh, k["ess"], k["wd"])
    nxg = [x / (k["ess"] * (y + k["wd"])) for x, y in zip(hhat, hh)]  # g sigma z = h_hat sigma^2
    mean = lambda old, new: [(o * (count - 1) + n) / count for o, n in zip(old, new)]  # noqa
    return Case(args, {"params": d(b), "avg_grads": mean(d(ag), gg),
                       "avg_nxgs": mean(d(an), nxg)}, tol=NOISY)


def case_ivon_update_(dtype, path, gen):
    """Lines 3-8: g and h_hat averaged over the step's samples (the last one here, the earlier
    given as their means of g and g sigma z); gm <- beta1 gm + (1 - beta1) g;
    h <- beta2 h + (1 - beta2) h_hat + (1 - beta2)^2 / 2 (h - h_hat)^2 / (h + delta);
    m <- m - lr clip((gm / bc + delta m) / (h + delta), -c, c); w <- m."""
    step = 2 ** 33 + 5
    count = 1 if path == "one" else 2
    p, g, b = rand(gen, dtype), rand(gen, dtype), rand(gen, dtype)
    sdt = _state_dt(dtype)
    h, gm = rand(gen, sdt, 0.1, 3.0), rand(gen, sdt)
    ag, an = (rand(gen, sdt), rand(gen, sdt)) if count > 1 else ([], [])
    k = IVON
    clip = 0.3 if path == "clip" else math.inf
    args = dict(params=p, grads=g, backups=b, hessians=h, momenta=gm, avg_grads=ag, avg_nxgs=an,
                param_ids=IDS, seed=SEED, step=step, lr=k["lr"], ess=k["ess"],
                weight_decay=k["wd"], beta1=k["beta1"], beta2=k["beta2"], clip_radius=clip,
                bias_correction=k["bc"], count=count, found_inf=_flag(path))
    if path.endswith("skip"):
        return Case(args, _skipped_update(args, ["hessians", "momenta"]))
    m, gg, hh, ess, wd = d(b), d(g), d(h), k["ess"], k["wd"]
    hhat = _ivon_sample(step, p, gg, hh, ess, wd)
    if count > 1:  # the earlier sample's h_hat = its g sigma z / sigma^2
        hhat = [(x * ess * (y + wd) + n) / 2 for x, y, n in zip(d(an), hh, hhat)]
        gg = [(a + y) / 2 for a, y in zip(d(ag), gg)]
    mom = [k["beta1"] * q + (1 - k["beta1"]) * y for q, y in zip(d(gm), gg)]
    b2 = k["beta2"]
    h_new = [b2 * x + (1 - b2) * e + 0.5 * (1 - b2) ** 2 * (x - e) ** 2 / (x + wd)
             for x, e in zip(hh, hhat)]
    step_ = [torch.clamp((q / k["bc"] + wd * w) / (x + wd), -clip, clip)
             for q, w, x in zip(mom, m, h_new)]
    if path == "clip":
        assert any(bool((s.abs() == clip).any()) for s in step_), "no entry clipped"
    return Case(args, {"params": [w - k["lr"] * s for w, s in zip(m, step_)], "hessians": h_new,
                       "momenta": mom}, tol=NOISY)


_STEPS = [str(s) for s in GOLDEN_STEPS]
# op -> its code paths (each a Case builder argument); every op of PHASES must be here
PATHS: Dict[str, tuple] = {
    "grad_sumsq": ("sam", "asam"),
    "nonfinite_flag": ("finite", "huge", "inf", "neg-inf", "nan"),
    "sam_perturb_": ("sam", "asam-norm", "sam-finite", "sam-skip"),
    "sam_restore_sgd_": tuple(SGD_PATHS),
    "sam_restore_adam_": tuple(ADAM_PATHS),
    "bsam_noise_": tuple(_STEPS),
    "bsam_perturb_": ("worked", "worked-deferred", "random", "random-deferred", "deferred-finite",
                      "random-skip"),
    "bsam_update_": ("worked", "worked-deferred", "worked-released", "random", "random-deferred",
                     "random-released", "deferred-finite", "deferred-skip"),
    "vi_noise_": tuple(f"{k}-{s}" for k in ("mfvi", "sigma") for s in _STEPS),
    "mfvi_update_": ("plain", "momentum", "momentum-finite", "momentum-skip"),
    "vsam_sumsq": ("plain",),
    "vsam_perturb_": ("log", "linear", "log-finite", "log-skip"),
    "ebisam_perturb_": tuple(_STEPS) + ("finite", "skip"),
    "samv_dots": ("plain", "shift"),
    "samv_perturb_": SAMV_PERTURB_PATHS,
    "samv_restore_sgd_": SAMV_SGD_PATHS,
    "samv_restore_adam_": SAMV_ADAM_PATHS,
    "ivon_noise_": tuple(_STEPS),
    "ivon_accumulate_": ("first", "third", "third-finite", "third-skip"),
    "ivon_update_": ("one", "two", "clip", "two-finite", "two-skip"),
}
BUILDERS: Dict[str, Callable] = {name: globals()[f"case_{name}"] for name in PATHS}


# --- the argument values of every op (the contract, the AOT matrix, the GPU cases) ------------
CASE_SEED = 0x0123456789ABCDEF  # > 2^32: both Philox key words matter
SAMV_COEFFS = [1.25, -0.4, 0.003, -0.002, 1.0, -0.6]  # the samv restores' c0 .. c5
# Each op: a base case and variants overriding it with the edge values that select another code
# path (each bool both ways, each optional list empty, each optional norm None and given:
# tests/test_contract.py checks it).  The base case gives every scalar argument and optional norm
# and selects the most code (every option on, the lists full): tests/test_triton_aot.py compiles
# it in every dtype, the variants in one.  EMPTY passes an optional list (role state?) empty.
CASES: Dict[str, List[dict]] = {
    "grad_sumsq": [dict(adaptive=True, eta=0.01), dict(adaptive=False, eta=0.0)],
    "nonfinite_flag": [dict()],
    "sam_perturb_": [dict(grad_norm=None, rho=0.05, eps=1e-12, adaptive=True, eta=0.01),
                     dict(adaptive=False, eta=0.0), dict(grad_norm=2.5, adaptive=False, eta=0.0),
                     dict(grad_norm=2.5), dict(rho=0.0, adaptive=False, eta=0.0)],
    "sam_restore_sgd_": [dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True,
                              weight_decay=1e-2, first=False),
                         dict(nesterov=False, weight_decay=0.0),
                         dict(momentum=0.0, momentum_bufs=EMPTY, nesterov=False, weight_decay=0.0),
                         dict(momentum=0.0, momentum_bufs=EMPTY, nesterov=False),
                         dict(first=True, nesterov=False, weight_decay=0.0),
                         dict(weight_decay=0.0),
                         dict(nesterov=False, dampening=0.1, weight_decay=5e-4),
                         dict(first=True), dict(first=True, nesterov=False),
                         # buffers given, momentum 0: the kernels must leave them alone
                         dict(momentum=0.0, nesterov=False, weight_decay=0.0)],
    "sam_restore_adam_": [dict(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                               weight_decay=5e-2, decoupled=True),
                          dict(weight_decay=0.0, decoupled=False),
                          dict(step=1, weight_decay=0.0, decoupled=False),
                          dict(step=7, weight_decay=1e-2, decoupled=False),
                          dict(weight_decay=0.0)],
    "bsam_noise_": [dict(seed=CASE_SEED, step=5, num_data=1000.0),
                    dict(seed=0, step=2 ** 40 + 3), dict(seed=2 ** 63 - 25, step=2 ** 32 - 1)],
    "bsam_perturb_": [dict(rho=0.05, beta2=0.999, delta=0.4, gamma=0.1),
                      dict(accums=EMPTY), dict(rho=0.0, delta=1e-3)],
    "bsam_update_": [dict(lr=0.5, beta1=0.9, beta2=0.999, delta=0.4, gamma=0.1, accum_scale=0.5,
                          released_order=True),
                     dict(released_order=False), dict(accums=EMPTY, released_order=False)],
    "vi_noise_": [dict(seed=CASE_SEED, step=5, sigma=0.03), dict(variances=EMPTY),
                  dict(step=2 ** 40 + 3)],
    "mfvi_update_": [dict(seed=CASE_SEED, step=7, lr=0.1, var_lr=0.3, momentum=0.9, prior_var=0.5,
                          num_data=50.0),
                     dict(momentum=0.0, momenta=EMPTY), dict(step=2 ** 33 + 1)],
    "vsam_sumsq": [dict()],
    # min_var inside the variances' range [0.5, 1.5): the linear step clamps some entries only
    "vsam_perturb_": [dict(sigma_norm=None, dim=40.0, eps=1e-12, var_lr=1e-3, prior_var=2.0,
                           num_data=40.0, log_step=True, min_var=0.9),
                      dict(log_step=False), dict(sigma_norm=3.25),
                      dict(sigma_norm=3.25, log_step=False)],
    "ebisam_perturb_": [dict(grad_norm=None, seed=CASE_SEED, step=11, rho=0.05, beta=0.5,
                             eps=1e-12),
                        dict(grad_norm=0.7), dict(beta=0.1, step=2 ** 32 - 1),
                        dict(grad_norm=1.0, eps=0.0)],
    "samv_dots": [dict(shift=0.7), dict(shift=0.0)],
    "samv_perturb_": [dict(norm=2.5, rho=0.05, eps=1e-12, adaptive=True, eta=0.01, sigma=1.0,
                           lmbda=0.9, first=False),
                      dict(adaptive=False, eta=0.0), dict(momenta=EMPTY),
                      dict(saved=EMPTY, first=True, sigma=0.5),
                      dict(saved=EMPTY, momenta=EMPTY, rho=0.0, adaptive=False)],
    # d = 1.25 g - 0.4 s, w += 0.003 g - 0.002 s, out = g - 0.6 s
    "samv_restore_sgd_": [dict(coeffs=SAMV_COEFFS, lr=0.1, momentum=0.9, dampening=0.0,
                               nesterov=True, weight_decay=1e-2, first=False),
                          dict(nesterov=False, weight_decay=0.0),
                          dict(momentum=0.0, momentum_bufs=EMPTY, outs=EMPTY, nesterov=False),
                          dict(first=True), dict(first=True, nesterov=False, outs=EMPTY),
                          dict(nesterov=False, dampening=0.1, weight_decay=5e-4, outs=EMPTY)],
    "samv_restore_adam_": [dict(coeffs=SAMV_COEFFS, step=3, lr=1e-2, beta1=0.9, beta2=0.999,
                                eps=1e-8, weight_decay=5e-2, decoupled=True),
                           dict(weight_decay=0.0, decoupled=False),
                           dict(step=1, outs=EMPTY, decoupled=False),
                           dict(weight_decay=1e-2, decoupled=False,
                                coeffs=[0.0, 1.0, -0.03, 0.03, 0.0, 0.0])],
    "ivon_noise_": [dict(seed=CASE_SEED, step=5, ess=50.0, weight_decay=1e-2),
                    dict(seed=0, step=2 ** 40 + 3, weight_decay=0.0)],
    # count 1 starts the running means, a later count updates them
    "ivon_accumulate_": [dict(seed=CASE_SEED, step=6, ess=50.0, weight_decay=1e-2, count=3),
                         dict(count=1, step=2 ** 33 + 1)],
    # clip_radius inside the steps' range: some entries clipped, not all
    "ivon_update_": [dict(seed=CASE_SEED, step=7, lr=0.05, ess=50.0, weight_decay=1e-2,
                          beta1=0.9, beta2=0.99, clip_radius=0.5, bias_correction=0.271,
                          count=2),
                     dict(avg_grads=EMPTY, avg_nxgs=EMPTY, count=1),
                     dict(clip_radius=float("inf"), bias_correction=1.0, step=2 ** 33 + 1)],
}


def case(name: str, i: int = 0) -> dict:
    """Case ``i`` of op ``name``: the base case with variant ``i``'s values."""
    return {**CASES[name][0], **CASES[name][i]}
