"""samkernels optimizers: thin shells that group tensors and call one fused op per phase."""
from samkernels.optim.sam import ASAM, SAM
from samkernels.optim.bsam import BSAM
from samkernels.optim.utils import bn_frozen, rho_proportional_to_lr

__all__ = ["SAM", "ASAM", "BSAM", "bn_frozen", "rho_proportional_to_lr"]
