"""A throw-away network of Linux network namespaces for testing packet policies for real.

Why namespaces: an nfhooks policy installs iptables rules and binds NFQUEUE queues. Done
in the machine's own namespace that could cut the machine off; inside a namespace it can
only ever touch the lab. Every namespace, veth, address, route and sysctl here is created
*inside* lab namespaces (veth pairs are created in one lab namespace with their peer placed
straight into another), so nothing is ever configured in the root namespace.

Naming: every lab namespace is ``nfhlab-<id>-<node>`` (see :mod:`nfhooks.lab.namespaces`:
owner records and `cleanup_stale`, which never touches a live lab or a foreign namespace).

The router topology::

    client --(lan)-- router --(wan)-- switch ==bridge== server
                                                   \\=== proxy

The WAN segment is a Linux bridge in a separate ``switch`` namespace rather than in the
router: a bridge in the router would make server<->proxy traffic bridged *inside the
router*, where br_netfilter (if loaded) would feed it through the router's iptables and the
engine under test. With a separate switch the router has exactly one interface per side
(``lan``, ``wan``) and sees only routed traffic.

This module is :class:`Lab` -- the building blocks of :class:`nfhooks.lab.network.Network`
plus the router topology, the logging servers, the probes and the engine -- and re-exports
the names other code imports from here (``from nfhooks.lab.topology import Lab, ...``).

For the vpn scenario, `Lab.add_office` adds a second office (gateway ``gw_b`` on the WAN
bridge, ``host_b`` behind it on its own private range) and `Lab.start_tunnel` runs
``nfhooks tunnel`` in a node and routes a remote office into its tun device.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pyroute2 import IPRoute

from .namespaces import ID_PREFIX_ENV, NS_MARKER, cleanup_stale
from .network import IFNAME_MAX, LabCommandError, Network, Node, check_ifname
from .processes import READY_LINE, EngineProc, LogServer, TcpServer, UdpServer, tail, terminate
from .scripts import CONNECT_SCRIPT, PING_SCRIPT, SERVER_SCRIPT, UDP_SEND_SCRIPT

__all__ = ["ID_PREFIX_ENV", "NS_MARKER", "ROUTER_SYSCTLS", "EngineProc", "Lab", "LabCommandError", "Node",
           "TcpServer", "UdpServer", "cleanup_stale", "host_networks", "pick_ranges"]

#: sysctls of a node that routes between its segments (the router, a second office's gateway).
ROUTER_SYSCTLS: Mapping[str, str] = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
}


class Lab(Network):
    """A lab of namespaces (see :class:`Network`) with the router topology built in, servers
    and probes to drive traffic through it, and the engine under test."""

    # ----------------------------------------------------------------- the topology

    @classmethod
    def router_topology(cls, prefix: str | None = None) -> Lab:
        """client -- router -- (switch) -- server + proxy; see the module docstring.

        If building fails half-way, whatever was made is removed before the error is
        raised.
        """
        lab = cls(prefix)
        t0 = time.monotonic()
        try:
            lab._build_router_topology()
        except BaseException:
            lab.close()
            raise
        lab.build_seconds = time.monotonic() - t0
        return lab

    def _build_router_topology(self) -> None:
        v4_octet, ula = pick_ranges(self.id)
        self.ranges = (v4_octet, ula)
        nets = {
            "lan": {4: ipaddress.ip_network(f"10.{v4_octet}.1.0/24"), 6: ipaddress.ip_network(f"{ula}:1::/64")},
            "wan": {4: ipaddress.ip_network(f"10.{v4_octet}.2.0/24"), 6: ipaddress.ip_network(f"{ula}:2::/64")},
        }
        self.networks = {seg: {f: str(n) for f, n in fams.items()} for seg, fams in nets.items()}

        def host(seg: str, fam: int, i: int) -> str:
            net = nets[seg][fam]
            return f"{net[i]}/{net.prefixlen}"

        self.add_node("client")
        self.add_node("router", sysctls=ROUTER_SYSCTLS)
        self.add_node("switch")
        self.add_node("server")
        self.add_node("proxy")

        # Bridge side first: its ports come up last (see wait_links_up), so the wait
        # overlaps with the rest of the build.
        self.add_bridge("switch", "br0")
        self.connect("router", "wan", "switch", "sw-router", b_master="br0")
        self.connect("server", "eth0", "switch", "sw-server", b_master="br0")
        self.connect("proxy", "eth0", "switch", "sw-proxy", b_master="br0")
        self.segments["wan"] = {"router": "wan", "server": "eth0", "proxy": "eth0"}

        self.connect("client", "eth0", "router", "lan")
        self.segments["lan"] = {"client": "eth0", "router": "lan"}

        for fam in (4, 6):
            self.add_address("router", "lan", host("lan", fam, 1))
            self.add_address("router", "wan", host("wan", fam, 1))
            self.add_address("client", "eth0", host("lan", fam, 2))
            self.add_address("server", "eth0", host("wan", fam, 2))
            self.add_address("proxy", "eth0", host("wan", fam, 3))
            self.add_route("client", "default", str(nets["lan"][fam][1]))
            self.add_route("server", "default", str(nets["wan"][fam][1]))
            self.add_route("proxy", "default", str(nets["wan"][fam][1]))
        self.wait_links_up()

    def add_office(self, gw: str = "gw_b", host: str = "host_b", segment: str = "lan_b",
                   index: int = 3) -> None:
        """A second office for the vpn scenario: gateway `gw` on the WAN bridge (WAN address
        .4, forwarding on) and `host` behind it on its own private segment
        (10.n.<index>.0/24, <ula>:<index>::/64), default route via `gw`.

        Call after router_topology(). Nothing routes between the offices until a tunnel
        joins them (start_tunnel, route_via)."""
        if self.ranges is None or "wan" not in self.networks:
            raise RuntimeError("add_office needs the router topology first")
        octet, ula = self.ranges
        nets = {4: ipaddress.ip_network(f"10.{octet}.{index}.0/24"),
                6: ipaddress.ip_network(f"{ula}:{index}::/64")}
        wan = {f: ipaddress.ip_network(self.networks["wan"][f]) for f in (4, 6)}
        self.networks[segment] = {f: str(n) for f, n in nets.items()}
        self.add_node(gw, sysctls=ROUTER_SYSCTLS)
        self.add_node(host)
        self.connect(gw, "wan", "switch", f"sw-{gw}"[:IFNAME_MAX], b_master="br0")
        self.connect(host, "eth0", gw, "lan")
        self.segments["wan"][gw] = "wan"
        self.segments[segment] = {gw: "lan", host: "eth0"}
        for fam in (4, 6):
            self.add_address(gw, "lan", f"{nets[fam][1]}/{nets[fam].prefixlen}")
            self.add_address(gw, "wan", f"{wan[fam][4]}/{wan[fam].prefixlen}")
            self.add_address(host, "eth0", f"{nets[fam][2]}/{nets[fam].prefixlen}")
            self.add_route(host, "default", str(nets[fam][1]))
        self.wait_links_up()

    def start_tunnel(self, node: str | Node, listen: str, peer: str, dev: str = "tun0",
                     addrs: Sequence[str] = (), routes: Sequence[str] = (),
                     mtu: int = 1400) -> EngineProc:
        """Run ``nfhooks tunnel`` in `node` (a tun device `dev` carried in UDP from `listen`
        to `peer`), then -- inside that node only -- give the device `addrs`, bring it up
        with `mtu` (room for the 28 bytes of UDP/IPv4 around each packet) and route
        `routes` (CIDRs) into it. Stopped (SIGTERM, by PID) at close()."""
        check_ifname(dev)
        self._seq += 1
        log_path = self.tmpdir / f"tunnel-{self.node(node).name}-{self._seq}.log"
        argv = [sys.executable, "-m", "nfhooks", "tunnel", "--dev", dev, "--listen", listen,
                "--peer", peer]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as log:
            proc = self.popen(node, *argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        tunnel = EngineProc(proc, log_path, argv, self.node(node).name)
        self._engines.append(tunnel)  # its log goes into debug_report
        tunnel.wait_log("nfhooks tunnel ready", timeout=15)
        n = self.node(node)
        with IPRoute(netns=n.ns) as ipr:
            idx = ipr.link_lookup(ifname=dev)[0]
            ipr.link("set", index=idx, mtu=mtu, state="up")
        for cidr in addrs:
            self.add_address(n, dev, cidr)
        for cidr in routes:
            net = ipaddress.ip_network(cidr)
            with IPRoute(netns=n.ns) as ipr:
                ipr.route("add", dst=str(net), oif=ipr.link_lookup(ifname=dev)[0],
                          family=socket.AF_INET if net.version == 4 else socket.AF_INET6)
        return tunnel

    # ----------------------------------------------------------------- servers and probes

    def _python(self, node: str | Node, script: str, *args: Any, timeout: float) -> str:
        cp = self.exec(node, sys.executable, "-c", script, *args, timeout=timeout)
        return cp.stdout.strip()

    def _resolve_dst(self, dst: str, family: int = 4) -> str:
        return self.addr(dst, family) if dst in self.nodes else dst

    def _start_server(
        self, cls: type[LogServer], mode: str, node: str | Node, port: int, family: int, bind: str | None
    ) -> Any:
        n = self.node(node)
        addr = bind or self.addr(n.name, family)
        self._seq += 1
        base = self.tmpdir / f"{mode}-{n.name}-{port}-{self._seq}"
        log_path, ready = base.with_suffix(".jsonl"), base.with_suffix(".ready")
        err_path = base.with_suffix(".err")
        with open(err_path, "wb") as err:
            proc = self.popen(
                n, sys.executable, "-c", SERVER_SCRIPT, mode, family, addr, port,
                log_path, ready, f"nfhooks-lab {n.name}",
                stdout=subprocess.DEVNULL, stderr=err,
            )
        server = cls(self, n.name, proc, addr, port, family, log_path)

        def up() -> bool:
            if ready.exists():
                return True
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{mode} server on {addr} port {port} in {n.name} exited with "
                    f"{proc.returncode}: {err_path.read_text(errors='replace')[-2000:]}"
                )
            return False

        self.wait_for(up, timeout=10, what=f"{mode} server on [{addr}]:{port} in {n.name}")
        return server

    def tcp_server(
        self, node: str | Node, port: int, family: int = 4, *, bind: str | None = None
    ) -> TcpServer:
        """Listening TCP server in the node (bound to the node's first address of
        `family`, or `bind`); returns once it listens."""
        return self._start_server(TcpServer, "tcp", node, port, family, bind)

    def udp_server(
        self, node: str | Node, port: int, family: int = 4, *, bind: str | None = None
    ) -> UdpServer:
        """UDP server in the node: logs (peer, payload) of each datagram and echoes it."""
        return self._start_server(UdpServer, "udp", node, port, family, bind)

    def tcp_connect(self, src_node: str | Node, dst_addr: str, port: int, timeout: float = 2.0) -> str:
        """Try a TCP connection from `src_node`: "ok", "refused" (a RST came back),
        "timeout" (dropped), or the errno name, e.g. "EHOSTUNREACH" (ICMP unreachable,
        also what most REJECTs produce) or "EPERM" (dropped in the sender's OUTPUT).
        `dst_addr` may be a node name (its first IPv4 address)."""
        dst = self._resolve_dst(dst_addr)
        return self._python(src_node, CONNECT_SCRIPT, dst, port, timeout, timeout=timeout + 10)

    def udp_send(
        self, src_node: str | Node, dst_addr: str, port: int, payload: bytes | str, timeout: float = 2.0
    ) -> bytes | None:
        """Send one datagram from `src_node`; return the reply (udp_server echoes) or None."""
        dst = self._resolve_dst(dst_addr)
        data = payload.encode() if isinstance(payload, str) else payload
        out = self._python(src_node, UDP_SEND_SCRIPT, dst, port, timeout,
                           base64.b64encode(data).decode(), timeout=timeout + 10)
        return base64.b64decode(out) if out else None

    def ping(self, src_node: str | Node, dst_addr: str, count: int = 1, timeout: float = 2) -> bool:
        """ICMP echo from `src_node`; True if any reply came back within `timeout` s each.
        (A raw-socket ping in Python, so iputils-ping need not be installed.)"""
        dst = self._resolve_dst(dst_addr)
        out = self._python(src_node, PING_SCRIPT, dst, count, timeout, timeout=count * timeout + 10)
        return int(out or "0") > 0

    # ----------------------------------------------------------------- the engine

    def engine_argv(self, policy: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "nfhooks", "run", policy, *args]

    def start_engine(
        self,
        policy: str,
        *args: str,
        node: str = "router",
        ready_timeout: float = 15.0,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        _argv: Sequence[str] | None = None,
    ) -> EngineProc:
        """Run ``python -m nfhooks run POLICY ARGS...`` in `node` and wait for its
        "nfhooks ready" line (printed once queues are bound and rules installed).

        Raises RuntimeError with the log tail if it exits first, TimeoutError (after
        stopping it) if the line does not come within `ready_timeout`. `_argv` replaces
        the command (for testing the lab without the engine).
        """
        argv = list(_argv) if _argv is not None else self.engine_argv(policy, *args)
        self._seq += 1
        log_path = self.tmpdir / f"engine-{self._seq}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log_path, "wb") as log:
            proc = self.popen(node, *argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd)
        engine = EngineProc(proc, log_path, argv, self.node(node).name)
        self._engines.append(engine)
        try:
            engine.wait_log(READY_LINE, timeout=ready_timeout)
        except TimeoutError:
            terminate(proc)
            raise
        return engine

    # ----------------------------------------------------------------- diagnostics

    def debug_report(self) -> str:
        """What to look at when a test failed: engine logs, router rules and addresses."""
        parts = [repr(self)]
        for e in self._engines:
            parts.append(f"--- engine {' '.join(e.argv[-4:])} pid {e.pid} "
                         f"({'running' if e.running() else f'exit {e.returncode}'}) log tail:\n"
                         f"{tail(e.log(), 60)}")
        if "router" in self.nodes and not self._closed:
            for cmd in (["ip", "-br", "addr"], ["iptables-save", "-c"], ["ip6tables-save", "-c"]):
                if shutil.which(cmd[0]) is None:
                    continue
                try:
                    cp = self.exec("router", *cmd, check=False, timeout=5)
                    parts.append(f"--- router: {' '.join(cmd)}\n{(cp.stdout + cp.stderr).strip()}")
                except (OSError, subprocess.SubprocessError) as exc:
                    parts.append(f"--- router: {' '.join(cmd)} failed: {exc}")
        return "\n".join(parts)


def host_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Networks of the machine's own addresses (read-only dump of the root namespace)."""
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    try:
        with IPRoute() as ipr:
            for msg in ipr.get_addr():
                a = msg.get_attr("IFA_ADDRESS")
                if a:
                    nets.append(ipaddress.ip_interface(f"{a}/{msg['prefixlen']}").network)
    except Exception:
        pass
    return nets


def pick_ranges(lab_id: str) -> tuple[int, str]:
    """10.<n>.0.0/16 and a ULA /48 derived from the lab id, avoiding the host's networks.

    Lab namespaces have their own routing tables, so a clash could not break the host;
    avoiding its ranges keeps addresses in logs unambiguous and leaves no doubt about
    where a packet went.
    """
    host = host_networks()
    digest = hashlib.sha256(lab_id.encode()).digest()
    octet = None
    for i in range(256):
        n = 16 + (digest[0] + i) % 224  # 10.16.x.x - 10.239.x.x
        net = ipaddress.ip_network(f"10.{n}.0.0/16")
        if not any(net.overlaps(h) for h in host if h.version == 4):
            octet = n
            break
    if octet is None:
        raise RuntimeError("no free 10.n.0.0/16 for the lab")
    for i in range(64):
        d = hashlib.sha256(digest + bytes([i])).digest()
        ula = f"fd{d[0]:02x}:{d[1]:02x}{d[2]:02x}:{d[3]:02x}{d[4]:02x}"
        net = ipaddress.ip_network(f"{ula}::/48")
        if d[:5] != b"\0" * 5 and not any(net.overlaps(h) for h in host if h.version == 6):
            return octet, ula
    raise RuntimeError("no free ULA /48 for the lab")


#: Old private name, still imported by nfhooks/lab/routeshape.py; use pick_ranges.
_pick_ranges = pick_ranges
