"""``run(config)``: resolve the preset, train every (sweep value, optimizer, seed), aggregate over seeds,
print the Table-1-style comparison and write JSON, CSV and plots."""
from __future__ import annotations

import copy
import csv
import inspect
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import fields
from typing import Any, Dict, List, Optional, Tuple

import torch

from samkernels.train.config import ConfigError, TrainConfig
from samkernels.train.data import DataSet, load_dataset
from samkernels.train.engine import RunOptions, RunSpec, train_run
from samkernels.train.metrics import predictor_label
from samkernels.train.models import model_name
from samkernels.train.optimizers import (Entry, accepted_keys, accepts, get_entry, renamed_key,
                                         set_hyper)
from samkernels.train.presets import Preset, get_preset

METRICS = ("accuracy", "nll", "ece", "auroc")
# --set / --sweep keys that change the training procedure rather than an optimizer
TRAIN_KEYS = ("epochs", "batch_size", "schedule", "milestones", "warmup_epochs", "label_smoothing",
              "augment", "aug_factor", "m")
DEFAULT_MODEL = {"mnist1d": "mlp", "digits": "mlp", "mnist": "mlp", "fashionmnist": "lenet5",
                 "cifar10": "resnet20-frn", "cifar100": "resnet20-frn"}
DEFAULT_HIDDEN = {"mnist1d": (256, 256), "digits": (128,), "mnist": (500, 300),
                  "fashionmnist": (500, 300), "cifar10": (500, 300), "cifar100": (500, 300)}
PRETTY_DATA = {"mnist1d": "MNIST-1D", "digits": "Digits (8x8)", "mnist": "MNIST",
               "fashionmnist": "FashionMNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


# --------------------------------------------------------------------------------------------
# Resolution: config + preset -> run specs
# --------------------------------------------------------------------------------------------
def _train_settings(cfg: TrainConfig, preset: Preset) -> Dict[str, Any]:
    pick = lambda ours, theirs: theirs if ours is None else ours  # noqa: E731
    return {"epochs": pick(cfg.epochs, preset.epochs),
            "batch_size": pick(cfg.batch_size, preset.batch_size),
            "schedule": pick(cfg.schedule, preset.schedule),
            "milestones": tuple(preset.milestones),
            "warmup_epochs": pick(cfg.warmup_epochs, preset.warmup_epochs),
            "label_smoothing": pick(cfg.label_smoothing, preset.label_smoothing),
            "augment": pick(cfg.augment, preset.augment),
            "aug_factor": pick(cfg.aug_factor, preset.aug_factor),
            "m": cfg.m}  # None: the preset's per-optimizer value


# integer settings: smallest allowed value and the CLI flag that sets them
_INT_MIN = {"epochs": (1, "--epochs"), "batch_size": (1, "--batch-size"),
            "warmup_epochs": (0, "--warmup-epochs"), "m": (1, "--m")}
_FLAG = {"label_smoothing": "--label-smoothing", "aug_factor": "--aug-factor",
         "schedule": "--schedule", "augment": "--augment", "milestones": "--set milestones"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_train_value(key: str, value: Any, option: Optional[str] = None) -> Any:
    """A training setting, checked before anything runs (``epochs=0`` would train nothing and
    ``batch_size=0`` divide by zero); ``option`` names where it came from in the message."""
    if key in _INT_MIN:
        low, flag = _INT_MIN[key]
        if not _is_int(value) or value < low:
            raise ConfigError(f"{option or flag} must be an integer >= {low}, got {value!r}")
        return value
    name = option or _FLAG.get(key, key)
    if key == "label_smoothing":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
    elif key == "aug_factor":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value!r}")
    elif key == "schedule":
        if value not in ("cosine", "step", "constant"):
            raise ConfigError(f"{name} must be cosine, step or constant, got {value!r}")
    elif key == "augment":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}")
    elif key == "milestones":
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in value):
            raise ConfigError(f"{name} must be positive numbers (epochs, or fractions of training "
                              f"if < 1), got {value!r}")
    return value


