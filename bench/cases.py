"""Parameter lists and step implementations shared by the pytest-benchmark file and report.py.

A "step" is one optimizer step without the forward/backward: gradients are pre-filled and stay
the same between the passes, so only the optimizer's own work is timed.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Tuple

import torch

import samkernels
from samkernels import BSAM, SAM


# --- shapes -------------------------------------------------------------------------------------
def resnet50_shapes(base: int = 64, classes: int = 1000,
                    blocks: Tuple[int, ...] = (3, 4, 6, 3)) -> List[Tuple[int, ...]]:
    """The 161 parameter tensors of torchvision's ResNet-50 (25,557,032 parameters); smaller
    ``base`` / ``blocks`` give the same layer pattern at toy size (the CPU dry run)."""
    shapes: List[Tuple[int, ...]] = [(base, 3, 7, 7), (base,), (base,)]
    inplanes = base
    for stage, n_blocks in enumerate(blocks):
        width = base * 2 ** stage
        for b in range(n_blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, inplanes, 1, 1), (4 * width,), (4 * width,)]
            inplanes = 4 * width
    return shapes + [(classes, inplanes), (classes,)]


def gpt2_small_shapes(d: int = 768, vocab: int = 50257, ctx: int = 1024,
                      layers: int = 12) -> List[Tuple[int, ...]]:
    """GPT-2 small (124M): token/position embeddings, 12 blocks, final layer norm (148 tensors);
    smaller arguments give the same pattern at toy size."""
    shapes: List[Tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,),
                   (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def tiny_shapes(n: int) -> List[Tuple[int, ...]]:
    return [(1 + (i % 7),) for i in range(n)]


SHAPES: Dict[str, Callable[[], List[Tuple[int, ...]]]] = {
    "resnet50": resnet50_shapes,
    "gpt2-small": gpt2_small_shapes,
    "tiny-1000": lambda: tiny_shapes(1000),
    "tiny-2000": lambda: tiny_shapes(2000),
    # toy versions for bench/gpu_session.sh --cpu-dry-run (Triton interpreted: ~ms per program)
    "resnet50-dry": lambda: resnet50_shapes(base=4, classes=10, blocks=(1,)),
    "gpt2-dry": lambda: gpt2_small_shapes(d=16, vocab=64, ctx=16, layers=1),
    "tiny-24": lambda: tiny_shapes(24),
}
GPU_SETS = ("gpt2-small", "tiny-2000", "resnet50")  # the sets with targets first
DRY_SETS = ("resnet50-dry", "gpt2-dry", "tiny-24")
# Which GPU target a shape set is judged by (the dry-run sets stand in for the real ones).
ROLE = {"gpt2-small": "gpt2", "gpt2-dry": "gpt2", "tiny-2000": "tiny", "tiny-24": "tiny"}
# The performance targets (bench/report.py and bench_bisam_loss.py print measured against these).
TARGETS = {
    "gpt2_x_floor_max": 1.15,      # fused step on GPT-2-small shapes: <= 1.15 x bandwidth floor
    "tiny_vs_foreach_min": 3.0,    # 2,000 tiny tensors: >= 3 x faster than torch._foreach_*
    "tiny_vs_loop_min": 10.0,      # ... and >= 10 x faster than a per-tensor Python loop
    "launches_per_phase_max": 3,   # kernel launches per optimizer phase
    "loss_bw_fraction_min": 0.80,  # BiSAM loss fwd+bwd at large K: >= 80 % of copy bandwidth
}


def make_params(shapes, device="cpu", dtype=torch.float32, seed=0) -> List[torch.nn.Parameter]:
    # drawn on the device itself (GPT-2-small's 124M values drawn on the CPU took ~2 s per row)
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g, device=device).to(dtype))
        p.grad = torch.randn(s, generator=g, device=device).to(dtype) * 1e-2
        params.append(p)
    return params


# --- fused steps (our optimizers; the backend is forced around the call) -------------------------
# On a GPU the fused optimizers run with nonfinite="skip_on_device": the inf/NaN check stays on the
# device (no host read per pass), which is the configuration for speed-critical GPU training.  On
# the CPU the default "skip" costs one scalar read per pass and nothing else.
NONFINITE = "skip_on_device" if torch.cuda.is_available() else "skip"


def _fused(make, phases):
    """Builder of a fused step of the optimizer ``make(params, nonfinite)`` calling the named
    phases in order: ``build(params, backend, nonfinite=NONFINITE)``.

    The returned ``step()`` runs the whole step; ``step.phases`` lists ``(name, call)`` so report.py
    can time and count launches of each phase on its own (phases must run in this order);
    ``step.optimizer`` is the optimizer."""
    def build(params, backend: str, nonfinite: str = None):
        opt = make(params, nonfinite or NONFINITE)
        calls = [(ph, getattr(opt, ph)) for ph in phases]

        def run(call):
            def go():
                with samkernels.use_backend(backend):
                    call()
            return go

        def step():
            with samkernels.use_backend(backend):
                for _, call in calls:
                    call()
        step.phases = [(ph, run(call)) for ph, call in calls]
        step.optimizer = opt
        return step
    return build


fused_sam = _fused(lambda ps, nf: SAM(ps, lr=1e-3, rho=0.05, momentum=0.9, weight_decay=5e-4,
                                      nonfinite=nf),
                   ["first_step", "second_step"])
fused_sam_adam = _fused(lambda ps, nf: SAM(ps, lr=1e-3, rho=0.05, base="adam", nonfinite=nf),
                        ["first_step", "second_step"])
fused_bsam = _fused(lambda ps, nf: BSAM(ps, lr=1e-3, num_data=50_000, rho=0.01, weight_decay=1e-4,
                                        seed=0, nonfinite=nf),
                    ["noise_step", "first_step", "second_step"])


def _family():
    from samkernels.optim import IVON, MFVI, BiSAM, EBiSAM, RandomSAM, VariationalSAM
    return {
        "bisam": _fused(lambda ps, nf: BiSAM(ps, lr=1e-3, rho=0.05, momentum=0.9, weight_decay=5e-4,
                                             nonfinite=nf),
                        ["first_step", "second_step"]),
        "ebisam": _fused(lambda ps, nf: EBiSAM(ps, lr=1e-3, rho=0.05, momentum=0.9, seed=0,
                                               nonfinite=nf),
                         ["first_step", "second_step"]),
        "randomsam": _fused(lambda ps, nf: RandomSAM(ps, lr=1e-3, sigma=5e-5, momentum=0.9, seed=0,
                                                     nonfinite=nf),
                            ["noise_step", "second_step"]),
        "mfvi": _fused(lambda ps, nf: MFVI(ps, lr=1e-3, num_data=50_000, seed=0, nonfinite=nf),
                       ["noise_step", "second_step"]),
        "vsam": _fused(lambda ps, nf: VariationalSAM(ps, lr=1e-3, num_data=50_000, momentum=0.9,
                                                     nonfinite=nf),
                       ["first_step", "second_step"]),
        "ivon": _fused(lambda ps, nf: IVON(ps, lr=0.1, ess=50_000, seed=0, nonfinite=nf),
                       ["noise_step", "second_step"]),
    }


# --- baselines in plain PyTorch: a per-tensor Python loop, and torch._foreach_* ----------------
# Each uses the hyper-parameters of the fused build above and the maths of
# samkernels/ops/reference.py.  SAM, RandomSAM and E-BiSAM perturb, restore and take torch's SGD
# step; the noise of the randomised ones is torch's (``noise=None``) or given: ``noise(step)``, the
# per-tensor normals of step ``step`` (0, 1, ...), so a test can hand them the fused optimizer's.
def _base(params, foreach, adam, **sgd):
    """torch's base step of the fused builds: SGD with momentum 0.9, or Adam (``adam``)."""
    if adam:
        return torch.optim.Adam(params, lr=1e-3, foreach=foreach)
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=foreach, **sgd)


