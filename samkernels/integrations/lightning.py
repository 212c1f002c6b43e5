"""PyTorch Lightning: train a ``LightningModule`` with any samkernels optimizer.

Subclass :class:`SAMModule` instead of ``LightningModule`` and write ``training_loss(batch)`` (the
loss of one batch) and ``configure_optimizers`` (a samkernels optimizer, optionally with LR
schedulers, in any of Lightning's return forms).  ``SAMModule`` turns on manual optimization and
its ``training_step`` runs ``opt.step(closure)``: SAM/ASAM/BiSAM/VariationalSAM two passes, BSAM
the noisy pass then the perturbed one, RandomSAM/MFVI one noisy pass.  What it does for you:

* **precision** ``"32-true"``, ``"bf16-mixed"``: the closure runs inside ``training_step``, i.e.
  under Lightning's autocast, for every pass.  ``"16-mixed"``: the backward goes through
  ``manual_backward`` (Lightning's ``GradScaler`` scales the loss), the step is
  ``opt.step(closure, scaler=scaler)`` (samkernels unscales and checks each pass) and then
  ``scaler.update()``; Lightning's own ``scaler.step(opt)``, which would run the closure once and
  step without it, is never called.
* **gradient accumulation** ``SAMModule(accumulate_grad_batches=k)`` (``Trainer(accumulate_grad_
  batches=)`` is refused by Lightning under manual optimization): ``training_step`` keeps the k
  micro-batches and, on the k-th (or the epoch's last batch), takes ONE step of the optimizer on
  their mean loss: each pass runs ``backward(loss_i / k)`` over all k micro-batches, so the ascent
  direction is the gradient summed over the k micro-batches and the second pass recomputes the same
  k micro-batches at the perturbed weights; the step equals the optimizer on the concatenated batch
  (up to BatchNorm statistics).  ``trainer.global_step`` and ``max_steps`` count optimizer steps.
* **LR schedulers** returned by ``configure_optimizers`` (Lightning does not step them under manual
  optimization): ``interval="step"`` ones after every ``frequency``-th optimizer step,
  ``interval="epoch"`` ones after the epoch's last optimizer step (before validation and
  checkpoints, so a resumed run is exact), ``ReduceLROnPlateau`` in ``on_train_epoch_end`` with its
  ``monitor`` from ``trainer.callback_metrics`` (call ``super().on_train_epoch_end()`` if you
  override it).
* **checkpoints**: Lightning saves the optimizer's ``state_dict`` (base state, bSAM precision, the
  noise seed and counter) and the schedulers'; ``on_save_checkpoint`` refuses to save perturbed
  weights.  Resume with ``Trainer.fit(ckpt_path=...)`` from an epoch-end checkpoint (or one taken at
  an optimizer step with a resumable data loader).
* **posterior** :meth:`SAMModule.predictive` (BSAM, MFVI): softmax averaged over
  posterior samples, for ``validation_step``.

One optimizer per module.  ``Trainer(gradient_clip_val=)`` is refused by Lightning under manual
optimization.  **DDP** (``strategy="ddp"``/``"ddp_spawn"``/``"ddp_fork"``): every
``manual_backward`` all-reduces (Lightning prepares DDP's reducer for each backward under manual
optimization), so both passes use the global gradient: SAM on the global batch (with accumulation:
on all ranks' micro-batches).
Other multi-process strategies (FSDP, DeepSpeed) are refused with a NotImplementedError.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, List

import torch

from samkernels.integrations import require

_L = require("lightning.pytorch", "lightning")

__all__ = ["SAMModule"]


class SAMModule(_L.LightningModule):
    """A ``LightningModule`` whose training step is one step of a samkernels optimizer.

    Implement ``training_loss(self, batch)`` (or ``training_loss(self, batch, ascent)``: ``ascent``
    is True for the pass whose gradient builds the perturbation, as with a samkernels closure) and
    ``configure_optimizers``.  ``accumulate_grad_batches``: micro-batches per optimizer step (see
    the module docstring).  ``log_loss``: name under which the step's first-pass loss (mean over the
    micro-batches) is logged with ``self.log``, or None.
    """

    def __init__(self, *args: Any, accumulate_grad_batches: int = 1,
                 log_loss: str | None = "train_loss", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if (not isinstance(accumulate_grad_batches, int) or isinstance(accumulate_grad_batches, bool)
                or accumulate_grad_batches < 1):
            raise ValueError("accumulate_grad_batches must be an int >= 1, got "
                             f"{accumulate_grad_batches!r}")
        self.automatic_optimization = False
        self.accumulate_grad_batches = accumulate_grad_batches
        self.log_loss = log_loss
        self._sk_batches: List[Any] = []

    # -- what the user writes --------------------------------------------------------------------
    def training_loss(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement training_loss(self, batch)")

    # -- the step --------------------------------------------------------------------------------
    def _sk_optimizer(self):
        lopt = self.optimizers()
        if isinstance(lopt, list):
            raise ValueError("SAMModule: configure_optimizers must return one optimizer, got "
                             f"{len(lopt)}")
        return lopt, lopt.optimizer

    def training_step(self, batch: Any, batch_idx: int):
        trainer = self.trainer
        if trainer.world_size > 1 and not isinstance(trainer.strategy, _L.strategies.DDPStrategy):
            raise NotImplementedError(f"SAMModule: strategy {type(trainer.strategy).__name__} is "
                                      "not supported (FSDP shards parameters); use DDP or one device")
        self._sk_batches.append(batch)
        last = trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches
        if len(self._sk_batches) < self.accumulate_grad_batches and not last:
            return None
        batches, self._sk_batches = self._sk_batches, []
        lopt, opt = self._sk_optimizer()
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # "16-mixed" only
        pass_flag = "ascent" in inspect.signature(self.training_loss).parameters
        k = len(batches)

        def closure(ascent):
            opt.zero_grad()
            total = None
            for b in batches:
                loss = self.training_loss(b, ascent) if pass_flag else self.training_loss(b)
                self.manual_backward(loss / k if k > 1 else loss)
                total = loss.detach() if total is None else total + loss.detach()
            return total / k if k > 1 else total

        # LightningOptimizer.step would route through the precision plugin (its GradScaler.step
        # refuses closures); these hooks are its bookkeeping (global_step, profiler).
        lopt._on_before_step()
        loss = opt.step(closure, scaler=scaler)
        if scaler is not None:
            scaler.update()
        lopt._on_after_step()
        opt.zero_grad()
        self._sk_step_schedulers("step")
        if last:
            self._sk_step_schedulers("epoch")
        if self.log_loss is not None:
            self.log(self.log_loss, loss, prog_bar=True)
        return loss

    def _sk_step_schedulers(self, interval: str, plateau: bool = False) -> None:
        trainer = self.trainer
        count = trainer.global_step if interval == "step" else trainer.current_epoch + 1
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval or config.reduce_on_plateau != plateau:
                continue
            if count % config.frequency:
                continue
            metric = None
            if plateau:
                metric = trainer.callback_metrics.get(config.monitor)
                if metric is None:
                    if config.strict:
                        raise RuntimeError(f"ReduceLROnPlateau monitors {config.monitor!r}, which "
                                           f"was not logged; logged: {list(trainer.callback_metrics)}")
                    continue
            self.lr_scheduler_step(config.scheduler, metric)

    def on_train_epoch_end(self) -> None:
        self._sk_step_schedulers("epoch", plateau=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        for opt in self.trainer.optimizers:
            if getattr(opt, "is_perturbed", False):
                raise RuntimeError("SAMModule: a checkpoint was requested while the parameters are "
                                   "perturbed (w + e); save between optimizer steps")
        if self._sk_batches:
            warnings.warn(f"SAMModule: checkpoint taken with {len(self._sk_batches)} of "
                          f"{self.accumulate_grad_batches} micro-batches accumulated; a run resumed "
                          "from it starts a new accumulation window", stacklevel=2)

    # -- posterior -------------------------------------------------------------------------------
    @torch.no_grad()
    def predictive(self, inputs: Any, samples: int = 32, generator: Any = 0) -> torch.Tensor:
        """Softmax of ``self(inputs)`` averaged over ``samples`` draws from the optimizer's
        posterior (BSAM, MFVI), e.g. in ``validation_step``.  ``generator``: a
        seed or ``torch.Generator``; the default 0 gives the same draws at every validation and
        leaves torch's global RNG (dropout, shuffling) untouched.  The mean weights come back
        exactly."""
        _, opt = self._sk_optimizer()
        if not hasattr(opt, "predictive"):
            raise TypeError(f"{type(opt).__name__} has no posterior; predictive needs BSAM or MFVI")
        return opt.predictive(self, inputs, samples=samples, generator=generator)