def _check_run_options(cfg: TrainConfig) -> None:
    """The options that are not training settings: counts and sizes a run cannot do without."""
    checks = [("--seeds", cfg.seeds, 1), ("--samples", cfg.samples, 0),
              ("--eval-every", cfg.eval_every, 1), ("--train-subset", cfg.train_subset, 1),
              ("--test-subset", cfg.test_subset, 1), ("--threads", cfg.threads, 1),
              ("--stop-after", cfg.stop_after, 1)]
    checks += [("--hidden", h, 1) for h in (cfg.hidden or [])]
    if isinstance(cfg.val_fraction, bool) or not isinstance(cfg.val_fraction, (int, float)) \
            or not 0 <= cfg.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction!r}")
    for flag, value, low in checks:
        if value is not None and (not _is_int(value) or value < low):
            raise ConfigError(f"{flag} must be an integer >= {low}, got {value!r}")


def _apply(hypers: Dict[str, Dict[str, Any]], entries: List[Entry], settings: Dict[str, Any],
           key: str, value: Any, option: str, flag: Optional[str] = None) -> List[Entry]:
    """Apply one ``key=value`` (``name.key`` targets one optimizer) to settings or hyper-parameters;
    returns the optimizers whose runs it can change.  ``flag`` is what the user typed when it was
    not ``option key=value`` (``--rho 0.1``): error messages name it."""
    if key in TRAIN_KEYS:
        settings[key] = _check_train_value(key, value, f"{option} {key}")
        # one-pass optimizers always run with m = 1 (see _msharpness)
        return [e for e in entries if key != "m" or e.passes >= 2]
    name, _, sub = key.rpartition(".")
    targets = entries
    if name:
        target = get_entry(name)
        targets = [e for e in entries if e.name == target.name]
        if not targets:
            raise ConfigError(f"{option} {key}: optimizer {name!r} is not among those selected "
                             f"({', '.join(e.name for e in entries)})")
        key = sub
    hit = [e for e in targets if accepts(e, key)]
    if not hit:
        for e in targets:  # a constructor keyword the trainer calls something else
            other = renamed_key(e, key)
            if other:
                raise ConfigError(f"{option} {key}: {e.name}'s {key} is set with {other} here "
                                  f"({e.name}.{other}=...), so that {key} names one thing only")
        known = sorted({k for e in targets for k in accepted_keys(e)} | set(TRAIN_KEYS))
        raise ConfigError(f"{flag or option + ' ' + key}: not a hyper-parameter of "
                         f"{', '.join(e.name for e in targets)}; known keys: {', '.join(known)}")
    for e in hit:
        set_hyper(hypers[e.name], key, value)
    return hit


