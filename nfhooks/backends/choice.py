"""A command's choice of backend (``--backend``), and what the commands print about it.

The choice is exported as ``NFHOOKS_BACKEND`` in the command's own environment: the processes
it starts (``--workers``, the lab's and the bench's engines and ``nfhooks`` commands) and the
helpers that take no backend argument use the same backend, detected once.
"""

from __future__ import annotations

import os
from typing import Callable

from . import BACKENDS, ENV, other_backends_with_ours, resolve
from .base import Backend

__all__ = ["choose", "remove_everywhere"]


def choose(name: str | None = None, fail: Callable[[str], None] | None = None) -> tuple[Backend, str]:
    """The backend ``name`` (None: $NFHOOKS_BACKEND, else auto) and why; exported (see above).
    An unknown name goes to ``fail`` (the CLI's one-line error), else raises ValueError."""
    try:
        chosen, why = resolve(name)
    except ValueError as e:
        if fail is None:
            raise
        fail(str(e))
        raise
    os.environ[ENV] = chosen
    return BACKENDS[chosen](), why


def remove_everywhere(backend: Backend) -> list[str]:
    """Remove ours from ``backend`` and from any other backend that holds some (a stale set a
    kill -9 left there); one line per table, the other backend's prefixed with its name."""
    removed = backend.remove()
    for other in other_backends_with_ours(backend):
        removed += [f"{other.name}: {line}" for line in other.remove()]
    return removed
