"""Dtype rules shared by the executable specification (:mod:`samkernels.ops.reference`), the
optimizers (their state tensors) and the tests.  Imports nothing from the rest of the package."""
from __future__ import annotations

import torch
from torch import Tensor


def opmath(t: Tensor) -> torch.dtype:
    """The dtype a parameter's maths runs in, and its optimizer state's dtype: float64 for float64
    parameters, float32 for float32 / float16 / bfloat16 ones (which are upcast)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
