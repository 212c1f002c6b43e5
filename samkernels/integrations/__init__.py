"""Recipes for the training frameworks users already have: PyTorch Lightning
(:mod:`samkernels.integrations.lightning`), the Hugging Face ``Trainer``
(:mod:`samkernels.integrations.transformers`) and Accelerate
(:mod:`samkernels.integrations.accelerate`).

Each framework assumes one forward and one backward per optimizer step; a SAM-type optimizer needs
two (or a noisy one).  The modules here make the second pass explicit and keep the framework's
mixed precision, gradient accumulation, schedulers and checkpoints working.  The core package
depends on torch and numpy only: each module imports its framework when it is imported, and fails
with a message that names the extra to install (``pip install "samkernels[lightning]"``, ...).
"""
from __future__ import annotations

import importlib


def require(module: str, extra: str):
    """Import ``module`` or raise an ImportError that names the samkernels extra providing it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"samkernels.integrations needs {module!r}: pip install "
                          f"\"samkernels[{extra}]\" (or pip install {module})") from exc
