"""One training run: one optimizer, one seed, one set of hyper-parameters.

A step hands the optimizer a ``PassClosure``.  Optimizers call it once per gradient evaluation (SGD
once; SAM and bSAM twice); the closure knows which pass it is in, so the loss can differ per pass
(BiSAM's first pass uses the ascent loss) and BatchNorm running statistics are only updated by the
first pass of a step, never at perturbed weights.  With m-sharpness (``m > 1``) the optimizer calls
``closure(i, ascent)`` for micro-batch ``i``, one perturbation per micro-batch.

Checkpoints (written after every epoch when a path is given) hold the model, the optimizer's
state_dict, the global RNG states, the history and the epoch count; shuffling and augmentation are
drawn from generators fixed by (seed, epoch), so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samkernels.train import metrics
from samkernels.train.config import ConfigError
from samkernels.train.data import DataSet, steps_per_epoch, train_batches
from samkernels.train.models import build_model, count_parameters, has_batchnorm
from samkernels.optim.utils import bn_frozen
from samkernels.train.optimizers import Entry, build

CHECKPOINT_VERSION = 1


@dataclass
class RunSpec:
    """Everything that defines a run (resolved from config + preset by the runner)."""
    key: str                      # unique name, e.g. "bsam-rho=0.05-s0"
    entry: Entry
    hyper: Dict[str, Any]
    seed: int
    epochs: int
    batch_size: int
    model: str
    hidden: Optional[Tuple[int, ...]] = None
    schedule: str = "cosine"
    milestones: Tuple[float, ...] = ()
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    augment: bool = False
    aug_factor: float = 1.0
    m: int = 1
    sweep: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> Dict[str, Any]:
        """JSON-friendly identity of the run (also used to check a checkpoint belongs to it)."""
        return {"key": self.key, "optimizer": self.entry.name, "hyper": _jsonable(self.hyper),
                "seed": self.seed, "epochs": self.epochs, "batch_size": self.batch_size,
                "model": self.model, "hidden": list(self.hidden) if self.hidden else None,
                "schedule": self.schedule, "milestones": list(self.milestones),
                "warmup_epochs": self.warmup_epochs, "label_smoothing": self.label_smoothing,
                "augment": self.augment, "aug_factor": self.aug_factor, "m": self.m,
                "sweep": _jsonable(self.sweep)}


@dataclass
class RunOptions:
    """How to run (does not change the result)."""
    device: torch.device = torch.device("cpu")
    samples: int = 32
    eval_every: int = 1
    eval_batch_size: int = 1000
    checkpoint: Optional[str] = None
    resume: bool = False
    stop_after: Optional[int] = None
    progress: bool = False
    keep_state: bool = False
    log: Callable[[str], None] = print


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------
def lr_factor(spec: RunSpec, step: int, steps_per_ep: int) -> float:
    """Multiplier of the base learning rate at global step ``step`` (0-based)."""
    total = spec.epochs * steps_per_ep
    warm = spec.warmup_epochs * steps_per_ep
    if step < warm:
        return (step + 1) / warm
    if spec.schedule == "constant":
        return 1.0
    if spec.schedule == "cosine":  # annealed to zero at the end of training
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    if spec.schedule == "step":  # x0.1 at each milestone (epochs, or fractions of training if < 1)
        epoch = step / steps_per_ep
        marks = [m * spec.epochs if m < 1 else m for m in spec.milestones]
        return 0.1 ** sum(epoch >= mark for mark in marks)
    raise ConfigError(f"unknown schedule {spec.schedule!r}; choose cosine, step or constant")


# --------------------------------------------------------------------------------------------
# Closures and steps
# --------------------------------------------------------------------------------------------
class PassLoss:
    """loss(pass_idx, logits, y): the training criterion on every pass, except the BiSAM family's
    first (ascent) pass, which uses ``ascent`` (the optimizer's ``ascent_loss``: its phi, mu, alpha);
    with ``select`` (E-BiSAM's ``EBiSAM.select``) the second pass keeps the examples whose ascent
    loss rose most under the perturbation."""

    def __init__(self, criterion, ascent=None, select: Optional[Callable[[Tensor, Tensor], Tensor]] = None):
        self.criterion, self.ascent, self.select = criterion, ascent, select
        self._q0: Optional[Tensor] = None

    def __call__(self, pass_idx: int, logits: Tensor, y: Tensor) -> Tensor:
        if self.ascent is None:
            return self.criterion(logits, y)
        if self.select is None:
            return self.ascent(logits, y) if pass_idx == 0 else self.criterion(logits, y)
        if pass_idx == 0:  # per-example ascent loss, remembered for the selection
            q = self.ascent(logits, y, reduction="none")
            self._q0 = q.detach()
            return q.mean()
        with torch.no_grad():
            q_after = self.ascent(logits.detach(), y, reduction="none")
        keep = self.select(self._q0, q_after)
        return self.criterion(logits[keep], y[keep])


class PassClosure:
    """The ``closure`` for ``optimizer.step``: zero grads, forward, loss of this pass, backward.

    The pass index comes from the optimizer when it says which pass this is (samkernels optimizers
    call ``closure(ascent)``, ``ascent=True`` for the perturbation-building pass), else from counting
    calls.  Records the training loss and accuracy of the first pass and the time spent inside
    (forward and backward), so that the optimizer's own share of a step can be reported."""

    def __init__(self, model: nn.Module, optimizer, x: Tensor, y: Tensor, loss: PassLoss,
                 criterion, freeze_bn, sync: Callable[[], None], m: int = 1):
        self.model, self.optimizer, self.x, self.y, self.m = model, optimizer, x, y, m
        self.loss, self.criterion, self.freeze_bn, self.sync = loss, criterion, freeze_bn, sync
        self.calls = 0
        self.seconds = 0.0
        self.stats: Optional[Tensor] = None  # (loss sum, correct, count) of first passes

    def __call__(self, *args) -> Tensor:
        """``closure()``, ``closure(ascent)`` or, with m-sharpness, ``closure(i, ascent)`` for
        micro-batch ``i`` of ``m`` (the batch split into ``m`` equal chunks)."""
        micro, ascent = ((None, None), (None, *args), args)[len(args)]
        k = self.calls if ascent is None else (0 if ascent else 1)
        # a step's only pass at the weights themselves (LookSAM's one-pass steps call
        # closure(False) first) counts as its first pass too: statistics, BatchNorm updates
        first = k == 0 or self.calls == 0
        self.calls += 1
        if micro is None:
            return self.run(self.x, self.y, k, first)
        return self.run(self.x.chunk(self.m)[micro], self.y.chunk(self.m)[micro], k, first)

    def run(self, x: Tensor, y: Tensor, k: int, first: Optional[bool] = None) -> Tensor:
        """Pass ``k`` (0 = first) on the batch (x, y); returns the detached loss.  ``first``
        (default ``k == 0``): the pass whose loss and accuracy are recorded, BatchNorm not frozen."""
        first = k == 0 if first is None else first
        self.sync()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        frozen = self.freeze_bn(self.model) if (not first and self.freeze_bn) else contextlib.nullcontext()
        with torch.enable_grad(), frozen:
            logits = self.model(x)
            loss = self.loss(k, logits, y)
            loss.backward()
        if first:
            with torch.no_grad():
                row = torch.stack([self.criterion(logits, y) * y.numel(),
                                   (logits.argmax(1) == y).sum().to(logits.dtype),
                                   torch.tensor(float(y.numel()), device=logits.device)])
            self.stats = row if self.stats is None else self.stats + row
        self.sync()
        self.seconds += time.perf_counter() - start
        return loss.detach()


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_probs(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Softmax of the model in eval mode, float64 on the CPU."""
    was_training = model.training
    model.eval()
    try:
        out = [torch.softmax(model(x[i:i + batch_size]).double(), 1).cpu()
               for i in range(0, x.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def is_bayesian(optimizer) -> bool:
    return hasattr(optimizer, "sampled_params")


@torch.no_grad()
def posterior_predictive(optimizer, model: nn.Module, x: Tensor, samples: int, seed: int,
                         batch_size: int) -> Tensor:
    """Softmax averaged over ``samples`` models drawn from the optimizer's posterior; each sample is
    used for the whole test set."""
    gen = torch.Generator().manual_seed(seed + 7919)  # CPU: the optimizer draws noise seeds from it
    total = None
    for _ in range(samples):
        with optimizer.sampled_params(generator=gen):
            probs = predict_probs(model, x, batch_size)
        total = probs if total is None else total + probs
    return total / samples


def _evaluate(probs: Tensor, labels: Tensor) -> Dict[str, Any]:
    return {"metrics": metrics.all_metrics(probs, labels),
            "calibration": metrics.calibration_bins(probs, labels)}


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, spec: RunSpec, model, optimizer, epoch: int, history, timing) -> None:
    payload = {"version": CHECKPOINT_VERSION, "run": spec.describe(), "epoch": epoch,
               "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "rng": _rng_state(), "history": history, "timing": timing}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint


def load_checkpoint(path: str, spec: RunSpec) -> Dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"checkpoint {path} has version {payload.get('version')}, "
                         f"expected {CHECKPOINT_VERSION}")
    if payload["run"] != spec.describe():
        theirs, ours = payload["run"], spec.describe()
        diff = [k for k in ours if theirs.get(k) != ours[k]]
        raise ConfigError(f"checkpoint {path} belongs to another run (differs in {', '.join(diff)}); "
                         "use another --checkpoint path or the same settings")
    return payload


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def train_run(spec: RunSpec, data: DataSet, opts: RunOptions) -> Dict[str, Any]:
    device = opts.device
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    random.seed(spec.seed)
    model = build_model(spec.model, data.input_shape, data.num_classes, spec.hidden).to(device)
    n_train = data.x_train.shape[0]
    num_data = n_train * (spec.aug_factor if spec.augment else 1.0)
    try:
        optimizer = build(spec.entry, model.parameters(), spec.hyper, num_data, spec.seed)
    except (TypeError, ValueError) as err:  # the constructor rejected a hyper-parameter
        raise ConfigError(f"{spec.entry.name} with {spec.hyper}: {err}") from err
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    spe = steps_per_epoch(data, spec.batch_size)
    if spec.m > 1 and spec.batch_size % spec.m:  # equal micro-batches
        raise ConfigError(f"batch size {spec.batch_size} is not divisible by m={spec.m}")

    criterion = lambda logits, y: F.cross_entropy(logits, y, label_smoothing=spec.label_smoothing)  # noqa: E731
    # BiSAM family: the optimizer's own ascent loss, built from this run's phi/mu/alpha (never the
    # registry's), and E-BiSAM's selection with its gamma (= sds_fraction)
    ascent = _required(optimizer, "ascent_loss") if spec.entry.ascent_loss else None
    select = _required(optimizer, "select") if spec.entry.selection else None
    freeze_bn = bn_frozen if has_batchnorm(model) else None
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    history: Dict[str, List[float]] = {k: [] for k in
                                       ("epoch", "lr", "train_loss", "train_acc", "val_acc", "val_nll")}
    timing = {"train_seconds": 0.0, "step_seconds": 0.0, "closure_seconds": 0.0, "steps": 0}
    start_epoch = 0
    if opts.checkpoint and opts.resume:
        if os.path.exists(opts.checkpoint):
            ckpt = load_checkpoint(opts.checkpoint, spec)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            _set_rng_state(ckpt["rng"])
            history, timing, start_epoch = ckpt["history"], ckpt["timing"], ckpt["epoch"]
            opts.log(f"[{spec.key}] resumed from {opts.checkpoint} at epoch {start_epoch}")
        else:
            opts.log(f"[{spec.key}] no checkpoint at {opts.checkpoint}: starting from scratch")

    bar = None
    if opts.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=spec.epochs * spe, initial=start_epoch * spe, desc=spec.key,
                   dynamic_ncols=True, leave=True)
    last_epoch = spec.epochs
    if opts.stop_after is not None:
        last_epoch = min(spec.epochs, max(opts.stop_after, start_epoch))
    try:
        for epoch in range(start_epoch, last_epoch):
            model.train()
            epoch_stats = torch.zeros(3, dtype=torch.float64, device=device)
            epoch_start = time.perf_counter()
            for i, (x, y) in enumerate(train_batches(data, spec.batch_size, spec.seed, epoch,
                                                     spec.augment)):
                factor = lr_factor(spec, epoch * spe + i, spe)
                for group, lr in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = lr * factor
                closure = PassClosure(model, optimizer, x, y, PassLoss(criterion, ascent, select),
                                      criterion, freeze_bn, sync, spec.m)
                sync()
                t0 = time.perf_counter()
                if spec.m > 1:  # m-sharpness: the optimizer calls closure(i, ascent) per micro-batch
                    optimizer.step(closure, m=spec.m)
                else:
                    optimizer.step(closure)
                sync()
                timing["step_seconds"] += time.perf_counter() - t0
                timing["closure_seconds"] += closure.seconds
                timing["steps"] += 1
                epoch_stats += closure.stats.double()
                if bar is not None:
                    bar.update(1)
                    if i % 10 == 0 or i == spe - 1:
                        s = epoch_stats.tolist()
                        rate = (i + 1) / max(1e-9, time.perf_counter() - epoch_start)
                        bar.set_postfix(epoch=epoch + 1, loss=f"{s[0] / s[2]:.3f}",
                                        acc=f"{s[1] / s[2]:.3f}", steps_s=f"{rate:.1f}")
            timing["train_seconds"] += time.perf_counter() - epoch_start
            s = epoch_stats.tolist()
            history["epoch"].append(epoch + 1)
            history["lr"].append(base_lrs[0] * factor)
            history["train_loss"].append(s[0] / s[2])
            history["train_acc"].append(s[1] / s[2])
            # learning curves on the validation split only: the test set is evaluated once, at
            # the end, so nothing seen during training depends on it
            if data.x_val is not None and ((epoch + 1) % opts.eval_every == 0
                                           or epoch + 1 == spec.epochs):
                probs = predict_probs(model, data.x_val, opts.eval_batch_size)
                history["val_acc"].append(metrics.accuracy(probs, data.y_val))
                history["val_nll"].append(metrics.nll(probs, data.y_val))
            else:
                history["val_acc"].append(math.nan)
                history["val_nll"].append(math.nan)
            if not math.isfinite(s[0]):
                raise FloatingPointError(f"[{spec.key}] training loss is {s[0]} in epoch "
                                         f"{epoch + 1}: lower the learning rate")
            if opts.checkpoint:
                save_checkpoint(opts.checkpoint, spec, model, optimizer, epoch + 1, history, timing)
    finally:
        if bar is not None:
            bar.close()

    done = len(history["epoch"])
    result: Dict[str, Any] = {
        "key": spec.key, "optimizer": spec.entry.name, "label": spec.entry.label, "seed": spec.seed,
        "sweep": _jsonable(spec.sweep), "hyper": _jsonable(spec.hyper), "run": spec.describe(),
        "num_data": num_data, "parameters": count_parameters(model), "epochs_done": done,
        "complete": done >= spec.epochs, "history": history, "throughput": _throughput(timing),
        "predictors": {},
    }
    if ascent is not None:  # the ascent loss actually used (the class fills in mu from phi)
        result["ascent_loss"] = {k: getattr(optimizer, k) for k in ("phi", "mu", "alpha")
                                 if hasattr(optimizer, k)}
    # the final model (no early stopping, no best-epoch choice), on validation and then test;
    # "metrics" are the test set's, "val_metrics" the validation split's (None without one)
    bayes = is_bayesian(optimizer) and opts.samples > 0
    for name in ("mean", "predictive") if bayes else ("mean",):
        if name == "mean":
            probs_of = lambda x: predict_probs(model, x, opts.eval_batch_size)  # noqa: E731
        else:
            probs_of = lambda x: posterior_predictive(optimizer, model, x, opts.samples,  # noqa
                                                      spec.seed, opts.eval_batch_size)
        ev: Dict[str, Any] = {"val_metrics": None if data.x_val is None else
                              metrics.all_metrics(probs_of(data.x_val), data.y_val)}
        ev.update(_evaluate(probs_of(data.x_test), data.y_test))
        if name == "predictive":
            ev["samples"] = opts.samples
        result["predictors"][name] = ev
    if opts.keep_state:  # final weights (tests compare runs bit for bit)
        result["state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return result


def _required(optimizer, attr: str):
    """``optimizer.attr``; a clear error when the class lacks it (the registry entry needs it)."""
    found = getattr(optimizer, attr, None)
    if not callable(found):
        raise ConfigError(f"{type(optimizer).__name__} has no {attr}(), which the trainer needs "
                          "for this optimizer")
    return found


def _throughput(timing: Dict[str, float]) -> Dict[str, float]:
    steps, step_s = timing["steps"], timing["step_seconds"]
    return {"steps": steps, "train_seconds": timing["train_seconds"],
            "steps_per_s": steps / timing["train_seconds"] if timing["train_seconds"] else math.nan,
            "optimizer_share": 1.0 - timing["closure_seconds"] / step_s if step_s else math.nan}
