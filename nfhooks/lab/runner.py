"""``nfhooks lab``: build the namespace lab, run the engine on its router, drive traffic across
every hook, and explain what happened.

The run is data-driven: each :class:`Scenario` names the hooks its traffic should cross and
a function that drives the traffic and reports what it observed. Which hooks were *really*
crossed, and with which verdicts, is not guessed: it is the difference of the engine's own
metrics (scraped inside the router namespace) before and after the scenario. Malformed raw
packets are judged the same way, plus the router's kernel counters (``nstat``), so the
summary says for each one whether the kernel dropped it before any hook or the engine got it.

Everything lives in lab namespaces (``nfhlab-<id>-*``) and is removed at the end, also on
failure or Ctrl-C, unless ``--keep``: then the lab is handed over to its engine process and
recorded in :data:`STATE_FILE` for ``nfhooks lab exec`` and ``nfhooks lab down``.

The scenario registry (``--scenario NAME``)
-------------------------------------------
A scenario is a :class:`Scenario`; :func:`register` adds one (or replaces the one with the
same key). ``--scenario`` takes a scenario's key or a group name, repeatable: ``standard``
(the default set), ``vpn``, ``all``, or any group a scenario declares. A scenario that lives
in its own module -- e.g. ``nfhooks/lab/routeshape.py`` -- registers itself at import time,
and the module is listed in :data:`PLUGINS` (imported on first use; a listed module that
does not exist yet is skipped)::

    # nfhooks/lab/routeshape.py
    from .runner import Check, Ctx, Scenario, register

    def setup(lab, ports):          # optional: before servers and the engine start
        lab.add_node(...)           # extra nodes/links/processes (all removed at close)
        return {"anything": "the run function needs"}   # -> ctx.state["route-shape"]

    def run(c: Ctx) -> list[Check]:  # drive traffic, return what was observed
        got = c.lab.tcp_connect("client", c.lab.addr("server"), 8080)
        return [Check(f"client -> server: {got}", got == "ok")]

    register(Scenario("route-shape", "route shaping: ...", "one line for the summary",
                      hooks=("PREROUTING", "FORWARD"), run=run, setup=setup,
                      groups=("route-shape",), options=lambda lab: {"some_option": "value"}))

Fields: ``key`` (unique, also selectable), ``title``/``description`` (shown), ``hooks`` (the
hooks its traffic must cross: the result fails if the engine's metrics do not show them),
``run(ctx) -> list[Check]`` (every Check false or an exception fails the scenario; other
scenarios still run), ``groups`` (default ``("standard",)``: part of the default set),
``setup(lab, ports)`` (optional, its return value is ``ctx.state[key]``), ``options(lab)``
(optional: policy options passed to the engine with ``--set``, only those the policy
declares; the user's ``--set`` wins), ``needs`` (names in nfhooks.verdict it depends on).
``ctx`` (:class:`Ctx`) gives the lab (``ctx.lab.exec/popen/tcp_connect/udp_send/ping/addr``),
the engine, the metrics scraper (``ctx.scraper.scrape()`` -> :class:`Snapshot`), the policy's
ports/options (``ctx.ports``), the standard servers (``ctx.servers``), ``ctx.progress(text)``
for the progress line and ``ctx.add_table(title, columns, rows)`` for an extra table in the
summary (and in ``--json``). Which hooks a scenario crossed, with which verdicts, is
measured around ``run`` by the runner itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..hooks import HOOK_DOC, HOOKS, decision_table
from ..metrics import DEFAULT_METRICS_ADDR, parse_listen_addr
from .topology import ID_PREFIX_ENV, NS_MARKER, EngineProc, Lab, TcpServer, cleanup_stale

__all__ = ["Check", "Ctx", "LabConfig", "PLUGINS", "SCENARIOS", "Scenario", "down", "exec_in_node",
           "register", "run", "select"]

#: Where a kept lab (``--keep``) is recorded for ``lab exec`` / ``lab down``.
STATE_DIR = Path(os.environ.get("NFHOOKS_LAB_STATE_DIR", "/run/nfhooks-lab"))
#: One kept lab per NFHOOKS_LAB_PREFIX: people sharing a machine each have their own.
STATE_FILE = STATE_DIR / (f"current-{os.environ[ID_PREFIX_ENV]}.json"
                          if os.environ.get(ID_PREFIX_ENV) else "current.json")
#: Lab ids of `nfhooks lab` runs carry this tag, so `lab down` only ever clears lab runs
#: (test suites' labs use plain hex ids, which never contain an "l").
RUN_TAG = "lab"
DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "lab.py"

# Ports the lab's servers listen on; the router's ones come from the policy's options.
WEB_PORT = 8080      # server (and client, for the WAN -> LAN attempt)
HTTP_PORT = 80       # server: the classic OUTPUT drop; proxy: DNATed to PROXY_PORT
PROXY_PORT = 8080    # proxy: where the router's HTTP to the proxy is DNATed
CONNECT_TIMEOUT = 1.0  # for connections that are expected to be dropped
SCRAPE_INTERVAL = 0.5
_EXIT_SIGTERM = 128 + signal.SIGTERM

#: Kernel counters (``nstat``) that explain a dropped packet.
_KERNEL_DROP_RE = re.compile(r"Err|Csum|Trunc|Discard|Drop|Invalid|Bad")


@dataclass
class LabConfig:
    """What the user asked for on the command line."""

    policy: Path | None = None
    sets: list[str] = field(default_factory=list)
    duration: float = 5.0
    metrics_addr: str = DEFAULT_METRICS_ADDR
    keep: bool = False
    #: passed through to the engine as ``nfhooks run --pcap FILE``
    pcap: Path | None = None
    #: print the summary as JSON on stdout (everything else goes to stderr)
    json: bool = False
    #: scenario keys or groups (empty: "standard")
    scenarios: list[str] = field(default_factory=list)


class LabError(Exception):
    """A problem the user can fix (not root, bad policy, a kept lab in the way); exit 2."""


# --------------------------------------------------------------------------- metrics


Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Snapshot:
    """One scrape of the engine's /metrics: (sample name, sorted labels) -> value."""

    samples: Mapping[Key, float]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[Key, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
        return cls(out)

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(dict(k[1]), v) for k, v in self.samples.items() if k[0] == name]

    def minus(self, earlier: Snapshot, name: str) -> list[tuple[dict[str, str], float]]:
        """Series of `name` that grew since `earlier`, with their increase."""
        return [(labels, v - earlier.samples.get((name, tuple(sorted(labels.items()))), 0.0))
                for labels, v in self.series(name)
                if v - earlier.samples.get((name, tuple(sorted(labels.items()))), 0.0) > 0]


EMPTY = Snapshot({})


