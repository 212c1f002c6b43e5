"""Bayesian logistic regression in 2-D: exact Bayes vs bSAM vs SAM.

The first experiment of the bSAM paper (Moellenhoff & Khan, "SAM as an Optimal Relaxation of
Bayes", Sec. 4.1, Fig. 3): a linear classifier with two weights and no bias, p(y=1|x, w) =
sigmoid(w . x), a Gaussian prior N(0, 1/prior_precision), on a small 2-D data set.  With two
weights the exact posterior p(w | D) can be computed on a grid, and with it the exact posterior
predictive p(y=1 | x, D) = sum_w p(w | D) sigmoid(w . x) at every input x.  We compare it with

  * bSAM (``samkernels.BSAM``, num_data=N, full batch): its posterior q(w) = N(omega, 1/(N s)) and
    the predictive ``opt.predictive`` (sigmoid averaged over models drawn from q);
  * SAM (``samkernels.SAM``, full batch, same prior as weight decay): a point estimate, whose
    predictive is sigmoid(w_SAM . x).

The distances to exact Bayes over a grid of inputs (mean |p - p_exact| and the mean Bernoulli
KL(p_exact || p)) are printed, and the figure (predictive contours with the data; the weight
posteriors) is written to OUT/bayes_logreg.png.

    python examples/bayes_logreg.py --out docs/          # about 10 s on a CPU

Everything is float64 and seeded: the data (torch.Generator), bSAM's noise (``seed=``) and the
predictive's draws (``generator=``), so a run prints the same numbers every time.
"""

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import samkernels

DTYPE = torch.float64


@dataclasses.dataclass
class Config:
    # data: two Gaussian blobs at +-mean (labels 1 / 0), n points, alternately labelled
    n: int = 20
    mean: Tuple[float, float] = (1.5, 0.5)
    sd: float = 0.7
    data_seed: int = 0
    prior_precision: float = 0.1      # prior N(0, 10 I) on the two weights
    # training (full batch, both optimizers the same number of steps)
    steps: int = 2000
    bsam_lr: float = 0.01
    bsam_rho: float = 0.01
    bsam_gamma: float = 0.01          # damping (0.1 in the paper's deep-learning runs; README)
    bsam_beta2: float = 0.99
    bsam_seed: int = 0
    sam_lr: float = 0.1
    sam_rho: float = 0.05
    sam_momentum: float = 0.9
    samples: int = 1000               # models drawn from bSAM's posterior for its predictive
    # grids: exact posterior over the weights, and the inputs the predictives are compared on
    weight_lim: float = 20.0
    weight_grid: int = 201
    input_lim: float = 6.0
    input_grid: int = 121


# -- data and model ------------------------------------------------------------------------------
def make_data(cfg: Config) -> Tuple[torch.Tensor, torch.Tensor]:
    """x: (n, 2), y: (n,) in {0, 1}; class 1 around +mean, class 0 around -mean."""
    g = torch.Generator().manual_seed(cfg.data_seed)
    y = (torch.arange(cfg.n) % 2).to(DTYPE)
    centre = torch.tensor(cfg.mean, dtype=DTYPE)
    x = torch.randn(cfg.n, 2, generator=g, dtype=DTYPE) * cfg.sd + (2 * y - 1)[:, None] * centre
    return x, y


class LogReg(torch.nn.Module):
    """sigmoid(w . x) written as two logits (0, w . x), so that the softmax that
    ``BSAM.predictive`` averages is (1 - p, p)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, dtype=DTYPE))

    def forward(self, x):
        f = x @ self.w
        return torch.stack([torch.zeros_like(f), f], dim=-1)


def mean_nll(logit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of Bernoulli labels: mean softplus(-(2y - 1) f)."""
    return F.softplus(-(2 * y - 1) * logit).mean(-1)


def input_grid(cfg: Config, size: Optional[int] = None) -> torch.Tensor:
    """(size*size, 2) points of the square [-input_lim, input_lim]^2, x1 fastest."""
    size = size or cfg.input_grid
    t = torch.linspace(-cfg.input_lim, cfg.input_lim, size, dtype=DTYPE)
    return torch.stack(torch.meshgrid(t, t, indexing="xy"), dim=-1).reshape(-1, 2)


