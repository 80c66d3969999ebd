"""User-facing error types.

A user error raises one of these; its message says what went wrong, where (file, key, line)
and what is allowed. The CLI prints the message without a traceback and exits with status 2.
A bug raises a normal exception.
"""


class UserError(Exception):
    """Base class of every error caused by user input rather than by a bug."""


class SpecError(UserError):
    """An experiment spec (TOML file or --set override) is invalid."""


class LaunchError(UserError):
    """A sweep cannot be submitted or inspected as asked (executor, allocation, run directory)."""


class ShardError(UserError):
    """An HDF5 shard is missing, truncated, corrupt or of an unknown schema version."""


class ModelError(UserError):
    """A model cannot be loaded as specified (unknown id, not available offline, bad dtype)."""


class TaskError(UserError):
    """A task's problems cannot be loaded (unknown source, malformed problem file)."""
