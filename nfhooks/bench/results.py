"""The measured results: one :class:`Row` per consumer and traffic, the ratios between rows
of the same run, and the latency probes' percentiles.

Pure (no lab), so the arithmetic is unit-tested; the report formats what is computed here.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .cases import NFHOOKS_CASES
from .parse import IperfResult

__all__ = ["Row", "added_latency", "latency_stats", "percentile", "ratio", "ratios", "round_ratios", "summarize",
           "throughput"]


@dataclass
class Row:
    """One consumer under one kind of traffic."""

    case: str
    proto: str
    seconds: float = 0.0
    rx_packets: int | None = None
    pps: float | None = None  # received per second
    tx_pps: float | None = None  # sent per second (UDP)
    gbps: float | None = None
    lost_pct: float | None = None
    handled: int | None = None  # packets the consumer decided
    queue_dropped: int | None = None
    user_dropped: int | None = None
    cpu_seconds: float | None = None
    cpu_core_pct: float | None = None  # share of one core while the test ran
    cpu_us_per_packet: float | None = None
    max_rss_mib: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: packets the consumer decided per second (the queue's ids handed over / the test's time):
    #: the throughput of a queue consumer; UDP's ``pps`` is what arrived, decided or not
    decided_pps: float | None = None
    bypassed: int | None = None  # UDP: arrived without being decided (a fail-open queue's bypass)
    #: consumer CPU per MB received: TCP's per-packet figure is per *decision*, and with GSO a
    #: decided packet is a super-packet of up to 64 KB, so per byte is the fair comparison
    cpu_us_per_mb: float | None = None
    round: int = 1  # which round of the run (1..rounds): ratios are formed within a round

    @classmethod
    def build(cls, case: str, res: IperfResult, *, wall: float | None = None, cpu: float | None = None,
              queue: Mapping[str, int] | None = None, rss_kib: int | None = None) -> Row:
        r = cls(case, res.protocol, seconds=res.seconds, rx_packets=res.packets, pps=res.pps,
                tx_pps=res.tx_pps, gbps=res.gbps)
        lf = res.lost_fraction
        r.lost_pct = None if lf is None else 100.0 * lf
        if queue is not None:
            r.handled = queue["handled"]
            r.queue_dropped = queue["queue_dropped"]
            r.user_dropped = queue["user_dropped"]
            r.decided_pps = r.handled / res.seconds if res.seconds else None
            if res.protocol == "udp" and res.packets is not None:
                r.bypassed = max(0, res.packets - r.handled)
        if cpu is not None:
            r.cpu_seconds = cpu
            # a retried iperf3 test (bench.run) stretches the wall time with idle seconds
            span = res.seconds if wall and res.seconds and wall > res.seconds + 2 else wall
            if span:
                r.cpu_core_pct = 100.0 * cpu / span
            n = r.handled or r.rx_packets
            if n:
                r.cpu_us_per_packet = 1e6 * cpu / n
            mb = (r.gbps or 0.0) * 1e9 / 8 * res.seconds / 1e6
            if mb:
                r.cpu_us_per_mb = 1e6 * cpu / mb
        if rss_kib is not None:
            r.max_rss_mib = rss_kib / 1024
        return r


#: nft over legacy: what the nf_tables path costs relative to legacy xtables, same policy.
BACKEND_PAIR = ("nfhooks nft", "nfhooks legacy")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def throughput(r: Row, delivered: bool = False) -> float | None:
    """What a row is compared by: TCP Gbit/s received; UDP packets decided per second for a
    queue consumer (fail-closed, so nothing arrives undecided), received ones for the kernel
    row, which decides nothing (``delivered``: received ones for every row, to compare with it)."""
    if r.proto == "tcp":
        return r.gbps
    return r.decided_pps if r.decided_pps is not None and not delivered else r.pps


def ratios(rows: Sequence[Row]) -> dict[str, float | None]:
    """Throughput and CPU ratios between consumers measured in the same round.

    Keys like ``udp_pps nfhooks/bare`` (:func:`throughput`: decided per second),
    ``tcp_gbps nfhooks/kernel`` and ``udp_cpu_per_packet nfhooks/bare``; a missing or zero
    measurement gives None.
    """
    by = {(r.case, r.proto): r for r in rows if r.error is None}
    out: dict[str, float | None] = {}
    pairs = (("nfhooks", "bare"), ("nfhooks", "kernel"), ("bare", "kernel"), ("scapy", "bare"),
             ("nfhooks fields", "nfhooks"), ("nfhooks", "scapy"), BACKEND_PAIR,
             *((c, b) for c in NFHOOKS_CASES[1:] for b in ("kernel", "bare")))
    for proto, metric in (("udp", "pps"), ("tcp", "gbps")):
        for a, b in pairs:
            ra, rb = by.get((a, proto)), by.get((b, proto))
            if ra is None or rb is None:
                continue
            k = "kernel" in (a, b)  # against the kernel: what was delivered, on both sides
            out[f"{proto}_{metric} {a}/{b}"] = ratio(throughput(ra, k), throughput(rb, k))
    for proto in ("udp", "tcp"):
        for a, b in (("nfhooks", "bare"), ("scapy", "bare"), ("nfhooks fields", "nfhooks"),
                     BACKEND_PAIR,
                     *((c, "bare") for c in NFHOOKS_CASES[1:])):
            ra, rb = by.get((a, proto)), by.get((b, proto))
            if ra is None or rb is None:
                continue
            out[f"{proto}_cpu_per_packet {a}/{b}"] = ratio(ra.cpu_us_per_packet, rb.cpu_us_per_packet)
            if proto == "tcp":
                out[f"tcp_cpu_per_mb {a}/{b}"] = ratio(ra.cpu_us_per_mb, rb.cpu_us_per_mb)
    return out


#: Row fields summarized over rounds (median, min, max).
_MEASURED = ("seconds", "rx_packets", "pps", "tx_pps", "gbps", "lost_pct", "handled", "queue_dropped",
             "user_dropped", "cpu_seconds", "cpu_core_pct", "cpu_us_per_packet", "max_rss_mib", "decided_pps",
             "bypassed", "cpu_us_per_mb")
_INTS = {f.name for f in fields(Row) if f.name in _MEASURED and "int" in str(f.type)}


def summarize(rows: Sequence[Row]) -> list[Row]:
    """One row per (case, proto), in first-seen order: each measured field the median over the
    rounds that succeeded, ``extra["range"][field] = [min, max]``, ``extra["rounds"]`` how
    many rounds it holds and ``extra["failed_rounds"]`` how many failed. A row that failed in
    every round is its first failure."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.case, r.proto), []).append(r)
    out = []
    for group in groups.values():
        ok = [r for r in group if r.error is None]
        if not ok:
            out.append(replace(group[0], extra={**group[0].extra, "rounds": 0, "failed_rounds": len(group)}))
            continue
        med = replace(ok[0], round=0, extra={**ok[0].extra, "rounds": len(ok), "failed_rounds": len(group) - len(ok),
                                             "range": {}})
        for name in _MEASURED:
            vals = [getattr(r, name) for r in ok if getattr(r, name) is not None]
            if not vals:
                continue
            m = statistics.median(vals)
            setattr(med, name, round(m) if name in _INTS else m)
            med.extra["range"][name] = [min(vals), max(vals)]
        out.append(med)
    return out


