"""The route-shape lab: a router with two uplinks to one far host, policy routing and shaping
decided in Python, observed at the far side.

Topology (every namespace ``nfhlab-<id>-<node>``, nothing in the machine's own)::

    client --(lan)-- router ==(up1)== far        the far host has both uplinks and a service
                            ==(up2)==            address on its loopback (10.n.99.1, ula:99::1)

The router's main table routes everything by up1; ``policies/uplinks.py`` sends bulk ports by
up2 and alternates ``balanced_ports`` per connection, masquerading on each uplink -- so the far
host tells which uplink a connection took by the source address it sees (the router's up1 or
up2 address), and by which of its interfaces the packets arrived on.
Then ``policies/shaping.py`` shapes up1: an iperf3 flow in the bulk class is measured against
its 5 Mbit/s, while a ping through the same link shows interactive traffic still goes first.

``scenario(lab)`` drives it and returns the summary lines; ``run()`` builds and removes a lab
around it (``python -m nfhooks.lab.routeshape``, or ``nfhooks lab --scenario route-shape``
where the runner has the registry). The kernel tests use the same helpers.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .topology import Lab, _pick_ranges
from ..backends.tools import SAVE_TOOLS

ROOT = Path(__file__).resolve().parents[2]
UPLINKS_POLICY = ROOT / "policies" / "uplinks.py"
SHAPING_POLICY = ROOT / "policies" / "shaping.py"
BULK_PORT = 5201      # uplinks.py: uplink 2; shaping.py: the bulk class
BALANCED_PORT = 8081  # uplinks.py: alternates per connection
PLAIN_PORT = 8080     # uplinks.py: uplink 1
BULK_RATE = 5_000_000  # shaping.py's bulk class, bit/s
_ROUTER_SYSCTLS = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}


def build_lab(prefix: str | None = None) -> Lab:
    """client -- router == up1/up2 == far; removed again if building fails half-way."""
    lab = Lab(prefix)
    try:
        octet, ula = _pick_ranges(lab.id)
        nets = {seg: {4: ipaddress.ip_network(f"10.{octet}.{n}.0/24"), 6: ipaddress.ip_network(f"{ula}:{n}::/64")}
                for seg, n in (("lan", 1), ("up1", 11), ("up2", 12))}
        lab.networks = {seg: {f: str(n) for f, n in fams.items()} for seg, fams in nets.items()}
        lab.add_node("client")
        lab.add_node("router", sysctls=_ROUTER_SYSCTLS)
        lab.add_node("far")
        lab.connect("client", "eth0", "router", "lan")
        lab.connect("router", "up1", "far", "isp1")
        lab.connect("router", "up2", "far", "isp2")
        lab.segments = {"lan": {"client": "eth0", "router": "lan"}, "up1": {"router": "up1", "far": "isp1"},
                        "up2": {"router": "up2", "far": "isp2"}}
        lab.add_address("far", "lo", f"10.{octet}.99.1/32")  # the service: far's first address
        lab.add_address("far", "lo", f"{ula}:99::1/128")
        for fam in (4, 6):
            def host(seg: str, i: int) -> str:
                return f"{nets[seg][fam][i]}/{nets[seg][fam].prefixlen}"
            lab.add_address("router", "lan", host("lan", 1))
            lab.add_address("client", "eth0", host("lan", 2))
            for seg, far_if in (("up1", "isp1"), ("up2", "isp2")):
                lab.add_address("router", seg, host(seg, 1))
                lab.add_address("far", far_if, host(seg, 2))
            lab.add_route("client", "default", str(nets["lan"][fam][1]))
            lab.add_route("router", "default", str(nets["up1"][fam][2]))  # main: everything by up1
            lab.add_route("far", str(nets["lan"][fam]), str(nets["up1"][fam][1]))  # unNATed replies by up1
        lab.wait_links_up()
    except BaseException:
        lab.close()
        raise
    return lab


def uplink_args(lab: Lab) -> list[str]:
    """--set options of policies/uplinks.py for this lab's addresses."""
    out = []
    for name, seg in (("gw1", "up1"), ("gw2", "up2")):
        out += ["--set", f"{name}={_far(lab, seg, 4)}", "--set", f"{name}_6={_far(lab, seg, 6)}"]
    return out


