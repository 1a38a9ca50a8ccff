"""`make bench`: what nfhooks costs per packet, next to what it is compared with, in one run.

Run as root: ``python -m nfhooks.bench [--seconds 5] [--quick] [--json PATH] [--profile PATH]``.

Two lab namespaces joined by a veth (client -- router). iperf3 servers listen on the router,
iperf3 clients in the client namespace send the same traffic through each consumer:

==============  ==================================================================================
kernel          no queue rule at all: what the veth, the stack and iperf3 do alone
bare            a minimal NetfilterQueue script: ``lambda p: p.accept()``, bound with the queue
                length nfhooks uses, and ``-A INPUT -p udp|tcp --dport P -j NFQUEUE``
scapy           the common approach: the same script, ``IP(p.get_payload())`` then accept
nfhooks         ``nfhooks run policies/bench.py``: a handler that accepts unread
nfhooks fields  the same engine, the handler reads pkt.src / pkt.dport / pkt.proto first
nfhooks 20      ``nfhooks run policies/bench20.py``: a realistic 20-handler INPUT policy; for the
handlers        flood 19 kernel matches do not fire, one does (its handler accepts)
nfhooks flow    ``nfhooks run policies/bench_flow.py``, port 5203: ``flow=True`` handlers; Python
offload         sees each connection's first packet, the kernel's offload rule accepts the rest
nfhooks 2       ``nfhooks run --workers 2 policies/bench.py`` when ``run`` has ``--workers``
workers         (otherwise the row says "not available")
==============  ==================================================================================

Latency (``--latency-rate``, default 10,000 pps): a UDP echo server on the router (port 5204)
and a pinger in the client namespace sending fixed-rate 12-byte probes from one fixed port
and timing each reply (``perf_counter_ns`` in the probe): round-trip p50/p90/p99 with no
queue rule (kernel), through a bare NetfilterQueue consumer, and through nfhooks' engine
(``udp_echo``: every probe is queued at INPUT). "Added" = a consumer's percentile minus the
kernel's, both from the same run.

Traffic: iperf3 UDP with 64-byte payloads at full speed (``-u -b 0 -l 64``) and iperf3 TCP, each
from a fixed client port (``--cport``): the conntrack table is machine-wide, so a flood is one
5-tuple, never thousands of entries. All packets to the iperf3 port are queued at INPUT.

Measured per row: packets the receiver got per second (iperf3's server-side count, received =
packets - lost) and Gbit/s for TCP; the consumer's CPU time (utime+stime from /proc/PID/stat,
before/after) divided by the packets it decided (the kernel's queue statistics: id_sequence
minus user_dropped), and the share of one core it used; packets the kernel dropped because the
queue was full; the consumer's peak RSS (VmHWM). On a 2-core machine the sender, the softirq
work and the consumer share the cores, so CPU per packet is the number to compare between
consumers, and pps ratios only within one run (the machine is noisy).

Everything happens inside the lab's namespaces (rules included); the lab is a context
manager, so processes it started and its namespaces are removed on failure too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "IperfResult",
    "Row",
    "cpu_ticks",
    "main",
    "parse_iperf",
    "queue_handled",
    "ratios",
    "summarize_collapsed",
    "breakdown",
    "vm_hwm_kib",
]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POLICY = ROOT / "policies" / "bench.py"
PORT = 5201  # policies/bench.py: accept unread
FIELDS_PORT = 5202  # policies/bench.py: read fields, then accept
FLOW_PORT = 5203  # policies/bench_flow.py: flow=True handlers (offloaded after the first packet)
ECHO_PORT = 5204  # policies/bench.py: udp_echo, the latency probe's port (every packet queued)
BENCH20_POLICY = ROOT / "policies" / "bench20.py"
FLOW_POLICY = ROOT / "policies" / "bench_flow.py"
BARE_QUEUE = 100  # queue of the bare/scapy scripts (nfhooks uses 0..3)
CPORT_BASE = 41000  # fixed client ports: one 5-tuple per flood
UDP_LEN = 64
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
CASES = ("kernel", "bare", "scapy", "nfhooks", "nfhooks fields", "nfhooks 20 handlers",
         "nfhooks flow offload", "nfhooks 2 workers")
#: Cases compared with kernel and bare in the ratios, the markdown table and the chart.
NFHOOKS_CASES = CASES[3:]
LATENCY_RATE = 10_000.0
NOT_AVAILABLE = "not available"

_ECHO_SCRIPT = r"""
import socket, sys
host, port, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, port))
open(ready, "w").close()
while True:
    d, a = s.recvfrom(2048)
    s.sendto(d, a)
"""

# Fixed-rate UDP probes from one fixed port; each reply's round trip (ns) is timed by the same
# process that stamped it. Prints {"sent": N, "rtt_ns": [...]} as JSON.
_PING_SCRIPT = r"""
import json, select, socket, struct, sys, time
host, port, rate, seconds, cport = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", cport))
s.connect((host, port))
s.setblocking(False)
now, clock = time.perf_counter_ns, time.perf_counter
rtts = []
def drain():
    while True:
        try:
            d = s.recv(64)
        except (BlockingIOError, ConnectionRefusedError):
            return
        t = now()
        rtts.append(t - struct.unpack("!Iq", d[:12])[1])