def _loop_perturbed(params, perturbation, adam=False, **sgd):
    """A perturb / restore / ``torch.optim.SGD`` (or ``Adam``) step, tensor by tensor (davda54/sam
    style).  ``perturbation()`` runs once per step and returns ``e(i, p)``, the perturbation of
    tensor i."""
    base = _base(params, False, adam, **sgd)
    old = {}

    @torch.no_grad()
    def step():
        e = perturbation()
        for i, p in enumerate(params):
            old[p] = p.data.clone()
            p.add_(e(i, p))
        for p in params:
            p.data.copy_(old[p])
        base.step()
    return step


def _foreach_perturbed(params, perturbation, adam=False, **sgd):
    """The same step in ``torch._foreach_*`` ops: ``perturbation()`` returns the list of e."""
    base = _base(params, True, adam, **sgd)
    backups = [torch.empty_like(p) for p in params]

    @torch.no_grad()
    def step():
        e = perturbation()
        torch._foreach_copy_(backups, params)
        torch._foreach_add_(params, e)
        torch._foreach_copy_(params, backups)
        base.step()
    return step


def _loop_norm(params):
    return torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)


def _foreach_norm(grads):
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _noise_source(params, noise):
    """``draw()`` -> this step's normals (torch.randn_like, or ``noise(step)``)."""
    counter = [0]

    def draw():
        counter[0] += 1
        if noise is None:
            return [torch.randn_like(p) for p in params]
        return noise(counter[0] - 1)
    return draw