class Scraper:
    """Scrapes the engine's metrics inside the router namespace (they listen on loopback
    there) and keeps the latest snapshot for the live table."""

    def __init__(self, lab: Lab, url: str) -> None:
        self.lab, self.url = lab, url
        self.latest = EMPTY
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scrape(self) -> Snapshot:
        cp = self.lab.exec("router", "curl", "-s", "-m", "2", self.url, check=False, timeout=5)
        if cp.returncode or not cp.stdout:
            raise RuntimeError(f"cannot scrape {self.url} in the router namespace: "
                               f"curl exited {cp.returncode} {cp.stderr.strip()}")
        snap = Snapshot.parse(cp.stdout)
        self.latest = snap
        return snap

    def start(self) -> None:
        """Background scraping for the live table (errors only leave the table stale)."""
        def loop() -> None:
            while not self._stop.wait(SCRAPE_INTERVAL):
                try:
                    self.scrape()
                except Exception:  # noqa: BLE001 -- the live view must never end the run
                    pass
        self._thread = threading.Thread(target=loop, name="lab-scraper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def kernel_counters(lab: Lab, node: str = "router") -> dict[str, int]:
    """The node's SNMP/netstat counters (``nstat -asz``: absolute, zeros too, no history)."""
    out = lab.exec(node, "nstat", "-asz", timeout=5).stdout
    counters: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            counters[parts[0]] = int(parts[1])
    return counters


_DEFAULT_RULE_RE = re.compile(r'^\[(\d+):\d+\] -A NFH-(\w+) .*--comment "nfhooks default"')
#: The handler label for a hook default carried out by the kernel rule (never queued).
KERNEL_DEFAULT = "(default rule)"


def default_rule_counts(lab: Lab, node: str = "router") -> dict[str, int]:
    """Packets per hook that no handler queued and the hook's default rule decided, in the
    kernel: the engine never sees those, so its metrics cannot count them."""
    counts: dict[str, int] = {}
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        out = lab.exec(node, tool, "-c", check=False, timeout=5).stdout
        for line in out.splitlines():
            m = _DEFAULT_RULE_RE.match(line)
            if m:
                counts[m.group(2)] = counts.get(m.group(2), 0) + int(m.group(1))
    return counts


def _default_verdicts(before: Mapping[str, int], after: Mapping[str, int],
                      defaults: Mapping[str, str]) -> list[tuple[dict[str, str], float]]:
    return [({"hook": h, "handler": KERNEL_DEFAULT, "verdict": defaults.get(h, "drop")}, float(n - before.get(h, 0)))
            for h, n in after.items() if n > before.get(h, 0)]


def _kernel_drops(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items()
            if v != before.get(k, 0) and _KERNEL_DROP_RE.search(k)}


# --------------------------------------------------------------------------- scenarios


@dataclass
class Check:
    """One observation of a scenario: what happened and whether it is what should."""

    text: str
    ok: bool


@dataclass
class Ctx:
    """What scenario functions get: the lab, its engine, servers and the policy's ports."""

    lab: Lab
    engine: EngineProc
    scraper: Scraper
    cfg: LabConfig
    ports: dict[str, int]
    servers: dict[str, TcpServer] = field(default_factory=dict)
    #: handlers that only see loopback (the lab's own scrapes): left out of the evidence
    skip: set[str] = field(default_factory=set)
    #: the policy's default verdict per hook (for the kernel's default-rule counters)
    defaults: dict[str, str] = field(default_factory=dict)
    #: extra rows a scenario wants shown in the summary (the malformed packets' table)
    rows: list[tuple[str, ...]] = field(default_factory=list)
    progress: Callable[[str], None] = lambda _text: None
    #: what each scenario's setup returned, by scenario key
    state: dict[str, Any] = field(default_factory=dict)
    #: extra tables of the current scenario: (title, columns, rows)
    tables: list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]] = field(default_factory=list)

    def add_table(self, title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
        """An extra table for the summary (and --json), e.g. the packets a scenario captured."""
        self.tables.append((title, tuple(columns), [tuple(map(str, r)) for r in rows]))


@dataclass(frozen=True)
class Scenario:
    """Traffic as data: write its function and `register` it (see the module docstring).

    `needs` names verdict factories of nfhooks.verdict the scenario depends on; while one is
    missing (or `run` is None) the scenario is listed as "not yet" instead of run.
    """

    key: str
    title: str
    description: str
    hooks: tuple[str, ...]
    run: Callable[[Ctx], list[Check]] | None
    needs: tuple[str, ...] = ()
    groups: tuple[str, ...] = ("standard",)
    setup: Callable[[Lab, Mapping[str, Any]], Any] | None = None
    options: Callable[[Lab], Mapping[str, str]] | None = None

    def missing(self) -> list[str]:
        from .. import verdict

        return [n for n in self.needs if not hasattr(verdict, n)]

    @property
    def ready(self) -> bool:
        return self.run is not None and not self.missing()


def _fam(f: int) -> str:
    return f"IPv{f}"


def _both(fn: Callable[[int], Check]) -> list[Check]:
    """Run a per-family check for IPv4 and IPv6 at once (timeouts overlap)."""
    with ThreadPoolExecutor(2) as ex:
        return list(ex.map(fn, (4, 6)))


def _connect(c: Ctx, src: str, dst: str, port: int, family: int, want: str,
             timeout: float = 2.0, dst_addr: str | None = None) -> Check:
    addr = dst_addr or c.lab.addr(dst, family)
    got = c.lab.tcp_connect(src, addr, port, timeout=timeout)
    shown = f"[{addr}]" if ":" in addr else addr
    return Check(f"{_fam(family)} {src} → {dst} {shown}:{port}: {got}"
                 + ("" if got == want else f" (expected {want})"), got == want)


def _peer_seen(c: Ctx, server: str, peer: str, family: int) -> Check:
    srv = c.servers[f"{server}{family}"]
    want = c.lab.addr(peer, family)
    try:
        peers = c.lab.wait_for(lambda: want in srv.log_peers(), timeout=3,
                               what=f"{want} in {srv}'s log")
    except TimeoutError:
        peers = False
    seen = srv.log_peers()[-1] if srv.log_peers() else "nobody"
    return Check(f"{_fam(family)} {server} saw the connection from {seen}"
                 + (f" (the {peer}: no NAT)" if peers else f" (expected {want})"), bool(peers))


def forwarded(c: Ctx) -> list[Check]:
    checks = _both(lambda f: _connect(c, "client", "server", WEB_PORT, f, "ok"))
    return checks + _both(lambda f: _peer_seen(c, "server", "client", f))


def to_router(c: Ctx) -> list[Check]:
    port = c.ports["service_port"]
    checks = _both(lambda f: _connect(c, "client", "router", port, f, "ok"))

    def ping(f: int) -> Check:
        ok = c.lab.ping("client", c.lab.addr("router", f), timeout=2)
        return Check(f"{_fam(f)} client pings router {c.lab.addr('router', f)}: "
                     f"{'reply' if ok else 'no reply'}", ok)
    return checks + _both(ping)


def from_router(c: Ctx) -> list[Check]:
    return _both(lambda f: _connect(c, "router", "server", WEB_PORT, f, "ok"))


def seed_output_drop(c: Ctx) -> list[Check]:
    port = c.ports["web_port"]
    checks = _both(lambda f: _connect(c, "router", "server", port, f, "timeout",
                                      timeout=CONNECT_TIMEOUT))
    routers = {c.lab.addr("router", f, facing="server") for f in (4, 6)}
    leaked = [p for f in (4, 6) for p in c.servers[f"http{f}"].log_peers() if p in routers]
    checks.append(Check(f"server port {port} got {len(leaked)} connection(s) from the router",
                        not leaked))
    # The same port from the client is forwarded traffic: OUTPUT is not involved.
    checks.append(_connect(c, "client", "server", port, 4, "ok"))
    return checks


_UDP_PROBE = r"""
import errno, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2.0)
s.connect((host, port))
s.send(b"nfhooks-lab")
try:
    s.recv(100)
    print("answer")
except TimeoutError:
    print("timeout")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"""


def rejected(c: Ctx) -> list[Check]:
    tport, uport = c.ports["reject_port"], c.ports["reject_udp_port"]
    checks = _both(lambda f: _connect(c, "client", "router", tport, f, "refused"))

    def udp(f: int) -> Check:
        addr = c.lab.addr("router", f)
        got = c.lab.exec("client", sys.executable, "-c", _UDP_PROBE, addr, uport).stdout.strip()
        return Check(f"{_fam(f)} client → router udp {addr}:{uport}: {got}"
                     + (" (ICMP port unreachable)" if got == "ECONNREFUSED" else " (expected ECONNREFUSED)"),
                     got == "ECONNREFUSED")
    checks += _both(udp)
    checks.append(Check(f"(a server listens on router tcp {tport} and udp {uport}: "
                        "the refusal comes from the policy, not a closed port)", True))
    return checks


def wan_to_lan(c: Ctx) -> list[Check]:
    checks = _both(lambda f: _connect(c, "server", "client", WEB_PORT, f, "timeout",
                                      timeout=CONNECT_TIMEOUT))
    got = [p for f in (4, 6) for p in c.servers[f"client{f}"].log_peers()]
    checks.append(Check(f"client's server got {len(got)} connection(s) from the WAN", not got))
    return checks


def masqueraded(c: Ctx) -> list[Check]:
    """Source NAT: the server must see the router's WAN address, never the client's."""
    port = c.ports["nat_port"]
    checks = _both(lambda f: _connect(c, "client", "server", port, f, "ok"))

    def seen(f: int) -> Check:
        srv, want = c.servers[f"nat{f}"], c.lab.addr("router", f, facing="server")
        try:
            c.lab.wait_for(lambda: srv.log_peers(), timeout=3, what=f"a connection logged by {srv}")
        except TimeoutError:
            pass
        peers = srv.log_peers()
        return Check(f"{_fam(f)} server port {port} saw {', '.join(peers) or 'nobody'} "
                     f"(the router's WAN address is {want})", bool(peers) and set(peers) == {want})
    return checks + _both(seen)


def steady(c: Ctx) -> list[Check]:
    """Mixed traffic for --duration seconds, so the live table moves and every hook counts."""
    flows: list[tuple[str, str, int]] = [
        ("client", "server", WEB_PORT), ("client", "router", c.ports["service_port"]),
        ("router", "server", WEB_PORT)]
    deadline = time.monotonic() + c.cfg.duration
    done = failed = 0
    i = 0
    while True:
        src, dst, port = flows[i % len(flows)]
        fam = 4 if (i // len(flows)) % 2 == 0 else 6
        got = c.lab.tcp_connect(src, c.lab.addr(dst, fam), port)
        done += 1
        failed += got != "ok"
        i += 1
        left = deadline - time.monotonic()
        c.progress(f"{done} connections, {max(left, 0):.0f}s left")
        if left <= 0 and i >= 2 * len(flows):  # every flow in both families at least once
            break
    return [Check(f"{done - failed}/{done} connections ok over {c.cfg.duration:g}s "
                  "(client → server, client → router, router → server; IPv4 and IPv6)", not failed)]


# -- raw packets ------------------------------------------------------------------------------

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
                  _kernel_drops(before[1], kern))


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
    checks.append(_connect(c, "client", "server", WEB_PORT, 4, "ok"))
    return checks



# -- NAT, mangling, forwarding off ----------------------------------------------------------------

def _fetch(c: Ctx, node: str, addr: str, port: int, timeout: float = 3.0) -> str:
    """The body of http://addr:port/ fetched with curl in `node` ("" if nothing came)."""
    host = f"[{addr}]" if ":" in addr else addr
    cp = c.lab.exec(node, "curl", "-s", "-g", "-m", f"{timeout:g}", f"http://{host}:{port}/",
                    check=False, timeout=timeout + 5)
    return cp.stdout.strip()


def dnat_local(c: Ctx) -> list[Check]:
    """The second classic example: the router's own HTTP to the proxy's port 80 (nothing
    listens there) is DNATed at OUTPUT to the proxy's 8080, whose page comes back; at the
    same time HTTP to the server (the drop's destination) still times out."""
    port = c.ports["web_port"]

    def fetch(f: int) -> Check:
        addr = c.lab.addr("proxy", f)
        body = _fetch(c, "router", addr, port)
        shown = f"[{addr}]" if f == 6 else addr
        return Check(f"{_fam(f)} router fetches http://{shown}:{port}/ → {body or 'nothing'!r} "
                     f"(DNAT to the proxy's {PROXY_PORT})", body == "nfhooks-lab proxy")
    checks = _both(fetch)

    def peer(f: int) -> Check:
        srv, want = c.servers[f"proxy{f}"], c.lab.addr("router", f, facing="proxy")
        try:
            c.lab.wait_for(lambda: want in srv.log_peers(), timeout=3, what="the router in the proxy's log")
        except TimeoutError:
            pass
        return Check(f"{_fam(f)} proxy port {PROXY_PORT} saw {', '.join(srv.log_peers()) or 'nobody'}",
                     want in srv.log_peers())
    checks += _both(peer)
    checks += _both(lambda f: _connect(c, "router", "server", port, f, "timeout", timeout=CONNECT_TIMEOUT))
    return checks


def port_forward(c: Ctx) -> list[Check]:
    """DNAT at PREROUTING: the server connects to the router's WAN address and port and
    reaches the client's service; the client sees the server's own address (no SNAT)."""
    port = c.ports["forward_port"]
    checks = _both(lambda f: _connect(c, "server", "router", port, f, "ok",
                                      dst_addr=c.lab.addr("router", f, facing="server")))

    def seen(f: int) -> Check:
        srv, want = c.servers[f"forward{f}"], c.lab.addr("server", f)
        try:
            c.lab.wait_for(lambda: want in srv.log_peers(), timeout=3, what=f"{want} in {srv}'s log")
        except TimeoutError:
            pass
        return Check(f"{_fam(f)} client port {port} (behind the router) saw "
                     f"{', '.join(srv.log_peers()) or 'nobody'} (the server is {want})",
                     want in srv.log_peers())
    return checks + _both(seen)


# A UDP receiver that reports the TTL / hop limit and TOS / traffic class of each datagram
# as the receiving host's kernel saw them (IP_RECVTTL/IP_RECVTOS, IPV6_RECVHOPLIMIT/
# IPV6_RECVTCLASS ancillary data), and echoes it so the sender returns at once.
_TTL_RECEIVER = r"""
import json, select, socket, sys
fam, host, log_path, ready = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
ports = [int(p) for p in sys.argv[5:]]
v6 = fam == "6"
socks = []
for port in ports:
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    if v6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
        s.setsockopt(socket.IPPROTO_IPV6, getattr(socket, "IPV6_RECVTCLASS", 66), 1)
    else:
        s.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_RECVTTL", 12), 1)
        s.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_RECVTOS", 13), 1)
    s.bind((host, port))
    socks.append((s, port))
log = open(log_path, "a", buffering=1)
open(ready, "w").close()
while True:
    readable = select.select([x for x, _ in socks], [], [])[0]
    for s, port in socks:
        if s not in readable:
            continue
        data, anc, _flags, peer = s.recvmsg(2048, 256)
        rec = {"port": port, "peer": peer[0], "ttl": None, "tos": None}
        for level, typ, raw in anc:
            val = int.from_bytes(raw[:4], sys.byteorder) if len(raw) >= 4 else raw[0]
            if typ in (getattr(socket, "IP_TTL", 2), getattr(socket, "IPV6_HOPLIMIT", 52)):
                rec["ttl"] = val
            else:
                rec["tos"] = val & 0xFF
        log.write(json.dumps(rec) + "\n")
        s.sendto(data, peer)
"""


def _ttl_receiver(lab: Lab, node: str, family: int, ports: Sequence[int]) -> Path:
    base = lab.tmpdir / f"ttl-{node}-{family}"
    log, ready = base.with_suffix(".jsonl"), base.with_suffix(".ready")
    proc = lab.popen(node, sys.executable, "-c", _TTL_RECEIVER, family, lab.addr(node, family), log,
                     ready, *ports, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the TTL receiver in {node} exited with {proc.returncode}")
        return ready.exists()
    lab.wait_for(up, timeout=10, what=f"the TTL receiver in {node}")
    return log


def _records(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def mangled(c: Ctx) -> list[Check]:
    """set_ttl | set_dscp at POSTROUTING on UDP to mangle_port, as the server's kernel
    reports them; a datagram to the next port (not matched) shows the untouched values."""
    port, ttl, dscp = c.ports["mangle_port"], int(c.ports["mangle_ttl"]), int(c.ports["mangle_dscp"])
    control = port + 1
    logs = c.state.get("mangle") or {}
    checks: list[Check] = []
    rows = []
    for f in (4, 6):
        log = logs[f]
        for p in (port, control):
            c.lab.udp_send("client", c.lab.addr("server", f), p, b"nfhooks-lab mangle", timeout=2)
        def both(log: Path = log) -> bool:
            return len({x["port"] for x in _records(log)}) >= 2
        try:
            c.lab.wait_for(both, timeout=3, what="both datagrams at the receiver")
        except TimeoutError:
            pass
        recs = _records(log)
        got = {r["port"]: r for r in recs}
        m, k = got.get(port, {}), got.get(control, {})
        ttl_name = "TTL" if f == 4 else "hop limit"
        m_dscp = None if m.get("tos") is None else m["tos"] >> 2
        k_dscp = None if k.get("tos") is None else k["tos"] >> 2
        rows.append((_fam(f), f"udp {port} (marked)", str(m.get("ttl")), str(m_dscp), str(m.get("tos"))))
        rows.append((_fam(f), f"udp {control} (control)", str(k.get("ttl")), str(k_dscp), str(k.get("tos"))))
        checks.append(Check(f"{_fam(f)} server received udp {port} with {ttl_name} {m.get('ttl')} and "
                            f"DSCP {m_dscp} (the policy sets {ttl} and {dscp})",
                            m.get("ttl") == ttl and m_dscp == dscp))
        checks.append(Check(f"{_fam(f)} server received udp {control} (not matched) with {ttl_name} "
                            f"{k.get('ttl')} and DSCP {k_dscp} (64 minus the router's hop, DSCP 0)",
                            k.get("ttl") == 63 and k_dscp == 0))
    c.add_table("mangling: what the server's kernel saw (IP_RECVTTL/IP_RECVTOS, IPV6_RECVHOPLIMIT/TCLASS)",
                ("family", "datagram", "TTL / hop limit", "DSCP", "TOS byte"), rows)
    return checks


def mangle_setup(lab: Lab, ports: Mapping[str, Any]) -> dict[int, Path]:
    p = int(ports["mangle_port"])
    return {f: _ttl_receiver(lab, "server", f, (p, p + 1)) for f in (4, 6)}


def _hook_packets(c: Ctx, hook: str) -> float:
    """Every packet the engine and the hook's default rule saw at `hook` so far."""
    snap = c.scraper.scrape()
    queued = sum(v for l, v in snap.series("nfhooks_packets_total") if l["hook"] == hook)
    return queued + default_rule_counts(c.lab).get(hook, 0)


def forwarding_off(c: Ctx) -> list[Check]:
    """net.ipv4.ip_forward=0 in the router's namespace: the routing decision (after
    PREROUTING) has nowhere to send a packet for another host, so FORWARD never sees it."""
    server = c.lab.addr("server", 4)
    checks: list[Check] = []
    pre0, fwd0 = _hook_packets(c, "PREROUTING"), _hook_packets(c, "FORWARD")
    c.lab.sysctl("router", {"net.ipv4.ip_forward": 0})
    try:
        c.progress("ip_forward=0")
        got = c.lab.tcp_connect("client", server, WEB_PORT, timeout=CONNECT_TIMEOUT)
        pre1, fwd1 = _hook_packets(c, "PREROUTING"), _hook_packets(c, "FORWARD")
    finally:
        c.lab.sysctl("router", {"net.ipv4.ip_forward": 1})
    checks.append(Check(f"ip_forward=0: IPv4 client → server {server}:{WEB_PORT}: {got} "
                        "(not ok: the router does not route)", got != "ok"))
    checks.append(Check(f"ip_forward=0: PREROUTING +{pre1 - pre0:g} packets, FORWARD +{fwd1 - fwd0:g} "
                        "(must stay 0)", fwd1 == fwd0 and pre1 > pre0))
    c.progress("ip_forward=1")
    got = c.lab.tcp_connect("client", server, WEB_PORT)
    fwd2 = _hook_packets(c, "FORWARD")
    checks.append(Check(f"ip_forward=1 again: client → server: {got}, FORWARD +{fwd2 - fwd1:g}",
                        got == "ok" and fwd2 > fwd1))
    return checks

#: The lab's traffic, in order (see the module docstring: `register` adds to it).
SCENARIOS: list[Scenario] = [
    Scenario("forwarded", "forwarded: client → server",
             "the client's connection is routed through the router", ("PREROUTING", "FORWARD", "POSTROUTING"),
             forwarded),
    Scenario("to-router", "to the router: client → router",
             "the router's own service port, and ping", ("PREROUTING", "INPUT"), to_router),
    Scenario("from-router", "from the router: router → server",
             "the router opens a connection itself", ("OUTPUT", "POSTROUTING"), from_router),
    Scenario("output-drop", "classic example: router's own HTTP to port 80 dropped at OUTPUT",
             "locally generated tcp/80 vanishes; the client's tcp/80 is forwarded and works",
             ("OUTPUT",), seed_output_drop),
    Scenario("reject", "reject: refused ports on the router",
             "TCP reset and ICMP port unreachable, sent by the policy's reject()",
             ("PREROUTING", "INPUT"), rejected),
    Scenario("wan-to-lan", "default drop: WAN → LAN",
             "the server cannot open connections to the client (FORWARD default drop)",
             ("PREROUTING", "FORWARD"), wan_to_lan),
    Scenario("malformed", "raw packets: malformed frames from the client (scapy, AF_PACKET)",
             "bad header lengths, truncated TCP, bad checksums, odd flags; then a normal connection",
             ("PREROUTING",), malformed),
    Scenario("steady", "steady traffic for --duration seconds",
             "connections across all five hooks while the live table updates",
             HOOKS, steady),
    Scenario("masquerade", "NAT: masquerade client → server (nat_port)",
             "the server sees the router's WAN address instead of the client's",
             ("PREROUTING", "FORWARD", "POSTROUTING"), masqueraded, needs=("masquerade",)),
    Scenario("dnat-local", "classic example: router's own HTTP to port 80 → proxy:8080 (DNAT at OUTPUT)",
             "HTTP to the proxy's address is DNATed to its 8080 and returns its page; HTTP to the "
             "server (drop_dst) still times out", ("OUTPUT", "POSTROUTING"), dnat_local, needs=("dnat",)),
    Scenario("port-forward", "NAT: a port forward WAN → client (DNAT at PREROUTING)",
             "the server reaches the client's service via the router's WAN address and forward_port",
             ("PREROUTING", "FORWARD", "POSTROUTING"), port_forward, needs=("dnat",)),
    Scenario("mangle", "mangling: TTL and DSCP set at POSTROUTING",
             "client → server UDP to mangle_port; the server's kernel reports the TTL/hop limit and DSCP",
             ("PREROUTING", "FORWARD", "POSTROUTING"), mangled, needs=("set_ttl", "set_dscp"),
             setup=mangle_setup),
    Scenario("forwarding-off", "forwarding off: net.ipv4.ip_forward=0 on the router",
             "forwarded packets stop after PREROUTING and never reach FORWARD; then forwarding is on again",
             ("PREROUTING", "FORWARD"), forwarding_off),
]

#: Modules that register scenarios of their own when imported (see the module docstring);
#: one that does not exist (yet) is skipped.
PLUGINS: list[str] = ["nfhooks.lab.vpn", "nfhooks.lab.routeshape"]
_plugins_loaded = False


def register(scenario: Scenario) -> Scenario:
    """Add a scenario to the registry (replacing one with the same key); returns it."""
    for i, sc in enumerate(SCENARIOS):
        if sc.key == scenario.key:
            SCENARIOS[i] = scenario
            return scenario
    SCENARIOS.append(scenario)
    return scenario


def load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import importlib

    for name in PLUGINS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # the module exists but something it imports does not
                raise


def _ordered() -> list[Scenario]:
    """The registry in a fixed order, whatever imported a plugin first: the built-in scenarios
    as defined, then each plugin's in PLUGINS order."""
    def rank(sc: Scenario) -> int:
        mod = getattr(sc.run or sc.setup, "__module__", __name__)
        return PLUGINS.index(mod) + 1 if mod in PLUGINS else 0

    return sorted(SCENARIOS, key=rank)


def groups() -> dict[str, list[str]]:
    """Group name -> scenario keys ("all" included)."""
    load_plugins()
    out: dict[str, list[str]] = {}
    for sc in _ordered():
        for g in sc.groups:
            out.setdefault(g, []).append(sc.key)
    out["all"] = [sc.key for sc in _ordered()]
    return out


def select(names: Sequence[str]) -> list[Scenario]:
    """The scenarios `--scenario NAME...` asks for (keys or groups; none: "standard"),
    in registry order. Unknown names are a LabError listing what exists."""
    load_plugins()
    wanted = [n for name in (names or ["standard"]) for n in name.split(",") if n.strip()]
    g = groups()
    keys = {sc.key for sc in SCENARIOS}
    unknown = [n for n in wanted if n not in g and n not in keys]
    if unknown:
        raise LabError(f"unknown scenario {', '.join(map(repr, unknown))}: groups "
                       f"{', '.join(sorted(g))}; scenarios {', '.join(sc.key for sc in SCENARIOS)}")
    chosen = {k for n in wanted for k in (g.get(n) or [n])}
    return [sc for sc in _ordered() if sc.key in chosen]


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    scenario: Scenario
    checks: list[Check]
    verdicts: list[tuple[dict[str, str], float]]
    seconds: float
    rows: list[tuple[str, ...]] = field(default_factory=list)
    error: str | None = None
    tables: list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]] = field(default_factory=list)
    #: the expected hooks are the lab policy's; another policy (--policy) may have no handler
    #: at some of them, so a hook no handler saw is then a note, not a failure
    strict_hooks: bool = True

    @property
    def crossed(self) -> list[str]:
        seen = {l["hook"] for l, _ in self.verdicts}
        return [h for h in HOOKS if h in seen]

    @property
    def missing_hooks(self) -> list[str]:
        return [h for h in self.scenario.hooks if h not in self.crossed]

    @property
    def ok(self) -> bool:
        return self.error is None and all(c.ok for c in self.checks) and not (
            self.strict_hooks and self.missing_hooks)


def _run_one(ctx: Ctx, sc: Scenario, skip: set[str]) -> Result:
    assert sc.run is not None
    ctx.rows = []
    ctx.tables = []
    before, rules_before = ctx.scraper.scrape(), default_rule_counts(ctx.lab)
    t0 = time.monotonic()
    try:
        checks, error = sc.run(ctx), None
    except Exception as exc:  # noqa: BLE001 -- one broken scenario must not hide the others
        checks, error = [], f"{type(exc).__name__}: {exc}"
    seconds = time.monotonic() - t0
    after = ctx.scraper.scrape()
    verdicts = [(l, v) for l, v in after.minus(before, "nfhooks_handler_packets_total")
                if l["handler"] not in skip]
    verdicts += _default_verdicts(rules_before, default_rule_counts(ctx.lab), ctx.defaults)
    strict = Path(ctx.cfg.policy).resolve() == DEFAULT_POLICY if ctx.cfg.policy else True
    return Result(sc, checks, verdicts, seconds, list(ctx.rows), error, list(ctx.tables), strict)


# --------------------------------------------------------------------------- rendering


def _verdict_text(verdicts: Iterable[tuple[dict[str, str], float]], hook: str) -> str:
    parts = [f"{l['handler']}:{l['verdict']} {v:g}" for l, v in verdicts if l["hook"] == hook]
    return ", ".join(sorted(parts))


#: Colours of the per-hook table: what the verdict does to the packet.
VERDICT_STYLE = {"accept": "green", "drop": "bold red", "reject": "yellow", "mark": "blue",
                 "connmark": "blue", "mangle": "magenta", "dnat": "cyan", "snat": "cyan",
                 "masquerade": "cyan", "redirect": "cyan", "nat": "cyan"}
HOOK_STYLE = "bold"


def _vtext(verdict: str) -> Text:
    return Text(verdict, style=VERDICT_STYLE.get(verdict, ""))


def hook_table(snap: Snapshot, rules: Sequence[tuple[dict[str, str], float]] = (),
               title: str = "per-hook verdicts") -> Table:
    """hook x table x verdict packet and byte counts, like `iptables -L -v`, plus which
    handlers gave them; `rules` adds the defaults the kernel's rules gave (never queued)."""
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for col, just in (("hook", "left"), ("table", "left"), ("verdict", "left"),
                      ("pkts", "right"), ("bytes", "right"), ("handlers", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    packets = {(l["hook"], l["table"], l["verdict"]): v for l, v in snap.series("nfhooks_packets_total")}
    nbytes = {(l["hook"], l["table"], l["verdict"]): v for l, v in snap.series("nfhooks_bytes_total")}
    handlers = snap.series("nfhooks_handler_packets_total")
    for hook in HOOKS:
        rows = sorted((k, v) for k, v in packets.items() if k[0] == hook and v > 0)
        kernel = [(l, v) for l, v in rules if l["hook"] == hook]
        if not rows and not kernel:
            t.add_row(hook, "-", "-", "0", "0", Text("nothing queued here", style="dim"))
        for (h, table, verdict), v in rows:
            names = ", ".join(f"{l['handler']} {n:g}" for l, n in sorted(handlers, key=lambda x: -x[1])
                              if l["hook"] == h and l["verdict"] == verdict and n > 0)
            t.add_row(Text(h, style=HOOK_STYLE), table, _vtext(verdict), f"{v:g}",
                      f"{nbytes.get((h, table, verdict), 0):.0f}", names)
        for l, v in kernel:
            t.add_row(Text(hook, style=HOOK_STYLE), decision_table(hook), _vtext(l["verdict"]), f"{v:g}", "",
                      Text("(default rule) in the kernel: no handler queued these", style="dim"))
    return t


class LiveView:
    """Progress plus the per-hook table from the latest scrape, re-rendered by rich.live."""

    def __init__(self, progress: Progress, scraper: Scraper) -> None:
        self.progress, self.scraper = progress, scraper

    def __rich__(self) -> RenderableType:
        return Group(self.progress, hook_table(self.scraper.latest, title="live: per-hook verdicts"))


def _topology_table(lab: Lab) -> Table:
    roles = {"client": "the private LAN's host (default route: the router)",
             "router": "forwarding on; runs the engine and the lab policy",
             "switch": "a bridge for the WAN segment (no addresses)",
             "server": "outside: web servers on 8080 and 80",
             "proxy": "outside: the NAT scenarios' target (web server on 8080)",
             "gw_b": "office B's gateway (vpn): the tunnel's other end",
             "host_b": "office B's host (vpn): web server on 8080"}
    t = Table(title=f"topology: client --lan-- router --wan-- switch(br0) -- server, proxy "
                    f"(lan {lab.networks['lan'][4]} {lab.networks['lan'][6]}, "
                    f"wan {lab.networks['wan'][4]} {lab.networks['wan'][6]})",
              box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("node", "namespace", "addresses", "role"):
        t.add_column(col)
    if "lan_b" in lab.networks:
        t.title = str(t.title) + (f"; vpn: office B lan_b {lab.networks['lan_b'][4]} {lab.networks['lan_b'][6]}"
                                  " behind gw_b, joined to the lan by tun0")
    for name, node in lab.nodes.items():
        addrs = " ".join(node.addrs.get(4, []) + node.addrs.get(6, [])) or "-"
        t.add_row(name, node.ns, addrs, roles.get(name, ""))
    return t


def _scenario_table(results: Sequence[Result]) -> Table:
    t = Table(title="scenarios", box=box.SIMPLE_HEAD, title_justify="left", show_lines=True)
    for col in ("scenario", "hooks: expected → crossed (handler:verdict packets)", "observed", "result"):
        t.add_column(col)
    for r in results:
        hooks = Text()
        hooks.append("expected " + (", ".join(r.scenario.hooks) or "- (a lab of its own, see its tables)") + "\n",
                     style="dim")
        for h in r.crossed:
            hooks.append(f"{h}", style="bold" if h in r.scenario.hooks else "")
            hooks.append(f"  {_verdict_text(r.verdicts, h)}\n")
        for h in r.missing_hooks:
            hooks.append(f"{h}  no handler saw it\n" if r.strict_hooks else
                         f"{h}  no handler saw it (this policy may have none there)\n",
                         style="red" if r.strict_hooks else "yellow")
        observed = Text("\n".join(("✓ " if c.ok else "✗ ") + c.text for c in r.checks))
        if r.error:
            observed.append(f"\nerror: {r.error}", style="red")
        result = Text("PASS", style="green") if r.ok else Text("FAIL", style="bold red")
        title = Text(r.scenario.title + "\n")
        title.append(r.scenario.description, style="dim")
        t.add_row(title, hooks, observed,
                  Text.assemble(result, f"\n{r.seconds:.1f}s"))
    return t


def _malformed_table(rows: Sequence[tuple[str, ...]]) -> Table:
    t = Table(title="raw packets from the client (layer 2, to the router's MAC): what really happened",
              box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("packet", "what is wrong", "outcome (evidence)", ""):
        t.add_column(col)
    for row in rows:
        t.add_row(*(Text(cell) for cell in row))
    return t


def _hooks_explained(snap: Snapshot, rules: Sequence[tuple[dict[str, str], float]],
                     skip: set[str]) -> Table:
    t = Table(title="what happened at each hook (whole run)", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("hook", "sees", "the policy's verdicts (handler:verdict packets)"):
        t.add_column(col)
    series = [(l, v) for l, v in snap.series("nfhooks_handler_packets_total") if v > 0] + list(rules)
    for hook in HOOKS:
        text = _verdict_text(series, hook) or "nothing"
        if any(l["handler"] in skip and l["hook"] == hook for l, _ in series):
            text += "  (" + ", ".join(sorted(skip)) + ": the lab's own metric scrapes over lo)"
        t.add_row(hook, HOOK_DOC[hook], text)
    return t


def _metrics_panel(cfg: LabConfig, url: str, kept: bool, snap: Snapshot) -> Panel:
    malformed = sum(v for _, v in snap.series("nfhooks_malformed_packets_total"))
    p50 = _decision_summary(snap)
    where = "are" if kept else "were (the lab is gone now)"
    text = (f"The engine's Prometheus metrics {where} served inside the router namespace at {url}\n"
            f"  nfhooks lab exec router -- curl -s {url.removeprefix('http://')}   (with --keep)\n"
            "  nfhooks_packets_total{hook,table,verdict}      the per-hook table above\n"
            "  nfhooks_handler_packets_total{hook,handler,verdict}  who decided\n"
            f"  nfhooks_malformed_packets_total{{hook}}        {malformed:g} this run\n"
            f"  nfhooks_decision_seconds{{hook}}               {p50}\n"
            "  nfhooks_queue_kernel_dropped_packets_total     packets the kernel dropped (queue full)")
    if cfg.pcap:
        text += (f"\nEvery queued packet, with its hook, handler and verdict, was recorded by the engine in "
                 f"{Path(cfg.pcap).resolve()} (open it with wireshark or tcpdump -r)")
    return Panel(text, title="metrics", title_align="left")


def _decision_summary(snap: Snapshot) -> str:
    count = sum(v for _, v in snap.series("nfhooks_decision_seconds_count"))
    total = sum(v for _, v in snap.series("nfhooks_decision_seconds_sum"))
    return f"{count:g} decisions, mean {total / count * 1e6:.0f} µs" if count else "no decisions"


def _nfhooks_cmd() -> str:
    """How to call nfhooks inside a node (the venv's script, which may not be on PATH)."""
    script = Path(sys.executable).parent / "nfhooks"
    return str(script) if script.exists() else f"{sys.executable} -m nfhooks"


def _next_panel(lab: Lab, kept: bool) -> Panel:
    server = lab.addr("server")
    if kept:
        text = (f"The lab {lab.id} is still up (engine and servers running):\n"
                f"  nfhooks lab exec client -- ping -c 3 {server}\n"
                f"  nfhooks lab exec client -- curl -s {server}:{WEB_PORT}\n"
                f"  nfhooks lab exec router -- {_nfhooks_cmd()} rules\n"
                f"  nfhooks lab exec router -- nstat -az IpInHdrErrors\n"
                f"  nfhooks lab down            # stops the engine, removes the namespaces")
    else:
        text = ("  nfhooks lab --keep                      # leave the lab up to explore it\n"
                "  nfhooks lab exec client -- ping -c 3 SERVER   (after --keep; it prints SERVER's address)\n"
                "  nfhooks lab --set service_port=2200     # the policy's options\n"
                "  nfhooks lab --policy my_policy.py       # your own policy on the same traffic\n"
                "  nfhooks lab --scenario vpn              # two offices joined by a tun tunnel (nfhooks tunnel)\n"
                "  nfhooks lab --scenario reject --json    # one scenario, the summary as JSON for scripts\n"
                "  nfhooks lab --pcap lab.pcapng           # record every queued packet with its verdict\n"
                "  nfhooks lab down                        # remove a kept lab or a crashed run's leftovers")
    return Panel(text, title="try next", title_align="left")


def _not_yet_panel(pending: Sequence[Scenario]) -> Panel | None:
    if not pending:
        return None
    lines = []
    for sc in pending:
        missing = sc.missing()
        why = (f"needs nfhooks.verdict.{', '.join(missing)} (NAT/mangle verdicts are being added)"
               if missing else "the verdicts exist now; its scenario and lab-policy handler are "
               "not written yet")
        lines.append(f"  not yet: {sc.key}: {sc.title} -- {why}")
    return Panel("\n".join(lines), title="TODO: not yet in the lab", title_align="left", style="yellow")


# --------------------------------------------------------------------------- the run


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty() or os.environ.get("COLUMNS"):
        return Console(stderr=stderr)
    return Console(width=160, stderr=stderr)


def _policy_ports(policy: Path, sets: list[str]) -> tuple[dict[str, int | str], Any]:
    """Load the policy here too: bad policies fail before any namespace exists, and the
    scenarios use the ports the policy was configured with."""
    from ..policy import PolicyError, load_policy, parse_sets

    try:
        pol = load_policy(policy, parse_sets(sets))
    except PolicyError as e:
        raise LabError(str(e)) from None
    defaults: dict[str, int | str] = {"service_port": 2222, "reject_port": 23,
                                      "reject_udp_port": 514, "web_port": HTTP_PORT, "nat_port": 8081,
                                      "forward_port": 8022, "mangle_port": 5060, "mangle_ttl": 33,
                                      "mangle_dscp": 46, "tunnel_port": 51820, "tun_if": "tun0"}
    for k in defaults:
        if k in pol.options:
            defaults[k] = pol.options[k].value
    return defaults, pol


def _lab_sets(lab: Lab, pol: Any, scenarios: Sequence[Scenario]) -> list[str]:
    """--set arguments for the lab's addresses, only for options the policy declares (the
    user's own --set come after them on the command line, so they win)."""
    a = lab.addr
    values: dict[str, str] = {
        "drop_dst": a("server", 4), "drop_dst6": a("server", 6),
        "dnat_dst": a("proxy", 4), "dnat_dst6": a("proxy", 6),
        "proxy": f"{a('proxy', 4)}:{PROXY_PORT}", "proxy6": f"[{a('proxy', 6)}]:{PROXY_PORT}",
        "inside": a("client", 4), "inside6": a("client", 6),
        "lan_if": lab.iface("router", "client"), "wan_if": lab.iface("router", "server"),
    }
    for sc in scenarios:
        if sc.options is not None:
            values.update(sc.options(lab))
    return [f"{k}={v}" for k, v in values.items() if k in pol.options]


def _loopback_handlers(pol: Any) -> set[str]:
    """Handlers that only see loopback traffic: the lab's own scrapes, not scenario traffic."""
    out = set()
    for h in pol.handlers:
        m = h.match
        if any(i is not None and i.name == "lo" and not i.negate for i in (m.iif, m.oif)) or any(
                a is not None and a.net.is_loopback and not a.negate for a in (m.src, m.dst)):
            out.add(h.name)
    return out


def _metrics_url(addr: str) -> str:
    host, port = parse_listen_addr(addr)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"


def _start_servers(lab: Lab, ports: Mapping[str, int | str]) -> dict[str, TcpServer]:
    """The services the scenarios talk to; the router listens on the reject ports too, so
    a refusal there can only come from the policy."""
    servers: dict[str, TcpServer] = {}
    for f in (4, 6):
        servers[f"server{f}"] = lab.tcp_server("server", WEB_PORT, f)
        servers[f"http{f}"] = lab.tcp_server("server", int(ports["web_port"]), f)
        servers[f"client{f}"] = lab.tcp_server("client", WEB_PORT, f)
        servers[f"service{f}"] = lab.tcp_server("router", int(ports["service_port"]), f)
        servers[f"refused{f}"] = lab.tcp_server("router", int(ports["reject_port"]), f)
        lab.udp_server("router", int(ports["reject_udp_port"]), f)
        servers[f"nat{f}"] = lab.tcp_server("server", int(ports["nat_port"]), f)
        servers[f"proxy{f}"] = lab.tcp_server("proxy", PROXY_PORT, f)
        servers[f"forward{f}"] = lab.tcp_server("client", int(ports["forward_port"]), f)
    return servers


def _warm_up(lab: Lab) -> None:
    """Ping along every path before the engine starts: proves the network, and fills the
    neighbour caches so that neighbour discovery does not show up in the scenarios."""
    pairs = [(s, d, f) for f in (4, 6)
             for s, d in (("client", "router"), ("client", "server"), ("router", "server"),
                          ("router", "proxy"))]
    with ThreadPoolExecutor(len(pairs)) as ex:
        results = list(ex.map(lambda p: (p, lab.ping(p[0], lab.addr(p[1], p[2]), timeout=2)), pairs))
    broken = [f"{s} → {d} IPv{f}" for (s, d, f), ok in results if not ok]
    if broken:
        raise RuntimeError(f"the lab network does not work before the engine starts: {', '.join(broken)}")


def _check_root() -> None:
    if os.geteuid() != 0:
        raise LabError("nfhooks lab builds network namespaces and installs iptables rules in them: "
                       "run it as root (sudo .venv/bin/nfhooks lab); nothing outside the lab is touched")


def _lab_id() -> str:
    import secrets

    return os.environ.get(ID_PREFIX_ENV, "") + RUN_TAG + secrets.token_hex(3)[:5]


_MAIN_PID = os.getpid()


def _on_sigterm(_signum: int, _frame: Any) -> None:
    if os.getpid() != _MAIN_PID:
        # A fork of this process (pyroute2 forks a helper for each IPRoute(netns=...) and
        # stops it with SIGTERM): it inherited this handler, but it must never unwind into
        # the run's `finally` and tear the lab down (that SIGKILLed the lab's tunnels).
        os._exit(_EXIT_SIGTERM)
    raise SystemExit(_EXIT_SIGTERM)  # unwinds through the finally that removes the lab


def run(cfg: LabConfig, console: Console | None = None) -> int:
    """The whole lab run; returns the exit status (0 all scenarios passed, 1 not, 2 setup).

    With ``cfg.json`` everything human goes to stderr and stdout gets only the JSON summary.
    """
    console = console or _console(stderr=cfg.json)
    _check_root()
    policy = (cfg.policy or DEFAULT_POLICY).resolve()
    ports, pol = _policy_ports(policy, cfg.sets)
    scenarios = select(cfg.scenarios)
    url = _metrics_url(cfg.metrics_addr)
    if cfg.keep:
        _refuse_second_kept_lab()
    skip = _loopback_handlers(pol)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    lab: Lab | None = None
    kept = False
    try:
        with console.status("building the lab (namespaces, veths, bridge, IPv4 + IPv6)"):
            lab = Lab.router_topology(_lab_id())
            state: dict[str, Any] = {}
            for sc in scenarios:
                if sc.setup is not None and sc.ready:
                    state[sc.key] = sc.setup(lab, ports)
            servers = _start_servers(lab, ports)
            _warm_up(lab)
            sets = _lab_sets(lab, pol, scenarios) + list(cfg.sets)
            engine = lab.start_engine(str(policy), *[a for s in sets for a in ("--set", s)],
                                      "--metrics-addr", cfg.metrics_addr,
                                      *(["--public-metrics"] if _public(cfg.metrics_addr) else []),
                                      *(["--pcap", str(Path(cfg.pcap).resolve())] if cfg.pcap else []))
        console.print(f"lab [bold]{lab.id}[/bold] up in {lab.build_seconds:.1f}s; engine pid {engine.pid} "
                      f"runs {policy.name} in {lab.ns_name('router')}; metrics {url}")
        if not cfg.json:
            console.print(_topology_table(lab))
        scraper = Scraper(lab, url)
        scraper.scrape()
        defaults = {h: pol.default(h).kind for h in HOOKS}
        results = _run_scenarios(lab, engine, scraper, cfg, ports, servers, skip, defaults, console,
                                 scenarios, state)
        final = scraper.scrape()
        rules = _default_verdicts({}, default_rule_counts(lab), defaults)
        if cfg.keep:
            _keep(lab, engine, url, policy)
            kept = True
        if cfg.json:
            print(json.dumps(summary_json(lab, results, final, rules, cfg, url, kept, engine), indent=2),
                  flush=True)
        else:
            _summary(console, lab, results, final, rules, skip, cfg, url, kept, scenarios)
        return 0 if all(r.ok for r in results) and len(results) == len([s for s in scenarios if s.ready]) \
            else 1
    except LabError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any failure: the debug report, then the lab goes
        if lab is not None:
            console.print(Panel(lab.debug_report()[-6000:], title="lab debug report", title_align="left"))
        raise LabError(f"the lab run failed: {exc}") from exc
    finally:
        signal.signal(signal.SIGTERM, old)
        if lab is not None and not kept:
            lab.close()
            console.print(f"lab {lab.id} removed: namespaces {NS_MARKER}{lab.id}-*, its processes and logs")


def summary_json(lab: Lab, results: Sequence[Result], final: Snapshot,
                 rules: Sequence[tuple[dict[str, str], float]], cfg: LabConfig, url: str, kept: bool,
                 engine: EngineProc | None = None) -> dict[str, Any]:
    """The summary for scripts (``--json``): topology, every scenario with the hooks it
    crossed, the verdicts given and what was observed, and the per-hook totals."""
    hooks: dict[str, list[dict[str, Any]]] = {h: [] for h in HOOKS}
    for l, v in final.series("nfhooks_packets_total"):
        if v > 0:
            hooks[l["hook"]].append({"table": l["table"], "verdict": l["verdict"], "packets": int(v),
                                     "handler": "(any)"})
    for l, v in rules:
        hooks[l["hook"]].append({"table": decision_table(l["hook"]), "verdict": l["verdict"],
                                 "packets": int(v), "handler": KERNEL_DEFAULT})
    return {
        "lab": lab.id,
        "ok": all(r.ok for r in results),
        "passed": sum(r.ok for r in results),
        "total": len(results),
        "kept": kept,
        "metrics": url,
        "pcap": str(cfg.pcap) if cfg.pcap else None,
        "engine": {"pid": engine.pid, "argv": engine.argv} if engine is not None else None,
        "topology": {
            "networks": lab.networks,
            "nodes": {n: {"namespace": node.ns, "ipv4": node.addrs.get(4, []), "ipv6": node.addrs.get(6, [])}
                      for n, node in lab.nodes.items()},
        },
        "scenarios": [
            {
                "key": r.scenario.key, "title": r.scenario.title, "ok": r.ok,
                "seconds": round(r.seconds, 3),
                "hooks_expected": list(r.scenario.hooks), "hooks_crossed": r.crossed,
                "verdicts": [{"hook": l["hook"], "handler": l["handler"], "verdict": l["verdict"],
                              "packets": int(v)} for l, v in r.verdicts],
                "checks": [{"text": c.text, "ok": c.ok} for c in r.checks],
                "error": r.error,
                "tables": [{"title": t, "columns": list(cols), "rows": [list(x) for x in rows]}
                           for t, cols, rows in r.tables]
                + ([{"title": "raw packets", "columns": ["packet", "what is wrong", "outcome", "result"],
                     "rows": [list(x) for x in r.rows]}] if r.rows else []),
            }
            for r in results
        ],
        "hooks": hooks,
    }


def _public(addr: str) -> bool:
    host, _ = parse_listen_addr(addr)
    return host not in ("127.0.0.1", "::1", "localhost")


def _run_scenarios(lab: Lab, engine: EngineProc, scraper: Scraper, cfg: LabConfig,
                   ports: dict[str, Any], servers: dict[str, TcpServer], skip: set[str],
                   defaults: dict[str, str], console: Console, scenarios: Sequence[Scenario],
                   state: dict[str, Any]) -> list[Result]:
    runnable = [s for s in scenarios if s.ready]
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                        console=console)
    task = progress.add_task("scenarios", total=len(runnable))
    ctx = Ctx(lab, engine, scraper, cfg, ports, servers, skip, defaults, state=state)
    results: list[Result] = []
    scraper.start()
    try:
        with Live(LiveView(progress, scraper), console=console, refresh_per_second=4, transient=True):
            for sc in runnable:
                progress.update(task, description=sc.title)
                ctx.progress = lambda text, sc=sc: progress.update(task, description=f"{sc.title}: {text}")
                r = _run_one(ctx, sc, skip)
                results.append(r)
                mark = "[green]✓[/green]" if r.ok else "[bold red]✗[/bold red]"
                console.print(f"{mark} {sc.title}  [dim]handlers saw it at: {', '.join(r.crossed) or 'none'}  "
                              f"{r.seconds:.1f}s[/dim]")
                progress.advance(task)
                if not engine.running():
                    console.print(f"[bold red]the engine exited ({engine.returncode}); log tail:[/bold red]\n"
                                  + "\n".join(engine.log().splitlines()[-20:]))
                    break
    finally:
        scraper.stop()
    return results


def _summary(console: Console, lab: Lab, results: Sequence[Result], final: Snapshot,
             rules: list[tuple[dict[str, str], float]], skip: set[str], cfg: LabConfig, url: str,
             kept: bool, scenarios: Sequence[Scenario] = ()) -> None:
    passed = sum(r.ok for r in results)
    console.print()
    console.rule(f"nfhooks lab {lab.id}: {passed}/{len(results)} scenarios passed")
    console.print(_topology_table(lab))
    console.print(_scenario_table(results))
    rows = [row for r in results for row in r.rows]
    if rows:
        console.print(_malformed_table(rows))
    for r in results:
        for title, cols, trows in r.tables:
            t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
            for col in cols:
                t.add_column(col)
            for row in trows:
                t.add_row(*(Text(cell) for cell in row))
            console.print(t)
    if results and all(not r.scenario.hooks for r in results):
        # every scenario ran in a lab of its own (route-shape): the standard router was idle
        console.print("[dim]These scenarios ran in labs of their own (their tables are above); the "
                      "standard lab's router, idle meanwhile, is not shown.[/dim]")
    else:
        console.print(_hooks_explained(final, rules, skip))
        console.print(hook_table(final, rules))
        console.print(_metrics_panel(cfg, url, kept, final))
    pending = _not_yet_panel([s for s in (scenarios or SCENARIOS) if not s.ready])
    if pending is not None:
        console.print(pending)
    console.print(_next_panel(lab, kept))


# --------------------------------------------------------------------------- --keep, exec, down


def _proc_start(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def read_state() -> dict[str, Any] | None:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return None


def _namespaces_exist(state: Mapping[str, Any]) -> bool:
    return any((Path("/run/netns") / ns).exists() for ns in state.get("namespaces", {}).values())


def _refuse_second_kept_lab() -> None:
    state = read_state()
    if state and _namespaces_exist(state):
        raise LabError(f"a kept lab ({state['id']}) is still up; remove it first with `nfhooks lab down`")


def _keep(lab: Lab, engine: EngineProc, url: str, policy: Path) -> None:
    """Hand the lab to its engine (see Lab.detach) and record it for `lab exec` / `lab down`."""
    lab.detach(engine.pid)
    state = {
        "id": lab.id,
        "namespaces": {n: node.ns for n, node in lab.nodes.items()},
        "addresses": {n: node.addrs for n, node in lab.nodes.items()},
        "engine": {"pid": engine.pid, "start": _proc_start(engine.pid), "argv": engine.argv,
                   "log": str(engine.log_path)},
        "policy": str(policy),
        "metrics": url,
    }
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, STATE_FILE)


def exec_in_node(node: str, cmd: Sequence[str]) -> None:
    """Replace this process with CMD inside the kept lab's NODE (exit status passes through)."""
    state = read_state()
    if not state or not _namespaces_exist(state):
        raise LabError("no kept lab is up: start one with `nfhooks lab --keep`")
    namespaces = state["namespaces"]
    if node not in namespaces:
        raise LabError(f"no node {node!r} in lab {state['id']} (nodes: {', '.join(namespaces)})")
    if not cmd:
        raise LabError("no command given: nfhooks lab exec NODE -- CMD [ARGS...]")
    os.execvp("ip", ["ip", "netns", "exec", namespaces[node], *cmd])


def _stop_engine(engine: Mapping[str, Any], timeout: float = 10.0) -> str:
    """SIGTERM the kept engine -- only if that PID is still the engine we started."""
    pid, start, argv = engine.get("pid"), engine.get("start"), engine.get("argv") or []
    if not isinstance(pid, int) or _proc_start(pid) is None:
        return "engine: not running"
    if _proc_start(pid) != start or _cmdline(pid) != list(argv):
        return f"engine: pid {pid} is now another process; left alone"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _proc_start(pid) == start:
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            return f"engine: pid {pid} did not stop in {timeout:g}s; killed"
        time.sleep(0.05)
    return f"engine: pid {pid} stopped (its rules removed)"


def down(console: Console | None = None) -> int:
    """Remove the kept lab and the leftovers of crashed `nfhooks lab` runs."""
    console = console or _console()
    _check_root()
    state = read_state()
    removed: list[str] = []
    mine = f"{os.environ.get(ID_PREFIX_ENV, '')}{RUN_TAG}"
    if state and not str(state.get("id", "")).startswith(mine):
        console.print(f"the kept lab {state.get('id')} is not one of {ID_PREFIX_ENV}="
                      f"{os.environ.get(ID_PREFIX_ENV, '')!r}'s runs: left alone")
        state = None
    if state:
        console.print(_stop_engine(state.get("engine") or {}))
        # Its owner (the engine) is gone now, so cleanup_stale takes it; the processes left
        # in its namespaces are the lab's own servers.
        removed += cleanup_stale(f"{NS_MARKER}{state['id']}-", kill=True)
        STATE_FILE.unlink(missing_ok=True)
    # Crashed runs: lab ids carry RUN_TAG; labs whose owner still runs are left alone.
    # Processes still in them were started by that run (its servers, its engine).
    removed += cleanup_stale(f"{NS_MARKER}{os.environ.get(ID_PREFIX_ENV, '')}{RUN_TAG}", kill=True)
    if removed:
        console.print("removed: " + " ".join(removed))
    else:
        console.print("nothing to remove: no kept lab and no leftovers of `nfhooks lab` runs")
    left = [ns for ns in (state or {}).get("namespaces", {}).values() if (Path("/run/netns") / ns).exists()]
    if left:
        console.print(f"[red]still there: {' '.join(left)}[/red]")
        return 1
    return 0
