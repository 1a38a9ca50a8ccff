"""Notice when the running engine's rules vanish, and put them back.

Something else can remove nfhooks' rules under a live engine: ``nfhooks flush --force``, an
``iptables -F`` or an ``iptables-restore`` without ``--noflush`` by another tool. The engine
would then serve empty queues in an unfiltered namespace that looks healthy. So the engine
compares what the kernel holds with the current generation's rule set, periodically (every
``interval`` seconds, from its own loop) and at every metrics scrape (the scrape thread only
reads and wakes the loop; the loop checks again and acts, so a check never races an
install or a reload).

What it does on a confirmed loss: it logs an error naming what is missing, counts it
(``nfhooks_rules_missing_total``), removes whatever is left of the current generation and
installs it again (``nfhooks_rules_restored_total``), NAT targets included. Why re-install
rather than exit: an engine that exits leaves its hooks as its rules are now -- gone, so a
fail-closed hook would stay open until someone notices; the engine is the namespace's owner
(it holds the lock), and ``nfhooks flush --force`` is documented for removing a crashed
engine's leftovers. To remove the rules of a live engine for good, stop the engine.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from .rulebuild import CHAIN_PREFIX, FAMILIES, RuleSet

__all__ = ["RuleWatch", "missing_rules", "ours_in_save", "reinstall"]

log = logging.getLogger("nfhooks.integrity")
DEFAULT_INTERVAL = 5.0  # seconds between the loop's own checks
_RULE = re.compile(r"^-A (\S+) .*?(?:-j|-g) (\S+)")


def ours_in_save(text: str) -> tuple[set[tuple[str, str]], dict[tuple[str, str], int], set[tuple[str, str, str]]]:
    """From ``iptables-save`` text: our chains ``{(table, chain)}``, the rule count of each of
    our chains ``{(table, chain): n}``, and the jumps into them ``{(table, builtin, target)}``."""
    chains: set[tuple[str, str]] = set()
    counts: dict[tuple[str, str], int] = {}
    jumps: set[tuple[str, str, str]] = set()
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":" + CHAIN_PREFIX):
            chains.add((table, line[1:].split(" ", 1)[0]))
        elif line.startswith("-A "):
            chain = line.split(" ", 2)[1]
            if chain.startswith(CHAIN_PREFIX):
                counts[(table, chain)] = counts.get((table, chain), 0) + 1
                continue
            m = _RULE.match(line)
            if m and m.group(2).startswith(CHAIN_PREFIX):
                jumps.add((table, chain, m.group(2)))
    return chains, counts, jumps


def missing_rules(rs: RuleSet, saved: Callable[[int], str]) -> list[str]:
    """What of ``rs`` the kernel no longer holds, one phrase per loss (empty: all there).

    ``saved(family)`` returns that family's iptables-save text. A chain with fewer rules than
    compiled counts as a loss; more is fine (NAT targets append rules as they are chosen)."""
    out: list[str] = []
    for fam in FAMILIES:
        keys = [k for k in rs.tables() if k[0] == fam]
        if not keys:
            continue
        chains, counts, jumps = ours_in_save(saved(fam))
        for key in keys:
            table = key[1]
            for chain in rs.chains.get(key, []):
                want = sum(1 for r in rs.rules.get(key, []) if r.chain == chain)
                if (table, chain) not in chains:
                    out.append(f"IPv{fam} {table} chain {chain}")
                elif counts.get((table, chain), 0) < want:
                    out.append(f"IPv{fam} {table} {chain}: {counts.get((table, chain), 0)} of {want} rules")
            for j in rs.jumps.get(key, []):
                if (table, j.chain, j.target) not in jumps:
                    out.append(f"IPv{fam} {table} jump {j.chain} -> {j.target}")
    return out


class RuleWatch:
    """The engine's check that its rules are still installed (see the module docstring).

    ``current()`` returns the generation's RuleSet to compare with; ``restore(missing)``
    re-installs it (the engine's job). ``saved`` reads iptables-save text per family.
    Metrics go on the injected ``registry``.
    """

    def __init__(self, current: Callable[[], RuleSet], restore: Callable[[list[str]], None],
                 saved: Callable[[int], str], registry: Any, wake_fd: Callable[[], int | None],
                 interval: float = DEFAULT_INTERVAL) -> None:
        from prometheus_client import Counter

        self.current = current
        self.restore = restore
        self.saved = saved
        self.wake_fd = wake_fd
        self.interval = interval
        self.next_check = time.monotonic() + interval
        self.suspect = False  # set by a scrape that saw a loss; the loop confirms
        self.enabled = True  # off while the engine itself changes rules (start, stop)
        self.missing_total = Counter("nfhooks_rules_missing", "Times the engine found some of its rules "
                                     "removed under it (e.g. nfhooks flush --force); each time it "
                                     "re-installs them.", registry=registry)
        self.restored_total = Counter("nfhooks_rules_restored", "Times the engine re-installed its "
                                      "rules after finding them removed.", registry=registry)
        self._nudge = _ScrapeNudge(self)
        registry.register(self._nudge)

    def due(self) -> bool:
        return self.enabled and (self.suspect or time.monotonic() >= self.next_check)

    def check(self) -> list[str]:
        """Compare and, on a loss, log, count and restore. Runs in the engine's loop only."""
        self.suspect = False
        self.next_check = time.monotonic() + self.interval
        if not self.enabled:
            return []
        try:
            lost = missing_rules(self.current(), self.saved)
        except Exception as e:  # noqa: BLE001 -- a failing check must not stop the engine
            log.warning("could not check that nfhooks' rules are installed: %s", e)
            return []
        if lost:
            self.missing_total.inc()
            log.error("nfhooks' rules were removed under the running engine (%s%s): the namespace "
                      "was unfiltered; re-installing them. To remove them for good, stop the engine",
                      "; ".join(lost[:6]), f"; and {len(lost) - 6} more" if len(lost) > 6 else "")
            try:
                self.restore(lost)
            except Exception as e:  # noqa: BLE001 -- keep serving; try again at the next check
                log.error("could not re-install nfhooks' rules: %s; trying again in %g s", e, self.interval)
                return lost
            self.restored_total.inc()
            log.warning("nfhooks' rules re-installed")
        return lost


class _ScrapeNudge:
    """A collector that yields nothing: at each scrape it compares (read-only, in the scrape
    thread) and, on a loss, marks the watch suspect and wakes the engine's loop."""

    def __init__(self, watch: RuleWatch) -> None:
        self.watch = watch

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        w = self.watch
        if w.enabled and not w.suspect:
            try:
                lost = missing_rules(w.current(), w.saved)
            except Exception:  # noqa: BLE001 -- never fail a scrape for this
                lost = []
            if lost:
                w.suspect = True
                fd = w.wake_fd()
                if fd is not None:
                    try:
                        os.write(fd, b"r")
                    except OSError:
                        pass
        return iter(())


def reinstall(backend: Any, rs: RuleSet, nat: Any = None) -> None:
    """Put ``rs`` back after its rules were removed under the engine: what is left of its
    generation goes, the whole generation is installed again with the chains installed beside
    it (``rs.side``: the uplink NAT of a routing policy), then every NAT target already
    chosen (``nat``: a nat.NatTargets, or None). The engine and the --workers main process
    pass this as RuleWatch's ``restore``."""
    backend.remove_generation(rs.generation)
    backend.install(rs)
    for side in rs.side:  # chains installed beside the generation (the uplink NAT: routing)
        backend.restore(side.family, side.restore_lines(), side.what)
    if nat is not None:
        nat.reinstall()
