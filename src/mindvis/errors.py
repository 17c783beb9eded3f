"""Error types for mindvis.

Every expected failure (bad input file, wrong field, impossible option, refused checkpoint) raises a
subclass of :class:`MindVisError`. The command line turns these into one line on stderr and exit code 2;
anything else is a bug and is reported with a pointer to a log file holding the traceback.
"""

from __future__ import annotations

from os import PathLike


class MindVisError(Exception):
    """An expected, user-facing error with a one-line message.

    Args:
        message: what went wrong and what was expected.
        path: the file or folder concerned, if any; it is named at the start of the message.
        field: the key, column or option concerned, if any.
    """

    def __init__(self, message: str, *, path: str | PathLike | None = None, field: str | None = None):
        # control characters (a newline in a file name) would break the one-line message
        self.path = (
            None if path is None else "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(path))
        )
        self.field = field
        self.detail = message
        parts = []
        if self.path is not None:
            parts.append(f"{self.path}:")
        if field is not None:
            parts.append(f"[{field}]")
        parts.append(message)
        super().__init__(" ".join(parts))


class DataError(MindVisError):
    """A dataset file is missing, malformed, or inconsistent."""


class CheckpointError(MindVisError):
    """A checkpoint is missing, truncated, refused by the safe loader, or does not fit the model."""


class ConfigError(MindVisError):
    """An option or configuration value is invalid."""


class OutputExistsError(MindVisError):
    """An output path exists and overwriting was not asked for."""


class OutputOverlapError(MindVisError):
    """An output path equals, contains or lies inside one of the command's inputs."""


class OutputNotWritableError(MindVisError):
    """An output path cannot be created where it lies (permission denied, read-only file system)."""


class WeightsUnavailable(MindVisError):
    """Pretrained network weights needed by a metric or model are not present locally."""
