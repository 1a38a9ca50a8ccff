"""Queue series that survive a reload, and no ``*_created`` series (issue 17.3).

A hot reload binds the next generation's queues under other numbers (generations 1 and 2
alternate between two ranges: both must be bound while the old one drains), so every series
labelled ``queue`` ended with the old generation and a new one began -- each reload renewed
them all. The engine's queue collectors (kstats.QueueStatsCollector, overload.OverloadCollector)
are therefore exported through :class:`StableQueues`: the ``queue`` label is dropped, series
are keyed by (hook, handler), which a reload keeps, and counters stay monotonic: what a queue
counted before it went away (retired, or rebound from 0) is carried, as supervise.CounterCarry
does for a restarted worker. ``nfhooks_queue_config_info`` keeps saying how each handler's
queue is bound, without the number.

Only the single engine does this: under ``--workers`` the queue label is what tells the
workers apart (workers.py), and there is no reload.

``_created``: a ``run`` process sets prometheus_client's switch once (cli.run); the samples a
collector adds itself with ``created=`` are dropped here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.metrics_core import Metric

__all__ = ["StableQueues", "StableRegistry"]

_Key = tuple[str, tuple[tuple[str, str], ...]]  # sample name, labels without queue


class StableQueues:
    """A collector's families without the ``queue`` label (summed; ``*_info`` gauges: max)
    and without ``_created`` samples, counters carried over a queue that went away."""

    def __init__(self, inner: Any, label: str = "queue") -> None:
        self.inner = inner
        self.label = label
        self.last: dict[tuple[_Key, str], float] = {}  # (key, queue) -> value at the last scrape
        self.carried: dict[_Key, float] = {}

    def describe(self) -> Iterable[Metric]:
        describe = getattr(self.inner, "describe", None)
        return describe() if describe is not None else []

    def collect(self) -> Iterator[Metric]:
        fams = list(self.inner.collect())
        now: dict[tuple[_Key, str], float] = {}
        for fam in fams:
            if fam.type == "counter":
                for s in fam.samples:
                    if not s.name.endswith("_created"):
                        now[(self._key(s), s.labels.get(self.label, ""))] = s.value
        for (key, queue), value in self.last.items():  # gone, or rebound and counting from 0
            if now.get((key, queue), -1.0) < value:
                self.carried[key] = self.carried.get(key, 0.0) + value
        self.last = now
        for fam in fams:
            m = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            sums: dict[_Key, float] = {}
            info = fam.type == "gauge" and fam.name.endswith("_info")
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                key = self._key(s)
                sums[key] = max(sums.get(key, 0.0), s.value) if info else sums.get(key, 0.0) + s.value
            if fam.type == "counter":
                for key in self.carried:  # a handler whose queue went: its count stays
                    if key[0] == fam.name + "_total":
                        sums[key] = sums.get(key, 0.0) + self.carried[key]
            for key, value in sums.items():
                m.add_sample(key[0], dict(key[1]), value)
            yield m

    def _key(self, s: Any) -> _Key:
        return (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != self.label)))


class StableRegistry:
    """What QueueSet.export registers on: the registry, each collector wrapped in StableQueues."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self.wrapped: dict[int, StableQueues] = {}

    def register(self, collector: Any) -> None:
        w = self.wrapped[id(collector)] = StableQueues(collector)
        self.registry.register(w)

    def unregister(self, collector: Any) -> None:
        w = self.wrapped.pop(id(collector), None)
        if w is not None:
            self.registry.unregister(w)