def resolve(cfg: TrainConfig) -> Tuple[Preset, str, str, Optional[Tuple[int, ...]], List[RunSpec]]:
    """(preset, data name, model, hidden, run specs) for ``cfg``; raises ValueError on bad input."""
    preset = get_preset(cfg.preset)
    entries: List[Entry] = []
    for name in (cfg.optimizers or preset.optimizers):
        entry = get_entry(name)
        if entry not in entries:
            entries.append(entry)
    for entry in entries:
        entry.cls()  # a clear error now if samkernels.optim lacks it
    data = (cfg.data or preset.data).lower().replace("-", "").replace("_", "")
    model = cfg.model or (preset.model if data == preset.data else DEFAULT_MODEL.get(data, "mlp"))
    hidden = None
    if model == "mlp":
        hidden = tuple(cfg.hidden) if cfg.hidden else (
            preset.hidden if data == preset.data and preset.hidden else DEFAULT_HIDDEN.get(data))
    elif cfg.hidden:
        raise ConfigError(f"--hidden sets MLP layer sizes; model {model!r} has none")
    _check_run_options(cfg)

    # preset hyper-parameters, minus keys this version's constructor does not take
    base_hypers: Dict[str, Dict[str, Any]] = {}
    for e in entries:
        hp = dict(e.defaults)
        hp.update(copy.deepcopy(preset.hyper.get(e.name, {})))
        ok = set(accepted_keys(e))
        dropped = [k for k in hp if k not in ok]
        if dropped:
            warnings.warn(f"preset {preset.name}: {e.cls().__name__} takes no {', '.join(dropped)}; "
                          "ignored", stacklevel=2)
        base_hypers[e.name] = {k: v for k, v in hp.items() if k in ok}
    base_settings = _train_settings(cfg, preset)
    for key, value in base_settings.items():
        if value is not None:  # the preset's values pass too; a CLI/TrainConfig value may not
            base_settings[key] = _check_train_value(key, value)
    shortcuts = [("lr", cfg.lr, "--lr"), ("rho", cfg.rho, "--rho")]
    overrides = [(k, v, f"{flag} {v}") for k, v, flag in shortcuts if v is not None]
    overrides += [(k, v, None) for k, v in cfg.overrides.items()]
    for key, value, flag in overrides:
        _apply(base_hypers, entries, base_settings, key, value, "--set", flag)

    sweep_values: List[Any] = [None]
    swept = {e.name for e in entries}
    if cfg.sweep is not None:
        key, values = cfg.sweep
        if not values:
            raise ConfigError("--sweep needs at least one value")
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"--sweep {key}: a value is repeated in {list(values)}")
        sweep_values = list(values)
        hit = _apply(copy.deepcopy(base_hypers), entries, dict(base_settings), key, values[0],
                     "--sweep")
        swept = {e.name for e in hit}

    sgd_double = preset.sgd_double_epochs if cfg.sgd_double_epochs is None else cfg.sgd_double_epochs
    specs: List[RunSpec] = []
    for n, value in enumerate(sweep_values):
        hypers, settings = copy.deepcopy(base_hypers), dict(base_settings)
        sweep: Dict[str, Any] = {}
        if cfg.sweep is not None:
            sweep = {cfg.sweep[0]: value}
            _apply(hypers, entries, settings, cfg.sweep[0], value, "--sweep")
        for e in entries:
            # an optimizer the swept key does not touch runs once, with the base settings, as a
            # reference (sweep {}; a flat line in the sweep plot) instead of once per value
            if e.name not in swept:
                if n:
                    continue
                hypers_e, settings_e, sweep_e = base_hypers[e.name], base_settings, {}
            else:
                hypers_e, settings_e, sweep_e = hypers[e.name], settings, sweep
            specs.extend(_specs(cfg, e, hypers_e, settings_e, sweep_e, sgd_double, model, hidden,
                                preset))
    if cfg.sweep is not None:  # references first, as in the table
        specs.sort(key=lambda s: bool(s.sweep))
    return preset, data, model, hidden, specs


def _specs(cfg: TrainConfig, e: Entry, hyper: Dict[str, Any], settings: Dict[str, Any],
           sweep: Dict[str, Any], sgd_double: bool, model: str, hidden, preset: Preset) -> List[RunSpec]:
    """One run spec per seed of optimizer ``e``."""
    epochs = settings["epochs"] * (2 if sgd_double and e.passes == 1 else 1)
    m = _msharpness(e, settings["m"], preset)
    if m > 1 and settings["batch_size"] % m:  # equal micro-batches
        raise ConfigError(f"--batch-size {settings['batch_size']} is not divisible by --m {m} "
                          f"({e.name})")
    tag = "".join(f"-{k}={v}" for k, v in sweep.items())
    return [RunSpec(key=f"{e.name}{tag}-s{seed}", entry=e, hyper=dict(hyper), seed=seed,
                    epochs=epochs, batch_size=settings["batch_size"], model=model, hidden=hidden,
                    schedule=settings["schedule"], milestones=tuple(settings["milestones"]),
                    warmup_epochs=settings["warmup_epochs"],
                    label_smoothing=settings["label_smoothing"], augment=settings["augment"],
                    aug_factor=settings["aug_factor"], m=m, sweep=dict(sweep))
            for seed in range(cfg.seed, cfg.seed + cfg.seeds)]


