"""The standard scenarios' traffic (the ``standard`` group, see :mod:`nfhooks.lab.registry`):
forwarded, to and from the router, the classic OUTPUT drop, reject, the WAN -> LAN default
drop, steady traffic, NAT (masquerade, DNAT at OUTPUT, a port forward), mangling (TTL and
DSCP as the receiving kernel saw them) and forwarding switched off.

Each function drives traffic in the lab and returns what it observed as :class:`Check` s;
which hooks were crossed is measured around it by the runner. Raw malformed packets:
:mod:`nfhooks.lab.rawpackets`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import CONNECT_TIMEOUT, PROXY_PORT, WEB_PORT
from .evidence import default_rule_counts
from .scenario import Check, Ctx, both_families, check_connect, family_name
from .topology import Lab

__all__ = ["dnat_local", "forwarded", "forwarding_off", "from_router", "mangle_setup", "mangled",
           "masqueraded", "port_forward", "rejected", "seed_output_drop", "steady", "to_router", "wan_to_lan"]


def _peer_seen(c: Ctx, server: str, peer: str, family: int) -> Check:
    srv = c.servers[f"{server}{family}"]
    want = c.lab.addr(peer, family)
    try:
        peers = c.lab.wait_for(lambda: want in srv.log_peers(), timeout=3,
                               what=f"{want} in {srv}'s log")
    except TimeoutError:
        peers = False
    seen = srv.log_peers()[-1] if srv.log_peers() else "nobody"
    return Check(f"{family_name(family)} {server} saw the connection from {seen}"
                 + (f" (the {peer}: no NAT)" if peers else f" (expected {want})"), bool(peers))


def forwarded(c: Ctx) -> list[Check]:
    checks = both_families(lambda f: check_connect(c, "client", "server", WEB_PORT, f, "ok"))
    return checks + both_families(lambda f: _peer_seen(c, "server", "client", f))


def to_router(c: Ctx) -> list[Check]:
    port = c.ports["service_port"]
    checks = both_families(lambda f: check_connect(c, "client", "router", port, f, "ok"))

    def ping(f: int) -> Check:
        ok = c.lab.ping("client", c.lab.addr("router", f), timeout=2)
        return Check(f"{family_name(f)} client pings router {c.lab.addr('router', f)}: "
                     f"{'reply' if ok else 'no reply'}", ok)
    return checks + both_families(ping)


def from_router(c: Ctx) -> list[Check]:
    return both_families(lambda f: check_connect(c, "router", "server", WEB_PORT, f, "ok"))


def seed_output_drop(c: Ctx) -> list[Check]:
    port = c.ports["web_port"]
    checks = both_families(lambda f: check_connect(c, "router", "server", port, f, "timeout",
                                      timeout=CONNECT_TIMEOUT))
    routers = {c.lab.addr("router", f, facing="server") for f in (4, 6)}
    leaked = [p for f in (4, 6) for p in c.servers[f"http{f}"].log_peers() if p in routers]
    checks.append(Check(f"server port {port} got {len(leaked)} connection(s) from the router",
                        not leaked))
    # The same port from the client is forwarded traffic: OUTPUT is not involved.
    checks.append(check_connect(c, "client", "server", port, 4, "ok"))
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
    checks = both_families(lambda f: check_connect(c, "client", "router", tport, f, "refused"))

    def udp(f: int) -> Check:
        addr = c.lab.addr("router", f)
        got = c.lab.exec("client", sys.executable, "-c", _UDP_PROBE, addr, uport).stdout.strip()
        return Check(f"{family_name(f)} client → router udp {addr}:{uport}: {got}"
                     + (" (ICMP port unreachable)" if got == "ECONNREFUSED" else " (expected ECONNREFUSED)"),
                     got == "ECONNREFUSED")
    checks += both_families(udp)
    checks.append(Check(f"(a server listens on router tcp {tport} and udp {uport}: "
                        "the refusal comes from the policy, not a closed port)", True))
    return checks


def wan_to_lan(c: Ctx) -> list[Check]:
    checks = both_families(lambda f: check_connect(c, "server", "client", WEB_PORT, f, "timeout",
                                      timeout=CONNECT_TIMEOUT))
    got = [p for f in (4, 6) for p in c.servers[f"client{f}"].log_peers()]
    checks.append(Check(f"client's server got {len(got)} connection(s) from the WAN", not got))
    return checks


def masqueraded(c: Ctx) -> list[Check]:
    """Source NAT: the server must see the router's WAN address, never the client's."""
    port = c.ports["nat_port"]
    checks = both_families(lambda f: check_connect(c, "client", "server", port, f, "ok"))

    def seen(f: int) -> Check:
        srv, want = c.servers[f"nat{f}"], c.lab.addr("router", f, facing="server")
        try:
            c.lab.wait_for(lambda: srv.log_peers(), timeout=3, what=f"a connection logged by {srv}")
        except TimeoutError:
            pass
        peers = srv.log_peers()
        return Check(f"{family_name(f)} server port {port} saw {', '.join(peers) or 'nobody'} "
                     f"(the router's WAN address is {want})", bool(peers) and set(peers) == {want})
    return checks + both_families(seen)


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
        return Check(f"{family_name(f)} router fetches http://{shown}:{port}/ → {body or 'nothing'!r} "
                     f"(DNAT to the proxy's {PROXY_PORT})", body == "nfhooks-lab proxy")
    checks = both_families(fetch)

    def peer(f: int) -> Check:
        srv, want = c.servers[f"proxy{f}"], c.lab.addr("router", f, facing="proxy")
        try:
            c.lab.wait_for(lambda: want in srv.log_peers(), timeout=3, what="the router in the proxy's log")
        except TimeoutError:
            pass
        return Check(f"{family_name(f)} proxy port {PROXY_PORT} saw {', '.join(srv.log_peers()) or 'nobody'}",
                     want in srv.log_peers())
    checks += both_families(peer)
    checks += both_families(lambda f: check_connect(c, "router", "server", port, f, "timeout", timeout=CONNECT_TIMEOUT))
    return checks


def port_forward(c: Ctx) -> list[Check]:
    """DNAT at PREROUTING: the server connects to the router's WAN address and port and
    reaches the client's service; the client sees the server's own address (no SNAT)."""
    port = c.ports["forward_port"]
    checks = both_families(lambda f: check_connect(c, "server", "router", port, f, "ok",
                                      dst_addr=c.lab.addr("router", f, facing="server")))

    def seen(f: int) -> Check:
        srv, want = c.servers[f"forward{f}"], c.lab.addr("server", f)
        try:
            c.lab.wait_for(lambda: want in srv.log_peers(), timeout=3, what=f"{want} in {srv}'s log")
        except TimeoutError:
            pass
        return Check(f"{family_name(f)} client port {port} (behind the router) saw "
                     f"{', '.join(srv.log_peers()) or 'nobody'} (the server is {want})",
                     want in srv.log_peers())
    return checks + both_families(seen)


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
        rows.append((family_name(f), f"udp {port} (marked)", str(m.get("ttl")), str(m_dscp), str(m.get("tos"))))
        rows.append((family_name(f), f"udp {control} (control)", str(k.get("ttl")), str(k_dscp), str(k.get("tos"))))
        checks.append(Check(f"{family_name(f)} server received udp {port} with {ttl_name} {m.get('ttl')} and "
                            f"DSCP {m_dscp} (the policy sets {ttl} and {dscp})",
                            m.get("ttl") == ttl and m_dscp == dscp))
        checks.append(Check(f"{family_name(f)} server received udp {control} (not matched) with {ttl_name} "
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
