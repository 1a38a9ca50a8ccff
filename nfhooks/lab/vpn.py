"""The lab's ``vpn`` scenario (``nfhooks lab --scenario vpn``): two offices joined by a tunnel.

    office A: client --lan-- router ==tun0== (UDP over the WAN) ==tun0== gw_b --lan-- host_b :office B
                         (engine)                                                 (private ranges)

Office A is the router topology's LAN (10.n.1.0/24); office B (10.n.3.0/24, <ula>:3::/64)
sits behind a second gateway ``gw_b`` on the WAN bridge. ``nfhooks tunnel`` runs on both
gateways: each routes the other office into its tun device, and the tunnel carries every
packet in a UDP datagram to the other gateway. On the router (where the engine runs) the
inner packet client -> host_b crosses FORWARD (lan -> tun0); the UDP datagram carrying it
is the router's own traffic and crosses OUTPUT and POSTROUTING (and the replies arrive at
INPUT). A packet sniffer on the router's tun0 and wan shows both, byte for byte.

This module registers itself with the runner's scenario registry (runner.PLUGINS), the
same way other scenario modules do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .runner import Check, Ctx, Scenario, _connect, _fam, register
from .topology import Lab

GW, HOST, SEGMENT = "gw_b", "host_b", "lan_b"
WEB_PORT = 8080
TUNNEL_NET = 99  # 10.n.99.0/30 and <ula>:99::/64 between the two tun devices

# Captures on the router's interfaces (AF_PACKET, cooked: the IP packet without link header):
# every packet on the tun device, and on the WAN the UDP datagrams of the tunnel, whose
# payload is the inner packet. One JSON line each; stops after `limit` packets.
_SNIFFER = r"""
import json, select, socket, sys
from nfhooks.tunnel import describe
log_path, ready, port, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ifaces = sys.argv[5:]
socks = {}
for name in ifaces:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))
    s.bind((name, 0))
    socks[s] = name
log = open(log_path, "a", buffering=1)
open(ready, "w").close()
n = 0
while n < limit:
    for s in select.select(list(socks), [], [])[0]:
        data, addr = s.recvfrom(65535)
        name, direction = socks[s], "out" if addr[2] == socket.PACKET_OUTGOING else "in"
        rec = {"if": name, "dir": direction, "packet": describe(data)}
        v4 = data[0] >> 4 == 4
        l4 = (data[0] & 0x0F) * 4 if v4 else 40
        proto = data[9] if v4 else data[6]
        if proto == 17 and len(data) >= l4 + 8:
            sport, dport = int.from_bytes(data[l4:l4 + 2], "big"), int.from_bytes(data[l4 + 2:l4 + 4], "big")
            if port in (sport, dport):
                rec["inner"] = describe(data[l4 + 8:])
        if name == ifaces[0] or "inner" in rec:
            log.write(json.dumps(rec) + "\n")
            n += 1
