"""Test-set metrics of the bSAM paper's Table 1 (Möllenhoff & Khan 2022, §4.2).

Every function takes predictive probabilities ``probs`` (n x K, rows summing to one; for a Bayesian
method the softmax averaged over posterior samples) and integer ``labels`` (n,).  The maths runs in
float64 and the results are Python floats.

* accuracy - fraction of ``argmax probs == label``;
* NLL      - mean of ``-log probs[i, label_i]`` (probabilities are clamped at the smallest positive
             float64 so that a confident mistake gives a large finite value, not ``inf``);
* ECE      - expected calibration error with equal-width confidence bins (20 in the paper): the
             confidence is the max probability, bin b holds ``b/B < conf <= (b+1)/B``, and
             ``ECE = sum_b n_b/n * |acc_b - conf_b|``;
* AUROC    - area under the ROC curve of the confidence as a score separating correct (positive) from
             wrong (negative) predictions: the probability that a random correct prediction is more
             confident than a random wrong one, ties counting one half.  Undefined (``nan``) when all
             predictions are correct or all are wrong.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torch import Tensor

ECE_BINS = 20


def _prep(probs: Tensor, labels: Tensor):
    probs = torch.as_tensor(probs).detach().to("cpu", torch.float64)
    labels = torch.as_tensor(labels).detach().to("cpu", torch.long)
    if probs.ndim != 2 or labels.ndim != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"expected probs (n, K) and labels (n,), got {tuple(probs.shape)} and "
                         f"{tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("metrics need at least one example")
    return probs, labels


def accuracy(probs: Tensor, labels: Tensor) -> float:
    probs, labels = _prep(probs, labels)
    return (probs.argmax(1) == labels).double().mean().item()


def nll(probs: Tensor, labels: Tensor) -> float:
    probs, labels = _prep(probs, labels)
    p_true = probs.gather(1, labels[:, None]).squeeze(1)
    return -p_true.clamp_min(torch.finfo(torch.float64).tiny).log().mean().item()


def calibration_bins(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> Dict[str, List[float]]:
    """Per-bin ``count``, ``accuracy`` and mean ``confidence`` (nan for empty bins) and the ``edges``."""
    probs, labels = _prep(probs, labels)
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    # Right-closed bins: conf in (b/B, (b+1)/B] goes to bin b (conf >= 1/K > 0 always).
    upper = torch.arange(1, bins + 1, dtype=torch.float64) / bins
    idx = torch.bucketize(conf, upper).clamp_max(bins - 1)
    count = torch.bincount(idx, minlength=bins).double()
    acc_sum = torch.bincount(idx, weights=correct, minlength=bins)
    conf_sum = torch.bincount(idx, weights=conf, minlength=bins)
    nonempty = count > 0
    nan = torch.full_like(count, math.nan)
    return {
        "edges": [b / bins for b in range(bins + 1)],
        "count": count.tolist(),
        "accuracy": torch.where(nonempty, acc_sum / count.clamp_min(1), nan).tolist(),
        "confidence": torch.where(nonempty, conf_sum / count.clamp_min(1), nan).tolist(),
    }


def ece(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    cal = calibration_bins(probs, labels, bins)
    n = sum(cal["count"])
    return sum(c / n * abs(a - f) for c, a, f in zip(cal["count"], cal["accuracy"], cal["confidence"])
               if c > 0)


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of ``x`` with ties sharing the mean of their ranks."""
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).double()           # rank of the last member of each tie group
    mean_rank = last - (counts.double() - 1) / 2       # mean of first..last
    return mean_rank[inverse]


def auroc(probs: Tensor, labels: Tensor) -> float:
    """AUROC of max-probability confidence, correct = positive (Mann-Whitney U / (n_pos n_neg))."""
    probs, labels = _prep(probs, labels)
    conf, pred = probs.max(1)
    correct = pred == labels
    n_pos = int(correct.sum())
    n_neg = correct.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(conf)
    u = ranks[correct].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def all_metrics(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> Dict[str, float]:
    """The four numbers of the paper's tables: accuracy, nll, ece, auroc."""
    return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels),
            "ece": ece(probs, labels, bins), "auroc": auroc(probs, labels)}


def predictor_label(run: Dict[str, Any], predictor: str) -> str:
    """The name of one predictor of a trainer run in tables and plots."""
    if predictor == "predictive":
        return f"{run['label']} (predictive, {run['predictors']['predictive']['samples']} samples)"
    if "predictive" in run["predictors"]:
        return f"{run['label']} (mean weights)"
    return run["label"]
