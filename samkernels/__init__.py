"""samkernels: fused multi-tensor kernels for sharpness-aware and Bayesian training."""
from samkernels._dispatch import set_backend, tune_backend, use_backend
from samkernels import ops
from samkernels import optim
from samkernels.optim import ASAM, BSAM, SAM
from samkernels.ops.bisam_loss import BiSAMLoss, bisam_loss

__version__ = "0.1.0"
__all__ = ["ops", "optim", "SAM", "ASAM", "BSAM", "bisam_loss", "BiSAMLoss", "set_backend", "use_backend", "tune_backend", "__version__"]
