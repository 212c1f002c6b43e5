"""samkernels optimizers: thin shells that group tensors and call one fused op per phase."""
from samkernels.optim.sam import ASAM, SAM
from samkernels.optim.sam_variants import GSAM, WSAM, FriendlySAM, LookSAM
from samkernels.optim.bsam import BSAM
from samkernels.optim.random_sam import RandomSAM
from samkernels.optim.mfvi import MFVI
from samkernels.optim.vsam import VSAM, VariationalSAM
from samkernels.optim.bisam import BiSAM, E_BiSAM, EBiSAM
from samkernels.optim.ivon import IVON
from samkernels.optim._base import NonFiniteGradientError
from samkernels.optim.utils import bn_frozen, rho_proportional_to_lr

__all__ = ["SAM", "ASAM", "GSAM", "WSAM", "LookSAM", "FriendlySAM", "BSAM", "RandomSAM", "MFVI", "VariationalSAM", "VSAM", "BiSAM", "EBiSAM",
           "E_BiSAM", "IVON", "NonFiniteGradientError", "bn_frozen", "rho_proportional_to_lr"]
