"""The lab's building blocks: nodes (one network namespace each), veth links, bridges,
addresses, routes and sysctls, running commands in a node, and tearing it all down.

Every namespace, veth, address, route and sysctl here is created *inside* lab namespaces
(veth pairs are created in one lab namespace with their peer placed straight into another),
so nothing is ever configured in the machine's own namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from pyroute2 import IPRoute, netns
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from .namespaces import ID_PREFIX_ENV, NS_MARKER, OWNER_DIR, owner_path, pids_in_namespaces
from .namespaces import proc_start_time, remove_namespace
from .processes import EngineProc, terminate

__all__ = ["BASE_SYSCTLS", "IFNAME_MAX", "KEEP_LOGS_ENV", "LabCommandError", "Network", "Node",
           "check_ifname", "run_sysctls"]

#: Set to keep the lab's temp dir (server and engine logs) after close(), for debugging.
KEEP_LOGS_ENV = "NFHOOKS_LAB_KEEP_LOGS"

_ID_RE = re.compile(r"[A-Za-z0-9]{1,24}")
_NODE_RE = re.compile(r"[a-z][a-z0-9_]{0,23}")
#: Longest interface name the kernel takes (IFNAMSIZ - 1).
IFNAME_MAX = 15
_BR_STATE_FORWARDING = 3

#: sysctls set in every lab namespace before any interface exists, so interfaces inherit
#: them: no duplicate address detection (addresses usable at once, no tentative races),
#: no reverse-path filtering (new namespaces inherit the host's rp_filter; NAT and proxy
#: tests must not depend on what the host happens to use).
BASE_SYSCTLS: Mapping[str, str] = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}

T = TypeVar("T")


@dataclass
class Node:
    """One host of the lab: its logical name, its real namespace and its addresses."""

    name: str
    ns: str
    addrs: dict[int, list[str]] = field(default_factory=lambda: {4: [], 6: []})


class LabCommandError(subprocess.CalledProcessError):
    """A command in a lab node failed; unlike CalledProcessError its text shows stderr."""

    def __init__(self, node: str, cp: subprocess.CompletedProcess[str]) -> None:
        super().__init__(cp.returncode, cp.args, cp.stdout, cp.stderr)
        self.node = node

    def __str__(self) -> str:
        cmd = " ".join(map(str, self.cmd))
        err = (self.stderr or "").strip()[-2000:]
        out = (self.stdout or "").strip()[-500:]
        text = f"in lab node {self.node!r}: `{cmd}` exited with {self.returncode}"
        if err:
            text += f"\nstderr:\n{err}"
        if out:
            text += f"\nstdout:\n{out}"
        return text


def check_ifname(name: str) -> None:
    """Refuse names the kernel would reject (IFNAMSIZ) before anything is created."""
    if not name or len(name) > IFNAME_MAX or "/" in name or " " in name:
        raise ValueError(f"interface name {name!r}: 1-{IFNAME_MAX} chars, no '/' or spaces")


def run_sysctls(ns: str, values: Mapping[str, str]) -> None:
    """Write sysctls *inside* namespace `ns`.

    /proc/sys/net shows the network namespace of the process that opens it, so the writes
    happen in a child that `ip netns exec` has moved into `ns` (which fails, rather than
    falling back to the root namespace, if `ns` does not exist). pyroute2 has no sysctl API.
    """
    argv: list[str] = []
    for key, value in values.items():
        if not re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+)+", key):
            raise ValueError(f"bad sysctl name {key!r}")
        argv += ["/proc/sys/" + key.replace(".", "/"), str(value)]
    script = 'while [ $# -gt 0 ]; do printf "%s\\n" "$2" > "$1" || exit 1; shift 2; done'
    cp = subprocess.run(
        ["ip", "netns", "exec", ns, "sh", "-c", script, "sh", *argv],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if cp.returncode:
        raise LabCommandError(ns, cp)


class Network:
    """A set of namespaces wired together; everything it made goes away at close().

    The building blocks; :class:`nfhooks.lab.topology.Lab` adds the topologies and traffic."""

    def __init__(self, prefix: str | None = None) -> None:
        if prefix is None:
            prefix = os.environ.get(ID_PREFIX_ENV, "") + secrets.token_hex(3)[:5]
        if prefix.startswith(NS_MARKER):
            prefix = prefix[len(NS_MARKER) :]
        if not _ID_RE.fullmatch(prefix):
            raise ValueError(
                f"lab id {prefix!r}: use 1-24 letters/digits (namespaces are {NS_MARKER}<id>-<node>)"
            )
        self.id = prefix
        self.nodes: dict[str, Node] = {}
        #: segment name -> {node name: interface name on that segment}
        self.segments: dict[str, dict[str, str]] = {}
        #: segment name -> {4: "10.n.1.0/24", 6: "fd..:1::/64"}
        self.networks: dict[str, dict[int, str]] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._engines: list[EngineProc] = []
        self._tmp: Path | None = None
        self._owner_written = False
        self._closed = False
        self._seq = 0
        #: close() acts only in this process, never in a fork of it (pyroute2 forks helpers)
        self._pid = os.getpid()
        #: seconds the last build (router_topology) took
        self.build_seconds: float | None = None
        #: (n, ula): the lab's 10.n.0.0/16 and ULA /48 (set by router_topology)
        self.ranges: tuple[int, str] | None = None

    def __repr__(self) -> str:
        return f"<Lab {self.id} nodes={list(self.nodes)}{' closed' if self._closed else ''}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------- building blocks

    @property
    def tmpdir(self) -> Path:
        """Per-lab directory for logs and server records (removed at close)."""
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix=f"{NS_MARKER}{self.id}-"))
        return self._tmp

    def _write_owner(self) -> None:
        """Record this process as the lab's owner *before* the first namespace exists,
        so there is never a lab namespace that cleanup_stale could mistake for stale."""
        if self._owner_written:
            return
        OWNER_DIR.mkdir(parents=True, exist_ok=True)
        path = owner_path(self.id)
        if any(n.startswith(f"{NS_MARKER}{self.id}-") for n in netns.listnetns()):
            raise FileExistsError(f"lab id {self.id!r} is already in use (namespaces exist)")
        record = {"pid": os.getpid(), "start": proc_start_time(os.getpid()), "tmp": str(self.tmpdir)}
        try:
            with open(path, "x") as f:  # exclusive: two labs can never share an id
                f.write(json.dumps(record))
        except FileExistsError:
            raise FileExistsError(f"lab id {self.id!r} is already in use ({path})") from None
        self._owner_written = True

    def ns_name(self, node: str) -> str:
        return f"{NS_MARKER}{self.id}-{node}"

    def add_node(self, name: str, sysctls: Mapping[str, str] | None = None) -> Node:
        """Create the node's namespace with lo up and the lab's base sysctls (+ `sysctls`)."""
        if self._closed:
            raise RuntimeError("lab is closed")
        if not _NODE_RE.fullmatch(name):
            raise ValueError(f"node name {name!r}: lowercase letters, digits, _")
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists")
        self._write_owner()
        ns = self.ns_name(name)
        node = Node(name=name, ns=ns, addrs={4: [], 6: []})
        netns.create(ns)
        self.nodes[name] = node
        run_sysctls(ns, {**BASE_SYSCTLS, **(sysctls or {})})
        with IPRoute(netns=ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return node

    def sysctl(self, node: str | Node, values: Mapping[str, str | int]) -> None:
        """Set sysctls inside one node's namespace (never the machine's own)."""
        run_sysctls(self._ns(node), {k: str(v) for k, v in values.items()})

    def add_bridge(self, node: str | Node, ifname: str) -> None:
        """A plain learning bridge: no STP (ports forward at once), no multicast snooping
        (no querier here, so snooping could only ever drop neighbour discovery)."""
        check_ifname(ifname)
        with IPRoute(netns=self._ns(node)) as ipr:
            ipr.link("add", ifname=ifname, kind="bridge", br_stp_state=0, br_mcast_snooping=0)
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")

    def connect(
        self,
        a: str | Node,
        a_if: str,
        b: str | Node,
        b_if: str,
        *,
        a_master: str | None = None,
        b_master: str | None = None,
    ) -> None:
        """A veth pair between two nodes, both ends up (optionally enslaved to a bridge).

        The pair is created inside `a`'s namespace with its peer placed directly into
        `b`'s, so no interface ever appears in the root namespace.
        """
        check_ifname(a_if)
        check_ifname(b_if)
        a_ns, b_ns = self._ns(a), self._ns(b)
        with IPRoute(netns=a_ns) as ipr:
            ipr.link("add", ifname=a_if, kind="veth", peer={"ifname": b_if, "net_ns_fd": b_ns})
            idx = ipr.link_lookup(ifname=a_if)[0]
            if a_master:
                ipr.link("set", index=idx, master=ipr.link_lookup(ifname=a_master)[0])
            ipr.link("set", index=idx, state="up")
        with IPRoute(netns=b_ns) as ipr:
            idx = ipr.link_lookup(ifname=b_if)[0]
            if b_master:
                ipr.link("set", index=idx, master=ipr.link_lookup(ifname=b_master)[0])
            ipr.link("set", index=idx, state="up")

    def add_address(self, node: str | Node, ifname: str, cidr: str) -> None:
        """Address with prefix length; IPv6 ones with nodad so they are usable at once."""
        iface = ipaddress.ip_interface(cidr)
        n = self.node(node)
        kw: dict[str, Any] = {}
        if iface.version == 6:
            kw["flags"] = IFA_F_NODAD
        with IPRoute(netns=n.ns) as ipr:
            ipr.addr(
                "add",
                index=ipr.link_lookup(ifname=ifname)[0],
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                **kw,
            )
        n.addrs.setdefault(iface.version, []).append(str(iface.ip))

    def add_route(self, node: str | Node, dst: str, gateway: str) -> None:
        """A route via `gateway`; dst "default" means 0.0.0.0/0 or ::/0 by gateway family."""
        fam = ipaddress.ip_address(gateway).version
        if dst == "default":
            dst = "0.0.0.0/0" if fam == 4 else "::/0"
        with IPRoute(netns=self._ns(node)) as ipr:
            ipr.route(
                "add",
                dst=dst,
                gateway=gateway,
                family=socket.AF_INET if fam == 4 else socket.AF_INET6,
            )

    # ----------------------------------------------------------------- links up

    def _links_down(self, node: str) -> list[str]:
        """Interfaces of `node` that cannot pass traffic yet (operstate not UP, or a
        bridge port not forwarding)."""
        down = []
        with IPRoute(netns=self._ns(node)) as ipr:
            for m in ipr.get_links():
                name = m.get_attr("IFLA_IFNAME")
                if name != "lo" and m.get_attr("IFLA_OPERSTATE") != "UP":
                    down.append(name)
            for m in ipr.link("dump", family=socket.AF_BRIDGE):
                info = m.get_attr("IFLA_PROTINFO")
                if info is not None and info.get_attr("IFLA_BRPORT_STATE") != _BR_STATE_FORWARDING:
                    down.append(f"{m.get_attr('IFLA_IFNAME')} (bridge port)")
        return down

    def wait_links_up(self, timeout: float = 10.0) -> None:
        """Wait until every interface in the lab is operationally up.

        Carrier changes reach the stack through the kernel's linkwatch, which batches
        events up to a second: until then a fresh veth has a no-op qdisc and a bridge port
        is "disabled", so the first ARP request would be dropped and the first ping of a
        test take a second (an ARP retry) instead of milliseconds.
        """

        def all_up() -> bool:
            return not any(self._links_down(n) for n in self.nodes)

        try:
            self.wait_for(all_up, timeout=timeout, interval=0.02, what="lab interfaces up")
        except TimeoutError:
            down = {n: d for n in self.nodes if (d := self._links_down(n))}
            raise TimeoutError(f"timed out after {timeout}s waiting for lab interfaces up: {down}") from None

    # ----------------------------------------------------------------- lookups

    def node(self, name: str | Node) -> Node:
        if isinstance(name, Node):
            return name
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(f"no node {name!r} in lab {self.id} (nodes: {', '.join(self.nodes)})") from None

    def _ns(self, node: str | Node) -> str:
        return self.node(node).ns

    def addr(self, name: str | Node, family: int = 4, *, facing: str | None = None) -> str:
        """First address of `name` (the router's first is its LAN one); with `facing`, the
        address on the segment shared with that peer (e.g. the router's WAN address)."""
        n = self.node(name)
        addrs = n.addrs.get(family) or []
        if not addrs:
            raise KeyError(f"node {n.name!r} has no IPv{family} address")
        if facing is None:
            return addrs[0]
        seg = self._shared_segment(n.name, facing)
        net = ipaddress.ip_network(self.networks[seg][family])
        for a in addrs:
            if ipaddress.ip_address(a) in net:
                return a
        raise KeyError(f"node {n.name!r} has no IPv{family} address on segment {seg!r}")

    def _shared_segment(self, node: str, peer: str) -> str:
        for seg, members in self.segments.items():
            if node in members and peer in members:
                return seg
        raise KeyError(f"nodes {node!r} and {peer!r} share no segment")

    def iface(self, node: str | Node, peer: str | Node) -> str:
        """Interface in `node` facing `peer` (for iif/oif matches): router->client is
        "lan", router->server and router->proxy "wan", every host's own is "eth0"."""
        n, p = self.node(node).name, self.node(peer).name
        return self.segments[self._shared_segment(n, p)][n]

    # ----------------------------------------------------------------- running things

    def _argv(self, node: str | Node, cmd: Sequence[Any]) -> list[str]:
        if not cmd:
            raise ValueError("no command given")
        return ["ip", "netns", "exec", self._ns(node), *map(str, cmd)]

    def exec(
        self,
        node: str | Node,
        *cmd: Any,
        timeout: float = 10,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the node and wait; LabCommandError (with stderr) on failure."""
        cp = subprocess.run(
            self._argv(node, cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=dict(env) if env is not None else None,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and cp.returncode:
            raise LabCommandError(self.node(node).name, cp)
        return cp

    def popen(self, node: str | Node, *cmd: Any, **kw: Any) -> subprocess.Popen[Any]:
        """Start a command in the node; it is terminated (by PID) at close()."""
        if self._closed:
            raise RuntimeError("lab is closed")
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self._argv(node, cmd), **kw)
        self._procs.append(proc)
        return proc

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 10.0,
        interval: float = 0.05,
        what: str = "condition",
    ) -> T:
        """Poll until `predicate()` is truthy and return that value (exceptions propagate).
        Polling, not sleeping: tests are as fast as the machine and fail with a reason."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)

    # ----------------------------------------------------------------- teardown

    def close(self) -> None:
        """Stop tracked processes (SIGTERM, SIGKILL after 3 s, by PID), then any process
        still inside a lab namespace (all started through this lab), then remove the
        namespaces (and with them every veth) and the temp dir. Idempotent."""
        if self._closed or os.getpid() != self._pid:
            return
        self._closed = True
        errors: list[str] = []
        for proc in reversed(self._procs):
            try:
                terminate(proc)
            except Exception as exc:  # keep tearing down
                errors.append(f"stopping pid {proc.pid}: {exc!r}")
        names = [n.ns for n in self.nodes.values()]
        if self._owner_written:
            # The id is ours (the owner record was created exclusively), so any namespace
            # with it is ours too -- e.g. one add_node made just before failing.
            names += [
                n for n in netns.listnetns()
                if n.startswith(f"{NS_MARKER}{self.id}-") and n not in names
            ]
        for pid in pids_in_namespaces(names):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name in names:
            try:
                remove_namespace(name)
            except Exception as exc:
                errors.append(f"removing {name}: {exc!r}")
        if self._owner_written:
            owner_path(self.id).unlink(missing_ok=True)
        if self._tmp is not None and not os.environ.get(KEEP_LOGS_ENV):
            shutil.rmtree(self._tmp, ignore_errors=True)
        left = [n for n in names if n in netns.listnetns()]
        if left or errors:
            raise RuntimeError(f"lab {self.id} teardown incomplete: left {left}; {'; '.join(errors)}")

    def detach(self, owner_pid: int) -> None:
        """Leave the lab running after this process exits (``nfhooks lab --keep``).

        The owner record is handed to `owner_pid` (e.g. the lab's engine), so cleanup_stale
        of other runs keeps the lab while that process lives and removes it once it is gone;
        close() becomes a no-op here and nothing started through this lab is stopped.
        """
        if not self._owner_written:
            raise RuntimeError("lab has no namespaces to detach")
        record = {"pid": owner_pid, "start": proc_start_time(owner_pid), "tmp": str(self.tmpdir)}
        path = owner_path(self.id)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)  # atomic: cleanup never reads a half-written record
        self._procs.clear()
        self._engines.clear()
        self._closed = True

