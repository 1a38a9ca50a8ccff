"""What the lab observes, so a scenario's result is measured, not guessed: the engine's own
metrics scraped inside the router namespace (:class:`Snapshot`, :class:`Scraper`), the
kernel's counters (``nstat``) and the packets the hooks' default rules decided in the kernel.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from .config import SCRAPE_INTERVAL
from .topology import Lab
from ..backends.tools import SAVE_TOOLS

__all__ = ["EMPTY", "KERNEL_DEFAULT", "Key", "Scraper", "Snapshot", "default_rule_counts", "default_verdicts",
           "kernel_counters", "kernel_drops"]

#: Kernel counters (``nstat``) that explain a dropped packet.
_KERNEL_DROP_RE = re.compile(r"Err|Csum|Trunc|Discard|Drop|Invalid|Bad")

Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Snapshot:
    """One scrape of the engine's /metrics: (sample name, sorted labels) -> value."""

    samples: Mapping[Key, float]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        out: dict[Key, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
        return cls(out)

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(dict(k[1]), v) for k, v in self.samples.items() if k[0] == name]

    def minus(self, earlier: Snapshot, name: str) -> list[tuple[dict[str, str], float]]:
        """Series of `name` that grew since `earlier`, with their increase."""
        return [(labels, v - earlier.samples.get((name, tuple(sorted(labels.items()))), 0.0))
                for labels, v in self.series(name)
                if v - earlier.samples.get((name, tuple(sorted(labels.items()))), 0.0) > 0]


EMPTY = Snapshot({})


class Scraper:
    """Scrapes the engine's metrics inside the router namespace (they listen on loopback
    there) and keeps the latest snapshot for the live table."""

    def __init__(self, lab: Lab, url: str) -> None:
        self.lab, self.url = lab, url
        self.latest = EMPTY
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scrape(self) -> Snapshot:
        cp = self.lab.exec("router", "curl", "-s", "-m", "2", self.url, check=False, timeout=5)
        if cp.returncode or not cp.stdout:
            raise RuntimeError(f"cannot scrape {self.url} in the router namespace: "
                               f"curl exited {cp.returncode} {cp.stderr.strip()}")
        snap = Snapshot.parse(cp.stdout)
        self.latest = snap
        return snap

    def start(self) -> None:
        """Background scraping for the live table (errors only leave the table stale)."""
        def loop() -> None:
            while not self._stop.wait(SCRAPE_INTERVAL):
                try:
                    self.scrape()
                except Exception:  # noqa: BLE001 -- the live view must never end the run
                    pass
        self._thread = threading.Thread(target=loop, name="lab-scraper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def kernel_counters(lab: Lab, node: str = "router") -> dict[str, int]:
    """The node's SNMP/netstat counters (``nstat -asz``: absolute, zeros too, no history)."""
    out = lab.exec(node, "nstat", "-asz", timeout=5).stdout
    counters: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            counters[parts[0]] = int(parts[1])
    return counters


_DEFAULT_RULE_RE = re.compile(r'^-A NFH-(\w+) .*--comment "nfhooks default"')


#: The handler label for a hook default carried out by the kernel rule (never queued).
KERNEL_DEFAULT = "(default rule)"


def default_rule_counts(lab: Lab, node: str = "router") -> dict[str, int]:
    """Packets per hook that no handler queued and the hook's default rule decided, in the
    kernel: the engine never sees those, so its metrics cannot count them."""
    from ..backends import resolve
    from ..saved import counted_rules

    tools = SAVE_TOOLS[resolve()[0]]  # the lab's engines' ($NFHOOKS_BACKEND: `nfhooks lab --backend`)
    counts: dict[str, int] = {}
    for fam in (4, 6):
        out = lab.exec(node, tools[fam], "-c", check=False, timeout=5).stdout
        for rule in counted_rules(out, fam):
            m = _DEFAULT_RULE_RE.match(rule.text)
            if m:
                counts[m.group(1)] = counts.get(m.group(1), 0) + rule.packets
    return counts


def default_verdicts(before: Mapping[str, int], after: Mapping[str, int],
                      defaults: Mapping[str, str]) -> list[tuple[dict[str, str], float]]:
    return [({"hook": h, "handler": KERNEL_DEFAULT, "verdict": defaults.get(h, "drop")}, float(n - before.get(h, 0)))
            for h, n in after.items() if n > before.get(h, 0)]


def kernel_drops(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items()
            if v != before.get(k, 0) and _KERNEL_DROP_RE.search(k)}
