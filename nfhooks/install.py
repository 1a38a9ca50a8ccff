"""Compatibility facade over the rules backends (nfhooks/backends/): the functions nfhooks
always had, each delegating to the backend ``$NFHOOKS_BACKEND`` names (else auto-detected).

New code takes a Backend explicitly (``Engine(backend=...)``); this stays for callers and
users' scripts that import ``nfhooks.install``.
"""

from __future__ import annotations

from typing import Sequence

from .backends import get_backend
from .backends.base import generation_chains
from .errors import KernelError
from .rulebuild import Rule, RuleSet
from .saved import Counted

__all__ = ["KernelError", "Counted", "check_kernel", "install", "retire_stamps", "restore", "remove_generation",
           "append_rule", "remove_all", "saved_text", "installed", "generation_chains"]


def check_kernel() -> None:
    get_backend().check_kernel()


def install(rs: RuleSet) -> None:
    get_backend().install(rs)


def retire_stamps(rs: RuleSet) -> int:
    return get_backend().retire_stamps(rs)


def restore(family: int, lines: Sequence[str], what: str) -> None:
    get_backend().restore(family, lines, what)


def remove_generation(generation: int) -> list[str]:
    return get_backend().remove_generation(generation)


def append_rule(family: int, table: str, hook: str, rule: Rule, prelude: Sequence[Rule] = ()) -> None:
    get_backend().append_rule(family, table, hook, rule, prelude)


def remove_all(only: set[str] | None = None) -> list[str]:
    return get_backend().remove(only)


def saved_text(family: int, counters: bool = False) -> str:
    return get_backend().saved_text(family, counters)


def installed(counters: bool = False) -> tuple[str, list[Counted]]:
    return get_backend().installed(counters)
