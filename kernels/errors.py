"""The one error type of the kernels package: bad shapes, dtypes, devices or options."""

from ldot.errors import LdotError


class KernelError(LdotError, ValueError):
    """Raised for invalid inputs to the contrastive loss (never for numerical trouble)."""
