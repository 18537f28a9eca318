"""The one base of every user-facing error, and the exit codes every command and Slurm script shares.

Each package raises its own subclass (DataError, ConfigError, ModelError, EvalError, KernelError,
TrackingError), so a message says where it comes from; a command catches LdotError once and prints it
as one line, exit EXIT_BAD_INPUT, without a traceback.
"""

EXIT_BAD_INPUT = 2  # bad config, data or launch: fix the input; the Slurm scripts never requeue it
EXIT_REQUEUE = 75   # EX_TEMPFAIL: preempted, a checkpoint was written; run again with --resume auto


class LdotError(Exception):
    """A problem the user can fix, naming the file or key and what is wrong."""
