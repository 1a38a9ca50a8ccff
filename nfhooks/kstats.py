"""The kernel's own view of each NFQUEUE, read from /proc at scrape time.

The kernel knows what userspace cannot count: packets still waiting for a verdict, packets
dropped before they reached us (queue full, socket overrun). Used by the metrics
(:class:`QueueStatsCollector`), the engine (a stop waits for its queues to drain, a reload
for the old generation's) and the bench.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["DEFAULT_PROC_PATH", "QueueStat", "QueueStatsCollector", "parse_queue_stats", "read_queue_stats"]

#: The kernel's per-queue statistics, for the network namespace of the reading process.
DEFAULT_PROC_PATH: Final = "/proc/net/netfilter/nfnetlink_queue"



@dataclass(frozen=True, slots=True)
class QueueStat:
    """One line of /proc/net/netfilter/nfnetlink_queue (one bound queue).

    ``peer_portid`` is the netlink port id of the socket bound to the queue; for the first
    netlink socket of a process it is the process id, which is how nfhooks tells the user
    which process already holds a queue number.
    """

    queue_number: int
    peer_portid: int
    queue_total: int  # packets waiting in the kernel for a verdict
    copy_mode: int  # 0 none, 1 meta, 2 packet
    copy_range: int  # bytes of payload copied to userspace
    queue_dropped: int  # dropped by the kernel: queue full (queue_maxlen reached)
    user_dropped: int  # dropped: netlink socket receive buffer overrun
    id_sequence: int  # last packet id handed out


_QUEUE_FIELDS: Final = 8


def parse_queue_stats(text: str) -> list[QueueStat]:
    """Parse the kernel's nfnetlink_queue stats file.

    Each line is ``queue_number peer_portid queue_total copy_mode copy_range queue_dropped
    user_dropped id_sequence 1`` (the trailing 1 is a historical constant). Lines that do
    not have at least eight integer columns are skipped rather than failing a scrape.
    """
    stats: list[QueueStat] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < _QUEUE_FIELDS:
            continue
        try:
            values = [int(f) for f in fields[:_QUEUE_FIELDS]]
        except ValueError:
            continue
        stats.append(QueueStat(*values))
    return stats


class QueueStatsCollector:
    """Reads the kernel's queue statistics at scrape time, for this engine's queues only.

    The kernel knows things userspace cannot count: packets still waiting for a verdict and
    packets dropped before they ever reached us (queue full, socket buffer overrun). Queues
    bound by other programs in the same namespace are skipped: their numbers mean nothing
    to this engine's operators.
    """

    def __init__(self, proc_path: str = DEFAULT_PROC_PATH) -> None:
        self.proc_path = proc_path
        # queue number -> (hook, handler). Replaced whole, never mutated, so a scrape on
        # the HTTP thread never sees a half-updated map.
        self._queues: Mapping[int, tuple[str, str]] = {}

    def set_queues(self, queues: Mapping[int, tuple[str, str]]) -> None:
        """Make ``queues`` (queue number -> (hook, handler label)) the engine's queues."""
        self._queues = dict(queues)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily]:
        labels = ["queue", "hook", "handler"]
        return (
            GaugeMetricFamily(
                "nfhooks_queue_waiting_packets",
                "Packets waiting in the kernel queue for a verdict from nfhooks.",
                labels=labels,
            ),
            CounterMetricFamily(
                "nfhooks_queue_kernel_dropped_packets_total",
                "Packets the kernel dropped because the queue was full (nfhooks too slow).",
                labels=labels,
            ),
            CounterMetricFamily(
                "nfhooks_queue_user_dropped_packets_total",
                "Packets the kernel dropped because the netlink socket buffer overran.",
                labels=labels,
            ),
        )

    def describe(self) -> Iterable[Metric]:
        """The names this collector produces, so the registry refuses duplicates."""
        return self._families()

    def collect(self) -> Iterator[Metric]:
        queues = self._queues
        if not queues:
            return
        try:
            with open(self.proc_path, encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError:
            # Module not loaded, no queue bound yet, or another namespace's /proc: no data
            # is the truth here, and a failing scrape would hide every other metric.
            return
        waiting, kernel_dropped, user_dropped = self._families()
        found = False
        for st in parse_queue_stats(text):
            owner = queues.get(st.queue_number)
            if owner is None:
                continue
            found = True
            labels = [str(st.queue_number), owner[0], owner[1]]
            waiting.add_metric(labels, st.queue_total)
            kernel_dropped.add_metric(labels, st.queue_dropped)
            user_dropped.add_metric(labels, st.user_dropped)
        if found:
            yield waiting
            yield kernel_dropped
            yield user_dropped


def read_queue_stats(proc_path: str = DEFAULT_PROC_PATH) -> dict[int, QueueStat]:
    """The statistics of every queue bound in this namespace, by queue number ({} when the
    file cannot be read: no queue bound, module not loaded)."""
    try:
        with open(proc_path, encoding="ascii", errors="replace") as f:
            return {st.queue_number: st for st in parse_queue_stats(f.read())}
    except OSError:
        return {}