# -- exact Bayes ---------------------------------------------------------------------------------
def exact_posterior(x, y, cfg: Config) -> Dict[str, torch.Tensor]:
    """The posterior p(w | D) ∝ exp(-N mean_nll(w) - prior_precision |w|^2 / 2) on a square grid
    of weights.  Returns the grid points ``w`` (K, 2), their probabilities ``prob`` (K,), summing
    to 1, the mode, mean and covariance, and ``edge_mass`` (the mass on the grid's border: small
    when the grid holds the posterior)."""
    t = torch.linspace(-cfg.weight_lim, cfg.weight_lim, cfg.weight_grid, dtype=DTYPE)
    w = torch.stack(torch.meshgrid(t, t, indexing="xy"), dim=-1).reshape(-1, 2)
    log_post = (-len(y) * mean_nll(w @ x.T, y)
                - 0.5 * cfg.prior_precision * (w * w).sum(-1))
    prob = torch.softmax(log_post, dim=0)
    mean = prob @ w
    centred = w - mean
    cov = centred.T @ (centred * prob[:, None])
    grid = prob.reshape(cfg.weight_grid, cfg.weight_grid)
    edge = grid[0].sum() + grid[-1].sum() + grid[1:-1, 0].sum() + grid[1:-1, -1].sum()
    return dict(w=w, prob=prob, axis=t, mode=map_estimate(x, y, cfg), mean=mean, cov=cov,
                edge_mass=edge)


def map_estimate(x, y, cfg: Config, iters: int = 50) -> torch.Tensor:
    """The posterior mode, by Newton's method on N mean_nll(w) + prior_precision |w|^2 / 2."""
    w = torch.zeros(2, dtype=DTYPE)
    eye = torch.eye(2, dtype=DTYPE)
    for _ in range(iters):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (p - y) + cfg.prior_precision * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + cfg.prior_precision * eye
        w = w - torch.linalg.solve(hess, grad)
    return w


def exact_predictive(post: Dict[str, torch.Tensor], points: torch.Tensor,
                     tol: float = 1e-10, chunk: int = 2048) -> torch.Tensor:
    """p(y=1 | x, D) = sum_k prob_k sigmoid(w_k . x) at each point, over the grid weights whose
    probability exceeds ``tol`` times the largest (with the default grid this agrees with a
    601 x 601 grid on [-25, 25]^2 to 1e-7)."""
    keep = post["prob"] > post["prob"].max() * tol
    w, prob = post["w"][keep], post["prob"][keep]
    prob = prob / prob.sum()
    return torch.cat([torch.sigmoid(p @ w.T) @ prob for p in points.split(chunk)])


# -- training ------------------------------------------------------------------------------------
def train_bsam(x, y, cfg: Config):
    model = LogReg()
    opt = samkernels.BSAM(model.parameters(), lr=cfg.bsam_lr, num_data=len(y), rho=cfg.bsam_rho,
                          weight_decay=cfg.prior_precision / len(y), gamma=cfg.bsam_gamma,
                          betas=(0.9, cfg.bsam_beta2), seed=cfg.bsam_seed)
    _fit(model, opt, x, y, cfg.steps)
    return model, opt


def train_sam(x, y, cfg: Config):
    model = LogReg()
    opt = samkernels.SAM(model.parameters(), lr=cfg.sam_lr, rho=cfg.sam_rho,
                         momentum=cfg.sam_momentum, weight_decay=cfg.prior_precision / len(y))
    _fit(model, opt, x, y, cfg.steps)
    return model, opt


def _fit(model, opt, x, y, steps):
    def closure():
        opt.zero_grad()
        loss = mean_nll(model(x)[:, 1], y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)


# -- comparison ----------------------------------------------------------------------------------
def distances(p: torch.Tensor, p_exact: torch.Tensor) -> Dict[str, float]:
    """Mean over the grid of |p - p_exact| and of KL(Bernoulli(p_exact) || Bernoulli(p))."""
    e, q = p_exact.clamp(1e-12, 1 - 1e-12), p.to(DTYPE).clamp(1e-12, 1 - 1e-12)
    kl = e * torch.log(e / q) + (1 - e) * torch.log((1 - e) / (1 - q))
    return dict(mean_abs=(q - e).abs().mean().item(), kl=kl.mean().item())


