"""The Hugging Face ``Trainer`` with samkernels optimizers: :class:`SAMTrainer`.

The stock ``Trainer`` runs one forward and one backward per micro-batch and calls
``optimizer.step()`` after the last micro-batch of a step, when the micro-batches a second pass
needs are gone.  ``SAMTrainer.training_step`` keeps the micro-batches of the step instead; at the
last one it runs the passes of the optimizer over all of them (so with
``gradient_accumulation_steps = k`` the ascent uses the gradient summed over the k micro-batches and
the second pass recomputes all k at the perturbed weights: SAM on the whole accumulated batch):

* SAM, ASAM, VariationalSAM: pass at w, ``first_step``, pass at w + e;
* BSAM: ``noise_step``, the noisy pass, ``first_step``, the pass at omega + eps;
* RandomSAM, MFVI: ``noise_step``, the one pass at the noisy weights.

The Trainer then clips the gradient of the last pass (``max_grad_norm``), logs its norm, and its
``optimizer.step()`` is routed to the optimizer's ``second_step`` (which puts the mean weights back
and updates them), followed by the LR scheduler's step: one per optimizer step.  Checkpoints are
taken after that, never while perturbed; the optimizer's ``state_dict`` (momentum, Adam moments,
bSAM precisions, the noise seed and counter) rides in the Trainer's ``optimizer.pt``, so
``train(resume_from_checkpoint=...)`` continues exactly.

The logged ``loss`` is the first-pass loss (at w, or at the noisy weights for BSAM/RandomSAM/MFVI),
summed over the micro-batches as the Trainer does.  ``bf16=True`` works (autocast of the Trainer's
accelerator); ``fp16=True`` is refused (the Trainer's GradScaler path calls ``scaler.step(opt)``).
BiSAM and E-BiSAM are refused (their ascent loss, and E-BiSAM's selection, need the logits and
targets of each pass, which depend on the model's head: use their closures in your own loop).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from samkernels.integrations import require

transformers = require("transformers", "transformers")

from samkernels import optim as _optim  # noqa: E402
from samkernels.optim._base import TwoPassOptimizer  # noqa: E402

__all__ = ["SAMTrainer", "OPTIMIZERS"]

#: names accepted by ``SAMTrainer(sam_optimizer=...)`` (case and ``_``/``-`` insensitive)
OPTIMIZERS = {
    "sam": _optim.SAM, "asam": _optim.ASAM, "bsam": _optim.BSAM, "randomsam": _optim.RandomSAM,
    "mfvi": _optim.MFVI, "variationalsam": _optim.VariationalSAM, "vsam": _optim.VariationalSAM,
}


def _optimizer_class(name: str):
    key = str(name).lower().replace("_", "").replace("-", "")
    if key not in OPTIMIZERS:
        raise ValueError(f"sam_optimizer={name!r} is not one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[key]


class SAMTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose optimizer step is a samkernels step over the whole
    accumulated batch.

    Give the optimizer either as ``optimizers=(opt, scheduler)`` (``scheduler`` may be ``None``:
    the Trainer then builds its own from ``TrainingArguments``), or by name:
    ``SAMTrainer(..., sam_optimizer="sam", sam_kwargs={"rho": 0.05, "momentum": 0.9})``; the
    optimizer then gets the model's trainable parameters, ``lr=args.learning_rate`` unless
    ``sam_kwargs`` sets it, and for BSAM/MFVI/VariationalSAM ``num_data=len(train_dataset)``
    unless set.
    ``args.weight_decay`` and ``args.optim`` are not used: put weight decay in ``sam_kwargs``.

    ``predictive_samples=K`` (BSAM, MFVI, VariationalSAM: optimizers with ``sampled_params``):
    ``evaluate``/``predict`` return the logits of the posterior predictive, i.e. the log of the
    softmax averaged over K posterior samples (sample i drawn with seed ``predictive_seed + i``),
    and the loss of the mean weights.  ``0`` (default): the mean weights' logits.
    """

    def __init__(self, *args, sam_optimizer: Optional[str] = None,
                 sam_kwargs: Optional[Dict[str, Any]] = None, predictive_samples: int = 0,
                 predictive_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.fp16:
            raise ValueError("SAMTrainer does not support fp16=True (the Trainer's GradScaler "
                             "calls scaler.step(opt), which a two-pass optimizer cannot take): "
                             "use bf16=True")
        if sam_optimizer is None and self.optimizer is None:
            raise ValueError("SAMTrainer needs a samkernels optimizer: optimizers=(opt, sched) or "
                             "sam_optimizer='sam' (one of " + ", ".join(sorted(OPTIMIZERS)) + ")")
        if sam_optimizer is not None and self.optimizer is not None:
            raise ValueError("give the optimizer either in optimizers=(opt, sched) or as "
                             "sam_optimizer=, not both")
        self.sam_optimizer_cls = None if sam_optimizer is None else _optimizer_class(sam_optimizer)
        self.sam_kwargs = dict(sam_kwargs or {})
        if self.optimizer is not None:
            self._check_optimizer(self.optimizer)
        if isinstance(predictive_samples, bool) or not isinstance(predictive_samples, int) \
                or predictive_samples < 0:
            raise ValueError(f"predictive_samples must be an int >= 0, got {predictive_samples!r}")
        self.predictive_samples = predictive_samples
        self.predictive_seed = predictive_seed
        self._sam_batches = []  # the micro-batches of the optimizer step in progress

    # -- the optimizer ---------------------------------------------------------------------------
    @staticmethod
    def _check_optimizer(opt) -> None:
        if not isinstance(opt, TwoPassOptimizer):
            raise TypeError(f"SAMTrainer needs a samkernels optimizer, got {type(opt).__name__}")
        if isinstance(opt, _optim.BiSAM):  # EBiSAM too
            raise TypeError(f"SAMTrainer does not run {type(opt).__name__} (its ascent loss needs "
                            "the logits and targets of each pass): use its closure in a plain loop")

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.sam_optimizer_cls is not None:
            model = self.model if model is None else model
            kwargs = dict(self.sam_kwargs)
            kwargs.setdefault("lr", self.args.learning_rate)
            if self.sam_optimizer_cls in (_optim.BSAM, _optim.MFVI, _optim.VariationalSAM):
                kwargs.setdefault("num_data", len(self.train_dataset))
            params = [p for p in model.parameters() if p.requires_grad]
            self.optimizer = self.sam_optimizer_cls(params, **kwargs)
            self._check_optimizer(self.optimizer)
            return self.optimizer
        return super().create_optimizer(model)

    @property
    def sam_optimizer(self) -> TwoPassOptimizer:
        """The samkernels optimizer (under the accelerator's wrapper once training started)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _route_step(self) -> None:
        # The Trainer calls self.optimizer.step() (accelerate's wrapper) after clipping: that is
        # the optimizer's last phase.  Installed on the wrapper object, not on the user's optimizer.
        wrapper = self.optimizer
        if getattr(wrapper, "_samkernels_routed", None) is wrapper:
            return
        opt = self.sam_optimizer

        def final_phase(closure=None):
            if closure is not None:
                raise RuntimeError("SAMTrainer runs the passes itself; step() takes no closure")
            with opt._restore_on_error():  # mean weights back, step undone, if second_step raises
                opt.second_step()
            wrapper._opt_called = True  # what torch's LR-scheduler wrapper of step() records

        final_phase._wrapped_by_lr_sched = True  # a scheduler on the wrapper: no false warning
        wrapper.step = final_phase
        wrapper._samkernels_routed = wrapper

    # -- one optimizer step ----------------------------------------------------------------------
    def train(self, *args, **kwargs):
        self._sam_batches = []  # nothing left over from an interrupted call
        return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Keeps micro-batches until the last one of the step, then runs the optimizer's passes
        over all of them (``Trainer.training_step`` per micro-batch and pass: its loss scaling for
        accumulation and its backward).  Returns the summed first-pass loss at the last
        micro-batch of a step, 0 before it."""
        self._sam_batches.append((dict(inputs), num_items_in_batch))
        if len(self._sam_batches) < self.current_gradient_accumulation_steps:
            return torch.zeros((), device=self.args.device)
        batches, self._sam_batches = self._sam_batches, []
        opt = self.sam_optimizer
        self._check_optimizer(opt)
        self._route_step()

        def one_pass():
            total = None
            for micro_inputs, n_items in batches:  # a copy each pass: compute_loss may pop labels
                loss = super(SAMTrainer, self).training_step(model, dict(micro_inputs), n_items)
                total = loss if total is None else total + loss
            return total

        with opt._restore_on_error():
            if hasattr(opt, "noise_step"):  # BSAM, RandomSAM, MFVI
                opt.noise_step()
            loss = one_pass()
            if hasattr(opt, "first_step"):  # two-pass: perturb with the summed gradient
                opt.first_step(zero_grad=True)
                if not opt.skip_pending:  # a non-finite first pass skips the step
                    one_pass()
        return loss

    def _save_checkpoint(self, model, trial):
        if self.optimizer is not None and self.sam_optimizer.is_perturbed:
            raise RuntimeError("SAMTrainer: checkpoint requested while the weights are perturbed")
        return super()._save_checkpoint(model, trial)

    # -- posterior predictive at evaluation time --------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only,
                                                       ignore_keys=ignore_keys)
        if self.predictive_samples == 0 or prediction_loss_only or logits is None:
            return loss, logits, labels
        opt = self.sam_optimizer
        if not hasattr(opt, "sampled_params"):
            raise TypeError(f"predictive_samples needs a posterior (BSAM, MFVI, VariationalSAM), "
                            f"not {type(opt).__name__}")
        if not torch.is_tensor(logits):
            raise TypeError("predictive_samples needs the model to return one logits tensor")
        probs = None
        for i in range(self.predictive_samples):
            with opt.sampled_params(generator=self.predictive_seed + i):
                _, sample_logits, _ = super().prediction_step(model, inputs, False,
                                                              ignore_keys=ignore_keys)
            p = torch.softmax(sample_logits.float(), dim=-1)
            probs = p if probs is None else probs + p
        return loss, (probs / self.predictive_samples).log(), labels
