"""Exceptions that end a command with a message and a chosen exit status, never a traceback."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class RunStopped(RuntimeError):
    """A run stopped on purpose (a signal, a non-finite loss, a full disk): `str(error)` says why and how to go on;
    the command exits with `exit_status`."""

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status


@contextmanager
def os_errors_named(path: Path | str) -> Iterator[None]:
    """Within: a failed write through safetensors, which reports an OS error as its own exception without the
    path (`... I/O error: No space left on device (os error 28)`), is raised as the `OSError` it stands for,
    naming `path`, so the CLI prints the path and the fix instead of a traceback."""
    try:
        yield
    except Exception as error:
        match = re.search(r"\(os error (\d+)\)", str(error)) if type(error).__name__ == "SafetensorError" else None
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(path)) from error