def _msharpness(entry: Entry, requested: Optional[int], preset: Preset) -> int:
    """Micro-batches per step for ``entry``: 1 for one-pass optimizers; an explicit ``--m`` the
    optimizer cannot do is an error, the preset's value falls back to 1 with a warning."""
    if entry.passes < 2:
        return 1  # m-sharpness concerns perturbing optimizers only
    m = requested if requested is not None else preset.m.get(entry.name, 1)
    cls = entry.cls()
    able = "m" in inspect.signature(cls.step).parameters  # step(closure, m): closure(i, ascent)
    if m > 1 and not able:
        if requested is not None:
            raise ConfigError(f"--m {m}: {entry.name} ({cls.__name__}) has no m-sharpness support "
                              "in this version of samkernels; use --m 1")
        warnings.warn(f"preset {preset.name} uses m={m} for {entry.name}, which {cls.__name__} "
                      "cannot do in this version of samkernels: running with m=1", stacklevel=4)
        m = 1
    return m


def checkpoint_path(template: Optional[str], key: str, n_runs: int) -> Optional[str]:
    """Per-run checkpoint file: ``{run}`` in the template is the run key; otherwise the key is
    inserted before the extension when there are several runs."""
    if not template:
        return None
    if "{run}" in template:
        return template.replace("{run}", key)
    if n_runs == 1:
        return template
    stem, ext = os.path.splitext(template)
    return f"{stem}-{key}{ext or '.pt'}"


def _small(model: str, hidden, data: DataSet) -> bool:
    """Fewer than a million parameters (the CPU benchmarks' MLPs and LeNet-5)."""
    from samkernels.train.models import build_model, count_parameters
    return count_parameters(build_model(model, data.input_shape, data.num_classes, hidden)) < 1_000_000


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available")
    return device


# --------------------------------------------------------------------------------------------
# The call
# --------------------------------------------------------------------------------------------
def run(config: Optional[TrainConfig] = None, **kwargs) -> Dict[str, Any]:
    """Train and evaluate everything ``config`` asks for; returns the results dict (also written to
    ``config.out`` as results.json / runs.csv / summary.csv / *.png when given).

    ``run(epochs=3, optimizers=["sgd"])`` is short for ``run(TrainConfig(epochs=3, ...))``."""
    cfg = copy.deepcopy(config) if config is not None else TrainConfig()
    for key, value in kwargs.items():
        if key not in {f.name for f in fields(TrainConfig)}:
            raise TypeError(f"run() got an unknown option {key!r}")
        setattr(cfg, key, value)
    log = (lambda msg: None) if cfg.quiet else (lambda msg: print(msg, flush=True))
    started = time.perf_counter()
    preset, data_name, model, hidden, specs = resolve(cfg)
    device = _device(cfg.device)
    threads_before = torch.get_num_threads()
    try:
        return _run(cfg, preset, data_name, model, hidden, specs, device, log, started)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg, preset, data_name, model, hidden, specs, device, log, started) -> Dict[str, Any]:
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    data: DataSet = load_dataset(data_name, cfg.data_dir, cfg.download)
    data = data.subset(cfg.train_subset, cfg.test_subset)
    try:
        data = data.split_validation(cfg.val_fraction).to(device)
    except ValueError as err:
        raise ConfigError(f"--val-fraction {cfg.val_fraction}: {err}")
    threads = cfg.threads
    if threads is None and device.type == "cpu" and _small(model, hidden, data):
        threads = 1  # small models: thread start-up costs more than it saves (and hurts under load)
    if threads:
        torch.set_num_threads(threads)
    n_val = 0 if data.x_val is None else data.x_val.shape[0]
    log(f"{PRETTY_DATA.get(data.name, data.name)}: {data.x_train.shape[0]} train / {n_val} "
        f"validation / {data.x_test.shape[0]} test, model {model_name(model, hidden)}, "
        f"{preset_label(preset.name, preset.data, data.name)}, "
        f"{len(specs)} run(s) on {device} ({torch.get_num_threads()} thread(s))")

    runs: List[Dict[str, Any]] = []
    for spec in specs:
        opts = RunOptions(device=device, samples=cfg.samples, eval_every=cfg.eval_every,
                          checkpoint=checkpoint_path(cfg.checkpoint, spec.key, len(specs)),
                          resume=cfg.resume, stop_after=cfg.stop_after,
                          progress=cfg.progress and not cfg.quiet, keep_state=cfg.keep_weights,
                          log=log)
        runs.append(train_run(spec, data, opts))

    results = {"config": cfg.to_dict(),
               "preset": {"name": preset.name, "source": preset.source, "data": preset.data},
               "data": data.name, "model": model,
               "sizes": {"train": data.x_train.shape[0], "val": n_val, "test": data.x_test.shape[0]},
               "hidden": list(hidden) if hidden else None,
               "device": str(device), "threads": torch.get_num_threads(),
               "torch": torch.__version__,
               "wall_seconds": time.perf_counter() - started,
               "runs": runs, "summary": summarize(runs)}
    log("")
    log(format_table(results))
    if cfg.out:
        write_outputs(results, cfg.out, plots=cfg.plots)
        log(f"\nresults written to {cfg.out}")
    return results


