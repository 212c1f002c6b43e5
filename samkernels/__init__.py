"""samkernels: fused multi-tensor kernels for sharpness-aware and Bayesian training."""
from samkernels._dispatch import set_backend, use_backend
from samkernels import ops

__version__ = "0.1.0"
__all__ = ["ops", "set_backend", "use_backend", "__version__"]
