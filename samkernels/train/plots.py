"""PNG plots of a results dict (matplotlib, Agg backend; imported only when plots are written).

* ``learning_curves.png``  - training loss and test accuracy (mean weights) per epoch, mean over seeds;
* ``reliability.png``      - reliability diagrams (accuracy per confidence bin vs. the diagonal), one
                              panel per method and predictor, bins pooled over seeds;
* ``sweep_<key>.png``      - accuracy and NLL against the swept value (``--sweep``), mean ± std;
                              optimizers without the swept key are one dashed horizontal line.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from samkernels.train.metrics import predictor_label  # noqa: E402
from samkernels.train.models import model_name  # noqa: E402


def _mean_curves(runs: List[Dict[str, Any]], field: str) -> Tuple[List[int], List[float]]:
    """Per-epoch mean over the runs (runs may differ in length: SGD with doubled epochs)."""
    length = max(len(r["history"][field]) for r in runs)
    epochs, means = [], []
    for i in range(length):
        vals = [r["history"][field][i] for r in runs
                if i < len(r["history"][field]) and math.isfinite(r["history"][field][i])]
        if vals:
            epochs.append(i + 1)
            means.append(sum(vals) / len(vals))
    return epochs, means


def _groups(results: Dict[str, Any]) -> Dict[str, List[Dict[str, Any]]]:
    """Runs grouped by (optimizer, sweep value), labelled for legends."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in results["runs"]:
        tag = ", ".join(f"{k}={v}" for k, v in r["sweep"].items())
        groups.setdefault(r["label"] + (f" ({tag})" if tag else ""), []).append(r)
    return groups


def learning_curves(results: Dict[str, Any], path: str) -> None:
    fig = learning_curves_figure(results)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def learning_curves_figure(results: Dict[str, Any]):
    """The learning-curve figure: training loss and validation accuracy of the mean weights per
    epoch (the test set is not evaluated during training)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for label, runs in _groups(results).items():
        ax_loss.plot(*_mean_curves(runs, "train_loss"), label=label)
        e, acc = _mean_curves(runs, "val_acc")
        ax_acc.plot(e, [100 * a for a in acc], label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss (first pass)", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy % (mean weights)")
    for ax in (ax_loss, ax_acc):  # epochs are whole numbers: no 1.25, 1.5 ticks on short runs
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.legend(fontsize=8)
    seeds = sorted({r["seed"] for r in results["runs"]})
    fig.suptitle(f"{results['data']} / {model_name(results['model'], results.get('hidden'))}: "
                 f"mean over {len(seeds)} seed(s)")
    fig.tight_layout()
    return fig


def _pooled_bins(runs: List[Dict[str, Any]], predictor: str) -> Dict[str, List[float]]:
    """Calibration bins summed over seeds (count-weighted accuracy and confidence)."""
    cal = [r["predictors"][predictor]["calibration"] for r in runs]
    nb = len(cal[0]["count"])
    count = [sum(c["count"][b] for c in cal) for b in range(nb)]
    pooled = {"edges": cal[0]["edges"], "count": count, "accuracy": [], "confidence": []}
    for b in range(nb):
        for field in ("accuracy", "confidence"):
            tot = sum(c[field][b] * c["count"][b] for c in cal if c["count"][b] > 0)
            pooled[field].append(tot / count[b] if count[b] else math.nan)
    return pooled


def reliability(results: Dict[str, Any], path: str) -> None:
    panels = []
    for label, runs in _groups(results).items():
        for predictor in sorted(runs[0]["predictors"], key=lambda p: p != "predictive"):
            panels.append((predictor_label(runs[0], predictor) + label[len(runs[0]["label"]):],
                           _pooled_bins(runs, predictor), len(runs)))
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.3 * rows), squeeze=False)
    for ax, (title, bins, nruns) in zip(axes.flat, panels):
        edges = bins["edges"]
        width = edges[1] - edges[0]
        acc = [0.0 if math.isnan(a) else a for a in bins["accuracy"]]
        ax.bar(edges[:-1], acc, width=width, align="edge", edgecolor="k", linewidth=0.4,
               label="accuracy")
        ax.plot([0, 1], [0, 1], "r--", linewidth=1, label="perfect calibration")
        total = sum(bins["count"])
        ece = sum(c / total * abs(a - f) for c, a, f in
                  zip(bins["count"], bins["accuracy"], bins["confidence"]) if c)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
        # the ECE of the pooled bins (all seeds' test predictions together), which is not the
        # table's mean of per-seed ECEs
        pooled = f", {nruns} seeds pooled" if nruns > 1 else ""
        ax.set_title(f"{title}\nECE {ece:.4f}{pooled}", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_key(results: Dict[str, Any]) -> Any:
    """The swept key (runs of optimizers it does not apply to carry no sweep value)."""
    return next(k for r in results["runs"] for k in r["sweep"])


Point = Tuple[Any, float, float, float, float]  # (value, accuracy, std, NLL, std)


def sweep_lines(results: Dict[str, Any]) -> Tuple[Dict[str, List[Point]], Dict[str, Point]]:
    """What the sweep plot shows: per row label, one point per swept value; and the reference rows
    (optimizers without the swept key, run once) as (None, accuracy, std, NLL, std), drawn flat."""
    key = sweep_key(results)
    lines: Dict[str, List[Point]] = {}
    flat: Dict[str, Point] = {}
    for row in results["summary"]:
        stats = (row["accuracy"], row["accuracy_std"], row["nll"], row["nll_std"])
        if key in row["sweep"]:
            lines.setdefault(row["label"], []).append((row["sweep"][key], *stats))
        else:
            flat[row["label"]] = (None, *stats)
    return lines, flat


def sweep(results: Dict[str, Any], path: str) -> None:
    key = sweep_key(results)
    lines, flat = sweep_lines(results)
    fig, (ax_acc, ax_nll) = plt.subplots(1, 2, figsize=(11, 4))
    numeric = all(isinstance(p[0], (int, float)) for pts in lines.values() for p in pts)
    for label, pts in lines.items():
        xs = [p[0] for p in pts] if numeric else [str(p[0]) for p in pts]
        ax_acc.errorbar(xs, [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts], marker="o",
                        capsize=3, label=label)
        ax_nll.errorbar(xs, [p[3] for p in pts], yerr=[p[4] for p in pts], marker="o", capsize=3,
                        label=label)
    for i, (label, (_, acc, acc_std, nll, nll_std)) in enumerate(flat.items()):
        # one run set, independent of the swept value: a horizontal line with its std band
        color = f"C{(len(lines) + i) % 10}"
        for ax, mean, std in ((ax_acc, 100 * acc, 100 * acc_std), (ax_nll, nll, nll_std)):
            ax.axhline(mean, color=color, linestyle="--", label=f"{label} (no {key})")
            if std > 0:
                ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
    values = [p[0] for pts in lines.values() for p in pts]
    if numeric and values and min(values) > 0 and max(values) / min(values) >= 10:
        ax_acc.set_xscale("log")
        ax_nll.set_xscale("log")
    ax_acc.set(xlabel=key, ylabel="test accuracy %")
    ax_nll.set(xlabel=key, ylabel="test NLL")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(results: Dict[str, Any], out: str) -> List[str]:
    paths = [os.path.join(out, "learning_curves.png"), os.path.join(out, "reliability.png")]
    learning_curves(results, paths[0])
    reliability(results, paths[1])
    if any(r["sweep"] for r in results["runs"]):  # runs[0] may be a not-swept reference
        key = sweep_key(results)
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)
        paths.append(os.path.join(out, f"sweep_{safe}.png"))
        sweep(results, paths[-1])
    return paths