# --------------------------------------------------------------------------------------------
# Aggregation and output
# --------------------------------------------------------------------------------------------
def preset_label(preset_name: str, preset_data: Optional[str], data: str) -> str:
    """What the header says about the preset: ``preset mnist1d`` when its data set is the one
    trained on; otherwise only its optimizer settings and schedule are in effect, and it says so
    (``--data digits`` under the default preset is not "preset mnist1d")."""
    if preset_data is None or preset_data == data:
        return f"preset {preset_name}"
    return f"no {data} preset: settings of preset {preset_name}, made for {preset_data}"


def _mean_std(values: List[float]) -> Tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def summarize(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and sample std over seeds per (sweep value, optimizer, predictor), in run order."""
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in runs:
        for predictor in sorted(r["predictors"], key=lambda p: p != "predictive"):
            key = (json.dumps(r["sweep"], sort_keys=True), r["optimizer"], predictor)
            groups.setdefault(key, []).append(r)
    rows = []
    for (_, optimizer, predictor), members in groups.items():
        row: Dict[str, Any] = {"optimizer": optimizer, "label": predictor_label(members[0], predictor),
                               "predictor": predictor, "sweep": members[0]["sweep"],
                               "seeds": [m["seed"] for m in members]}
        for metric in METRICS:
            mean, std = _mean_std([m["predictors"][predictor]["metrics"][metric] for m in members])
            row[metric], row[metric + "_std"] = mean, std
            vals = [(m["predictors"][predictor].get("val_metrics") or {}).get(metric)
                    for m in members]
            row["val_" + metric], _ = _mean_std(vals)
        for t in ("steps_per_s", "optimizer_share"):
            row[t], _ = _mean_std([m["throughput"][t] for m in members])
        row["complete"] = all(m["complete"] for m in members)
        row["selected"] = None
        rows.append(row)
    _select(rows)
    return rows


def _select(rows: List[Dict[str, Any]]) -> None:
    """Per (optimizer, predictor) of a sweep, mark the sweep value with the best mean validation
    accuracy over seeds (``selected`` True; others False; the first wins ties; rows outside a
    sweep or without a validation split keep None).  Only validation numbers enter the choice."""
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for row in rows:
        if row["sweep"]:
            groups.setdefault((row["optimizer"], row["predictor"]), []).append(row)
    for members in groups.values():
        scored = [r for r in members if math.isfinite(r["val_accuracy"])]
        if not scored:
            continue
        best = max(scored, key=lambda r: r["val_accuracy"])  # max keeps the first of equals
        for r in members:
            r["selected"] = r is best


def _fmt(mean: float, std: float, nseeds: int, digits: int, scale: float = 1.0) -> str:
    if not math.isfinite(mean):
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    return text + (f"({std * scale:.{digits}f})" if nseeds > 1 else "")


def format_table(results: Dict[str, Any]) -> str:
    """The bSAM paper's Table 1 layout: accuracy (%), NLL, ECE, AUROC, mean(std) over seeds, plus
    throughput (steps/s, optimizer's share of step time)."""
    rows = results["summary"]
    head = (f"{'method':<40} {'val acc %':>9} {'accuracy % ↑':>14} {'NLL ↓':>14} {'ECE ↓':>16} "
            f"{'AUROC ↑':>14} {'steps/s':>8} {'opt %':>6}")
    name = PRETTY_DATA.get(results["data"], results["data"])
    model = model_name(results["model"], results["hidden"])
    pre = preset_label(results["preset"]["name"], results["preset"].get("data"), results["data"])
    lines = [f"{name} / {model} ({pre})", head, "-" * len(head)]
    swept_key = (results["config"].get("sweep") or [None])[0]
    last_sweep, seen = None, set()
    for row in rows:
        sweep = json.dumps(row["sweep"], sort_keys=True)
        if row["sweep"] and sweep != last_sweep:
            lines.append("  " + ", ".join(f"{k} = {v}" for k, v in row["sweep"].items()))
        elif swept_key and not row["sweep"] and sweep != last_sweep:
            lines.append(f"  not swept ({swept_key} does not apply): one run set for every value")
        last_sweep = sweep
        n = len(row["seeds"])
        first = (sweep, row["optimizer"]) not in seen  # throughput once per optimizer
        seen.add((sweep, row["optimizer"]))
        speed = f"{row['steps_per_s']:8.1f} {100 * row['optimizer_share']:5.1f}%" if first else ""
        label = ("* " if row.get("selected") else "") + row["label"] + (
            "" if row["complete"] else " [incomplete]")
        val = f"{100 * row['val_accuracy']:.2f}" if math.isfinite(row["val_accuracy"]) else "n/a"
        lines.append(f"{label:<40} {val:>9} "
                     f"{_fmt(row['accuracy'], row['accuracy_std'], n, 2, 100):>14} "
                     f"{_fmt(row['nll'], row['nll_std'], n, 3):>14} "
                     f"{_fmt(row['ece'], row['ece_std'], n, 4):>16} "
                     f"{_fmt(row['auroc'], row['auroc_std'], n, 3):>14} {speed}")
    seeds = rows[0]["seeds"] if rows else []
    sizes = results.get("sizes")
    if sizes:
        lines.append(f"val acc: the mean weights' / predictive's accuracy on {sizes['val']} "
                     f"validation examples held out of the training data; the other columns: "
                     f"{sizes['test']} test examples, final model (no early stopping)")
    if any(row.get("selected") for row in rows):
        lines.append("* the sweep value picked per method on mean validation accuracy "
                     "(the test columns played no part)")
    lines.append(f"seeds: {', '.join(map(str, seeds))}; mean(std) over seeds; ECE with 20 bins; "
                 f"wall time {results['wall_seconds']:.1f} s")
    return "\n".join(lines)


def _public(run: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in run.items() if k != "state"}


def write_outputs(results: Dict[str, Any], out: str, plots: bool = True) -> None:
    os.makedirs(out, exist_ok=True)
    public = dict(results, runs=[_public(r) for r in results["runs"]])
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(public, fh, indent=1, default=str, allow_nan=True)
    with open(os.path.join(out, "runs.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "optimizer", "label", "seed", "sweep", "predictor", *METRICS,
                    *(f"val_{k}" for k in METRICS),
                    "epochs_done", "steps_per_s", "optimizer_share", "train_seconds"])
        for r in results["runs"]:
            for predictor, ev in r["predictors"].items():
                w.writerow([r["key"], r["optimizer"], predictor_label(r, predictor), r["seed"],
                            json.dumps(r["sweep"]), predictor,
                            *(ev["metrics"][k] for k in METRICS),
                            *((ev.get("val_metrics") or {}).get(k) for k in METRICS),
                            r["epochs_done"],
                            r["throughput"]["steps_per_s"], r["throughput"]["optimizer_share"],
                            r["throughput"]["train_seconds"]])
    with open(os.path.join(out, "summary.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["optimizer", "label", "predictor", "sweep", "seeds",
                    *(f"{k}{s}" for k in METRICS for s in ("", "_std")),
                    *(f"val_{k}" for k in METRICS), "selected", "steps_per_s", "optimizer_share"])
        for row in results["summary"]:
            w.writerow([row["optimizer"], row["label"], row["predictor"], json.dumps(row["sweep"]),
                        len(row["seeds"]), *(row[k + s] for k in METRICS for s in ("", "_std")),
                        *(row["val_" + k] for k in METRICS), row["selected"],
                        row["steps_per_s"], row["optimizer_share"]])
    with open(os.path.join(out, "table.txt"), "w") as fh:
        fh.write(format_table(results) + "\n")
    if plots:
        from samkernels.train import plots as plotting
        plotting.write_all(results, out)
