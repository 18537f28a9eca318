"""The model library's one error type: a model directory or checkpoint that cannot be used, as one line."""

from ldot.errors import LdotError


class ModelError(LdotError, ValueError):
    """A text-encoder directory, export or checkpoint the user named is missing, or not what it should be."""
