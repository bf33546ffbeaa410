"""Exceptions that end a command with a message and a chosen exit status, never a traceback."""

from __future__ import annotations


class RunStopped(RuntimeError):
    """A run stopped on purpose (a signal, a non-finite loss, a full disk): `str(error)` says why and how to go on;
    the command exits with `exit_status`."""

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status
