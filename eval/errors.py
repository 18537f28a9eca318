"""The eval package's one error type: a bad index directory, checkpoint pairing or query, as one line."""

from ldot.errors import LdotError


class EvalError(LdotError, ValueError):
    """A problem the user can fix, naming the file and what is wrong; the CLI prints it without a traceback."""
