"""The measured results: one :class:`Row` per consumer and traffic, the ratios between rows
of the same run, and the latency probes' percentiles.

Pure (no lab), so the arithmetic is unit-tested; the report formats what is computed here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .cases import NFHOOKS_CASES
from .parse import IperfResult

__all__ = ["Row", "added_latency", "latency_stats", "percentile", "ratio", "ratios"]


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
        if cpu is not None:
            r.cpu_seconds = cpu
            if wall:
                r.cpu_core_pct = 100.0 * cpu / wall
            n = r.handled or r.rx_packets
            if n:
                r.cpu_us_per_packet = 1e6 * cpu / n
        if rss_kib is not None:
            r.max_rss_mib = rss_kib / 1024
        return r


#: nft over legacy: what the nf_tables path costs relative to legacy xtables, same policy.
BACKEND_PAIR = ("nfhooks nft", "nfhooks legacy")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(rows: Sequence[Row]) -> dict[str, float | None]:
    """Throughput and CPU ratios between consumers measured in the same run.

    Keys like ``udp_pps nfhooks/bare``, ``tcp_gbps nfhooks/kernel`` and
    ``udp_cpu_per_packet nfhooks/bare``; a missing or zero measurement gives None.
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
            out[f"{proto}_{metric} {a}/{b}"] = ratio(getattr(ra, metric), getattr(rb, metric))
    for proto in ("udp", "tcp"):
        for a, b in (("nfhooks", "bare"), ("scapy", "bare"), ("nfhooks fields", "nfhooks"),
                     BACKEND_PAIR,
                     *((c, "bare") for c in NFHOOKS_CASES[1:])):
            ra, rb = by.get((a, proto)), by.get((b, proto))
            if ra is None or rb is None:
                continue
            out[f"{proto}_cpu_per_packet {a}/{b}"] = ratio(ra.cpu_us_per_packet, rb.cpu_us_per_packet)
    return out


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

