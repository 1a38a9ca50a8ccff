"""The lab's ``kernel-state`` scenario (``nfhooks lab --scenario kernel-state``): Python decides
once, the kernel enforces thousands of packets.

On a lab of its own (the router topology, beside the runner's lab, removed afterwards) the
router runs ``policies/ssh_guard.py``: the client opens ``max_new`` SSH connections (Python
accepts each one's first packet), then one more -- Python bans the client in the kernel set
``banned`` -- then floods new connections. The kernel's ``src=banned`` rule drops the flood by
itself; Python's count does not move. The summary puts the two side by side: the ``ssh``
handler's packets (``nfhooks_handler_packets_total``) and the set rule's packet counter
(``iptables-save -c``). The server, another source, still gets through. IPv4 and IPv6.

This module registers itself with the scenario registry (registry.PLUGINS).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from ..backends.tools import SAVE_TOOLS
from .evidence import Scraper
from .registry import register
from .scenario import Check, Ctx, Scenario
from .topology import Lab

__all__ = ["FLOOD", "GUARD_POLICY", "MAX_NEW", "PORT", "enforced", "run"]

GUARD_POLICY = Path(__file__).resolve().parents[2] / "policies" / "ssh_guard.py"
PORT = 2022  # ssh_guard's port option (a lab server listens there, nothing else does)
MAX_NEW = 3
FLOOD = 400  # new connections the client attempts per family once banned
METRICS = "http://127.0.0.1:9477/metrics"
RULE = '--comment "nfhooks kernel banned"'

# Opens `n` non-blocking TCP connections (one SYN each, plus the kernel's retransmissions)
# in batches, so the flood needs no more file descriptors than a batch.
_FLOOD = r"""
import socket, sys, time
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
left = n
while left > 0:
    batch = []
    for _ in range(min(left, 200)):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((addr, port))
        batch.append(s)
    left -= len(batch)
    time.sleep(0.2)
    for s in batch:
        s.close()
"""


def enforced(lab: Lab, family: int) -> int:
    """Packets the kernel dropped by the ``src=banned`` rule (summed over both backends'
    views: nfhooks' rules are in one of them)."""
    total = 0
    for tools in SAVE_TOOLS.values():
        for line in lab.exec("router", tools[family], "-c", check=False).stdout.splitlines():
            if RULE in line:
                total += int(line.split("]")[0].strip("[").split(":")[0])
    return total


def _decided(scraper: Scraper) -> int:
    return int(sum(v for l, v in scraper.scrape().series("nfhooks_handler_packets_total")
                   if l.get("handler") == "ssh"))


def _family(lab: Lab, scraper: Scraper, family: int) -> tuple[list[Check], tuple[int, int]]:
    """One family's allowed connections, the ban, the flood; (checks, (decided, enforced))."""
    router = lab.addr("router", family, facing="client")
    before = _decided(scraper)
    got = [lab.tcp_connect("client", router, PORT, timeout=2.0) for _ in range(MAX_NEW)]
    banned_on = lab.tcp_connect("client", router, PORT, timeout=0.5)
    lab.exec("client", sys.executable, "-c", _FLOOD, router, PORT, FLOOD, timeout=60)
    flood_seen = _decided(scraper) - before
    other = lab.tcp_connect("server", lab.addr("router", family, facing="server"), PORT, timeout=2.0)
    n, m = flood_seen, enforced(lab, family)
    fam = f"IPv{family}"
    return [
        Check(f"{fam} client: {MAX_NEW} connections {', '.join(got)}; connection {MAX_NEW + 1} {banned_on} (banned)",
              got == ["ok"] * MAX_NEW and banned_on == "timeout"),
        Check(f"{fam} python decided {n}, kernel enforced {m} (the client's flood of {FLOOD} connections)",
              n == MAX_NEW + 1 and m > n),
        Check(f"{fam} another source (the server) while the client is banned: {other}", other == "ok"),
    ], (n, m)


def scenario(lab: Lab, say: Callable[[str], None]) -> tuple[list[Check], list[tuple[str, ...]]]:
    """Run ssh_guard on `lab`'s router and drive both families; (checks, table rows)."""
    engine = lab.start_engine(str(GUARD_POLICY), "--set", f"port={PORT}", "--set", f"max_new={MAX_NEW}",
                              "--set", "window=60", "--set", "ban=600")
    for family in (4, 6):
        lab.tcp_server("router", PORT, family, bind="::" if family == 6 else "0.0.0.0")
    scraper = Scraper(lab, METRICS)
    checks: list[Check] = []
    rows: list[tuple[str, ...]] = []
    for family in (4, 6):
        say(f"kernel-state: IPv{family} client floods the router's port {PORT}")
        got, (n, m) = _family(lab, scraper, family)
        checks += got
        rows.append((f"IPv{family}", str(n), str(m)))
    engine.stop()
    checks.append(Check("the engine exited cleanly", "Traceback" not in engine.log()))
    return checks, rows


def run(c: Ctx) -> list[Check]:
    """``nfhooks lab --scenario kernel-state``: its own lab, beside the runner's."""
    c.progress("kernel-state: building client -- router -- server for policies/ssh_guard.py")
    lab = Lab.router_topology()
    try:
        checks, rows = scenario(lab, c.progress)
    finally:
        lab.close()
    c.add_table("kernel-state: packets of the banned client", ("family", "python decided", "kernel enforced"), rows)
    # the runner's own lab is not touched by this one: its client still reaches the router's service
    port = int(c.ports.get("service_port", 2222))
    got = c.lab.tcp_connect("client", c.lab.addr("router", 4, facing="client"), port, timeout=2.0)
    return [*checks, Check(f"the runner's lab meanwhile: client → router :{port} {got}", got == "ok")]


register(Scenario(
    "kernel-state", "kernel state: Python bans once, the kernel drops the flood (policies/ssh_guard.py)",
    "on a lab of its own: a client over ssh_guard's max_new is banned in a kernel set by Python; its flood "
    "of new connections is dropped by the kernel; the handler's count and the set rule's hits side by side",
    hooks=(), run=run, groups=("kernel-state",)))
