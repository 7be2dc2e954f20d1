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


class Interrupted(MegastreamError):
    """SIGINT/SIGTERM: the run stopped after a step and saved a resumable checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as shells report them


class ResourceError(MegastreamError):
    """The run does not fit this machine's RAM or GPU memory (found by the plan, or by the GPU), or a
    save does not fit the free disk space."""


class TrainingError(MegastreamError):
    """Training itself went wrong in a way the user must look at (e.g. losses that stay non-finite)."""
