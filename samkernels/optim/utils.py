"""Training-loop helpers shared by every samkernels optimizer."""
from __future__ import annotations

import contextlib
from typing import Callable, Union

import torch
from torch.nn.modules.batchnorm import _BatchNorm

SeedLike = Union[None, int, torch.Generator]


def draw_seed(seed: SeedLike) -> int:
    """A 62-bit noise seed: an int as given, else one draw from ``seed`` (a Generator) or from torch's
    default generator, so ``torch.manual_seed`` makes runs reproducible."""
    if isinstance(seed, bool) or (seed is not None and not isinstance(seed, (int, torch.Generator))):
        raise ValueError(f"seed must be None, an int or a torch.Generator, got {type(seed).__name__}")
    if isinstance(seed, int):
        if not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        return seed
    device = seed.device if isinstance(seed, torch.Generator) else None  # a CUDA generator too
    return int(torch.randint(0, 2 ** 62, (1,), generator=seed, device=device).item())


@contextlib.contextmanager
def bn_frozen(model: torch.nn.Module):
    """Forward passes inside the block do not update BatchNorm running statistics.

    Use it around the perturbed (second) pass of a SAM-type step, so the statistics are those of
    the clean weights only: in train mode the layers still normalise with batch statistics, they
    just stop tracking (``track_running_stats`` is switched off and back on; nothing is copied).
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m in layers:
            m.track_running_stats = True


LR_MAX_KEY = "rho_schedule_lr_max"  # where rho_proportional_to_lr keeps each group's lr_max


def rho_proportional_to_lr(rho_max: float, rho_min: float = 0.0, lr_max: float = None,
                           lr_min: float = 0.0) -> Callable[[dict], float]:
    """GSAM's schedule: rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min).

    Returns a ``rho_schedule`` for any samkernels optimizer that takes one.  ``lr_max`` defaults
    to each group's learning rate when the schedule is first used (its ``initial_lr`` if an LR
    scheduler set one), remembered in the group under ``"rho_schedule_lr_max"``: the group dict
    is saved by ``state_dict()``, so a resumed run keeps the same lr_max.  Without that memory
    rho would follow the current lr onto itself and never decay."""
    if not rho_max >= rho_min >= 0:
        raise ValueError(f"need rho_max >= rho_min >= 0, got rho_max={rho_max}, rho_min={rho_min}")

    def schedule(group: dict) -> float:
        top = lr_max
        if top is None:
            top = group.setdefault(LR_MAX_KEY, float(group.get("initial_lr", group["lr"])))
        if top <= lr_min:
            return rho_max
        frac = min(max((float(group["lr"]) - lr_min) / (top - lr_min), 0.0), 1.0)
        return rho_min + (rho_max - rho_min) * frac
    return schedule


@torch.no_grad()
def posterior_predictive(optimizer, model: torch.nn.Module, inputs, samples: int = 32,
                         generator=None) -> torch.Tensor:
    """Softmax of ``model(inputs)`` averaged over ``samples`` draws from ``optimizer``'s posterior
    (its ``sampled_params`` context: BSAM, MFVI, VariationalSAM).  The model is put in eval mode
    for the call and returned to its previous mode; the mean weights come back exactly."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    gen = generator if isinstance(generator, torch.Generator) else torch.Generator().manual_seed(
        draw_seed(generator))
    was_training = model.training
    model.eval()
    try:
        total = None
        for _ in range(samples):
            with optimizer.sampled_params(gen):
                probs = torch.softmax(model(inputs).float(), dim=-1)
            total = probs if total is None else total + probs
        return total / samples
    finally:
        model.train(was_training)


class PosteriorSampler:
    """``sampled_params`` and ``predictive`` for an optimizer with a Gaussian posterior (BSAM,
    MFVI, VariationalSAM).  Subclasses write one draw of a group into its parameters with
    ``_sample_group(group, ps, seed)``, which returns the backups holding the mean weights."""

    @contextlib.contextmanager
    def sampled_params(self, generator: SeedLike = None):
        """Load one model theta ~ q into the parameters; on exit the mean weights are copied back
        exactly.  ``generator``: int seed, torch.Generator or None."""
        self._require_unperturbed("sampled_params")
        seed = self._shared_seed(generator)  # sharded parameters: one seed on every rank
        try:
            with torch.no_grad():
                for group, ps in self._grouped(with_grad=False):
                    self._mark_perturbed(ps, self._sample_group(group, ps, seed))
            yield self
        finally:
            self.restore()

    def predictive(self, model: torch.nn.Module, inputs, samples: int = 32,
                   generator: SeedLike = None) -> torch.Tensor:
        """Softmax of ``model(inputs)`` averaged over ``samples`` posterior draws (the bSAM paper
        uses 32); see ``samkernels.optim.utils.posterior_predictive``."""
        return posterior_predictive(self, model, inputs, samples, generator)
