"""One error hierarchy. Every message names the file or value at fault and says what to do."""

from __future__ import annotations


class ClipworksError(Exception):
    """Base of every error clipworks raises on purpose; the CLI prints it as one line and exits 1."""

    exit_code = 1

    def __init__(self, message: str = "", *, setting: str | None = None) -> None:
        super().__init__(message)
        # The library argument at fault ("device", "model"): the CLI names its flag, other callers the argument.
        self.setting = setting


class ModelNotFound(ClipworksError):
    """A model name or path that resolves to nothing usable."""


class BadBundle(ClipworksError):
    """A model folder that exists but is incomplete or inconsistent."""


class BadImage(ClipworksError):
    """An input that cannot be decoded as an image."""


class BadPromptFile(ClipworksError):
    """A text-embedding JSON file with the wrong shape, keys or dimension."""


class ExportCheckFailed(ClipworksError):
    """An exported graph whose outputs do not match the source model closely enough."""


class DownloadError(ClipworksError):
    """A model file that could not be fetched."""


class UsageError(ClipworksError):
    """Arguments that cannot work together, or inputs that are missing."""

    exit_code = 2


def status(message: str) -> None:
    """Progress and status lines go to stderr, so stdout stays clean for data (JSON, tables, paths)."""
    import sys

    print(message, file=sys.stderr)