def _far(lab: Lab, seg: str, family: int) -> str:
    return str(ipaddress.ip_network(lab.networks[seg][family])[2])


def router_addr(lab: Lab, seg: str, family: int = 4) -> str:
    return str(ipaddress.ip_network(lab.networks[seg][family])[1])


def uplink_of(lab: Lab, peer: str) -> str:
    """Which uplink a source address the far host saw belongs to ("up1", "up2" or "?")."""
    for seg in ("up1", "up2"):
        if peer in (router_addr(lab, seg, 4), router_addr(lab, seg, 6)):
            return seg
    return f"? ({peer})"


# ------------------------------------------------------------------------------ observations

def snapshot(lab: Lab, node: str = "router", devs: tuple[str, ...] = ()) -> dict[str, str]:
    """ip rules, every routing table, the qdiscs and our iptables lines: compare before/after."""
    cmds = {"ip rule": ["ip", "rule", "list"], "ip -6 rule": ["ip", "-6", "rule", "list"],
            "routes": ["ip", "route", "show", "table", "all"], "routes6": ["ip", "-6", "route", "show", "table", "all"],
            "qdiscs": ["tc", "qdisc", "show"]}
    out = {k: lab.exec(node, *argv).stdout for k, argv in cmds.items()}
    out["qdiscs"] = re.sub(r" direct_packets_stat \d+", "", out["qdiscs"])  # a counter, not configuration
    from ..backends import resolve

    tools = SAVE_TOOLS[resolve()[0]]  # the lab's engines' ($NFHOOKS_BACKEND: `nfhooks lab --backend`)
    save = lab.exec(node, tools[4]).stdout + lab.exec(node, tools[6]).stdout
    out["nfhooks iptables"] = "\n".join(line for line in save.splitlines() if "NFH-" in line or "nfhooks" in line)
    return out


def rx_bytes(lab: Lab, node: str, ifname: str) -> int:
    """Bytes received on an interface (where packets arrived, whatever their addresses say)."""
    info = json.loads(lab.exec(node, "ip", "-s", "-j", "link", "show", "dev", ifname).stdout)
    return int(info[0]["stats64"]["rx"]["bytes"])


