"""Random test inputs and comparisons shared by the op and optimizer tests."""
from __future__ import annotations

from typing import List, Sequence

import torch


def tol(dtype: torch.dtype):
    """(rtol, atol) for a fused result in ``dtype`` against the float64 reference."""
    return {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-6),
            torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}[dtype]


def make_params(shapes: Sequence[tuple], dtypes: Sequence[torch.dtype], gen: torch.Generator,
                noncontig: Sequence[bool] = ()) -> List[torch.Tensor]:
    """Fresh random tensors (never zeros); ``noncontig[i]`` gives a transposed (strided) view."""
    out = []
    for i, (shape, dt) in enumerate(zip(shapes, dtypes)):
        if i < len(noncontig) and noncontig[i] and len(shape) == 2:
            t = torch.randn(shape[::-1], generator=gen, dtype=torch.float64).to(dt).t()
            assert not t.is_contiguous()
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dt)
        out.append(t)
    return out


def positive_like(ts, gen, lo=0.5, hi=3.0, state_dtype=True):
    """Positive random state (precisions) in each tensor's opmath dtype."""
    out = []
    for t in ts:
        dt = torch.float64 if t.dtype == torch.float64 else torch.float32
        out.append((torch.rand(t.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dt))
    return out


def state_like(ts, gen):
    out = []
    for t in ts:
        dt = torch.float64 if t.dtype == torch.float64 else torch.float32
        out.append(torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dt))
    return out


def f64(ts):
    return [t.detach().double().clone() for t in ts]


def assert_close_list(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], what: str):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        rtol, atol = tol(g.dtype)
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}[{i}] ({g.dtype}, {tuple(g.shape)}): {m}")


def mlp(dtype=torch.float64, seed=0):
    """The small MLP the optimizer tests train (6 -> 17 -> 3)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3)).to(dtype)


def data(dtype=torch.float64, n=32, seed=1):
    """n random inputs for ``mlp`` (drawn in float64, then cast) and labels in 0..2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64).to(dtype), torch.randint(0, 3, (n,), generator=g)
