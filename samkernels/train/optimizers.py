"""Optimizers by name.

Each registry entry names a class (``torch.optim`` for the plain baselines, ``samkernels.optim`` for
the SAM family, looked up lazily so that a missing class raises a clear error only when asked for),
the constructor arguments that define the variant (``base="adam"`` for SAM-Adam, ``phi="tanh"`` for
BiSAM (tanh)) and how many gradient evaluations one step costs.

Hyper-parameters are the constructor's keyword arguments plus these trainer-level keys, each offered
only to the optimizers that use it:

* ``prior_precision`` - the bSAM paper's ``N * delta``: weight decay becomes ``prior_precision / N``
  with ``N`` the training-set size (times ``aug_factor`` under augmentation, as in the authors' code);
  offered to optimizers whose constructor takes ``weight_decay``;
* ``sds_fraction``    - E-BiSAM's sharpness-sensitive data selection: fraction of each batch the
  second pass keeps (the examples whose ascent loss rose most under the perturbation).  It is
  ``EBiSAM``'s ``gamma``; the trainer calls it ``sds_fraction`` so that ``--set gamma=...`` keeps
  meaning bSAM's damping only.

The BiSAM family's ascent loss (``phi``, ``mu``, ``alpha``) is the optimizer's own
``ascent_loss``, so the values in the run's hyper-parameters are the ones used.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from samkernels.train.config import ConfigError

TRAINER_KEYS = ("prior_precision", "sds_fraction")
# constructor keywords the trainer exposes under another name: {entry: {constructor name: key}}
RENAMED = {"ebisam": {"gamma": "sds_fraction"}}


class OptimizerUnavailable(RuntimeError):
    """The registry knows the optimizer but ``samkernels.optim`` does not provide it (yet)."""


@dataclass(frozen=True)
class Entry:
    name: str                              # registry key
    label: str                             # row label in tables and plots
    module: str                            # "torch.optim" or "samkernels.optim"
    classes: Tuple[str, ...]               # class names tried in order
    fixed: Dict[str, Any] = field(default_factory=dict)   # kwargs that define the variant
    defaults: Dict[str, Any] = field(default_factory=dict)  # used when the preset gives nothing
    passes: int = 1                        # gradient evaluations per step
    ascent_loss: bool = False              # first pass on optimizer.ascent_loss (BiSAM family)
    selection: bool = False                # second pass on a data selection (E-BiSAM's SDS)
    num_data: bool = False                 # constructor takes num_data (Bayesian methods)
    ess: bool = False                      # constructor takes ess, the training-set size (IVON)
    seed: bool = False                     # constructor takes seed (noise of its own)

    def resolve(self) -> Tuple[type, Dict[str, Any]]:
        """(class, kwargs fixed by the variant); clear error if this samkernels lacks it."""
        module = importlib.import_module(self.module)
        for name in self.classes:
            found = getattr(module, name, None)
            if found is not None:
                return found, dict(self.fixed)
        raise OptimizerUnavailable(
            f"optimizer {self.name!r} ({self.label}) needs {self.module}.{self.classes[0]}, "
            f"which this version of samkernels does not provide yet")

    def cls(self) -> type:
        return self.resolve()[0]

    def available(self) -> bool:
        try:
            self.cls()
            return True
        except (OptimizerUnavailable, ImportError):
            return False


def _e(name, label, module, classes, **kw) -> Entry:
    return Entry(name, label, module, tuple(classes), **kw)


_SK = "samkernels.optim"
REGISTRY: Dict[str, Entry] = {e.name: e for e in [
    _e("sgd", "SGD", "torch.optim", ["SGD"], defaults=dict(lr=0.1, momentum=0.9)),
    _e("adam", "Adam", "torch.optim", ["Adam"], defaults=dict(lr=1e-3)),
    _e("adamw", "AdamW", "torch.optim", ["AdamW"], defaults=dict(lr=1e-3, weight_decay=1e-2)),
    _e("sam", "SAM-SGD", _SK, ["SAM"], fixed=dict(base="sgd"), passes=2,
       defaults=dict(lr=0.1, momentum=0.9, rho=0.05)),
    _e("sam-adam", "SAM-Adam", _SK, ["SAM"], fixed=dict(base="adam"), passes=2,
       defaults=dict(lr=1e-3, rho=0.05)),
    _e("sam-adamw", "SAM-AdamW", _SK, ["SAM"], fixed=dict(base="adamw"), passes=2,
       defaults=dict(lr=1e-3, rho=0.05)),
    _e("asam", "ASAM", _SK, ["SAM"], fixed=dict(base="sgd", adaptive=True), passes=2,
       defaults=dict(lr=0.1, momentum=0.9, rho=0.5)),
    _e("bsam", "bSAM", _SK, ["BSAM"], passes=2, num_data=True, seed=True,
       defaults=dict(lr=0.1, rho=0.01, gamma=0.1)),
    _e("randomsam", "RandomSAM", _SK, ["RandomSAM"], seed=True, defaults=dict(lr=0.1, momentum=0.9)),
    _e("mfvi", "MFVI", _SK, ["MFVI"], num_data=True, seed=True, defaults=dict(lr=0.1)),
    _e("vsam", "VSAM", _SK, ["VariationalSAM", "VSAM"], passes=2, num_data=True,
       defaults=dict(lr=0.1, rho=0.05)),
    # BiSAM Alg. 1-3.  mu and alpha are left to the class (mu: 1.5 for neglog, 10 for tanh, as in
    # the paper's §4.1) so that --set bisam.phi=tanh also gets tanh's mu; the presets write them out
    _e("bisam", "BiSAM", _SK, ["BiSAM"], passes=2, ascent_loss=True,
       defaults=dict(lr=0.1, momentum=0.9, rho=0.05)),
    _e("bisam-tanh", "BiSAM (tanh)", _SK, ["BiSAM"], fixed=dict(phi="tanh"), passes=2,
       ascent_loss=True, defaults=dict(lr=0.1, momentum=0.9, rho=0.05)),
    # A-BiSAM (Alg. 2): ASAM's T = |w| without eta (eq. 19; BiSAM's eta defaults to 0)
    _e("abisam", "A-BiSAM", _SK, ["BiSAM"], fixed=dict(adaptive=True), passes=2, ascent_loss=True,
       defaults=dict(lr=0.1, momentum=0.9, rho=2.0)),
    _e("ebisam", "E-BiSAM", _SK, ["EBiSAM", "E_BiSAM"], passes=2, ascent_loss=True, selection=True,
       seed=True, defaults=dict(lr=0.1, momentum=0.9, rho=0.05, beta=0.5, sds_fraction=0.5)),
    # the SAM variants on SGD with momentum, rho as SAM's and each method's own defaults
    # (docs/spec.md "SAM variants"); not tuned for this trainer's data sets
    _e("gsam", "GSAM", _SK, ["GSAM"], passes=2,
       defaults=dict(lr=0.1, momentum=0.9, rho=0.05, alpha=0.4)),
    _e("wsam", "WSAM", _SK, ["WSAM"], passes=2,
       defaults=dict(lr=0.1, momentum=0.9, rho=0.05, gamma=0.9)),
    _e("looksam", "LookSAM", _SK, ["LookSAM"], passes=2,
       defaults=dict(lr=0.1, momentum=0.9, rho=0.05, k=5, alpha=0.7)),
    _e("friendlysam", "FriendlySAM", _SK, ["FriendlySAM"], passes=2,
       defaults=dict(lr=0.1, momentum=0.9, rho=0.05, sigma=1.0, lmbda=0.9)),
    # IVON (Shen et al. 2024): ess = N, one posterior sample a step (mc_samples=1)
    _e("ivon", "IVON", _SK, ["IVON"], ess=True, seed=True, defaults=dict(lr=0.1)),
]}
ALIASES = {"sam-sgd": "sam", "samsgd": "sam", "samadam": "sam-adam", "b-sam": "bsam",
           "variationalsam": "vsam", "e-bisam": "ebisam", "a-bisam": "abisam",
           "random-sam": "randomsam"}


def get_entry(name: str) -> Entry:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in REGISTRY:
        raise ConfigError(f"unknown optimizer {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[key]


def _constructor_keys(entry: Entry) -> Tuple[str, ...]:
    """Keyword arguments of the constructor, minus params, the variant's fixed ones and those the
    trainer fills in."""
    cls, fixed = entry.resolve()
    names = []
    # a constructor that passes **kwargs on (GSAM & co. to SAM) also takes its parent's keywords;
    # private intermediate classes only pass them through
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        if not klass.__name__.startswith("_"):
            names += [n for n, p in params.items() if n not in ("self", "params") + tuple(names)
                      and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    skip = set(fixed) | {"num_data", "seed"} | ({"ess"} if entry.ess else set())
    return tuple(n for n in names if n not in skip)


def accepted_keys(entry: Entry) -> Tuple[str, ...]:
    """Constructor keywords plus the trainer keys this optimizer uses (see the module docstring)."""
    names = _constructor_keys(entry)
    renamed = RENAMED.get(entry.name, {})
    keys = tuple(n for n in names if n not in renamed)
    if "weight_decay" in names:  # prior_precision is turned into weight_decay (bSAM App. H)
        keys += ("prior_precision",)
    if entry.selection:
        keys += ("sds_fraction",)
    return keys


def renamed_key(entry: Entry, key: str) -> Optional[str]:
    """The trainer's name for constructor keyword ``key`` of ``entry`` if it has another one."""
    return RENAMED.get(entry.name, {}).get(key)


