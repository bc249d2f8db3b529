"""The one exception the loader raises."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ModelLoadError"]


class ModelLoadError(Exception):
    """A model could not be found, fetched or read.

    The message is one line that names the offending file (or model id) and says what is
    wrong, so a command-line front end can print it without a traceback.
    """

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        # Messages are shown to users as a single line: fold any embedded newlines.
        message = " ".join(str(message).split())
        super().__init__(message)
        self.path: Path | None = Path(path) if path is not None else None
