"""``TrainConfig``: everything one call of the trainer does.

Fields left at ``None`` take their value from the preset (``presets.py``); anything set here wins.
Optimizer hyper-parameters are changed with ``overrides`` (the CLI's ``--set key=value``): a plain key
goes to every selected optimizer whose constructor accepts it, ``name.key`` to one optimizer only.
"""
from __future__ import annotations

import ast
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple


class ConfigError(ValueError):
    """Bad user input (unknown name, malformed option, impossible combination)."""


@dataclass
class TrainConfig:
    # what to train
    preset: str = "mnist1d"
    optimizers: Optional[List[str]] = None       # registry names; None: the preset's list
    data: Optional[str] = None
    data_dir: Optional[str] = None
    download: bool = False                       # torchvision download into data_dir
    model: Optional[str] = None
    hidden: Optional[List[int]] = None           # MLP hidden sizes
    train_subset: Optional[int] = None           # first n training / test examples only
    test_subset: Optional[int] = None
    # how to train
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    schedule: Optional[str] = None               # cosine | step | constant
    warmup_epochs: Optional[int] = None
    label_smoothing: Optional[float] = None
    augment: Optional[bool] = None               # random crop (+ flip on CIFAR) for image data
    aug_factor: Optional[float] = None           # N (and N*delta) multiplier under augmentation
    sgd_double_epochs: Optional[bool] = None     # one-gradient optimizers get twice the epochs
    m: Optional[int] = None                      # m-sharpness: micro-batches per step
    lr: Optional[float] = None                   # shortcuts for overrides["lr"], ["rho"]
    rho: Optional[float] = None
    overrides: Dict[str, Any] = field(default_factory=dict)
    sweep: Optional[Tuple[str, List[Any]]] = None  # (key, values): one run set per value
    # repetitions and evaluation
    seed: int = 0
    seeds: int = 1                               # seeds seed, seed+1, ..., seed+seeds-1
    samples: int = 32                            # posterior samples in the Bayesian predictive
    eval_every: int = 1                          # epochs between validation evaluations (curves)
    val_fraction: float = 0.1                    # training data held out for validation (0: none)
    # machinery
    device: str = "auto"
    threads: Optional[int] = None                # torch.set_num_threads
    deterministic: bool = False                  # torch.use_deterministic_algorithms(True)
    out: Optional[str] = None                    # results directory (JSON, CSV, PNG)
    plots: bool = True
    checkpoint: Optional[str] = None             # checkpoint file (a "{run}" part names each run)
    resume: bool = False
    stop_after: Optional[int] = None             # stop each run after this many epochs (resumable)
    progress: bool = True
    quiet: bool = False
    keep_weights: bool = False                   # results["runs"][i]["state"]: final state_dict

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def parse_value(text: str) -> Any:
    """A ``--set`` / ``--sweep`` value: Python literal if it is one (0.1, 3, True, (0.9, 0.999)),
    a tuple for comma lists, else the string itself."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    if "," in text:
        return tuple(parse_value(part) for part in text.split(","))
    return text


def parse_assignment(text: str, option: str = "--set") -> Tuple[str, Any]:
    """``key=value`` -> (key, parsed value); clear error otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise ConfigError(f"{option} expects key=value, got {text!r}")
    return key.strip(), parse_value(value)


def parse_sweep(text: str) -> Tuple[str, List[Any]]:
    """``rho=0.01,0.05,0.1`` -> ("rho", [0.01, 0.05, 0.1])."""
    key, sep, values = text.partition("=")
    parts = [v for v in values.split(",")]
    if not sep or not key.strip() or not values.strip() or any(not v.strip() for v in parts):
        raise ConfigError(f"--sweep expects key=v1,v2,... (e.g. rho=0.01,0.05,0.1), got {text!r}")
    return key.strip(), [parse_value(v) for v in parts]
