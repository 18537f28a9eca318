"""ldot kernels: the bidirectional contrastive (CMR) loss — fused Triton, chunked torch, float64 reference, cross-rank."""
from .contrastive import ContrastiveLoss, contrastive_loss
from .distributed import global_contrastive_loss
from .errors import KernelError
from .reference import contrastive_loss_reference, materialized_contrastive_loss

__all__ = [
    "ContrastiveLoss",
    "KernelError",
    "contrastive_loss",
    "contrastive_loss_reference",
    "global_contrastive_loss",
    "materialized_contrastive_loss",
]