def loop_sam(params, adam=False):
    """davda54/sam style: per-tensor norms stacked, per-tensor perturb, restore, torch SGD (or
    Adam) step."""
    def perturbation():
        scale = 0.05 / (_loop_norm(params) + 1e-12)
        return lambda i, p: p.grad * scale
    return _loop_perturbed(params, perturbation, adam, **({} if adam else {"weight_decay": 5e-4}))


def foreach_sam(params, adam=False):
    grads = [p.grad for p in params]
    return _foreach_perturbed(
        params, lambda: torch._foreach_mul(grads, 0.05 / (_foreach_norm(grads) + 1e-12)), adam,
        **({} if adam else {"weight_decay": 5e-4}))


def loop_randomsam(params, noise=None):
    draw = _noise_source(params, noise)

    def perturbation():
        z = draw()
        return lambda i, p: z[i] * 5e-5
    return _loop_perturbed(params, perturbation)


def foreach_randomsam(params, noise=None):
    """RandomSAM in plain PyTorch: normals per tensor, foreach perturb/restore, foreach SGD."""
    draw = _noise_source(params, noise)
    return _foreach_perturbed(params, lambda: torch._foreach_mul(draw(), 5e-5))


def loop_ebisam(params):
    def perturbation():
        scale = 0.05 / 0.5 / (_loop_norm(params) + 1e-12)
        return lambda i, p: p.grad * (torch.rand_like(p) < 0.5) * scale
    return _loop_perturbed(params, perturbation)


def foreach_ebisam(params):
    """E-BiSAM's stochastic weight perturbation in plain PyTorch: global norm, a Bernoulli(beta)
    mask per tensor (torch.rand), masked perturb by rho/(1-beta), restore, foreach SGD."""
    grads = [p.grad for p in params]

    def perturbation():
        masks = [(torch.rand_like(p) < 0.5).to(p.dtype) for p in params]
        return torch._foreach_mul(torch._foreach_mul(grads, masks),
                                  0.05 / 0.5 / (_foreach_norm(grads) + 1e-12))
    return _foreach_perturbed(params, perturbation)


def loop_bsam(params):
    """Algorithm 1 written tensor by tensor with torch.randn noise (the direct translation)."""
    st = {p: (torch.ones_like(p), torch.zeros_like(p)) for p in params}
    N, rho, b1, b2, lr, delta, gamma = 50_000, 0.01, 0.9, 0.999, 1e-3, 1e-4, 0.1

    @torch.no_grad()
    def step():
        mean = {}
        for p in params:
            s, _ = st[p]
            mean[p] = p.data.clone()
            p.add_(torch.randn_like(p) / torch.sqrt(N * s))
        for p in params:
            s, _ = st[p]
            p.copy_(mean[p] + rho * p.grad / s)
            s.mul_(b2).add_((1 - b2) * (s.sqrt() * p.grad.abs() + delta + gamma))
        for p in params:
            s, m = st[p]
            m.mul_(b1).add_((1 - b1) * (p.grad + delta * mean[p]))
            p.copy_(mean[p] - lr * m / s)
    return step