n, interval = int(rate * seconds), 1.0 / rate
sent, nxt = 0, clock()
while sent < n:
    t = clock()
    if t >= nxt:
        s.send(struct.pack("!Iq", sent, now()))
        sent += 1
        nxt = max(nxt + interval, t - 0.01)  # behind by more than 10 ms: do not burst to catch up
        continue
    if select.select([s], [], [], nxt - t)[0]:
        drain()
end = clock() + 0.5
while clock() < end and len(rtts) < sent:
    if select.select([s], [], [], end - clock())[0]:
        drain()
print(json.dumps({"sent": sent, "rtt_ns": rtts}))
"""

# A minimal NetfilterQueue consumer, as a user would write it (plus the queue length nfhooks
# binds with, so the comparison is consumer against consumer, not queue size against queue
# size). The default SIGTERM action ends it; the kernel unbinds the queue with the socket.
_CONSUMER_SCRIPT = r"""
import sys
from netfilterqueue import NetfilterQueue
mode, num, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == "scapy":
    from scapy.layers.inet import IP
    def callback(p):
        IP(p.get_payload())
        p.accept()
else:
    callback = lambda p: p.accept()
q = NetfilterQueue()
q.bind(num, callback, max_len=4096)
open(ready, "w").close()
q.run()
"""


# --------------------------------------------------------------------------- pure parts


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


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(rows: Sequence[Row]) -> dict[str, float | None]:
    """Throughput and CPU ratios between consumers measured in the same run.

    Keys like ``udp_pps nfhooks/bare``, ``tcp_gbps nfhooks/kernel`` and
    ``udp_cpu_per_packet nfhooks/bare``; a missing or zero measurement gives None.
    """
    by = {(r.case, r.proto): r for r in rows if r.error is None}
    out: dict[str, float | None] = {}
    pairs = (("nfhooks", "bare"), ("nfhooks", "kernel"), ("bare", "kernel"), ("scapy", "bare"),
             ("nfhooks fields", "nfhooks"), ("nfhooks", "scapy"),
             *((c, b) for c in NFHOOKS_CASES[1:] for b in ("kernel", "bare")))
    for proto, metric in (("udp", "pps"), ("tcp", "gbps")):
        for a, b in pairs:
            ra, rb = by.get((a, proto)), by.get((b, proto))
            if ra is None or rb is None:
                continue
            out[f"{proto}_{metric} {a}/{b}"] = _ratio(getattr(ra, metric), getattr(rb, metric))
    for proto in ("udp", "tcp"):
        for a, b in (("nfhooks", "bare"), ("scapy", "bare"), ("nfhooks fields", "nfhooks"),
                     *((c, "bare") for c in NFHOOKS_CASES[1:])):
            ra, rb = by.get((a, proto)), by.get((b, proto))
            if ra is None or rb is None:
                continue
            out[f"{proto}_cpu_per_packet {a}/{b}"] = _ratio(ra.cpu_us_per_packet, rb.cpu_us_per_packet)
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


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(rows: Sequence[Row], lat: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """The results as markdown: throughput/CPU/RSS with ratios to kernel and bare, then latency."""
    by = {(r.case, r.proto): r for r in rows}
    out = [f"{meta.get('seconds', 0):g} s per row, {meta.get('cpus')} CPUs, kernel {meta.get('kernel')}, "
           f"Python {meta.get('python')}, {meta.get('iperf3')}, {meta.get('time')}; one run.", "",
           "| traffic | consumer | rx pps | rx Gbit/s | x kernel | x bare | decided in Python | "
           "CPU us/pkt | CPU x bare | CPU % core | max RSS MiB |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        traffic = f"UDP {UDP_LEN} B" if r.proto == "udp" else "TCP"
        if r.error:
            out.append(f"| {traffic} | {r.case} | {r.error.splitlines()[0][:90]} |" + " |" * 8)
            continue
        metric = "pps" if r.proto == "udp" else "gbps"
        k, b = by.get(("kernel", r.proto)), by.get(("bare", r.proto))
        xk = _ratio(getattr(r, metric), getattr(k, metric, None)) if r.case != "kernel" else None
        xb = _ratio(getattr(r, metric), getattr(b, metric, None)) if r.case not in ("kernel", "bare") else None
        cb = _ratio(r.cpu_us_per_packet, getattr(b, "cpu_us_per_packet", None)) \
            if r.case not in ("kernel", "bare") else None
        out.append(f"| {traffic} | {r.case} | {_fmt(r.pps, ',.0f')} | {_fmt(r.gbps, '.3f')} | {_x(xk)} | {_x(xb)} "
                   f"| {_fmt(r.handled, ',')} | {_fmt(r.cpu_us_per_packet, '.2f')} | {_x(cb)} "
                   f"| {_fmt(r.cpu_core_pct, '.0f')} | {_fmt(r.max_rss_mib, '.1f')} |")
    if lat:
        add = added_latency(lat)
        eng = lat.get("nfhooks") or {}
        rate = next((st.get("rate") for st in lat.values() if st.get("rate")), None)
        out += ["", f"Latency: UDP echo round trip at {_fmt(rate, ',.0f')} probes/s (us)", "",
                "| path | sent | received | p50 | p90 | p99 | max | added p50 | added p99 | CPU us/probe |",
                "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for case, st in lat.items():
            if st.get("error"):
                out.append(f"| {case} | {st['error'][:90]} |" + " |" * 8)
                continue
            a = add.get(case, {})
            out.append(f"| {case} | {st['sent']:,} | {st['received']:,} | {_fmt(st['p50_us'], '.0f')} "
                       f"| {_fmt(st['p90_us'], '.0f')} | {_fmt(st['p99_us'], '.0f')} | {_fmt(st['max_us'], '.0f')} "
                       f"| {_fmt(a.get('p50_us'), '+.0f')} | {_fmt(a.get('p99_us'), '+.0f')} "
                       f"| {_fmt(st.get('cpu_us_per_probe'), '.1f')} |")
        if eng.get("decision_p99_le_us") is not None:
            out += ["", f"The engine's own time per probe (`nfhooks_decision_seconds` at INPUT: callback "
                        "entry to the verdict's return, which includes the kernel re-injecting the packet): "
                        f"p50 <= {_fmt(eng.get('decision_p50_le_us'), 'g')} us, "
                        f"p99 <= {_fmt(eng['decision_p99_le_us'], 'g')} us (bucket bounds). The rest of the "
                        "added round trip is handing the packet to userspace and waking the engine; a p99 far "
                        "above both is scheduling on a loaded machine (compare the kernel row's p99)."]
    return "\n".join(out) + "\n"


DOCS_BEGIN = "<!-- bench:begin (written by python -m nfhooks.bench --docs) -->"
DOCS_END = "<!-- bench:end -->"


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between the bench markers replaced (appended if absent)."""
    new = f"{DOCS_BEGIN}\n{block.rstrip()}\n{DOCS_END}"
    i, j = text.find(DOCS_BEGIN), text.find(DOCS_END)
    if i < 0 or j < i:
        return text.rstrip("\n") + "\n\n" + new + "\n"
    return text[:i] + new + text[j + len(DOCS_END):]