@dataclass
class Iperf:
    """An iperf3 server in a node (one test, ``-1``), stopped with the lab."""

    lab: Lab
    node: str
    addr: str
    port: int
    proc: Any = None

    def __enter__(self) -> "Iperf":
        self.proc = self.lab.popen(self.node, "iperf3", "-s", "-1", "-B", self.addr, "-p", self.port,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"iperf3 server in {self.node} exited with {self.proc.returncode}")
            return bool(self.lab.exec(self.node, "ss", "-Htln", f"sport = :{self.port}", check=False).stdout.strip())

        self.lab.wait_for(listening, timeout=10, what=f"iperf3 listening on {self.addr}:{self.port}")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def iperf_client(lab: Lab, node: str, addr: str, port: int, seconds: int = 4, omit: int = 1,
                 congestion: str = "cubic") -> subprocess.Popen[str]:
    """Start a TCP iperf3 client (JSON to stdout); pair with :func:`iperf_result`.

    cubic, not the lab's default bbr: cubic fills the bottleneck's queue as a real bulk
    transfer does, so a ping stuck behind it would show (bbr keeps queues nearly empty)."""
    return lab.popen(node, "iperf3", "-c", addr, "-p", port, "-t", seconds, "-O", omit, "-J", "-C", congestion,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def iperf_result(proc: subprocess.Popen[str], timeout: float = 60) -> float:
    """The receiver's rate in bit/s (after the omitted slow-start seconds)."""
    out, err = proc.communicate(timeout=timeout)
    try:
        doc = json.loads(out)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 client exited {proc.returncode}: {err.strip() or out[-500:]}") from None
    if "error" in doc:
        raise RuntimeError(f"iperf3: {doc['error']}")
    return float(doc["end"]["sum_received"]["bits_per_second"])


@dataclass
class Ping:
    sent: int
    received: int
    avg_ms: float
    max_ms: float


def ping(lab: Lab, node: str, addr: str, count: int = 10, interval: float = 0.2) -> Ping:
    cp = lab.exec(node, "ping", "-n", "-q", "-c", count, "-i", interval, "-W", 2, addr,
                  timeout=count * interval + 15, check=False)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", cp.stdout)
    rtt = re.search(r"= [\d.]+/([\d.]+)/([\d.]+)/", cp.stdout)
    if not m:
        raise RuntimeError(f"ping from {node} to {addr}: {cp.stdout}{cp.stderr}")
    return Ping(int(m.group(1)), int(m.group(2)), float(rtt.group(1)) if rtt else float("inf"),
                float(rtt.group(2)) if rtt else float("inf"))


def class_bytes(lab: Lab, dev: str, classid: str, node: str = "router") -> int:
    """Bytes an htb class has sent (``tc -s class show``)."""
    text = lab.exec(node, "tc", "-s", "class", "show", "dev", dev).stdout
    m = re.search(rf"class htb {re.escape(classid)} .*?\n\s*Sent (\d+) bytes", text)
    return int(m.group(1)) if m else 0


def shaped_run(lab: Lab, src: str, dst_node: str, dst: str, dev: str, bulk_class: str = "4e46:11",
               seconds: int = 4) -> tuple[float, Ping]:
    """A bulk iperf3 flow through ``dev`` and, once it fills its class, a ping alongside."""
    start = class_bytes(lab, dev, bulk_class)
    with Iperf(lab, dst_node, dst, BULK_PORT):
        client = iperf_client(lab, src, dst, BULK_PORT, seconds=seconds)
        try:
            lab.wait_for(lambda: class_bytes(lab, dev, bulk_class) > start + 200_000 or client.poll() is not None,
                         timeout=15, what=f"the bulk flow in class {bulk_class} on {dev}")
            p = ping(lab, src, dst, count=10)
        finally:
            rate = iperf_result(client)
    return rate, p


# ------------------------------------------------------------------------------ the scenario

@dataclass
class Result:
    flows: list[tuple[str, str, str]] = field(default_factory=list)  # (flow, uplink the far side saw, expected)
    rate: float | None = None
    ping: Ping | None = None
    clean: bool = False
    lines: list[str] = field(default_factory=list)


def scenario(lab: Lab, say: Callable[[str], None] = lambda s: None) -> Result:
    """Drive the route-shape lab (built by :func:`build_lab`) and summarise what was observed."""
    res = Result()
    before = snapshot(lab)
    # 1. uplinks: which uplink each connection took, seen by the far host
    servers = {(p, f): lab.tcp_server("far", p, family=f) for p in (PLAIN_PORT, BALANCED_PORT, BULK_PORT)
               for f in (4, 6)}
    eng = lab.start_engine(str(UPLINKS_POLICY), *uplink_args(lab))
    try:
        for f in (4, 6):
            svc = lab.addr("far", f)
            for port, want, what in ((PLAIN_PORT, ["up1"], "plain"), (BULK_PORT, ["up2"], "bulk port"),
                                     (BALANCED_PORT, ["up1", "up2"], "balanced: alternates")):
                for _ in want:
                    lab.tcp_connect("client", svc, port)
                peers = servers[(port, f)].wait_peers(len(want))
                for peer, w in zip(peers, want):
                    res.flows.append((f"IPv{f} client → far:{port} ({what})", uplink_of(lab, peer), w))
            lab.tcp_connect("router", svc, BULK_PORT)
            res.flows.append((f"IPv{f} router → far:{BULK_PORT} (local, re-routed)",
                              uplink_of(lab, servers[(BULK_PORT, f)].wait_peers(2)[-1]), "up2"))
    finally:
        eng.stop()
        for srv in servers.values():
            srv.stop()  # frees far:5201 for iperf3
    for flow, up, want in res.flows:
        res.lines.append(f"{flow:<45} took {up}" + ("" if up == want else f" (expected {want})"))
    # 2. shaping on up1 (where main routes forwarded traffic without uplinks.py)
    eng = lab.start_engine(str(SHAPING_POLICY), "--set", "dev=up1")
    try:
        res.rate, res.ping = shaped_run(lab, "client", "far", lab.addr("far"), "up1")
    finally:
        eng.stop()
    dev = (res.rate - BULK_RATE) / BULK_RATE * 100
    res.lines.append(f"bulk class (5 Mbit/s on up1): iperf3 measured {res.rate / 1e6:.2f} Mbit/s ({dev:+.1f} %)")
    res.lines.append(f"ping through up1 during the bulk flow: {res.ping.received}/{res.ping.sent} replies, "
                     f"avg {res.ping.avg_ms:.2f} ms, max {res.ping.max_ms:.2f} ms (interactive class, prio 0)")
    after = snapshot(lab)
    changed = [k for k in before if before[k] != after[k]]
    res.clean = not changed
    res.lines.append("after exit: ip rules, routing tables, qdiscs and iptables back to what they were"
                     if res.clean else f"after exit: NOT restored: {', '.join(changed)}")
    for line in res.lines:
        say(line)
    return res


def run(say: Callable[[str], None] = print) -> int:
    """Build the lab, run the scenario, remove the lab; 0 if everything went as expected."""
    lab = build_lab()
    try:
        say(f"nfhooks lab route-shape: lab {lab.id} (client -- router == up1/up2 == far)")
        res = scenario(lab, say)
    finally:
        lab.close()
    return 0 if all(c.ok for c in checks(res)) else 1


@dataclass
class Verdict:
    text: str
    ok: bool


def checks(res: Result) -> list[Verdict]:
    """What the scenario should have observed."""
    out = [Verdict(f"{flow}: took {up}", up == want) for flow, up, want in res.flows]
    if res.rate is not None:
        out.append(Verdict(f"bulk class measured {res.rate / 1e6:.2f} Mbit/s, configured 5 Mbit/s (within 15 %)",
                           abs(res.rate - BULK_RATE) <= 0.15 * BULK_RATE))
    if res.ping is not None:
        out.append(Verdict(f"ping through the shaped link during the bulk flow: avg {res.ping.avg_ms:.2f} ms "
                           f"({res.ping.received}/{res.ping.sent} replies; under 20 ms)",
                           res.ping.received == res.ping.sent and res.ping.avg_ms < 20))
    out.append(Verdict("ip rules, routes, qdiscs and iptables restored after exit", res.clean))
    return out


def _lab_scenario(c: Any) -> list[Any]:
    """``nfhooks lab --scenario route-shape``: its own lab (two uplinks), beside the runner's."""
    from .runner import Check

    c.progress("route-shape: building client -- router == up1/up2 == far")
    lab = build_lab()
    try:
        res = scenario(lab, c.progress)
    finally:
        lab.close()
    c.add_table("route-shape: what the far host saw", ("observation",), [(line,) for line in res.lines])
    return [Check(v.text, v.ok) for v in checks(res)]


def _register() -> None:
    try:
        from .runner import Scenario, register
    except ImportError:  # the runner without a registry: run() above still works
        return
    register(Scenario(
        "route-shape", "route-shape: two uplinks chosen per connection, a shaped bulk class",
        "policies/uplinks.py then policies/shaping.py on a separate client -- router == up1/up2 == far lab: "
        "which uplink each flow took (seen by the far host), the bulk class's measured rate, ping latency",
        hooks=(), run=_lab_scenario, needs=("route", "shape"), groups=("route-shape",)))


_register()


if __name__ == "__main__":
    t0 = time.monotonic()
    code = run()
    print(f"({time.monotonic() - t0:.1f} s)")
    sys.exit(code)