def foreach_bsam(params):
    grads = [p.grad for p in params]
    s = [torch.ones_like(p) for p in params]
    m = [torch.zeros_like(p) for p in params]
    mean = [torch.empty_like(p) for p in params]
    N, rho, b1, b2, lr, delta, gamma = 50_000, 0.01, 0.9, 0.999, 1e-3, 1e-4, 0.1

    @torch.no_grad()
    def step():
        torch._foreach_copy_(mean, params)
        noise = [torch.randn_like(p) for p in params]
        torch._foreach_addcdiv_(params, noise, torch._foreach_sqrt(torch._foreach_mul(s, N)))
        torch._foreach_copy_(params, mean)
        torch._foreach_addcdiv_(params, grads, s, value=rho)
        h = torch._foreach_mul(torch._foreach_sqrt(s), torch._foreach_abs(grads))
        torch._foreach_add_(h, delta + gamma)
        torch._foreach_mul_(s, b2)
        torch._foreach_add_(s, h, alpha=1 - b2)
        upd = torch._foreach_add(grads, mean, alpha=delta)
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, upd, alpha=1 - b1)
        torch._foreach_copy_(params, mean)
        torch._foreach_addcdiv_(params, m, s, value=-lr)
    return step


# MFVI and VSAM as built above: N = 50,000, prior_var 1, var_lr 0.01, Sigma_0 = rho^2 / p with
# rho = 0.05 (p: the parameter count), the variance step on log Sigma.  ``step.variances`` is Sigma.
_VI = dict(N=50_000.0, prior_var=1.0, var_lr=0.01, rho=0.05, lr=1e-3)


def _variances(params):
    v0 = _VI["rho"] ** 2 / sum(p.numel() for p in params)
    return [torch.full_like(p, v0) for p in params]


def loop_mfvi(params, noise=None):
    """MFVI (ops.reference.vi_noise_, mfvi_update_; momentum 0) tensor by tensor."""
    N, prior, var_lr, lr = _VI["N"], _VI["prior_var"], _VI["var_lr"], _VI["lr"]
    var = _variances(params)
    draw = _noise_source(params, noise)

    @torch.no_grad()
    def step():
        z = draw()
        mean = []
        for p, v, zi in zip(params, var, z):  # theta = mu + sqrt(Sigma) z
            mean.append(p.data.clone())
            p.add_(v.sqrt() * zi)
        for p, v, zi, mu in zip(params, var, z, mean):
            d = p.grad + mu / (N * prior)
            du = 0.5 * p.grad * zi * v.sqrt() + (v / prior - 1.0) / (2.0 * N)
            v.mul_(torch.exp(-var_lr * du))
            p.copy_(mu - lr * d)
    step.variances = var
    return step


def foreach_mfvi(params, noise=None):
    """MFVI in ``torch._foreach_*`` ops (z kept from the noise to the update)."""
    N, prior, var_lr, lr = _VI["N"], _VI["prior_var"], _VI["var_lr"], _VI["lr"]
    grads = [p.grad for p in params]
    var = _variances(params)
    mean = [torch.empty_like(p) for p in params]
    draw = _noise_source(params, noise)

    @torch.no_grad()
    def step():
        z = draw()
        torch._foreach_copy_(mean, params)
        std = torch._foreach_sqrt(var)
        torch._foreach_addcmul_(params, std, z)
        d = torch._foreach_add(grads, mean, alpha=1.0 / (N * prior))
        du = torch._foreach_mul(torch._foreach_mul(grads, z), std)
        torch._foreach_mul_(du, 0.5)
        torch._foreach_add_(du, torch._foreach_add(torch._foreach_div(var, prior), -1.0),
                            alpha=1.0 / (2.0 * N))
        torch._foreach_mul_(du, -var_lr)
        torch._foreach_exp_(du)
        torch._foreach_mul_(var, du)
        torch._foreach_copy_(params, mean)
        torch._foreach_add_(params, d, alpha=-lr)
    step.variances = var
    return step


def loop_vsam(params):
    """VSAM (ops.reference.vsam_perturb_, log step; then SAM's restore and torch's SGD with
    momentum 0.9 and weight decay 1/(N prior_var)) tensor by tensor."""
    N, prior, var_lr = _VI["N"], _VI["prior_var"], _VI["var_lr"]
    var = _variances(params)
    sq = math.sqrt(sum(p.numel() for p in params))

    def perturbation():
        norm = torch.stack([(v * p.grad * p.grad).sum() for p, v in zip(params, var)]).sum().sqrt()
        inv = 1.0 / (norm + 1e-12)

        def e(i, p):
            v, g = var[i], p.grad
            out = sq * v * g * inv
            du = 0.5 * sq * v * g * g * inv + v / (2.0 * N * prior) - 0.5 / N
            v.mul_(torch.exp(-var_lr * du))
            return out
        return e
    step = _loop_perturbed(params, perturbation, weight_decay=1.0 / (N * prior))
    step.variances = var
    return step


