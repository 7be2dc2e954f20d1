"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""


class MegastreamError(Exception):
    """A problem the user can fix: the message says what, where, and how."""

    exit_code = 2


class ConfigError(MegastreamError):
    """The configuration (YAML file or --set override) is invalid."""


class DataError(MegastreamError):
    """The training data is missing or malformed."""


class CheckpointError(MegastreamError):
    """A model directory or checkpoint is missing, corrupt or incompatible."""
