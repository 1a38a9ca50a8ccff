"""The ``malformed`` scenario: hand-made frames (bad header lengths, truncated TCP, bad
checksums, odd flags) sent from the client at layer 2 straight to the router's MAC, and for
each one the evidence of what really happened -- dropped by the kernel before any hook,
conntrack INVALID at PREROUTING, or queued and counted as malformed by the engine.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import WEB_PORT
from .evidence import Snapshot, kernel_counters, kernel_drops
from .scenario import Check, Ctx, check_connect
from .topology import Lab

__all__ = ["RawProbe", "malformed"]


@dataclass(frozen=True)
class RawProbe:
    """A hand-made frame the client sends at layer 2 straight to the router's MAC."""

    name: str
    wrong: str
    expect: str  # "kernel" (dropped before any hook), "invalid" (PREROUTING drop), "malformed"
    build: Callable[[dict[str, str]], bytes]


def _probes() -> list[RawProbe]:
    """Built with scapy (imported here only: it is slow to import and only this needs it)."""
    import struct

    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    def v4(a: dict[str, str]) -> Any:
        return Ether(src=a["cmac"], dst=a["rmac"]) / IP(src=a["c4"], dst=a["r4"])

    def v4_with(a: dict[str, str], **ip: Any) -> Any:
        return Ether(src=a["cmac"], dst=a["rmac"]) / IP(src=a["c4"], dst=a["r4"], **ip)

    def port(a: dict[str, str]) -> int:
        return int(a["port"])

    return [
        RawProbe("ipv4-short-ihl", "IPv4 header length 12 bytes (IHL 3 < 5)", "kernel",
                 lambda a: bytes(v4_with(a, ihl=3) / TCP(dport=port(a)))),
        RawProbe("ipv4-bad-checksum", "IPv4 header checksum wrong", "kernel",
                 lambda a: bytes(v4_with(a, chksum=0xDEAD) / TCP(dport=port(a)))),
        RawProbe("ipv4-total-length", "IPv4 total length 400, the frame carries 40", "kernel",
                 lambda a: bytes(v4_with(a, len=400) / TCP(dport=port(a)))),
        RawProbe("tcp-truncated", "TCP header cut to 8 of 20 bytes", "invalid",
                 lambda a: bytes(v4_with(a, proto=6) / Raw(struct.pack("!HHI", 40000, port(a), 1)))),
        RawProbe("tcp-data-offset", "TCP data offset 2 (an 8-byte TCP header)", "invalid",
                 lambda a: bytes(v4(a) / TCP(sport=40001, dport=port(a), flags="S", dataofs=2))),
        RawProbe("tcp-bad-checksum", "TCP SYN with a wrong checksum", "invalid",
                 lambda a: bytes(v4(a) / TCP(sport=40002, dport=port(a), flags="S", chksum=0xBAD))),
        RawProbe("tcp-syn-fin", "TCP flags SYN+FIN", "invalid",
                 lambda a: bytes(v4(a) / TCP(sport=40003, dport=port(a), flags="SF"))),
        RawProbe("tcp-xmas", "TCP flags FIN+PSH+URG (xmas scan)", "invalid",
                 lambda a: bytes(v4(a) / TCP(sport=40004, dport=port(a), flags="FPU"))),
        RawProbe("tcp-null", "TCP with no flags (null scan)", "invalid",
                 lambda a: bytes(v4(a) / TCP(sport=40005, dport=port(a), flags=""))),
        RawProbe("ipv6-ext-header", "IPv6 destination-options header (8 bytes) in a 4-byte payload",
                 "malformed",
                 lambda a: bytes(Ether(src=a["cmac"], dst=a["rmac"])
                                 / IPv6(src=a["c6"], dst=a["r6"], nh=60, plen=4)
                                 / Raw(b"\x3b\x00\x01\x02"))),
    ]


_EXPECT_TEXT = {
    "kernel": "kernel drops it before any hook",
    "invalid": "conntrack INVALID, dropped at PREROUTING",
    "malformed": "queued, malformed, hook default",
}


# The client's sender: plain AF_PACKET on eth0 (what scapy's sendp does), one frame per line.
_SENDER = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for line in sys.stdin:
    s.send(bytes.fromhex(line.strip()))
    print("sent", flush=True)