def foreach_vsam(params):
    """VSAM in ``torch._foreach_*`` ops (as loop_vsam)."""
    N, prior, var_lr = _VI["N"], _VI["prior_var"], _VI["var_lr"]
    grads = [p.grad for p in params]
    var = _variances(params)
    sq = math.sqrt(sum(p.numel() for p in params))

    def perturbation():
        vg = torch._foreach_mul(var, grads)
        norm = torch.stack([t.sum() for t in torch._foreach_mul(vg, grads)]).sum().sqrt()
        inv = 1.0 / (norm + 1e-12)
        e = torch._foreach_mul(vg, sq * inv)
        du = torch._foreach_mul(torch._foreach_mul(e, grads), 0.5)
        torch._foreach_add_(du, torch._foreach_mul(var, 1.0 / (2.0 * N * prior)))
        torch._foreach_add_(du, -0.5 / N)
        torch._foreach_mul_(du, -var_lr)
        torch._foreach_exp_(du)
        torch._foreach_mul_(var, du)
        return e
    step = _foreach_perturbed(params, perturbation, weight_decay=1.0 / (N * prior))
    step.variances = var
    return step


# IVON as built above (one sample a step): ess 50,000, the optimizer's defaults (betas (0.9,
# 0.99999), weight decay delta 1e-4, h0 1, no clipping, lr rescaled by h0 + delta, debiased).
_IVON = dict(lr=0.1, ess=50_000.0, beta1=0.9, beta2=0.99999, wd=1e-4, h0=1.0)


def _ivon_state(params, noise):
    """The Hessians (h0), the momenta (0) and ``draw_step()`` -> (this step's normals, its bias
    correction 1 - beta1^t)."""
    hess = [torch.full_like(p, _IVON["h0"]) for p in params]
    gms = [torch.zeros_like(p) for p in params]
    draw, t = _noise_source(params, noise), [0]

    def draw_step():
        t[0] += 1
        return draw(), 1.0 - _IVON["beta1"] ** t[0]
    return hess, gms, draw_step


def loop_ivon(params, noise=None):
    """IVON (ops.reference.ivon_noise_, ivon_update_ with one sample) tensor by tensor."""
    lr, ess, b1, b2, wd, h0 = (_IVON[k] for k in ("lr", "ess", "beta1", "beta2", "wd", "h0"))
    hess, gms, draw_step = _ivon_state(params, noise)

    @torch.no_grad()
    def step():
        z, bc = draw_step()
        mean = []
        for p, h, zi in zip(params, hess, z):  # theta = m + z / sqrt(ess (h + delta))
            mean.append(p.data.clone())
            p.add_(zi / torch.sqrt(ess * (h + wd)))
        for p, h, gm, zi, m in zip(params, hess, gms, z, mean):
            g = p.grad
            f = zi / torch.sqrt(ess * (h + wd)) * g * (h + wd) * ess
            gm.mul_(b1).add_(g, alpha=1.0 - b1)
            h.copy_(b2 * h + (1.0 - b2) * f + 0.5 * (1.0 - b2) ** 2 * (h - f).square() / (h + wd))
            p.copy_(m - lr * (h0 + wd) * (gm / bc + wd * m) / (h + wd))
    return step


