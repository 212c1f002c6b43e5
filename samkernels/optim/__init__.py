"""samkernels optimizers: thin shells that group tensors and call one fused op per phase."""
from samkernels.optim.sam import ASAM, SAM
from samkernels.optim.bsam import BSAM

__all__ = ["SAM", "ASAM", "BSAM"]