def round_ratios(rows: Sequence[Row]) -> tuple[dict[str, float | None], dict[str, list[float]]]:
    """Every ratio formed within each round (:func:`ratios`), then over the rounds: the
    medians and, per key, ``[min, max]`` -- never a ratio of medians from different rounds."""
    per: dict[str, list[float]] = {}
    keys: list[str] = []
    for rnd in sorted({r.round for r in rows}):
        for k, v in ratios([r for r in rows if r.round == rnd]).items():
            if k not in per:
                per[k] = []
                keys.append(k)
            if v is not None:
                per[k].append(v)
    med = {k: (statistics.median(per[k]) if per[k] else None) for k in keys}
    span = {k: [min(per[k]), max(per[k])] for k in keys if per[k]}
    return med, span


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """The ``pct`` percentile of already sorted values (nearest rank: an observed value)."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(pct / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def latency_stats(rtt_ns: Sequence[int], sent: int, rate: float, warmup: int = 50) -> dict[str, Any]:
    """p50/p90/p99/max round trip in microseconds from a probe run (the first ``warmup``
    replies -- ARP, the conntrack entry, a cold queue -- are left out)."""
    us = sorted(v / 1000.0 for v in rtt_ns[warmup:])
    return {"rate": rate, "sent": sent, "received": len(rtt_ns),
            "lost_pct": 100.0 * (sent - len(rtt_ns)) / sent if sent else None,
            **{f"p{p}_us": percentile(us, p) for p in (50, 90, 99)},
            "max_us": us[-1] if us else None}


def added_latency(lat: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per consumer: its p50/p99 minus the kernel's (what the queue and the consumer add)."""
    base = lat.get("kernel") or {}
    out: dict[str, dict[str, float | None]] = {}
    for case, st in lat.items():
        if case == "kernel" or st.get("error"):
            continue
        out[case] = {k: (st[k] - base[k] if st.get(k) is not None and base.get(k) is not None else None)
                     for k in ("p50_us", "p99_us")}
    return out

