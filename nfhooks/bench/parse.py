"""Reading what the tools report: iperf3 JSON, /proc/PID/stat|status, the kernel's queue
statistics, Prometheus histograms and py-spy's collapsed stacks.

Pure functions (no lab, no processes), so they are unit-tested on recorded output.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BREAKDOWN", "IperfResult", "breakdown", "bucket_quantile", "cpu_ticks", "histogram_buckets",
           "parse_iperf", "queue_handled", "summarize_collapsed", "vm_hwm_kib"]


@dataclass
class IperfResult:
    """What the receiving side of one iperf3 test saw (and, for UDP, what was sent)."""

    protocol: str  # "udp" or "tcp"
    seconds: float
    packets: int | None  # UDP: datagrams received (total - lost); TCP: None
    lost: int | None  # UDP: datagrams lost on the way (sequence gaps)
    bits_per_second: float  # payload bits received per second
    sent: int | None = None  # UDP: datagrams the client sent

    @property
    def pps(self) -> float | None:
        if self.packets is None or not self.seconds:
            return None
        return self.packets / self.seconds

    @property
    def tx_pps(self) -> float | None:
        if self.sent is None or not self.seconds:
            return None
        return self.sent / self.seconds

    @property
    def gbps(self) -> float:
        return self.bits_per_second / 1e9

    @property
    def lost_fraction(self) -> float | None:
        if self.packets is None or self.lost is None:
            return None
        total = self.packets + self.lost
        return self.lost / total if total else 0.0


def parse_iperf(doc: Mapping[str, Any]) -> IperfResult:
    """The receiver's numbers from an iperf3 client's ``-J --get-server-output`` document.

    The receiver's figures are ``end.sum_received`` of the client's document (iperf3 >= 3.1
    copies them from the server; a ``server_output_json``, present when the server itself
    ran with ``-J``, is used the same way if the client has no ``sum_received``). For UDP,
    ``packets`` there is the highest sequence number the server saw and ``lost_packets`` the
    gaps below it, so received = packets - lost. Not ``end.sum``: for UDP that is the
    sender's count, which includes datagrams still queued or dropped after the last one
    the server saw. Raises ValueError on an iperf3 error report.
    """
    if doc.get("error"):
        raise ValueError(f"iperf3: {doc['error']}")
    start = doc.get("start") or {}
    end = doc.get("end") or {}
    proto = str((start.get("test_start") or {}).get("protocol", "")).lower()
    rx = end.get("sum_received")
    server = doc.get("server_output_json")
    if not rx and isinstance(server, Mapping):
        if server.get("error"):
            raise ValueError(f"iperf3 server: {server['error']}")
        send = server.get("end") or {}
        rx = send.get("sum_received") or send.get("sum")
    if not rx:
        raise ValueError("iperf3 document has no receiver summary (end.sum_received)")
    if not proto:
        proto = "udp" if "lost_packets" in rx else "tcp"
    seconds = float(rx.get("seconds", 0.0))
    bps = float(rx.get("bits_per_second", 0.0))
    if proto == "udp":
        total, lost = int(rx.get("packets", 0)), int(rx.get("lost_packets", 0))
        sent_sum = end.get("sum_sent") or {}
        sent = int(sent_sum["packets"]) if "packets" in sent_sum else None
        return IperfResult("udp", seconds, max(total - lost, 0), lost, bps, sent)
    return IperfResult("tcp", seconds, None, None, bps)


def cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks, all threads) from the text of /proc/PID/stat."""
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def vm_hwm_kib(status: str) -> int | None:
    """Peak resident set size (VmHWM, KiB) from the text of /proc/PID/status."""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def queue_handled(before: Iterable[Any], after: Iterable[Any], queues: Iterable[int] | None = None
                  ) -> dict[str, int]:
    """Packets handed to userspace and dropped, between two reads of the kernel's queue stats.

    ``before``/``after`` are :class:`nfhooks.metrics.QueueStat` lists. Handed over =
    id_sequence delta (a packet gets an id once it passed the queue-full check) minus
    user_dropped delta (the netlink socket could not take it). Queues bound only in ``after``
    count from 0; ``queues`` restricts to those numbers.
    """
    want = set(queues) if queues is not None else None
    b = {s.queue_number: s for s in before}
    out = {"handled": 0, "queue_dropped": 0, "user_dropped": 0}
    for s in after:
        if want is not None and s.queue_number not in want:
            continue
        p = b.get(s.queue_number)
        d_id = s.id_sequence - (p.id_sequence if p else 0)
        d_user = s.user_dropped - (p.user_dropped if p else 0)
        d_queue = s.queue_dropped - (p.queue_dropped if p else 0)
        out["handled"] += max(d_id - d_user, 0)
        out["queue_dropped"] += max(d_queue, 0)
        out["user_dropped"] += max(d_user, 0)
    return out