"""


def _ranges(lab: Lab) -> tuple[int, str]:
    assert lab.ranges is not None
    return lab.ranges


def setup(lab: Lab, ports: Mapping[str, Any]) -> dict[str, Any]:
    """Office B, the two tunnel ends and office B's web server; proves the tunnel with a
    ping each way before the engine starts."""
    lab.add_office(GW, HOST, SEGMENT)
    octet, ula = _ranges(lab)
    port, dev = int(ports["tunnel_port"]), str(ports["tun_if"])
    r_wan, g_wan = lab.addr("router", 4, facing=GW), lab.addr(GW, 4, facing="router")
    office_a, office_b = lab.networks["lan"], lab.networks[SEGMENT]
    tun_a = lab.start_tunnel("router", f"{r_wan}:{port}", f"{g_wan}:{port}", dev=dev,
                             addrs=(f"10.{octet}.{TUNNEL_NET}.1/30", f"{ula}:{TUNNEL_NET}::1/64"),
                             routes=(office_b[4], office_b[6]))
    tun_b = lab.start_tunnel(GW, f"{g_wan}:{port}", f"{r_wan}:{port}", dev="tun0",
                             addrs=(f"10.{octet}.{TUNNEL_NET}.2/30", f"{ula}:{TUNNEL_NET}::2/64"),
                             routes=(office_a[4], office_a[6]))
    lab.segments["tunnel"] = {"router": dev, GW: "tun0"}
    servers = {f: lab.tcp_server(HOST, WEB_PORT, f) for f in (4, 6)}
    for f in (4, 6):
        if not lab.ping("client", lab.addr(HOST, f), timeout=2):
            raise RuntimeError(f"the tunnel does not carry IPv{f} (client -> {HOST}) before the engine starts; "
                               f"tunnel logs:\n{tun_a.log()[-800:]}\n{tun_b.log()[-800:]}")
    return {"servers": servers, "tunnels": (tun_a, tun_b), "port": port, "dev": dev}


def _sniff(c: Ctx, dev: str, port: int) -> tuple[subprocess.Popen[Any], Path]:
    base = c.lab.tmpdir / "vpn-sniff"
    log, ready = base.with_suffix(".jsonl"), base.with_suffix(".ready")
    proc = c.lab.popen("router", sys.executable, "-c", _SNIFFER, log, ready, port, 12, dev,
                       c.lab.iface("router", "server"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the sniffer exited: {proc.stderr.read().decode()[-500:] if proc.stderr else ''}")
        return ready.exists()
    c.lab.wait_for(up, timeout=10, what="the packet sniffer in the router")
    return proc, log


def _captured(log: Path) -> list[dict[str, Any]]:
    out = []
    try:
        for line in log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    except OSError:
        pass
    return out


def _handler_delta(before: Any, after: Any, handler: str, hook: str) -> float:
    return sum(v for l, v in after.minus(before, "nfhooks_handler_packets_total")
               if l["handler"] == handler and l["hook"] == hook)


def run(c: Ctx) -> list[Check]:
    st = c.state["vpn"]
    dev, port = st["dev"], st["port"]
    sniffer, log = _sniff(c, dev, port)
    before = c.scraper.scrape()
    checks = [_connect(c, "client", HOST, WEB_PORT, f, "ok", dst_addr=c.lab.addr(HOST, f)) for f in (4, 6)]
    for f in (4, 6):
        srv, want = st["servers"][f], c.lab.addr("client", f)
        try:
            c.lab.wait_for(lambda srv=srv, want=want: want in srv.log_peers(), timeout=3, what="client at host_b")
        except TimeoutError:
            pass
        checks.append(Check(f"{_fam(f)} {HOST} (office B) saw {', '.join(srv.log_peers()) or 'nobody'}: "
                            "the client's private address, no NAT across the tunnel", want in srv.log_peers()))
    try:
        c.lab.wait_for(lambda: (lambda r: any(x["if"] == dev for x in r) and any("inner" in x for x in r))(
            _captured(log)), timeout=3, what="inner and encapsulated packets captured")
    except TimeoutError:
        pass
    after = c.scraper.scrape()
    sniffer.terminate()
    counts = {(h, hook): _handler_delta(before, after, h, hook) for h, hook in (
        ("to_tunnel", "FORWARD"), ("from_tunnel", "FORWARD"), ("tunnel_out", "OUTPUT"),
        ("tunnel_wire", "POSTROUTING"), ("tunnel_in", "INPUT"))}
    checks.append(Check(f"inner packets at FORWARD: to_tunnel (lan → {dev}) +{counts['to_tunnel', 'FORWARD']:g}, "
                        f"from_tunnel ({dev} → lan) +{counts['from_tunnel', 'FORWARD']:g}",
                        counts["to_tunnel", "FORWARD"] > 0 and counts["from_tunnel", "FORWARD"] > 0))
    checks.append(Check(f"UDP-encapsulated at OUTPUT: tunnel_out +{counts['tunnel_out', 'OUTPUT']:g}, "
                        f"POSTROUTING: tunnel_wire +{counts['tunnel_wire', 'POSTROUTING']:g}, "
                        f"replies at INPUT: tunnel_in +{counts['tunnel_in', 'INPUT']:g}",
                        counts["tunnel_out", "OUTPUT"] > 0 and counts["tunnel_wire", "POSTROUTING"] > 0
                        and counts["tunnel_in", "INPUT"] > 0))
    cap = _captured(log)
    client = c.lab.addr("client", 4)
    inner = [x for x in cap if x["if"] == dev and x["dir"] == "out" and client in x["packet"]]
    outer = [x for x in cap if "inner" in x and x["dir"] == "out" and client in x["inner"]]
    checks.append(Check(f"captured on the router: {len(inner)} inner packet(s) leaving {dev}, {len(outer)} "
                        f"UDP datagram(s) on the WAN carrying them", bool(inner) and bool(outer)))
    rows = []
    for x in cap:
        where = (f"FORWARD → POSTROUTING → {dev}" if x["if"] == dev and x["dir"] == "out"
                 else f"{dev} → PREROUTING → FORWARD" if x["if"] == dev
                 else f"OUTPUT → POSTROUTING → {x['if']}" if x["dir"] == "out"
                 else f"{x['if']} → PREROUTING → INPUT")
        rows.append((where, "inner" if x["if"] == dev else "encapsulated", x["packet"],
                     x.get("inner", "")))
    c.add_table(f"vpn: packets captured on the router ({dev} and the WAN)",
                ("path on the router", "", "packet", "carrying"), rows)
    return checks


def _options(lab: Lab) -> dict[str, str]:
    return {"tun_if": lab.segments.get("tunnel", {}).get("router", "tun0")}


register(Scenario(
    "vpn", "vpn: office A → office B through a userspace tun tunnel (nfhooks tunnel)",
    "the inner packet crosses FORWARD (lan → tun0); the UDP datagram carrying it crosses OUTPUT and "
    "POSTROUTING, its replies INPUT",
    ("FORWARD", "OUTPUT", "POSTROUTING", "INPUT"), run, groups=("vpn",), setup=setup, options=_options,
))