def accepts(entry: Entry, key: str) -> bool:
    if key in ("beta1", "beta2"):
        key = "betas"
    return key in accepted_keys(entry)


def set_hyper(hp: Dict[str, Any], key: str, value: Any) -> None:
    """hp[key] = value, with ``beta1``/``beta2`` editing one element of ``betas``."""
    if key in ("beta1", "beta2"):
        betas = list(hp.get("betas", (0.9, 0.999)))
        betas[0 if key == "beta1" else 1] = float(value)
        hp["betas"] = tuple(betas)
    else:
        hp[key] = value
        if key == "weight_decay":
            hp.pop("prior_precision", None)  # an explicit weight decay replaces N*delta


def build(entry: Entry, params: Iterable[torch.nn.Parameter], hp: Dict[str, Any], num_data: float,
          seed: int) -> torch.optim.Optimizer:
    """Instantiate ``entry`` with hyper-parameters ``hp`` (trainer keys resolved here)."""
    cls, fixed = entry.resolve()
    kwargs = {k: v for k, v in hp.items() if k not in TRAINER_KEYS}
    if "prior_precision" in hp:
        kwargs["weight_decay"] = hp["prior_precision"] / num_data
    for name, key in RENAMED.get(entry.name, {}).items():
        if key in hp:
            kwargs[name] = hp[key]  # E-BiSAM: sds_fraction is the constructor's gamma
    kwargs.update(fixed)
    if entry.num_data:
        kwargs["num_data"] = num_data
    if entry.ess:
        kwargs["ess"] = num_data
    if entry.seed:
        kwargs["seed"] = seed
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return cls(params, **kwargs)
