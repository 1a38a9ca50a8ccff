"""What a scenario is and gets: :class:`Scenario` (traffic as data), :class:`Ctx` (the lab,
engine, scraper and ports a scenario function receives), :class:`Check` (one observation),
:class:`Result` (what a scenario did, measured around it by :func:`run_one`), and the
helpers scenario modules share (:func:`check_connect`, :func:`both_families`).

How to write and register one: :mod:`nfhooks.lab.registry`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import verdict
from ..hooks import HOOKS
from .config import DEFAULT_POLICY, LabConfig
from .evidence import Scraper, default_rule_counts, default_verdicts
from .topology import EngineProc, Lab, TcpServer

__all__ = ["Check", "Ctx", "Result", "Scenario", "both_families", "check_connect", "family_name", "run_one"]


@dataclass
class Check:
    """One observation of a scenario: what happened and whether it is what should."""

    text: str
    ok: bool


@dataclass
class Ctx:
    """What scenario functions get: the lab, its engine, servers and the policy's ports."""

    lab: Lab
    engine: EngineProc
    scraper: Scraper
    cfg: LabConfig
    ports: dict[str, int]
    servers: dict[str, TcpServer] = field(default_factory=dict)
    #: handlers that only see loopback (the lab's own scrapes): left out of the evidence
    skip: set[str] = field(default_factory=set)
    #: the policy's default verdict per hook (for the kernel's default-rule counters)
    defaults: dict[str, str] = field(default_factory=dict)
    #: extra rows a scenario wants shown in the summary (the malformed packets' table)
    rows: list[tuple[str, ...]] = field(default_factory=list)
    progress: Callable[[str], None] = lambda _text: None
    #: what each scenario's setup returned, by scenario key
    state: dict[str, Any] = field(default_factory=dict)
    #: extra tables of the current scenario: (title, columns, rows)
    tables: list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]] = field(default_factory=list)

    def add_table(self, title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
        """An extra table for the summary (and --json), e.g. the packets a scenario captured."""
        self.tables.append((title, tuple(columns), [tuple(map(str, r)) for r in rows]))


@dataclass(frozen=True)
class Scenario:
    """Traffic as data: write its function and `register` it (see the module docstring).

    `needs` names verdict factories of nfhooks.verdict the scenario depends on; while one is
    missing (or `run` is None) the scenario is listed as "not yet" instead of run.
    """

    key: str
    title: str
    description: str
    hooks: tuple[str, ...]
    run: Callable[[Ctx], list[Check]] | None
    needs: tuple[str, ...] = ()
    groups: tuple[str, ...] = ("standard",)
    setup: Callable[[Lab, Mapping[str, Any]], Any] | None = None
    options: Callable[[Lab], Mapping[str, str]] | None = None

    def missing(self) -> list[str]:
        return [n for n in self.needs if not hasattr(verdict, n)]

    @property
    def ready(self) -> bool:
        return self.run is not None and not self.missing()


def family_name(f: int) -> str:
    return f"IPv{f}"


def both_families(fn: Callable[[int], Check]) -> list[Check]:
    """Run a per-family check for IPv4 and IPv6 at once (timeouts overlap)."""
    with ThreadPoolExecutor(2) as ex:
        return list(ex.map(fn, (4, 6)))


def check_connect(c: Ctx, src: str, dst: str, port: int, family: int, want: str,
             timeout: float = 2.0, dst_addr: str | None = None) -> Check:
    addr = dst_addr or c.lab.addr(dst, family)
    got = c.lab.tcp_connect(src, addr, port, timeout=timeout)
    shown = f"[{addr}]" if ":" in addr else addr
    return Check(f"{family_name(family)} {src} → {dst} {shown}:{port}: {got}"
                 + ("" if got == want else f" (expected {want})"), got == want)


@dataclass
class Result:
    scenario: Scenario
    checks: list[Check]
    verdicts: list[tuple[dict[str, str], float]]
    seconds: float
    rows: list[tuple[str, ...]] = field(default_factory=list)
    error: str | None = None
    tables: list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]] = field(default_factory=list)
    #: the expected hooks are the lab policy's; another policy (--policy) may have no handler
    #: at some of them, so a hook no handler saw is then a note, not a failure
    strict_hooks: bool = True

    @property
    def crossed(self) -> list[str]:
        seen = {l["hook"] for l, _ in self.verdicts}
        return [h for h in HOOKS if h in seen]

    @property
    def missing_hooks(self) -> list[str]:
        return [h for h in self.scenario.hooks if h not in self.crossed]

    @property
    def ok(self) -> bool:
        return self.error is None and all(c.ok for c in self.checks) and not (
            self.strict_hooks and self.missing_hooks)


def run_one(ctx: Ctx, sc: Scenario, skip: set[str]) -> Result:
    assert sc.run is not None
    ctx.rows = []
    ctx.tables = []
    before, rules_before = ctx.scraper.scrape(), default_rule_counts(ctx.lab)
    t0 = time.monotonic()
    try:
        checks, error = sc.run(ctx), None
    except Exception as exc:  # noqa: BLE001 -- one broken scenario must not hide the others
        checks, error = [], f"{type(exc).__name__}: {exc}"
    seconds = time.monotonic() - t0
    after = ctx.scraper.scrape()
    verdicts = [(l, v) for l, v in after.minus(before, "nfhooks_handler_packets_total")
                if l["handler"] not in skip]
    verdicts += default_verdicts(rules_before, default_rule_counts(ctx.lab), ctx.defaults)
    strict = Path(ctx.cfg.policy).resolve() == DEFAULT_POLICY if ctx.cfg.policy else True
    return Result(sc, checks, verdicts, seconds, list(ctx.rows), error, list(ctx.tables), strict)
