"""A collector of per-queue counters kept on an object of each bound queue (queue.py's
``BoundQueue.guard``, ``BoundQueue.batch``): read at scrape time, one series per queue that has
the object, no family at all when none has (GSO guards, verdict batches)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["QueueCounters"]

LABELS = ("queue", "hook", "handler")


class QueueCounters:
    """Counter families ``(name, help, field)`` read from ``getattr(bound_queue, attr).field``."""

    def __init__(self, bound: Any, attr: str, families: Sequence[tuple[str, str, str]]) -> None:
        self.bound = bound  # replaced whole by the queue set, never mutated
        self.attr = attr
        self.families = tuple(families)

    def _families(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily  # noqa: PLC0415

        return [CounterMetricFamily(name, text, labels=list(LABELS)) for name, text, _ in self.families]

    def describe(self) -> Iterable[Any]:
        return iter(self._families())

    def collect(self) -> Iterable[Any]:
        fams = self._families()
        holders = [(n, b, getattr(b, self.attr, None)) for n, b in sorted(dict(self.bound).items())]
        holders = [(n, b, o) for n, b, o in holders if o is not None]
        for num, b, obj in holders:
            labels = [str(num), b.hook, b.handler or "(default)"]
            for fam, (_, _, field) in zip(fams, self.families):
                fam.add_metric(labels, getattr(obj, field))
        if holders:
            yield from fams
