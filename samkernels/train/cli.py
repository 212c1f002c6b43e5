"""Command line: ``samkernels-train`` / ``python -m samkernels.train``.

With no arguments: MNIST-1D, an MLP, SGD vs SAM-SGD vs SAM-Adam vs bSAM, printed as the bSAM paper's
Table 1 (about a minute on two CPU cores).  ``--list`` shows presets, optimizers, data sets, models.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from samkernels.train.config import ConfigError, TrainConfig, parse_assignment, parse_sweep
from samkernels.train.data import DATASETS, DataError
from samkernels.train.models import MODELS
from samkernels.train.optimizers import REGISTRY, OptimizerUnavailable, get_entry
from samkernels.train.presets import list_presets


def _int_list(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="samkernels-train",
        description="Reference trainer for SAM-family optimizers: accuracy, NLL, ECE, AUROC.",
        epilog="Hyper-parameters: --set key=value applies to every selected optimizer taking 'key'; "
               "--set bsam.rho=0.02 to one optimizer. Training keys (epochs, batch_size, m, ...) "
               "work too. See docs/trainer.md.")
    g = p.add_argument_group("what to train")
    g.add_argument("--preset", default="mnist1d", help="experiment preset (see --list)")
    g.add_argument("--optimizers", help="comma-separated registry names, e.g. sgd,sam,bsam")
    g.add_argument("--data", help=f"data set: {', '.join(DATASETS)}")
    g.add_argument("--data-dir", help="folder with torchvision-layout MNIST/FashionMNIST/CIFAR files")
    g.add_argument("--download", action="store_true", help="download into --data-dir (torchvision)")
    g.add_argument("--model", help=f"architecture: {', '.join(MODELS)}")
    g.add_argument("--hidden", type=_int_list, help="MLP hidden sizes, e.g. 500,300")
    g.add_argument("--train-subset", type=int, help="use the first N training examples")
    g.add_argument("--test-subset", type=int, help="use the first N test examples")
    g = p.add_argument_group("how to train")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--schedule", choices=["cosine", "step", "constant"])
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop (+ horizontal flip on CIFAR) for image data sets")
    g.add_argument("--aug-factor", type=float, help="N multiplier under augmentation (paper: 4)")
    g.add_argument("--sgd-double-epochs", action=argparse.BooleanOptionalAction, default=None,
                   help="one-gradient-per-step optimizers (SGD, Adam, ...) train twice the epochs")
    g.add_argument("--m", type=int, help="m-sharpness: independent perturbations per micro-batch")
    g.add_argument("--lr", type=float, help="learning rate of every optimizer")
    g.add_argument("--rho", type=float, help="rho of every optimizer that has one")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a hyper-parameter (repeatable)")
    g.add_argument("--sweep", metavar="KEY=V1,V2,...", help="one run set per value, e.g. rho=0.01,0.05")
    g = p.add_argument_group("repetitions and evaluation")
    g.add_argument("--seed", type=int, default=0, help="first seed")
    g.add_argument("--seeds", type=int, default=1, help="number of seeds (mean and std reported)")
    g.add_argument("--samples", type=int, default=32, help="posterior samples for Bayesian methods")
    g.add_argument("--eval-every", type=int, default=1,
                   help="epochs between validation evaluations (learning curves)")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training data held out (seeded, the same for every run) "
                        "for learning curves and sweep choices; the test set is used only for "
                        "the final report (0: no validation split)")
    g = p.add_argument_group("machinery")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, help="torch.set_num_threads")
    g.add_argument("--deterministic", action="store_true", help="torch deterministic algorithms")
    g.add_argument("--out", help="results folder: results.json, runs.csv, summary.csv, PNG plots")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--checkpoint", help="checkpoint file, saved every epoch ({run} = run name)")
    g.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    g.add_argument("--stop-after", type=int, help="stop each run after N epochs (resume later)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--quiet", action="store_true", help="print nothing but errors")
    g.add_argument("--list", action="store_true", help="list presets, optimizers, data, models")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Namespace -> TrainConfig; ValueError with a clear message on bad values."""
    optimizers = None
    if args.optimizers:
        optimizers = [name.strip() for name in args.optimizers.split(",") if name.strip()]
        if not optimizers:
            raise ConfigError("--optimizers is empty")
        for name in optimizers:
            get_entry(name)  # unknown names fail here, before any data is loaded
    overrides = dict(parse_assignment(text) for text in args.set)
    return TrainConfig(
        preset=args.preset, optimizers=optimizers, data=args.data, data_dir=args.data_dir,
        download=args.download, model=args.model, hidden=args.hidden,
        train_subset=args.train_subset, test_subset=args.test_subset, epochs=args.epochs,
        batch_size=args.batch_size, schedule=args.schedule, warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing, augment=args.augment, aug_factor=args.aug_factor,
        sgd_double_epochs=args.sgd_double_epochs, m=args.m, lr=args.lr, rho=args.rho,
        overrides=overrides, sweep=parse_sweep(args.sweep) if args.sweep else None,
        seed=args.seed, seeds=args.seeds, samples=args.samples, eval_every=args.eval_every,
        val_fraction=args.val_fraction,
        device=args.device, threads=args.threads, deterministic=args.deterministic, out=args.out,
        plots=not args.no_plots, checkpoint=args.checkpoint, resume=args.resume,
        stop_after=args.stop_after, progress=not args.no_progress, quiet=args.quiet)


def _listing() -> str:
    lines = ["presets:"] + ["  " + line for line in list_presets()]
    lines.append("optimizers:")
    for e in REGISTRY.values():
        try:
            cls, fixed = e.resolve()
            args = ", ".join(f"{k}={v!r}" for k, v in fixed.items())
            state = f"{e.module}.{cls.__name__}({args})"
            if e.ascent_loss:
                state += ", ascent pass on its ascent_loss"
            if e.selection:
                state += ", second pass on the selected examples (sds_fraction)"
        except (OptimizerUnavailable, ImportError):
            state = f"needs {e.module}.{e.classes[0]}: not in this samkernels version yet"
        lines.append(f"  {e.name:11s} {e.label:13s} {state}")
    lines.append("data sets: " + ", ".join(DATASETS))
    lines.append("models: " + ", ".join(MODELS))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(_listing())
        return 0
    from samkernels.train.runner import run  # heavy imports only when training
    try:
        cfg = config_from_args(args)
        run(cfg)
    except (ConfigError, DataError, OptimizerUnavailable) as err:
        parser.error(str(err))  # prints usage and the message, exits with status 2
    except KeyboardInterrupt:
        print("interrupted" + (" (resume with --resume)" if args.checkpoint else ""), file=sys.stderr)
        return 130
    return 0
