"""The train package's one error type: a bad config, checkpoint or launch, reported as one line."""

from ldot.errors import LdotError


class ConfigError(LdotError, ValueError):
    """A configuration, checkpoint or launch problem the user can fix; the CLI prints it without a traceback."""
