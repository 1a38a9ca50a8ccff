"""Errors every layer raises and every caller can import without pulling in a rules backend."""

from __future__ import annotations

__all__ = ["KernelError", "PolicyError"]


class KernelError(RuntimeError):
    """The kernel or the machine cannot do what nfhooks needs; the text says what to do."""


class PolicyError(Exception):
    """A policy that cannot be loaded; ``str()`` is the one paragraph a user reads.

    Here, below every module that validates a policy (policy.py re-exports it), so a
    feature's declarations can raise it without importing policy.py.
    """

    def __init__(self, message: str, file: str | None = None, line: int | None = None) -> None:
        self.file, self.line, self.message = file, line, message
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        super().__init__(where + message)
