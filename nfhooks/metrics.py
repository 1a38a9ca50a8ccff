"""Prometheus metrics for nfhooks: per-hook verdict counters, decision latency, and the
kernel's own view of each NFQUEUE (backlog and drops) read at scrape time.

Everything hangs off one injected :class:`~prometheus_client.CollectorRegistry`; there is
no module-level mutable state, so tests and several engines in one process never collide.

The hot path is one ``VerdictCounter.count(nbytes)`` and one ``FastHistogram.observe(s)``
per packet. Both are plain attribute arithmetic on objects bound once at start
(``bind_verdict``, ``decision_histogram``): no label lookup, no lock, no prometheus-client
call per packet. :class:`PacketCollector` turns them into the ``nfhooks_packets``,
``nfhooks_bytes``, ``nfhooks_handler_packets`` and ``nfhooks_decision_seconds`` families at
scrape time. Bound series exist at 0 from the first scrape -- ``rate()`` in dashboards and
alerts then returns data even for verdicts never given yet.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client import metrics as _prom_metrics
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from .exporter import DEFAULT_METRICS_ADDR, parse_listen_addr, serve_registry
from .kstats import DEFAULT_PROC_PATH, QueueStat, QueueStatsCollector, parse_queue_stats

__all__ = [
    "DECISION_BUCKETS",
    "DEFAULT_HANDLER_LABEL",
    "DEFAULT_METRICS_ADDR",
    "DEFAULT_PROC_PATH",
    "HANDLER_VIA",
    "FastHistogram",
    "Metrics",
    "PacketCollector",
    "QueueStat",
    "QueueStatsCollector",
    "VerdictCounter",
    "package_version",
    "parse_listen_addr",
    "parse_queue_stats",
]

#: The label value for a hook's default verdict (no handler matched): an empty label value
#: is the same as a missing label in PromQL, which would make such series hard to select.
DEFAULT_HANDLER_LABEL: Final = "(default)"

#: How a verdict came about when the handler itself gave it: such series carry no ``via``
#: label (so every query written before the label existed still selects them); every other
#: way -- the kernel's default rule, a handler error ... (docs/metrics.md) -- is a ``via`` value.
HANDLER_VIA: Final = "handler"

#: A verdict takes microseconds when the handler is cheap, milliseconds when it is not;
#: 0.01 is a bucket boundary so the 10 ms p99 alert is exact, not interpolated.
DECISION_BUCKETS: Final = (
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, float("inf"),
)


def package_version() -> str:
    """The installed nfhooks version, or "dev" when running from a bare source tree."""
    try:
        return metadata.version("nfhooks")
    except metadata.PackageNotFoundError:
        return "dev"


def _handler_label(handler: str) -> str:
    return handler or DEFAULT_HANDLER_LABEL


# --------------------------------------------------------------------------- hot path


class VerdictCounter:
    """What one (hook, table, handler, verdict) counted: packets and their bytes.

    ``count`` is called per packet, so it is two integer additions on slots: no lock, no
    prometheus-client call. :class:`PacketCollector` reads the two ints at scrape time.

    Thread safety: only the engine thread (the one running the queue loop) writes; the
    scrape thread only reads, and reading an int attribute is atomic under the GIL. ``+=``
    is not atomic, which is fine with a single writer. A scrape between the two additions
    sees ``packets`` already incremented and ``bytes`` not yet: that momentary one-packet
    skew between the two counters is accepted (both are monotonic, the next scrape is
    consistent again).
    """

    __slots__ = ("packets", "bytes")

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0

    def count(self, nbytes: int) -> None:
        """One packet of ``nbytes`` bytes got this verdict."""
        self.packets += 1
        self.bytes += nbytes


class FastHistogram:
    """A fixed-bucket histogram updated with plain arithmetic, exported at scrape time.

    ``counts[i]`` is the number of observations in bucket ``i`` alone (not cumulative);
    :meth:`cumulative` gives Prometheus' ``le`` buckets. ``bisect_left`` puts a value equal
    to a bound into that bound's bucket, which is Prometheus' ``le`` (less or equal)
    semantics. ``bounds`` must be sorted and end with +Inf.

    Same threading contract as :class:`VerdictCounter`: one writer (the engine thread),
    readers on the scrape thread see each int/float atomically, and a scrape may see a
    bucket count and the sum one observation apart.

    The dispatcher inlines :meth:`observe` (a call less per packet): ``counts`` is never
    replaced, only its items incremented, and ``bounds`` never changes.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = DECISION_BUCKETS) -> None:
        if list(bounds) != sorted(bounds) or not bounds or bounds[-1] != float("inf"):
            raise ValueError(f"histogram bounds must be sorted and end with +Inf: {bounds!r}")
        self.bounds = tuple(bounds)
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """One observation (seconds for the decision latency)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> tuple[list[tuple[str, int]], float]:
        """``([(le, cumulative count), ...], sum)``, the last bucket (+Inf) being the count."""
        counts, total = list(self.counts), self.sum  # a snapshot: the engine keeps writing
        buckets: list[tuple[str, int]] = []
        acc = 0
        for bound, n in zip(self.bounds, counts):
            acc += n
            buckets.append((floatToGoString(bound), acc))
        return buckets, total


_PACKETS_HELP: Final = "Packets decided, by hook, table and verdict."
_BYTES_HELP: Final = "Bytes of the packets decided, by hook, table and verdict."
_HANDLER_PACKETS_HELP: Final = (
    f"Packets decided per handler ({DEFAULT_HANDLER_LABEL} is the hook's default verdict)."
)
_DECISION_HELP: Final = "Time from reading a queued packet to its verdict: given, or held for the pass's batch verdict (vbatch.py)."


class PacketCollector:
    """Exports the per-packet counters and the decision histogram at scrape time.

    Produces the same families (names, types, labels, HELP) that prometheus-client
    ``Counter``/``Histogram`` objects produced before, ``_created`` samples included:

    * ``nfhooks_packets_total`` / ``nfhooks_bytes_total`` {hook, table, verdict}: the sum
      over handlers of the bound :class:`VerdictCounter` objects;
    * ``nfhooks_handler_packets_total`` {hook, handler, verdict}: the sum over tables (the
      default verdict's "(default)" handler can be bound at one hook from several tables);
    * ``nfhooks_decision_seconds`` {hook}: one :class:`FastHistogram` per hook.

    Every bound object is exported, at 0 until it moves. The maps are replaced whole on
    each (rare) bind, never mutated, so a scrape iterates a stable snapshot without a lock.
    """

    def __init__(self) -> None:
        # (hook, table, handler label, verdict, via) -> (counter, creation time, exported at 0)
        self._counters: Mapping[tuple[str, str, str, str, str], tuple[VerdictCounter, float, bool]] = {}
        # hook -> (histogram, creation time)
        self._histograms: Mapping[str, tuple[FastHistogram, float]] = {}
        #: packets no handler queued, decided by a hook's default rule in the kernel: a callable
        #: returning ``[(hook, table, verdict, packets, bytes)]`` (obs_defaults.DefaultRuleCounts),
        #: read at scrape time; None: nothing to add (no engine, tests)
        self.kernel_defaults: Callable[[], Iterable[tuple[str, str, str, int, int]]] | None = None

    def verdict_counter(self, hook: str, table: str, handler: str, verdict: str,
                        via: str = HANDLER_VIA, at_zero: bool = True) -> VerdictCounter:
        """The counter for these labels (``handler`` already a label), created on first use.

        ``at_zero`` False: its series appears with its first packet (a verdict the handler's
        source cannot return, a failure path): no series at 0 for what may never happen
        (issue 17.3), and the packet path is the same plain counter."""
        key = (hook, table, handler, verdict, via)
        entry = self._counters.get(key)
        if entry is None or (at_zero and not entry[2]):
            entry = (entry[0], entry[1], True) if entry else (VerdictCounter(), time.time(), at_zero)
            self._counters = {**self._counters, key: entry}
        return entry[0]

    def histogram(self, hook: str) -> FastHistogram:
        """The decision latency histogram of ``hook``, created on first use."""
        entry = self._histograms.get(hook)
        if entry is None:
            entry = (FastHistogram(DECISION_BUCKETS), time.time())
            self._histograms = {**self._histograms, hook: entry}
        return entry[0]

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, CounterMetricFamily, CounterMetricFamily,
                             HistogramMetricFamily]:
        return (
            CounterMetricFamily("nfhooks_packets", _PACKETS_HELP, labels=["hook", "table", "verdict"]),
            CounterMetricFamily("nfhooks_bytes", _BYTES_HELP, labels=["hook", "table", "verdict"]),
            CounterMetricFamily("nfhooks_handler_packets", _HANDLER_PACKETS_HELP,
                                labels=["hook", "handler", "verdict"]),
            HistogramMetricFamily("nfhooks_decision_seconds", _DECISION_HELP, labels=["hook"]),
        )

    def describe(self) -> Iterable[Metric]:
        """The names this collector produces, so the registry refuses duplicates."""
        return self._families()

    def collect(self) -> Iterator[Metric]:
        # Honour prometheus_client's switch (PROMETHEUS_DISABLE_CREATED_SERIES or
        # disable_created_metrics()) for _created samples, as its own Counter does.
        use_created = bool(getattr(_prom_metrics, "_use_created", True))
        packets, bytes_, handler_packets, decision = self._families()

        # Sum at scrape time; dicts keep bind order, so series come out in the order the
        # prometheus-client children were created before. [packets, bytes, created]
        by_table: dict[tuple[str, str, str, str], list[float]] = {}
        by_handler: dict[tuple[str, str, str, str], list[float]] = {}
        counted = [(k, ctr.packets, ctr.bytes, created) for k, (ctr, created, at_zero) in self._counters.items()
                   if at_zero or ctr.packets]
        if self.kernel_defaults is not None:
            counted += [((hook, table, DEFAULT_HANDLER_LABEL, verdict, "default_rule"), n, b, None)
                        for hook, table, verdict, n, b in self.kernel_defaults()]
        for (hook, table, handler, verdict, via), n, b, created in counted:
            t = by_table.get((hook, table, verdict, via))
            if t is None:
                by_table[(hook, table, verdict, via)] = [n, b, created]
            else:
                t[0] += n
                t[1] += b
            h = by_handler.get((hook, handler, verdict, via))
            if h is None:
                by_handler[(hook, handler, verdict, via)] = [n, 0, created]
            else:
                h[0] += n
        for labels, (n, b, created) in by_table.items():
            _add(packets, ("hook", "table", "verdict"), labels, n, created if use_created else None)
            _add(bytes_, ("hook", "table", "verdict"), labels, b, created if use_created else None)
        for labels, (n, _, created) in by_handler.items():
            _add(handler_packets, ("hook", "handler", "verdict"), labels, n, created if use_created else None)

        for hook, (hist, created) in self._histograms.items():
            buckets, total = hist.cumulative()
            decision.add_metric([hook], buckets, total)
            if use_created:
                decision.samples.append(
                    Sample("nfhooks_decision_seconds_created", {"hook": hook}, created, None))

        yield packets
        yield bytes_
        yield handler_packets
        yield decision


def _add(fam: CounterMetricFamily, names: tuple[str, ...], values: tuple[str, ...], value: float,
         created: float | None) -> None:
    """One counter sample; ``values`` ends with the via, a label only when not the handler's."""
    labels = dict(zip(names, values))
    if values[-1] != HANDLER_VIA:
        labels["via"] = values[-1]
    fam.add_sample(fam.name + "_total", labels, value)
    if created is not None:
        fam.add_sample(fam.name + "_created", labels, created)


class _PolicyInfo:
    """``nfhooks_policy_info``: name, version and, for a policy loaded from a file, ``hash`` (the
    first 12 hex of the sha256 of the source text the loader compiled): which nodes run what."""

    def __init__(self) -> None:
        self.labels: dict[str, str] = {}

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("nfhooks_policy_info", "The policy loaded now (always 1); hash: the "
                                 "sha256 of its source text, first 12 hex digits.")

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        fam = self._family()
        if self.labels:
            fam.add_sample("nfhooks_policy_info", dict(self.labels), 1)
        yield fam


# --------------------------------------------------------------------------- the metrics


class Metrics:
    """Every metric nfhooks exports, registered on one registry.

    With ``registry=None`` a fresh registry is made (never the process-global one, so two
    engines or a reload cannot register twice) and the standard process/platform/GC
    collectors are added to it, as an operator expects from any exporter.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        proc_path: str = DEFAULT_PROC_PATH,
    ) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        r = registry

        # The per-packet families (packets, bytes, handler packets, decision latency) are
        # plain ints and floats exported by a collector at scrape time: see PacketCollector.
        self.packet_stats = PacketCollector()
        r.register(self.packet_stats)
        self._handler_errors = Counter(
            "nfhooks_handler_errors",
            "Exceptions raised by handlers (the hook's fail-mode verdict was given instead).",
            ["hook", "handler"], registry=r,
        )
        self._overruns = Counter(
            "nfhooks_handler_overruns",
            "Handler calls past --handler-budget or interrupted at --handler-timeout "
            "(the hook's default verdict was given instead).",
            ["hook", "handler"], registry=r,
        )
        self._malformed = Counter(
            "nfhooks_malformed_packets",
            "Queued packets whose headers could not be parsed.",
            ["hook"], registry=r,
        )
        self._truncated = Counter(
            "nfhooks_truncated_packets",
            "Queued packets that reached userspace shorter than on the wire (copy range).",
            ["hook"], registry=r,
        )
        self._policy_info = _PolicyInfo()
        r.register(self._policy_info)
        self._reloads = Counter(
            "nfhooks_policy_reloads", "Policy reloads that succeeded.", registry=r,
        )
        self._reload_errors = Counter(
            "nfhooks_policy_reload_errors",
            "Policy reloads that failed (the previous policy stays in force).",
            registry=r,
        )
        self._nat_targets = Gauge(
            "nfhooks_nat_targets", "NAT targets the loaded policy installed.", registry=r,
        )
        self._build_info = Gauge(
            "nfhooks_build_info", "The nfhooks version running (always 1).",
            ["version"], registry=r,
        )
        self._build_info.labels(package_version()).set(1)
        # Scrape-time: the engine injects up_when (queues bound and rules installed, not stopping),
        # so a scrape during start-up or the drain of a stop sees 0 -- a value a scrape can see.
        self.up_when: Callable[[], bool] = lambda: True
        self._up = Gauge("nfhooks_up", "1 while the engine decides packets (queues bound, rules "
                         "installed); 0 while it starts or stops.", registry=r)
        self._up.set_function(lambda: 1.0 if self.up_when() else 0.0)

        self.queue_stats = QueueStatsCollector(proc_path)
        r.register(self.queue_stats)
        self._server: WSGIServer | None = None

    # -- per packet (bound once) ------------------------------------------------------

    def bind_verdict(self, hook: str, table: str, handler: str, verdict: str,
                     via: str = HANDLER_VIA) -> VerdictCounter:
        """The counter one (hook, table, handler, verdict, via) moves; its series exist at 0 now.

        The same labels give the same object. Call it once, outside the per-packet path.
        """
        return self.packet_stats.verdict_counter(hook, table, _handler_label(handler), verdict, via)

    def lazy_verdict(self, hook: str, table: str, handler: str, verdict: str,
                     via: str = HANDLER_VIA) -> VerdictCounter:
        """As :meth:`bind_verdict`, but the series appears with the first packet counted."""
        return self.packet_stats.verdict_counter(hook, table, _handler_label(handler), verdict, via, False)

    def decision_histogram(self, hook: str) -> FastHistogram:
        """The latency histogram for ``hook``; call ``.observe(seconds)``."""
        return self.packet_stats.histogram(hook)

    def handler_errors(self, hook: str, handler: str) -> Counter:
        """The error counter child for a handler at a hook; call ``.inc()``."""
        return self._handler_errors.labels(hook, _handler_label(handler))

    def handler_overruns(self, hook: str, handler: str) -> Counter:
        return self._overruns.labels(hook, _handler_label(handler))

    def malformed(self, hook: str) -> Counter:
        return self._malformed.labels(hook)

    def truncated(self, hook: str) -> Counter:
        return self._truncated.labels(hook)

    # -- policy -----------------------------------------------------------------------

    def set_policy(self, policy: str, version: str, handlers: list[tuple[int, str, str]],
                   source_hash: str = "") -> None:
        """Record the loaded policy and its queues.

        ``handlers`` is ``[(queue_num, hook, handler_name)]``: the queue stats are labelled
        with it, and the per-hook/per-handler error, malformed, truncated and latency series
        are created at 0 so that dashboards and alerts see them before anything happens.
        """
        self._policy_info.labels = {"policy": policy, "version": version,
                                    **({"hash": source_hash} if source_hash else {})}
        queues: dict[int, tuple[str, str]] = {}
        for queue_num, hook, handler in handlers:
            label = _handler_label(handler)
            queues[int(queue_num)] = (hook, label)
            self.handler_errors(hook, handler)
            self.handler_overruns(hook, handler)
            self.malformed(hook)
            self.truncated(hook)
            self.decision_histogram(hook)
        self.queue_stats.set_queues(queues)

    def reloaded(self) -> None:
        self._reloads.inc()

    def reload_failed(self) -> None:
        self._reload_errors.inc()

    def set_nat_targets(self, n: int) -> None:
        self._nat_targets.set(n)

    # -- exposition -------------------------------------------------------------------

    def serve(self, addr: str = DEFAULT_METRICS_ADDR, *, allow_public: bool = False) -> tuple[str, int]:
        """Serve /metrics on ``addr`` from a daemon thread; returns the bound (host, port).

        Port 0 picks a free port (the real one is returned). A host that is not loopback
        (including ``:PORT``, every interface) must be asked for with ``allow_public=True``:
        the metrics reveal the policy, and nfhooks is often what guards this very host.
        """
        if self._server is not None:
            raise RuntimeError("metrics are already being served")
        self._server, host, port = serve_registry(self.registry, addr, allow_public=allow_public)
        return host, port

    def close(self) -> None:
        """Stop serving and report the engine down (``nfhooks_up`` 0)."""
        self.up_when = lambda: False
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