def chart(rows: Sequence[Row], lat: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    """docs/img/bench.png: throughput, CPU per packet and latency per consumer (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.error]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    panels = (
        (axes[0][0], "tcp", "gbps", 1.0, "TCP Gbit/s (receiver)"),
        (axes[0][1], "udp", "pps", 1e-3, f"UDP {UDP_LEN} B: thousand packets/s received"),
        (axes[1][0], None, "cpu_us_per_packet", 1.0, "consumer CPU us per packet (UDP | TCP)"),
    )
    colors = {"kernel": "#777777", "bare": "#4c72b0", "scapy": "#dd8452"}
    for ax, proto, attr, scale, label in panels:
        if proto is None:
            cases = [c for c in CASES if any(r.case == c and r.cpu_us_per_packet is not None for r in ok)]
            width = 0.4
            for i, (p, col) in enumerate((("udp", "#55a868"), ("tcp", "#8172b2"))):
                vals = [next((r.cpu_us_per_packet or 0 for r in ok if r.case == c and r.proto == p), 0) for c in cases]
                ys = [y + (i - 0.5) * width for y in range(len(cases))]
                ax.barh(ys, vals, height=width, color=col, label=p.upper())
                for y, v in zip(ys, vals):
                    ax.text(v, y, f" {v:.2f}", va="center", fontsize=7)
            ax.set_yticks(range(len(cases)), cases)
            ax.legend()
        else:
            sel = [r for c in CASES for r in ok if r.case == c and r.proto == proto and getattr(r, attr)]
            base = next((getattr(r, attr) for r in sel if r.case == "kernel"), None)
            vals = [getattr(r, attr) * scale for r in sel]
            ax.barh(range(len(sel)), vals, color=[colors.get(r.case, "#c44e52") for r in sel])
            ax.set_yticks(range(len(sel)), [r.case for r in sel])
            for y, r in enumerate(sel):
                if base:
                    ax.text(getattr(r, attr) * scale, y, f" {getattr(r, attr) / base:.2f}x kernel", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_title(label, fontsize=10)
    ax = axes[1][1]
    good = [(c, st) for c, st in lat.items() if not st.get("error") and st.get("p50_us") is not None]
    if good:
        width = 0.4
        for i, (k, col) in enumerate((("p50_us", "#4c72b0"), ("p99_us", "#c44e52"))):
            ys = [y + (i - 0.5) * width for y in range(len(good))]
            ax.barh(ys, [st[k] for _, st in good], height=width, color=col, label=k.split("_")[0])
            for y, (_, st) in zip(ys, good):
                ax.text(st[k], y, f" {st[k]:.0f}", va="center", fontsize=7)
        ax.set_yticks(range(len(good)), [c for c, _ in good])
        ax.invert_yaxis()
        ax.legend()
        rate = good[0][1].get("rate")
        ax.set_title(f"UDP echo round trip, us ({rate:,.0f} probes/s)", fontsize=10)
    else:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


# --------------------------------------------------------------------------- the lab


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


class Bench:
    """The two-node lab and the measurements; everything it starts is tracked by the lab."""

    def __init__(self, lab: Any, seconds: float, policy: Path, log: Any = print) -> None:
        self.lab = lab
        self.seconds = seconds
        self.policy = policy
        self.log = log
        self._cport = CPORT_BASE
        self.server_addr = ""

    # -- setup -------------------------------------------------------------------------

    def build(self) -> None:
        from .lab.topology import _pick_ranges

        lab = self.lab
        octet, _ = _pick_ranges(lab.id)
        lab.add_node("client")
        lab.add_node("router")
        lab.connect("client", "eth0", "router", "lan")
        lab.segments["lan"] = {"client": "eth0", "router": "lan"}
        lab.networks["lan"] = {4: f"10.{octet}.1.0/24"}
        lab.add_address("router", "lan", f"10.{octet}.1.1/24")
        lab.add_address("client", "eth0", f"10.{octet}.1.2/24")
        lab.wait_links_up()
        self.server_addr = lab.addr("router")
        for port in (PORT, FIELDS_PORT, FLOW_PORT):
            self._start_iperf_server(port)
        ready = lab.tmpdir / "echo.ready"
        echo = lab.popen("router", sys.executable, "-c", _ECHO_SCRIPT, self.server_addr, ECHO_PORT, ready)

        def echo_up() -> bool:
            if echo.poll() is not None:
                raise RuntimeError(f"UDP echo server exited with {echo.returncode}")
            return ready.exists()

        lab.wait_for(echo_up, timeout=10, what="UDP echo server")

    def _start_iperf_server(self, port: int) -> None:
        lab = self.lab
        err = open(lab.tmpdir / f"iperf3-server-{port}.log", "wb")
        proc = lab.popen("router", "iperf3", "-s", "-B", self.server_addr, "-p", port,
                         stdout=err, stderr=subprocess.STDOUT)
        err.close()

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"iperf3 server on port {port} exited with {proc.returncode}")
            out = lab.exec("router", "ss", "-Htln", f"sport = :{port}", check=False).stdout
            return bool(out.strip())

        lab.wait_for(listening, timeout=10, what=f"iperf3 server on port {port}")

    # -- probes ------------------------------------------------------------------------

    def queue_stats(self) -> list[Any]:
        from .metrics import parse_queue_stats

        cp = self.lab.exec("router", "cat", "/proc/net/netfilter/nfnetlink_queue", check=False)
        return parse_queue_stats(cp.stdout) if cp.returncode == 0 else []

    @staticmethod
    def cpu_seconds(pid: int) -> float | None:
        text = _read(f"/proc/{pid}/stat")
        return None if text is None else cpu_ticks(text) / CLK_TCK

    @staticmethod
    def rss_kib(pid: int) -> int | None:
        text = _read(f"/proc/{pid}/status")
        return None if text is None else vm_hwm_kib(text)

    # -- traffic -----------------------------------------------------------------------

    def iperf(self, proto: str, port: int, seconds: float | None = None, attempts: int = 3) -> IperfResult:
        """One iperf3 test from the client; retried when iperf3 fails to set the test up
        (3.12 now and then reports "unable to read from stream socket" right after the
        previous test on the same server)."""
        s = seconds or self.seconds
        for attempt in range(attempts):
            self._cport += 1  # a fresh fixed port per test: no TIME_WAIT clash for TCP
            argv: list[Any] = ["iperf3", "-c", self.server_addr, "-p", port, "--cport", self._cport,
                               "-t", f"{s:g}", "-J", "--get-server-output"]
            if proto == "udp":
                argv += ["-u", "-b", "0", "-l", UDP_LEN]
            cp = self.lab.exec("client", *argv, timeout=s + 40, check=False)
            try:
                return parse_iperf(json.loads(cp.stdout))
            except ValueError as e:
                err = str(e) if cp.stdout.strip().startswith("{") else (
                    f"iperf3 {proto} gave no JSON (exit {cp.returncode}): {(cp.stderr or cp.stdout)[-500:]}")
                if attempt + 1 == attempts:
                    raise RuntimeError(err) from None
                self.log(f"  (iperf3 {proto} failed, retrying: {err})")
                time.sleep(1.0)
        raise AssertionError("unreachable")

    def offloaded(self) -> int:
        """Packets nfhooks' offload rules accepted so far in the router (all rules, IPv4)."""
        text = self.lab.exec("router", "iptables-legacy-save", "-c", check=False).stdout
        return sum(int(line[1:line.index(":")]) for line in text.splitlines()
                   if line.startswith("[") and '"nfhooks offload ' in line)

    def measure(self, case: str, proto: str, port: int, pid: int | None,
                queues: Iterable[int] | None, pids: Sequence[int] = ()) -> Row:
        """One iperf3 test through a consumer: ``pid`` (and ``pids``, e.g. worker processes)
        are the consumer's processes whose CPU time and peak RSS count."""
        procs = [pid, *pids] if pid else []
        q0 = self.queue_stats() if pid else []
        c0 = [self.cpu_seconds(p) for p in procs]
        off0 = self.offloaded() if case == "nfhooks flow offload" else 0
        t0 = time.monotonic()
        res = self.iperf(proto, port)
        wall = time.monotonic() - t0
        c1 = [self.cpu_seconds(p) for p in procs]
        q1 = self.queue_stats() if pid else []
        cpu = (sum(b - a for a, b in zip(c0, c1) if a is not None and b is not None)
               if procs and None not in c0 else None)
        queue = queue_handled(q0, q1, queues) if pid else None
        rss = sum(self.rss_kib(p) or 0 for p in procs) if procs else None
        row = Row.build(case, res, wall=wall, cpu=cpu, queue=queue, rss_kib=rss)
        if case == "nfhooks flow offload" and cpu is not None:
            # CPU per packet of the whole flow: decided in Python + accepted by the offload rule
            off = self.offloaded() - off0
            row.extra["offloaded_packets"] = off
            n = (row.rx_packets if proto == "udp" else None) or (row.handled or 0) + off
            row.cpu_us_per_packet = 1e6 * cpu / n if n else None
        self.log(_describe(row))
        return row

    def latency(self, case: str, rate: float, seconds: float) -> dict[str, Any]:
        """Fixed-rate UDP echo probes from the client to the router's echo server."""
        self._cport += 1
        cp = self.lab.exec("client", sys.executable, "-c", _PING_SCRIPT, self.server_addr, ECHO_PORT,
                           rate, seconds, self._cport, timeout=seconds + 30, check=False)
        try:
            doc = json.loads(cp.stdout)
        except ValueError:
            raise RuntimeError(f"latency probe failed (exit {cp.returncode}): {cp.stderr[-500:]}") from None
        st = latency_stats(doc["rtt_ns"], doc["sent"], rate)
        self.log(f"  latency {case:<10} {rate:,.0f}/s: p50 {_fmt(st['p50_us'], '.0f')} us, "
                 f"p99 {_fmt(st['p99_us'], '.0f')} us, {st['received']:,}/{st['sent']:,} answered")
        return st

    # -- consumers ---------------------------------------------------------------------

    def rule(self, op: str, proto: str, port: int, queue: int) -> None:
        # iptables-legacy, the backend python-iptables (and so nfhooks) writes to; run with
        # `ip netns exec` inside the router namespace, never in the machine's own.
        self.lab.exec("router", "iptables-legacy", "-w", op, "INPUT", "-p", proto, "--dport", port,
                      "-j", "NFQUEUE", "--queue-num", queue)

    @contextlib.contextmanager
    def consumer(self, mode: str, proto: str, port: int) -> Iterator[subprocess.Popen[Any]]:
        """The bare/scapy script bound to BARE_QUEUE, with its queue rule for ``port``."""
        lab = self.lab
        ready = lab.tmpdir / f"consumer-{mode}-{proto}-{port}.ready"
        log_path = lab.tmpdir / f"consumer-{mode}-{proto}-{port}.log"
        with open(log_path, "wb") as logf:
            proc = lab.popen("router", sys.executable, "-c", _CONSUMER_SCRIPT, mode, BARE_QUEUE, ready,
                             stdout=logf, stderr=subprocess.STDOUT)

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{mode} consumer exited with {proc.returncode}: "
                                   f"{log_path.read_text(errors='replace')[-1500:]}")
            return ready.exists()

        try:
            lab.wait_for(up, timeout=30, what=f"{mode} consumer bound to queue {BARE_QUEUE}")
            self.rule("-A", proto, port, BARE_QUEUE)
            try:
                yield proc
            finally:
                self.rule("-D", proto, port, BARE_QUEUE)
        finally:
            _stop(proc)

    def script_consumer(self, mode: str, proto: str) -> Row:
        with self.consumer(mode, proto, PORT) as proc:
            return self.measure(mode, proto, PORT, proc.pid, [BARE_QUEUE])

    def kernel(self, proto: str) -> Row:
        return self.measure("kernel", proto, PORT, None, None)

    def start_engine(self, *extra: str) -> Any:
        return self.lab.start_engine(str(self.policy), "--set", f"port={PORT}",
                                     "--set", f"fields_port={FIELDS_PORT}",
                                     "--set", f"echo_port={ECHO_PORT}", *extra, node="router",
                                     ready_timeout=30)

    def engine_rows(self, protos: Sequence[str], fields: bool,
                    latency: dict[str, Any] | None = None, rate: float = LATENCY_RATE) -> list[Row]:
        """The policies/bench.py engine: nfhooks and nfhooks fields rows, and the engine's
        latency probe (into ``latency``)."""
        cases = [("nfhooks", PORT)] + ([("nfhooks fields", FIELDS_PORT)] if fields else [])
        try:
            engine = self.start_engine()
        except Exception as e:  # noqa: BLE001 -- the other rows are still worth reporting
            self.log(f"  nfhooks: engine did not start: {e}")
            if latency is not None:
                latency["nfhooks"] = {"error": f"engine did not start: {e}"}
            return [Row(c, p, error=f"engine did not start: {e}") for p in protos for c, _ in cases]
        rows = []
        try:
            for proto in protos:
                for case, port in cases:
                    rows.append(self._guard(case, proto, lambda: self.measure(
                        case, proto, port, engine.pid, None)))
            if latency is not None:
                latency["nfhooks"] = self._guard_latency("nfhooks", rate, engine=True, pid=engine.pid)
        finally:
            engine.stop()
        return rows

    def policy_rows(self, case: str, policy: Path, port: int, protos: Sequence[str]) -> list[Row]:
        """Rows of one more engine running ``policy`` (``--set port=<port>``)."""
        try:
            engine = self.lab.start_engine(str(policy), "--set", f"port={port}", node="router", ready_timeout=30)
        except Exception as e:  # noqa: BLE001
            self.log(f"  {case}: engine did not start: {e}")
            return [Row(case, p, error=f"engine did not start: {e}") for p in protos]
        try:
            return [self._guard(case, proto, lambda: self.measure(case, proto, port, engine.pid, None))
                    for proto in protos]
        finally:
            engine.stop()

    def workers_rows(self, protos: Sequence[str], workers: int = 2) -> list[Row]:
        """``nfhooks run --workers N`` if this nfhooks has it; otherwise rows saying so."""
        case = f"nfhooks {workers} workers"
        helptext = subprocess.run([sys.executable, "-m", "nfhooks", "run", "--help"], capture_output=True,
                                  text=True, env={**os.environ, "COLUMNS": "200"}).stdout
        if "--workers" not in helptext:
            self.log(f"  {case}: {NOT_AVAILABLE} (nfhooks run has no --workers)")
            return [Row(case, p, error=f"{NOT_AVAILABLE}: nfhooks run has no --workers yet") for p in protos]
        try:
            engine = self.start_engine("--workers", str(workers))
        except Exception as e:  # noqa: BLE001
            self.log(f"  {case}: engine did not start: {e}")
            return [Row(case, p, error=f"engine did not start: {e}") for p in protos]
        try:
            def children() -> list[int]:
                out = subprocess.run(["pgrep", "-P", str(engine.pid)], capture_output=True, text=True).stdout
                kids = [int(x) for x in out.split()]
                # `ip netns exec` may exec in place or fork: include grandchildren
                for k in list(kids):
                    out = subprocess.run(["pgrep", "-P", str(k)], capture_output=True, text=True).stdout
                    kids += [int(x) for x in out.split()]
                return kids

            return [self._guard(case, proto, lambda: self.measure(
                case, proto, PORT, engine.pid, None, pids=children())) for proto in protos]
        finally:
            engine.stop()

    def metrics_text(self) -> str:
        return self.lab.exec("router", "curl", "-s", "-m", "3", "http://127.0.0.1:9477/metrics",
                             check=False).stdout

    def _guard_latency(self, case: str, rate: float, seconds: float | None = None,
                       engine: bool = False, pid: int | None = None) -> dict[str, Any]:
        """The probe; with ``engine``, also the engine's own decision time over the probe
        (nfhooks_decision_seconds at INPUT: callback entry to verdict, bucket upper bounds);
        with ``pid``, the consumer's CPU time per answered probe (``cpu_us_per_probe``)."""
        try:
            h0 = histogram_buckets(self.metrics_text(), "nfhooks_decision_seconds", hook="INPUT") if engine else {}
            c0 = self.cpu_seconds(pid) if pid else None
            st = self.latency(case, rate, seconds or self.seconds)
            c1 = self.cpu_seconds(pid) if pid else None
            if c0 is not None and c1 is not None and st["received"]:
                st["cpu_us_per_probe"] = 1e6 * (c1 - c0) / st["received"]
                self.log(f"  latency {case:<10} CPU {st['cpu_us_per_probe']:.1f} us per probe")
            if engine:
                h1 = histogram_buckets(self.metrics_text(), "nfhooks_decision_seconds", hook="INPUT")
                for q in (50, 99):
                    le = bucket_quantile(h0, h1, q / 100)
                    st[f"decision_p{q}_le_us"] = None if le is None or le == float("inf") else le * 1e6
            return st
        except Exception as e:  # noqa: BLE001
            self.log(f"  latency {case}: FAILED: {e}")
            return {"error": f"{type(e).__name__}: {e}"}

    def bare_latency(self, rate: float) -> dict[str, Any]:
        try:
            with self.consumer("bare", "udp", ECHO_PORT) as proc:
                return self._guard_latency("bare", rate, pid=proc.pid)
        except Exception as e:  # noqa: BLE001
            return {"error": f"{type(e).__name__}: {e}"}

    def profile(self, out: Path, seconds: float, native: bool) -> dict[str, Any]:
        """py-spy on the engine while a UDP flood runs (a separate run: sampling slows it)."""
        pyspy = _pyspy()
        if pyspy is None:
            raise RuntimeError("--profile needs py-spy (pip install py-spy)")
        engine = self.start_engine()
        try:
            argv = [pyspy, "record", "-p", str(engine.pid), "-d", f"{seconds:g}", "-r", "500",
                    "-f", "raw", "-o", str(out)]
            if native:
                argv.append("--native")
            spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                time.sleep(0.5)  # attach before the flood starts
                self.iperf("udp", PORT, seconds)
                _, err = spy.communicate(timeout=seconds + 30)
            finally:
                _stop(spy)
            if spy.returncode:
                raise RuntimeError(f"py-spy exited with {spy.returncode}: {err[-800:]}")
        finally:
            engine.stop()
        text = out.read_text()
        return {**summarize_collapsed(text), "breakdown": breakdown(text)}

    def _guard(self, case: str, proto: str, fn: Any) -> Row:
        """One failing row is reported, not fatal: the other rows are still worth having."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            self.log(f"  {case} {proto}: FAILED: {e}")
            return Row(case, proto, error=f"{type(e).__name__}: {e}")

    def run(self, protos: Sequence[str], fields: bool, scapy: bool, *, more: bool = True,
            latency: dict[str, Any] | None = None, rate: float = LATENCY_RATE) -> list[Row]:
        """Every row; ``more``: also the 20-handler, flow offload and workers rows.
        ``latency`` (a dict) receives the latency probes: kernel, bare, nfhooks."""
        rows: list[Row] = []
        if latency is not None:
            latency["kernel"] = self._guard_latency("kernel", rate)
            latency["bare"] = self.bare_latency(rate)
        if not protos:  # --only latency: the engine's probe, no throughput rows
            if latency is not None:
                self.engine_rows((), False, latency=latency, rate=rate)
            return rows
        for proto in protos:
            rows.append(self._guard("kernel", proto, lambda: self.kernel(proto)))
            rows.append(self._guard("bare", proto, lambda: self.script_consumer("bare", proto)))
            if scapy:
                rows.append(self._guard("scapy", proto, lambda: self.script_consumer("scapy", proto)))
        rows += self.engine_rows(protos, fields, latency=latency, rate=rate)
        if more:
            rows += self.policy_rows("nfhooks 20 handlers", BENCH20_POLICY, PORT, protos)
            rows += self.policy_rows("nfhooks flow offload", FLOW_POLICY, FLOW_PORT, protos)
            rows += self.workers_rows(protos)
        order = {c: i for i, c in enumerate(CASES)}
        rows.sort(key=lambda r: (protos.index(r.proto), order.get(r.case, 99)))
        return rows


def _pyspy() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def _stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM by PID, SIGKILL after 3 s (the lab would do it at close; this frees the queue now)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _describe(r: Row) -> str:
    what = f"{_fmt(r.pps, ',.0f')} pps" if r.proto == "udp" else f"{_fmt(r.gbps, '.2f')} Gbit/s"
    cpu = f", {_fmt(r.cpu_us_per_packet, '.2f')} us CPU/pkt" if r.cpu_us_per_packet is not None else ""
    return f"  {r.case:<15} {r.proto}: {what}{cpu}"


# --------------------------------------------------------------------------- output


def render(rows: Sequence[Row], rat: Mapping[str, float | None], meta: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    con = Console()
    if not con.is_terminal:
        con = Console(width=160)  # piped to a file: do not squeeze the table to 80 columns
    t = Table(title=f"nfhooks bench: {meta['seconds']:g} s per row, {meta['cpus']} CPUs, "
                    f"kernel {meta['kernel']}, one run")
    for col in ("traffic", "consumer", "tx pps", "rx pps", "rx Gbit/s", "lost %", "decided",
                "queue-full drops", "CPU us/pkt", "CPU % of a core", "max RSS MiB"):
        t.add_column(col, justify="left" if col in ("traffic", "consumer") else "right")
    for r in rows:
        traffic = f"UDP {UDP_LEN} B" if r.proto == "udp" else "TCP"
        if r.error:
            style = "yellow" if r.error.startswith(NOT_AVAILABLE) else "red"
            what = "" if r.error.startswith(NOT_AVAILABLE) else "failed: "
            t.add_row(traffic, r.case, f"[{style}]{what}{escape(r.error.splitlines()[0][:80])}[/{style}]", *[""] * 8)
            continue
        t.add_row(traffic, r.case, _fmt(r.tx_pps, ",.0f"), _fmt(r.pps, ",.0f"), _fmt(r.gbps, ".3f"),
                  _fmt(r.lost_pct, ".1f"), _fmt(r.handled, ","), _fmt(r.queue_dropped, ","),
                  _fmt(r.cpu_us_per_packet, ".2f"), _fmt(r.cpu_core_pct, ".0f"), _fmt(r.max_rss_mib, ".1f"))
    con.print(t)
    rt = Table(title="ratios (same run)")
    rt.add_column("ratio")
    rt.add_column("value", justify="right")
    for k, v in rat.items():
        rt.add_row(k, _fmt(v, ".3f"))
    con.print(rt)


def _meta(seconds: float) -> dict[str, Any]:
    return {
        "seconds": seconds,
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "udp_payload": UDP_LEN,
        "iperf3": (subprocess.run(["iperf3", "--version"], capture_output=True, text=True)
                   .stdout.split("\n")[0].strip() if shutil.which("iperf3") else None),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nfhooks.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement (default 5)")
    ap.add_argument("--quick", action="store_true", help="2 s per row, no 'nfhooks fields' rows")
    ap.add_argument("--json", default="bench-results.json", help="write results here (default %(default)s)")
    ap.add_argument("--proto", choices=("udp", "tcp", "both"), default="both")
    ap.add_argument("--no-scapy", action="store_true", help="skip the scapy rows")
    ap.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="benchmark policy")
    ap.add_argument("--profile", type=Path, metavar="PATH",
                    help="also run py-spy on the engine under the UDP flood; raw stacks to PATH")
    ap.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--latency-rate", type=float, default=LATENCY_RATE,
                    help="UDP echo probes per second for the latency rows (default %(default)g)")
    ap.add_argument("--no-latency", action="store_true", help="skip the latency probes")
    ap.add_argument("--only", choices=("latency",),
                    help="only these rows: 'latency' = the kernel, bare and nfhooks latency probes "
                         "(with each consumer's CPU per probe), no throughput rows")
    ap.add_argument("--markdown", type=Path, default=Path("bench-results.md"),
                    help="write the markdown tables here (default %(default)s)")
    ap.add_argument("--chart", type=Path, default=ROOT / "docs" / "img" / "bench.png",
                    help="write the PNG chart here (needs matplotlib: pip install -e '.[docs]'); "
                         "'-' for none (default docs/img/bench.png)")
    ap.add_argument("--docs", type=Path, metavar="MD",
                    help="also put the markdown tables into MD between the bench markers "
                         "(e.g. docs/performance.md)")
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        print("nfhooks bench: needs root (network namespaces, iptables, NFQUEUE)", file=sys.stderr)
        return 2
    if shutil.which("iperf3") is None:
        print("nfhooks bench: iperf3 is not installed (make deps)", file=sys.stderr)
        return 2
    if args.profile and _pyspy() is None:
        print("nfhooks bench: --profile needs py-spy (.venv/bin/pip install py-spy)", file=sys.stderr)
        return 2
    seconds = 2.0 if args.quick and args.seconds == 5.0 else args.seconds
    protos: tuple[str, ...] = ("udp", "tcp") if args.proto == "both" else (args.proto,)
    if args.only == "latency":
        if args.no_latency:
            print("nfhooks bench: --only latency and --no-latency exclude each other", file=sys.stderr)
            return 2
        protos = ()

    from .lab.topology import Lab

    meta = _meta(seconds)
    t0 = time.monotonic()
    profile: dict[str, Any] | None = None
    with Lab() as lab:
        print(f"nfhooks bench: lab {lab.id} (client -- router), {seconds:g} s per row", flush=True)
        bench = Bench(lab, seconds, args.policy, log=lambda s: print(s, flush=True))
        bench.build()
        latency: dict[str, Any] | None = None if args.no_latency else {}
        rows = bench.run(protos, fields=not args.quick, scapy=not args.no_scapy, more=not args.quick,
                         latency=latency, rate=args.latency_rate)
        if args.profile:
            try:
                profile = bench.profile(args.profile, max(seconds, 5.0), args.profile_native)
            except Exception as e:  # noqa: BLE001 -- the measurements are still worth writing
                print(f"nfhooks bench: profile failed: {e}", file=sys.stderr)
    meta["wall_seconds"] = round(time.monotonic() - t0, 1)
    rat = ratios(rows)
    render(rows, rat, meta)
    doc: dict[str, Any] = {"meta": meta, "rows": [asdict(r) for r in rows], "ratios": rat,
                           "latency": latency or {}, "latency_added": added_latency(latency or {})}
    md = markdown(rows, latency or {}, meta)
    args.markdown.write_text(md)
    print(md)
    print(f"markdown: {args.markdown}")
    if args.docs:
        args.docs.write_text(replace_block(args.docs.read_text(), md))
        print(f"tables written into {args.docs}")
    if str(args.chart) != "-":
        try:
            chart(rows, latency or {}, args.chart,
                  f"nfhooks bench, one run: {meta['cpus']} CPUs, kernel {meta['kernel']}, {meta['time']}")
            print(f"chart: {args.chart}")
        except ImportError:
            print("nfhooks bench: no chart: matplotlib is not installed (pip install -e '.[docs]')", file=sys.stderr)
    if profile is not None:
        doc["profile"] = profile
        print(f"profile: {profile['samples']} samples in {args.profile}; top self time:")
        for f, pct in profile["self"][:10]:
            print(f"  {pct:5.1f}%  {f}")
        print("where the packet loop's time goes:")
        for k, pct in profile["breakdown"]["percent"].items():
            print(f"  {pct:5.1f}%  {k}")
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results: {args.json} ({meta['wall_seconds']} s)")
    return 1 if any(r.error and not r.error.startswith(NOT_AVAILABLE) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