def foreach_ivon(params, noise=None):
    """IVON in ``torch._foreach_*`` ops (as loop_ivon)."""
    lr, ess, b1, b2, wd, h0 = (_IVON[k] for k in ("lr", "ess", "beta1", "beta2", "wd", "h0"))
    grads = [p.grad for p in params]
    hess, gms, draw_step = _ivon_state(params, noise)
    mean = [torch.empty_like(p) for p in params]

    @torch.no_grad()
    def step():
        z, bc = draw_step()
        torch._foreach_copy_(mean, params)
        hd = torch._foreach_add(hess, wd)
        sigma_z = torch._foreach_div(z, torch._foreach_sqrt(torch._foreach_mul(hd, ess)))
        torch._foreach_add_(params, sigma_z)
        f = torch._foreach_mul(torch._foreach_mul(torch._foreach_mul(sigma_z, grads), hd), ess)
        torch._foreach_mul_(gms, b1)
        torch._foreach_add_(gms, grads, alpha=1.0 - b1)
        d = torch._foreach_sub(hess, f)
        d = torch._foreach_div(torch._foreach_mul(d, d), hd)
        torch._foreach_mul_(hess, b2)
        torch._foreach_add_(hess, f, alpha=1.0 - b2)
        torch._foreach_add_(hess, d, alpha=0.5 * (1.0 - b2) ** 2)
        u = torch._foreach_add(torch._foreach_div(gms, bc), mean, alpha=wd)
        torch._foreach_div_(u, torch._foreach_add(hess, wd))
        torch._foreach_copy_(params, mean)
        torch._foreach_add_(params, u, alpha=-lr * (h0 + wd))
    return step


IMPLS = {
    "sam": {"fused": fused_sam, "foreach": foreach_sam, "loop": loop_sam},
    "sam_adam": {"fused": fused_sam_adam, "foreach": functools.partial(foreach_sam, adam=True),
                 "loop": functools.partial(loop_sam, adam=True)},
    "bsam": {"fused": fused_bsam, "foreach": foreach_bsam, "loop": loop_bsam},
}
# The rest of the family: fused step overhead only (report.py --algos bisam,... --impls fused-cpu)
IMPLS.update({name: {"fused": build} for name, build in _family().items()})
# BiSAM's phases are SAM's (its ascent loss only changes the backward): the same baselines
IMPLS["bisam"].update(foreach=foreach_sam, loop=loop_sam)
IMPLS["randomsam"].update(foreach=foreach_randomsam, loop=loop_randomsam)
IMPLS["ebisam"].update(foreach=foreach_ebisam, loop=loop_ebisam)
IMPLS["mfvi"].update(foreach=foreach_mfvi, loop=loop_mfvi)
IMPLS["vsam"].update(foreach=foreach_vsam, loop=loop_vsam)
IMPLS["ivon"].update(foreach=foreach_ivon, loop=loop_ivon)

# Bytes each element of the parameter list must move in each phase (fp32), for the bandwidth floor.
# A phase's floor is its own traffic; a step's floor is the sum over its phases.
BYTES_PER_PHASE = {
    # SAM+SGD-momentum: norm (read g) 4 + perturb (read w, g; write backup, w) 16 = 20;
    # restore/update (read backup, g, buf; write w, buf) 20.
    "sam": {"first_step": 20, "second_step": 20},
    # SAM+Adam: the same first pass; restore/update (read backup, g, m, v; write w, m, v) 28
    "sam_adam": {"first_step": 20, "second_step": 28},
    # bSAM: noise (read w, s; write backup, w) 16; perturb + precision (read g, s, backup; write w,
    # s) 20; momentum + mean update (read g, backup, s, gm; write gm, w) 24.
    "bsam": {"noise_step": 16, "first_step": 20, "second_step": 24},
    # BiSAM/E-BiSAM: SAM's phases (E-BiSAM's mask is generated, not read)
    "bisam": {"first_step": 20, "second_step": 20},
    "ebisam": {"first_step": 20, "second_step": 20},
    # RandomSAM: noise (read w; write backup, w) 12 + restore/update 20
    "randomsam": {"noise_step": 12, "second_step": 20},
    # MFVI: noise (read w, var; write backup, w) 16 + update (read g, backup, var, m; write w, var, m) 28
    "mfvi": {"noise_step": 16, "second_step": 28},
    # VSAM: reduction (read g, var) 8 + perturb + var step (read w, g, var; write backup, w, var) 24;
    # restore/update 20
    "vsam": {"first_step": 32, "second_step": 20},
    # IVON (one sample): noise (read w, h; write backup, w) 16 + update (read g, backup, h, gm;
    # write w, h, gm) 28
    "ivon": {"noise_step": 16, "second_step": 28},
}
BYTES_PER_ELEMENT = {algo: sum(ph.values()) for algo, ph in BYTES_PER_PHASE.items()}