def histogram_buckets(metrics_text: str, name: str, **labels: str) -> dict[float, float]:
    """Cumulative bucket counts {le: count} of one histogram series in Prometheus text."""
    out: dict[float, float] = {}
    for line in metrics_text.splitlines():
        if not line.startswith(name + "_bucket{"):
            continue
        lab, _, value = line.rpartition("} ")
        have = dict(re.findall(r'(\w+)="([^"]*)"', lab))
        if all(have.get(k) == v for k, v in labels.items()) and "le" in have:
            out[float(have["le"])] = out.get(float(have["le"]), 0.0) + float(value)
    return out


def bucket_quantile(before: Mapping[float, float], after: Mapping[float, float], q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` of the observations between two reads
    of a cumulative histogram (the resolution is the buckets': an upper bound, not a value)."""
    les = sorted(after)
    if not les:
        return None
    total = after[les[-1]] - before.get(les[-1], 0.0)
    if total <= 0:
        return None
    for le in les:
        if after[le] - before.get(le, 0.0) >= q * total:
            return le
    return les[-1]


def summarize_collapsed(text: str, top: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Self and inclusive shares of samples per frame, from py-spy's raw (collapsed) output.

    Each line is ``frame;frame;...;leaf COUNT``. "self" is the share of samples whose leaf
    is the frame, "total" the share of samples with the frame anywhere on the stack
    (counted once per sample, so recursion does not inflate it).
    """
    self_n: dict[str, int] = defaultdict(int)
    total_n: dict[str, int] = defaultdict(int)
    samples = 0
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        samples += n
        self_n[frames[-1]] += n
        for f in set(frames):
            total_n[f] += n
    if not samples:
        return {"self": [], "total": [], "samples": 0}  # type: ignore[dict-item]

    def rank(d: Mapping[str, int]) -> list[tuple[str, float]]:
        return [(f, 100.0 * n / samples) for f, n in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"self": rank(self_n), "total": rank(total_n), "samples": samples}  # type: ignore[dict-item]


#: Where a sample of the engine's packet loop spent its time, first match wins (substrings
#: of py-spy frames; the C frames -- sendmsg, recv -- need ``--native``).
BREAKDOWN: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("metrics: verdict counters", ("VerdictCounter.count",)),
    ("metrics: latency histogram", ("Histogram.observe",)),
    ("parse (packet.py)", ("parse (nfhooks/packet.py",)),
    ("handler (policies/bench.py)", (" (bench.py:",)),  # py-spy names a file outside a package bare
    ("verdict: nfq_set_verdict/sendmsg (kernel re-injects the packet)", ("sendmsg", "nfq_set_verdict")),
    ("on_packet/apply: the rest", ("on_packet (nfhooks/engine.py",)),
    ("receive: recv (kernel hands over packets)", ("recv (",)),
    ("wait: epoll_wait", ("epoll_wait", "EpollSelector.select")),
    ("NetfilterQueue loop (Cython)", ("",)),
)


def breakdown(text: str) -> dict[str, Any]:
    """Share of the engine's packet-loop samples per :data:`BREAKDOWN` category.

    Samples outside the loop (``QueueSet.run`` not on the stack: the metrics HTTP thread,
    startup) are counted apart and left out of the shares.
    """
    cats: dict[str, int] = {name: 0 for name, _ in BREAKDOWN}
    loop = other = 0
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        if "QueueSet.run" not in stack:
            other += n
            continue
        loop += n
        for name, needles in BREAKDOWN:
            if any(x in stack for x in needles):
                cats[name] += n
                break
    shares = {k: (100.0 * v / loop if loop else 0.0) for k, v in cats.items()}
    return {"loop_samples": loop, "other_samples": other, "percent": shares}
