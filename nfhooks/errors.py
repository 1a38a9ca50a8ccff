"""Errors every layer raises and every caller can import without pulling in a rules backend."""

from __future__ import annotations

__all__ = ["KernelError"]


class KernelError(RuntimeError):
    """The kernel or the machine cannot do what nfhooks needs; the text says what to do."""
