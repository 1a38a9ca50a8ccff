"""Start, reload and stop as undo-on-error transactions, shared by the engine and ``--workers``.

:class:`Undo` is the transaction: every step first registers how to undo it (an undo must be
safe when its step failed half way or never ran), and ``unwind()`` runs them newest first --
all of them, even if one raises (the first error is raised at the end). A hot reload is one
(engine.Engine.reload: a refused new generation is taken down again, the old one kept).

:class:`Lifecycle` is one engine's hold on its network namespace, the same for one process
(engine.py) and for the main process of ``--workers`` (workers.py):

* ``begin()``: the kernel can do it (``Backend.check_kernel``), the namespace's lock
  (owner.py); then, inside the transaction, ``remove_stale()``: rules a kill -9 left under
  this backend or the other;
* the caller's steps, each registered with ``on_stop``; ``install(rs)`` the rules, last;
* ``end(failed)``: what must happen while the rules are still in place (``before_rules``: the
  workers answer what their queues hold), then exactly our rules removed -- unless an error
  ended the serving (``failed``), which leaves them as a kill -9 would, so a fail-closed hook
  stays closed --, then the other undos newest first (``with_rules`` ones, e.g. a feature's
  routes and qdiscs the left rules still mark packets for, stay with the rules), and the lock
  released. A start that fails calls ``end()`` too: everything it did is undone.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping

__all__ = ["Lifecycle", "Undo", "retire_due"]

log = logging.getLogger("nfhooks.engine")


class Undo:
    """Undo steps, run newest first by ``unwind``; see the module docstring."""

    def __init__(self) -> None:
        self._steps: list[tuple[Callable[[], Any], bool]] = []

    def push(self, undo: Callable[[], Any], *, with_rules: bool = False) -> None:
        """Register ``undo`` (before its step runs). ``with_rules``: skipped by
        ``unwind(keep_with_rules=True)`` (what rules left in place still need)."""
        self._steps.append((undo, with_rules))

    def unwind(self, keep_with_rules: bool = False) -> None:
        first: BaseException | None = None
        while self._steps:
            undo, with_rules = self._steps.pop()
            if keep_with_rules and with_rules:
                continue
            try:
                undo()
            except BaseException as e:  # noqa: BLE001 -- the rest must still be undone
                log.error("undoing a step: %s", e)
                first = first or e
        if first is not None:
            raise first


def retire_due(queues: Iterable[int], waiting: Mapping[int, int], now: float, since: float, empty_since: float,
               force: bool, grace: float, timeout: float) -> tuple[bool, float]:
    """A hot reload's old generation (retired at ``since``): whether it goes now, and when its
    ``queues`` were first seen empty (0.0: not empty now). It goes once they stayed empty for
    ``grace`` seconds (a packet the old chains stamped may still be on its way to them), after
    ``timeout`` anyway, or when ``force``d. ``waiting``: queue -> packets waiting (kstats)."""
    empty = all(waiting.get(n, 0) == 0 for n in queues)
    if empty and not empty_since:
        empty_since = now
    elif not empty:
        empty_since = 0.0
    return force or now - since > timeout or bool(empty_since and now - empty_since >= grace), empty_since


class Lifecycle:
    """One engine's hold on its namespace: begin, install, end (see the module docstring)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend  # a backends.Backend
        self.owner: Any = None  # an owner.Ownership once begin() took the namespace
        self.installed = False  # our rules are in the kernel (set by install, cleared by remove)
        self.left_installed = False  # end() left them as a kill -9 would (after an error)
        self._before = Undo()  # while the rules are still in place
        self._after = Undo()  # once they are removed (or left)

    def begin(self) -> None:
        """Check the kernel and take the namespace (OwnedElsewhere if another engine holds
        it: then nothing of this one's is undone, and nothing of the other's touched)."""
        from .owner import Ownership

        self.backend.check_kernel()
        self.owner = Ownership.acquire()

    def remove_stale(self) -> None:
        """The first step once the namespace is ours: a stale set (every backend's) goes."""
        from .backends import other_backends_with_ours

        for b in [self.backend, *other_backends_with_ours(self.backend)]:
            if b.has_ours():
                log.warning("removing a stale nfhooks rule set (backend %s) left by an engine that is gone: %s",
                            b.name, "; ".join(b.remove()))

    @property
    def owned(self) -> bool:
        return self.owner is not None

    def on_stop(self, undo: Callable[[], Any], *, before_rules: bool = False, with_rules: bool = False) -> None:
        """Register what ``end()`` undoes: ``before_rules`` while our rules are still in place
        (answer what is queued), else after they are removed; ``with_rules``: not done when
        the rules are left in place."""
        (self._before if before_rules else self._after).push(undo, with_rules=with_rules)

    def install(self, rs: Any) -> None:
        """Install ``rs`` (a partial install is removed by ``end()`` too: removal is by tag)."""
        self.backend.install(rs)
        self.installed = True

    def remove(self) -> list[str]:
        """Remove exactly our rules (every generation), logged."""
        removed = self.backend.remove()
        if removed:
            log.info("removed: %s", "; ".join(removed))
        self.installed = False
        return removed

    def end(self, failed: BaseException | None = None, leaving: str = "") -> bool:
        """Undo what was done, in order (module docstring); returns whether the rules were left
        in place. ``failed``: the error that ended the serving, if any (None: a signal, or a
        failed start); ``leaving``: what the log says then."""
        try:
            self._before.unwind()
        finally:
            if failed is not None and self.installed:
                log.error("%s", leaving or f"stopped on an error ({failed}); leaving the rules in place")
                self.installed = False
                self.left_installed = True
            try:
                if not self.left_installed and (self.installed or self.owner is not None):
                    self.remove()
            finally:
                try:
                    self._after.unwind(keep_with_rules=self.left_installed)
                finally:
                    if self.owner is not None:
                        self.owner.release()
                        self.owner = None
        return self.left_installed
