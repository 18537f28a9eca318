"""The one error type of the kernels package: bad shapes, dtypes, devices or options."""


class KernelError(ValueError):
    """Raised for invalid inputs to the contrastive loss (never for numerical trouble)."""
