"""Reference trainer for the SAM-family optimizers (bSAM paper Table 1 metrics).

    from samkernels.train import TrainConfig, run
    results = run(TrainConfig(optimizers=["sgd", "sam", "bsam"], seeds=3, out="results"))

Command line: ``samkernels-train`` or ``python -m samkernels.train`` (see ``docs/trainer.md``).
"""
from samkernels.train.config import ConfigError, TrainConfig


def run(config=None, **kwargs):
    """Train and evaluate what ``config`` (a ``TrainConfig``) asks for; returns the results dict."""
    from samkernels.train.runner import run as _run  # keeps `import samkernels.train` light
    return _run(config, **kwargs)


__all__ = ["ConfigError", "TrainConfig", "run"]
