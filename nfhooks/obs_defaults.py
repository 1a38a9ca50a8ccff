"""The hooks' default-rule decisions, counted (issue 17.1).

A packet no handler queues is decided by its hook's default rule (``nfhooks default``, at the
end of each NFH-<HOOK> chain) in the kernel: the engine never sees it. For a firewall with an
INPUT default of drop those are most of the drops, and they were in no metric. They are read at
scrape time from the default rules' kernel counters (as offload.py reads its rules') and
exported in the same families as the handlers' decisions -- ``nfhooks_packets_total``,
``nfhooks_bytes_total``, ``nfhooks_handler_packets_total`` -- with ``handler="(default)"`` and
``via="default_rule"``. A queued packet is never counted by the default rule (the queue rule
decided it before), so ``sum(nfhooks_packets_total{hook="INPUT",verdict="drop"})`` is every
drop at INPUT, counted once.

Counters stay monotonic across a reload: the old generation's chains go with their counters,
which are carried (per hook, table and verdict), like obs_series does for queues.

Under ``--workers`` the main process has the backend and reads them; :class:`Merged` puts its
samples into the families the workers' sums (WorkerMetrics) already export, since a family may
appear only once in an exposition.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.metrics_core import Metric

from .hooks import HOOKS
from .metrics import PacketCollector
from .saved import counted_rules

__all__ = ["DefaultRuleCounts", "DefaultRuleCollector", "Merged", "default_rule_counts"]

_CHAIN = re.compile(rf"^NFH-({'|'.join(HOOKS)})(?:-\d+)?$")
_TARGET = re.compile(r" -j (\w+)")
_TAG = '--comment "nfhooks default"'
_VERDICTS = {"DROP": "drop", "REJECT": "reject", "ACCEPT": "accept"}

Count = tuple[str, str, str, int, int]  # hook, table, verdict, packets, bytes


def default_rule_counts(texts: Iterable[str], would: Callable[[str], str] | None = None
                        ) -> dict[tuple[int, str, str, str, str], tuple[int, int]]:
    """{(family, table, chain, hook, verdict): (packets, bytes)} of the default rules in
    ``iptables-save -c`` texts. ``would(hook)``: the verdict of an ACCEPT default rule that
    stands in for another (``run --audit``); None: accept is accept."""
    out: dict[tuple[int, str, str, str, str], tuple[int, int]] = {}
    for text in texts:
        # which family: the save tool's header line (a family whose save failed is left out)
        for r in counted_rules(text, 6 if "ip6tables" in text[:300] else 4):
            m = _CHAIN.match(r.chain) if _TAG in r.text else None
            t = _TARGET.search(r.text) if m else None
            if m is None or t is None or t.group(1) not in _VERDICTS:
                continue
            hook = m.group(1)
            verdict = _VERDICTS[t.group(1)]
            if verdict == "accept" and would is not None:
                verdict = would(hook)
            key = (r.family, r.table, r.chain, hook, verdict)
            pk, by = out.get(key, (0, 0))
            out[key] = (pk + r.packets, by + r.bytes)
    return out


class DefaultRuleCounts:
    """``() -> [(hook, table, verdict, packets, bytes)]`` for PacketCollector.kernel_defaults:
    the default rules' counters from ``saved()`` (the backend's counter_texts: both families),
    read at most once a second, carried over a reload."""

    def __init__(self, saved: Callable[[], list[str]], would: Callable[[str], str] | None = None,
                 max_age: float = 1.0) -> None:
        self.saved = saved
        self.would = would
        self.max_age = max_age
        self._lock = threading.Lock()
        self._cache: tuple[float, list[Count]] = (-1e9, [])
        self._last: dict[tuple[int, str, str, str, str], tuple[int, int]] = {}
        self._carried: dict[tuple[str, str, str], list[int]] = {}

    def __call__(self) -> list[Count]:
        with self._lock:  # scrapes may overlap (a threaded HTTP server)
            t, cached = self._cache
            if time.monotonic() - t < self.max_age:
                return cached
            now = default_rule_counts(self.saved(), self.would)
            for key, (pk, by) in self._last.items():  # a chain gone (retired) or re-created at 0
                if now.get(key, (-1, -1))[0] < pk:
                    c = self._carried.setdefault(key[1:2] + key[3:], [0, 0])  # (table, hook, verdict)
                    c[0] += pk
                    c[1] += by
            self._last = now
            sums: dict[tuple[str, str, str], list[int]] = {k: list(v) for k, v in self._carried.items()}
            for (_, table, _, hook, verdict), (pk, by) in now.items():
                s = sums.setdefault((table, hook, verdict), [0, 0])
                s[0] += pk
                s[1] += by
            out = [(hook, table, verdict, pk, by) for (table, hook, verdict), (pk, by) in sorted(sums.items())]
            self._cache = (time.monotonic(), out)
            return out


class DefaultRuleCollector:
    """The default-rule samples alone, in the packet families (``--workers``' main process)."""

    def __init__(self, counts: Callable[[], list[Count]]) -> None:
        self.stats = PacketCollector()
        self.stats.kernel_defaults = counts

    def collect(self) -> Iterator[Metric]:
        for fam in self.stats.collect():
            if fam.name != "nfhooks_decision_seconds":
                yield fam


class Merged:
    """Several collectors as one: families of the same name become one family (the first's
    help and type), as the exposition format needs."""

    def __init__(self, *collectors: Any) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        fams: dict[str, Metric] = {}
        for c in self.collectors:
            for fam in c.collect():
                have = fams.get(fam.name)
                if have is None:
                    fams[fam.name] = fam
                else:
                    have.samples.extend(fam.samples)
        yield from fams.values()