@contextlib.contextmanager
def _threads(n: int):
    """Tiny tensors: one intra-op thread (on a busy machine more threads only contend)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run(cfg: Optional[Config] = None) -> dict:
    """Everything the figure and the test need: data, exact posterior and predictive, the trained
    bSAM and SAM models, their predictives on the input grid and their distances to exact Bayes."""
    cfg = cfg or Config()
    with _threads(1):
        x, y = make_data(cfg)
        post = exact_posterior(x, y, cfg)
        points = input_grid(cfg)
        p_exact = exact_predictive(post, points)
        bsam_model, bsam = train_bsam(x, y, cfg)
        sam_model, _ = train_sam(x, y, cfg)
        p_bsam = bsam.predictive(bsam_model, points, samples=cfg.samples, generator=0)[:, 1]
        with torch.no_grad():
            p_sam = torch.sigmoid(points @ sam_model.w)
    return dict(cfg=cfg, x=x, y=y, posterior=post, points=points, p_exact=p_exact,
                p_bsam=p_bsam.to(DTYPE), p_sam=p_sam, bsam_mean=bsam_model.w.detach().clone(),
                bsam_var=bsam.posterior_variance()[0].clone(),
                sam_w=sam_model.w.detach().clone(),
                dist_bsam=distances(p_bsam, p_exact), dist_sam=distances(p_sam, p_exact))


# -- figure --------------------------------------------------------------------------------------
def plot(res: dict, path: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    cfg, x, y, post = res["cfg"], res["x"], res["y"], res["posterior"]
    size = cfg.input_grid
    t = torch.linspace(-cfg.input_lim, cfg.input_lim, size, dtype=DTYPE).numpy()
    levels = [i / 20 for i in range(21)]
    fig = Figure(figsize=(13.5, 8.6), layout="constrained")
    axes = fig.subplots(2, 3)

    panels = [("(a) exact Bayes", res["p_exact"], None),
              ("(b) bSAM", res["p_bsam"], res["dist_bsam"]),
              ("(c) SAM (point estimate)", res["p_sam"], res["dist_sam"])]
    slice_x2 = cfg.input_lim - 1.0
    for ax, (title, p, d) in zip(axes[0], panels):
        cs = ax.contourf(t, t, p.reshape(size, size).numpy(), levels=levels, cmap="RdBu_r",
                         vmin=0, vmax=1)
        ax.contour(t, t, p.reshape(size, size).numpy(), levels=[0.1, 0.5, 0.9], colors="k",
                   linewidths=[0.6, 1.0, 0.6], linestyles=["--", "-", "--"])
        ax.scatter(*x[y == 1].T.numpy(), c="tab:red", edgecolors="k", s=28, zorder=3)
        ax.scatter(*x[y == 0].T.numpy(), c="tab:blue", edgecolors="k", s=28, zorder=3)
        ax.axhline(slice_x2, color="0.3", lw=0.8, ls=":")
        if d is not None:
            title += f"\nmean |p - p_exact| = {d['mean_abs']:.3f},  KL = {d['kl']:.3f}"
        else:
            title += "\n(numerical integration over a weight grid)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
        ax.set_aspect("equal")
    fig.colorbar(cs, ax=axes[0].tolist(), shrink=0.8, label="p(y = 1 | x)",
                 ticks=[0, .25, .5, .75, 1])

    # the weight posteriors: exact (filled) with bSAM's diagonal Gaussian (ellipses) on top
    wa = post["axis"].numpy()
    dens = post["prob"].reshape(cfg.weight_grid, cfg.weight_grid)
    mb, vb = res["bsam_mean"], res["bsam_var"]
    w_lo = torch.minimum(post["mean"] - 4 * post["cov"].diag().sqrt(), mb - 4 * vb.sqrt())
    w_hi = torch.maximum(post["mean"] + 4 * post["cov"].diag().sqrt(), mb + 4 * vb.sqrt())
    gauss = torch.exp(-0.5 * ((post["w"] - mb) ** 2 / vb).sum(-1))
    gauss = (gauss / gauss.sum()).reshape(cfg.weight_grid, cfg.weight_grid)

    def density_levels(d):  # levels enclosing about 39 %, 86 % and 99 % of the mass (1, 2, 3 sd)
        flat, _ = d.flatten().sort(descending=True)
        cum = flat.cumsum(0)
        return sorted({flat[int((cum < m).sum())].item() for m in (0.989, 0.865, 0.393)})

    for ax, (title, d) in zip(axes[1][:2], [
            ("(d) exact posterior p(w | D)\n(dashed: regions of 39, 86, 99 % of its mass)", dens),
            ("(e) bSAM's posterior N(omega, 1/(N s))\n(orange: the same regions of it)", gauss)]):
        ax.contourf(wa, wa, d.numpy(), levels=20, cmap="Purples")
        ax.contour(wa, wa, gauss.numpy(), levels=density_levels(gauss), colors="tab:orange",
                   linewidths=1.2)
        ax.contour(wa, wa, dens.numpy(), levels=density_levels(dens), colors="k",
                   linewidths=0.7, linestyles="--")
        ax.plot(*post["mean"].numpy(), "k+", ms=12, mew=1.5, label="exact posterior mean")
        ax.plot(*res["sam_w"].numpy(), "s", mfc="none", mec="tab:green", ms=11, mew=2,
                label="SAM w")
        ax.plot(*mb.numpy(), "o", color="tab:orange", mec="k", ms=6, label="bSAM mean omega")
        ax.plot(*post["mode"].numpy(), "kx", ms=7, mew=1.2, label="MAP")
        ax.set_xlim(w_lo[0].item(), w_hi[0].item())
        ax.set_ylim(w_lo[1].item(), w_hi[1].item())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("$w_1$")
        ax.set_ylabel("$w_2$")
    axes[1][0].legend(fontsize=8, loc="lower right")

    # a cut through the input plane above the data, where the three disagree most
    ax = axes[1][2]
    on_line = res["points"][:, 1].sub(slice_x2).abs() < 1e-9
    if not bool(on_line.any()):  # the grid has no row there: nearest row
        row = res["points"][:, 1].sub(slice_x2).abs()
        on_line = row <= row.min() + 1e-9
    x1 = res["points"][on_line, 0].numpy()
    for key, label, style in [("p_exact", "exact Bayes", dict(color="k", lw=2)),
                              ("p_bsam", "bSAM", dict(color="tab:orange", lw=2, ls="--")),
                              ("p_sam", "SAM", dict(color="tab:green", lw=1.5))]:
        ax.plot(x1, res[key][on_line].numpy(), label=label, **style)
    ax.set_title(f"(f) p(y = 1 | x) along $x_2$ = {res['points'][on_line, 1][0].item():.1f}"
                 " (dotted line above)", fontsize=10)
    ax.set_xlabel("$x_1$")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.suptitle("2-D Bayesian logistic regression (bSAM paper, Sec. 4.1): "
                 f"N = {cfg.n}, prior N(0, {1 / cfg.prior_precision:g} I), {cfg.steps} full-batch "
                 "steps", fontsize=11)
    fig.savefig(path, dpi=100)


def report(res: dict) -> str:
    post, db, ds = res["posterior"], res["dist_bsam"], res["dist_sam"]
    sd = post["cov"].diag().sqrt()
    fmt = lambda v: "(" + ", ".join(f"{float(a):.2f}" for a in v) + ")"  # noqa: E731
    return "\n".join([
        f"exact posterior: mean {fmt(post['mean'])}, sd {fmt(sd)}, MAP {fmt(post['mode'])}, "
        f"mass on the grid border {post['edge_mass'].item():.1e}",
        f"bSAM posterior:  mean {fmt(res['bsam_mean'])}, sd {fmt(res['bsam_var'].sqrt())}",
        f"SAM weights:     {fmt(res['sam_w'])}",
        f"distance to exact Bayes over {len(res['points'])} inputs in "
        f"[-{res['cfg'].input_lim:g}, {res['cfg'].input_lim:g}]^2:",
        f"  bSAM: mean |p - p_exact| = {db['mean_abs']:.4f}, mean KL = {db['kl']:.4f}",
        f"  SAM:  mean |p - p_exact| = {ds['mean_abs']:.4f}, mean KL = {ds['kl']:.4f}",
    ])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs", help="folder for bayes_logreg.png (default: docs)")
    ap.add_argument("--steps", type=int, default=Config.steps)
    ap.add_argument("--gamma", type=float, default=Config.bsam_gamma, help="bSAM damping")
    ap.add_argument("--no-plot", action="store_true", help="print the numbers only")
    args = ap.parse_args(argv)
    cfg = Config(steps=args.steps, bsam_gamma=args.gamma)
    start = time.perf_counter()
    res = run(cfg)
    print(report(res))
    if not args.no_plot:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "bayes_logreg.png")
        plot(res, path)
        print(f"wrote {path}")
    print(f"({time.perf_counter() - start:.1f} s)")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