"""


def _mac(lab: Lab, node: str, ifname: str) -> str:
    return lab.exec(node, "cat", f"/sys/class/net/{ifname}/address").stdout.strip()


@dataclass
class _Trace:
    """What one raw packet left behind: engine metric deltas and kernel counter deltas."""

    handlers: list[tuple[dict[str, str], float]]
    malformed: list[tuple[dict[str, str], float]]
    kernel: dict[str, int]

    @property
    def specific(self) -> bool:
        """Evidence that is about this packet (background traffic -- neighbour discovery --
        only ever moves plain accepts)."""
        return bool(self.kernel or self.malformed
                    or any(l["verdict"] != "accept" or l["handler"] == "(default)"
                           for l, _ in self.handlers))


def _trace(c: Ctx, before: tuple[Snapshot, dict[str, int]], skip: set[str]) -> _Trace:
    snap, kern = c.scraper.scrape(), kernel_counters(c.lab)
    handlers = [(l, v) for l, v in snap.minus(before[0], "nfhooks_handler_packets_total")
                if l["handler"] not in skip]
    return _Trace(handlers, snap.minus(before[0], "nfhooks_malformed_packets_total"),
                  kernel_drops(before[1], kern))


def _settled(c: Ctx, before: tuple[Snapshot, dict[str, int]], skip: set[str]) -> _Trace | None:
    """Poll until the packet's evidence appears and stops changing (or 2 s pass)."""
    last: list[_Trace] = []

    def stable() -> bool:
        t = _trace(c, before, skip)
        same = bool(last) and t.specific and repr(t) == repr(last[-1])
        last.append(t)
        return same

    try:
        c.lab.wait_for(stable, timeout=2.0, interval=0.05, what="the packet's trace")
    except TimeoutError:
        pass
    return last[-1] if last and last[-1].specific else None


def _describe(t: _Trace | None) -> tuple[str, str]:
    """(outcome kind, one line of evidence) for a raw packet's trace."""
    if t is None:
        return "none", "no trace: neither the engine nor the kernel counters saw it"
    kernel = ", ".join(f"{k} +{v}" for k, v in sorted(t.kernel.items()))
    if t.malformed:
        hooks = ", ".join(l["hook"] for l, _ in t.malformed)
        defaults = ", ".join(f"{l['hook']} {l['verdict']}" for l, _ in t.handlers
                             if l["handler"] == "(default)")
        text = (f"queued at {hooks}; unparseable, counted in nfhooks_malformed_packets_total; "
                f"hook default given: {defaults or '?'}")
        return "malformed", text + (f"; kernel: {kernel}" if kernel else "")
    decided = [f"{l['hook']} {l['handler']}: {l['verdict']}" for l, _ in t.handlers
               if l["verdict"] != "accept" or l["handler"] == "(default)"]
    if decided:
        kind = "invalid" if any("invalid: drop" in d for d in decided) else "queued"
        return kind, "queued: " + "; ".join(decided) + (f"; kernel: {kernel}" if kernel else "")
    return "kernel", f"dropped by the kernel before any hook: {kernel}"


def malformed(c: Ctx) -> list[Check]:
    lab = c.lab
    addrs = {"cmac": _mac(lab, "client", "eth0"), "rmac": _mac(lab, "router", "lan"),
             "c4": lab.addr("client", 4), "r4": lab.addr("router", 4),
             "c6": lab.addr("client", 6), "r6": lab.addr("router", 6),
             "port": str(c.ports["service_port"])}
    skip = c.skip
    sender = lab.popen("client", sys.executable, "-c", _SENDER, stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
    assert sender.stdin is not None and sender.stdout is not None
    checks: list[Check] = []
    try:
        for probe in _probes():
            c.progress(probe.name)
            before = (c.scraper.scrape(), kernel_counters(lab))
            sender.stdin.write(probe.build(addrs).hex() + "\n")
            sender.stdin.flush()
            if sender.stdout.readline().strip() != "sent":
                raise RuntimeError(f"the client's raw sender failed on {probe.name}")
            kind, text = _describe(_settled(c, before, skip))
            c.rows.append((probe.name, probe.wrong, text,
                           "as expected" if kind == probe.expect
                           else f"differs (usually: {_EXPECT_TEXT[probe.expect]})"))
            checks.append(Check(f"{probe.name}: {text}", kind != "none"))
    finally:
        sender.stdin.close()
    alive = c.engine.running()
    checks.append(Check(f"engine still running after the raw packets: {alive}", alive))
    checks.append(check_connect(c, "client", "server", WEB_PORT, 4, "ok"))
    return checks
