"""A throw-away network of Linux network namespaces for testing packet policies for real.

Why namespaces: an nfhooks policy installs iptables rules and binds NFQUEUE queues. Done
in the machine's own namespace that could cut the machine off; inside a namespace it can
only ever touch the lab. Every namespace, veth, address, route and sysctl here is created
*inside* lab namespaces (veth pairs are created in one lab namespace with their peer placed
straight into another), so nothing is ever configured in the root namespace.

Naming: every lab namespace is ``nfhlab-<id>-<node>``. The fixed ``nfhlab-`` marker is what
`cleanup_stale` keys on, so it can never remove a namespace somebody else made. While a lab
is alive, ``/run/nfhlab/<id>.json`` names its owner process; `cleanup_stale` leaves labs
whose owner still runs alone, so it is safe to call while other test runs are going on.

The router topology::

    client --(lan)-- router --(wan)-- switch ==bridge== server
                                                   \\=== proxy

The WAN segment is a Linux bridge in a separate ``switch`` namespace rather than in the
router: a bridge in the router would make server<->proxy traffic bridged *inside the
router*, where br_netfilter (if loaded) would feed it through the router's iptables and the
engine under test. With a separate switch the router has exactly one interface per side
(``lan``, ``wan``) and sees only routed traffic.

For the vpn scenario, `Lab.add_office` adds a second office (gateway ``gw_b`` on the WAN
bridge, ``host_b`` behind it on its own private range) and `Lab.start_tunnel` runs
``nfhooks tunnel`` in a node and routes a remote office into its tun device.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from pyroute2 import IPRoute, netns
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

__all__ = [
    "EngineProc",
    "Lab",
    "LabCommandError",
    "Node",
    "TcpServer",
    "UdpServer",
    "cleanup_stale",
    "NS_MARKER",
]

#: Every lab namespace name starts with this; nothing else is ever removed by the lab.
NS_MARKER = "nfhlab-"
#: Where live labs record their owner process (so cleanup can tell live from crashed).
OWNER_DIR = Path("/run/nfhlab")
NETNS_DIR = Path("/run/netns")
#: Environment variable prepended to random lab ids (e.g. "C" for one engineer's runs).
ID_PREFIX_ENV = "NFHOOKS_LAB_PREFIX"
#: Set to keep the lab's temp dir (server and engine logs) after close(), for debugging.
KEEP_LOGS_ENV = "NFHOOKS_LAB_KEEP_LOGS"
READY_LINE = "nfhooks ready"

_ID_RE = re.compile(r"[A-Za-z0-9]{1,24}")
_NODE_RE = re.compile(r"[a-z][a-z0-9_]{0,23}")
_NS_RE = re.compile(rf"{re.escape(NS_MARKER)}([A-Za-z0-9]+)-([A-Za-z0-9_.]+)")
_IFNAME_MAX = 15
_BR_STATE_FORWARDING = 3

#: sysctls set in every lab namespace before any interface exists, so interfaces inherit
#: them: no duplicate address detection (addresses usable at once, no tentative races),
#: no reverse-path filtering (new namespaces inherit the host's rp_filter; NAT and proxy
#: tests must not depend on what the host happens to use).
_BASE_SYSCTLS: Mapping[str, str] = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}
_ROUTER_SYSCTLS: Mapping[str, str] = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
}

T = TypeVar("T")

# --------------------------------------------------------------------------- helper scripts
# Small programs run with the lab's interpreter inside a node (`ip netns exec NS python -c`).
# Inline so that the lab needs nothing on the machine beyond iproute2 and Python.

_SERVER_SCRIPT = r"""
import base64, json, socket, sys, threading
mode, fam, host, port, log_path, ready_path, banner = sys.argv[1:8]
af = socket.AF_INET6 if fam == "6" else socket.AF_INET
s = socket.socket(af, socket.SOCK_STREAM if mode == "tcp" else socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if af == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind((host, int(port)))
lock = threading.Lock()
log = open(log_path, "a", buffering=1)
def record(**kw):
    with lock:
        log.write(json.dumps(kw) + "\n")
        log.flush()
def serve(conn, peer):
    conn.settimeout(1.0)
    data = b""
    try:
        data = conn.recv(65536)
    except OSError:
        pass
    if data:
        record(event="data", peer=peer[0], port=peer[1], data=base64.b64encode(data).decode())
    body = (banner + "\n").encode()
    try:
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d"
                     b"\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    except OSError:
        pass
    conn.close()
if mode == "tcp":
    s.listen(128)
open(ready_path, "w").close()
while True:
    if mode == "tcp":
        conn, peer = s.accept()
        record(event="accept", peer=peer[0], port=peer[1])
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
    else:
        data, peer = s.recvfrom(65535)
        record(event="datagram", peer=peer[0], port=peer[1], data=base64.b64encode(data).decode())
        try:
            s.sendto(data, peer)
        except OSError:
            pass
"""

_CONNECT_SCRIPT = r"""
import errno, socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(timeout)
try:
    s.connect((host, port))
    print("ok")
except TimeoutError:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print(errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__)
finally:
    s.close()
"""

_UDP_SEND_SCRIPT = r"""
import base64, socket, sys
host, port, timeout, data = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(timeout)
try:
    s.sendto(base64.b64decode(data), (host, port))
    reply = s.recv(65535)
    print(base64.b64encode(reply).decode())
except OSError:
    pass
"""

# Raw-socket ping, because iputils-ping is not necessarily installed.
_PING_SCRIPT = r"""
import os, select, socket, struct, sys, time
host, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
v6 = ":" in host
if v6:
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident = os.getpid() & 0xFFFF
def csum(b):
    if len(b) % 2:
        b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xFFFF)
    t += t >> 16
    return ~t & 0xFFFF
got = 0
for seq in range(1, count + 1):
    payload = b"nfhooks-lab-ping" + struct.pack("!d", time.time())
    kind = 128 if v6 else 8
    pkt = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + payload
    if not v6:
        pkt = struct.pack("!BBHHH", kind, 0, csum(pkt), ident, seq) + payload
    try:
        s.sendto(pkt, (host, 0))
    except OSError:
        continue
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            break
        data = s.recv(65535)
        if not v6:
            data = data[(data[0] & 0x0F) * 4:]
        if len(data) < 8:
            continue
        typ, _code, _sum, rid, rseq = struct.unpack("!BBHHH", data[:8])
        if typ == (129 if v6 else 0) and rid == ident and rseq == seq:
            got += 1
            break
print(got)
"""


# --------------------------------------------------------------------------- data types


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


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _terminate(proc: subprocess.Popen[Any], grace: float = 3.0) -> int:
    """SIGTERM, then SIGKILL after `grace` seconds -- always by the process's own PID."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        except ProcessLookupError:
            proc.wait(10)
    return proc.returncode


class _LogServer:
    """Common part of the tcp/udp servers: a tracked process writing JSON lines."""

    def __init__(
        self,
        lab: Lab,
        node: str,
        proc: subprocess.Popen[Any],
        addr: str,
        port: int,
        family: int,
        log_path: Path,
    ) -> None:
        self.lab, self.node, self.proc = lab, node, proc
        self.addr, self.port, self.family = addr, port, family
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def records(self) -> list[dict[str, Any]]:
        """Everything the server logged so far (a half-written last line is skipped)."""
        try:
            text = self.log_path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def stop(self) -> int:
        return _terminate(self.proc)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node} {self.addr} port {self.port} pid {self.pid}>"


class TcpServer(_LogServer):
    """TCP server in a node: records each accepted peer, answers a tiny HTTP/1.0 200."""

    def log_peers(self) -> list[str]:
        """Client addresses of the connections accepted so far, in order."""
        return [r["peer"] for r in self.records() if r.get("event") == "accept"]

    def connections(self) -> list[tuple[str, int]]:
        """(address, port) of each accepted connection -- the port shows SNAT port mapping."""
        return [(r["peer"], r["port"]) for r in self.records() if r.get("event") == "accept"]

    def received(self) -> list[bytes]:
        """The first chunk each connection sent (connections that sent nothing are absent)."""
        return [base64.b64decode(r["data"]) for r in self.records() if r.get("event") == "data"]

    def wait_peers(self, n: int = 1, timeout: float = 5.0) -> list[str]:
        """Peers once at least `n` connections were accepted (accept lags the handshake)."""
        return self.lab.wait_for(
            lambda: (p if len(p := self.log_peers()) >= n else None),
            timeout=timeout,
            what=f"{n} connection(s) logged by the TCP server in {self.node}",
        )


class UdpServer(_LogServer):
    """UDP server in a node: records each datagram's sender and payload and echoes it."""

    def datagrams(self) -> list[tuple[str, bytes]]:
        return [
            (r["peer"], base64.b64decode(r["data"]))
            for r in self.records()
            if r.get("event") == "datagram"
        ]

    def log_peers(self) -> list[str]:
        return [peer for peer, _ in self.datagrams()]

    def wait_datagrams(self, n: int = 1, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        return self.lab.wait_for(
            lambda: (d if len(d := self.datagrams()) >= n else None),
            timeout=timeout,
            what=f"{n} datagram(s) logged by the UDP server in {self.node}",
        )


class EngineProc:
    """A running `python -m nfhooks run ...` inside a lab node, its output in a log file."""

    def __init__(
        self, proc: subprocess.Popen[Any], log_path: Path, argv: Sequence[str], node: str
    ) -> None:
        self.proc = proc
        self.log_path = log_path
        self.argv = list(argv)
        self.node = node

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def running(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until `text` appears in the engine's output; fail early if it exits."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if text in log:
                return log
            if self.proc.poll() is not None:
                log = self.log()
                if text in log:
                    return log
                raise RuntimeError(
                    f"engine exited with {self.proc.returncode} before printing {text!r}; "
                    f"log tail:\n{_tail(log)}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"timed out after {timeout}s waiting for {text!r} in the engine log; "
                    f"log tail:\n{_tail(log)}"
                )
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `sig` and wait; an engine that does not exit in time is killed and that
        is an error (a clean shutdown that hangs is a bug worth failing a test for)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise TimeoutError(
                f"engine pid {self.pid} did not exit within {timeout}s of signal {sig}; "
                f"killed. log tail:\n{_tail(self.log())}"
            ) from None

    def kill9(self) -> int:
        """SIGKILL: what a crash looks like (no cleanup of rules or queues)."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(10)

    def __repr__(self) -> str:
        state = "running" if self.running() else f"exited {self.proc.returncode}"
        return f"<EngineProc pid {self.pid} in {self.node} {state}>"


# --------------------------------------------------------------------------- owner records


def _proc_start_time(pid: int) -> int | None:
    """Kernel start time of a process: tells a live owner from a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _owner_path(lab_id: str) -> Path:
    return OWNER_DIR / f"{lab_id}.json"


def _read_owner(lab_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(_owner_path(lab_id).read_text())
    except (OSError, ValueError):
        return None


def _owner_alive(record: Mapping[str, Any]) -> bool:
    pid, start = record.get("pid"), record.get("start")
    return isinstance(pid, int) and start is not None and _proc_start_time(pid) == start


def _list_lab_namespaces() -> list[str]:
    return sorted(n for n in netns.listnetns() if _NS_RE.fullmatch(n))


def _remove_namespace(name: str) -> None:
    """Unmount and unlink /run/netns/NAME; the kernel frees the namespace (and its veths)
    once no process is left in it."""
    if not _NS_RE.fullmatch(name):  # never anything that is not ours
        raise ValueError(f"refusing to remove {name!r}: not a lab namespace")
    try:
        netns.remove(name)
    except FileNotFoundError:
        pass


def _ns_inode(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pids_in_namespaces(names: Iterable[str]) -> dict[int, str]:
    """PID -> namespace for every process whose network namespace is one of `names`."""
    wanted = {ino: n for n in names if (ino := _ns_inode(n)) is not None}
    found: dict[int, str] = {}
    if not wanted:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        name = wanted.get((st.st_dev, st.st_ino))
        if name is not None:
            found[int(entry)] = name
    return found


def cleanup_stale(
    prefix_glob: str = NS_MARKER + "*", *, orphans: bool = True, kill: bool = False
) -> list[str]:
    """Remove lab namespaces left behind by crashed runs; return the names removed.

    Only namespaces named ``nfhlab-<id>-<node>`` that also match `prefix_glob` are
    considered (a pattern without wildcards is taken as a prefix, so "nfh" and "nfhlab-C"
    work). A lab whose owner process still runs is never touched. `orphans`: also remove
    matching lab namespaces that have no owner record at all. `kill`: SIGKILL (by PID)
    processes still inside the removed namespaces -- off by default, because after a crash
    they may belong to somebody else's run; left alone they only keep an invisible
    namespace alive until they exit.
    """
    pattern = prefix_glob if any(c in prefix_glob for c in "*?[") else prefix_glob + "*"
    removed: list[str] = []
    dead_ids: set[str] = set()
    for name in _list_lab_namespaces():
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        m = _NS_RE.fullmatch(name)
        assert m is not None
        lab_id = m.group(1)
        record = _read_owner(lab_id)
        if record is None and not orphans:
            continue
        if record is not None and _owner_alive(record):
            continue
        if kill:
            for pid in _pids_in_namespaces([name]):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        _remove_namespace(name)
        removed.append(name)
        if record is not None:
            dead_ids.add(lab_id)
    # Owner records of crashed labs whose namespaces are all gone now.
    if OWNER_DIR.is_dir():
        left = {m.group(1) for n in _list_lab_namespaces() if (m := _NS_RE.fullmatch(n))}
        for path in OWNER_DIR.glob("*.json"):
            lab_id = path.stem
            if lab_id in left or not fnmatch.fnmatchcase(f"{NS_MARKER}{lab_id}-x", pattern):
                continue
            record = _read_owner(lab_id)
            if record is None or _owner_alive(record):
                continue
            _remove_tmpdir(record.get("tmp"))
            path.unlink(missing_ok=True)
    return removed


def _remove_tmpdir(path: object) -> None:
    """Remove a lab temp dir -- only one that looks like ours (named nfhlab-*)."""
    if isinstance(path, str) and Path(path).name.startswith(NS_MARKER) and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- the lab


def _run_sysctls(ns: str, values: Mapping[str, str]) -> None:
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


class Lab:
    """A set of namespaces wired together; everything it made goes away at close()."""

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

    def __enter__(self) -> Lab:
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
        path = _owner_path(self.id)
        if any(n.startswith(f"{NS_MARKER}{self.id}-") for n in netns.listnetns()):
            raise FileExistsError(f"lab id {self.id!r} is already in use (namespaces exist)")
        record = {"pid": os.getpid(), "start": _proc_start_time(os.getpid()), "tmp": str(self.tmpdir)}
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
        _run_sysctls(ns, {**_BASE_SYSCTLS, **(sysctls or {})})
        with IPRoute(netns=ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return node

    def sysctl(self, node: str | Node, values: Mapping[str, str | int]) -> None:
        """Set sysctls inside one node's namespace (never the machine's own)."""
        _run_sysctls(self._ns(node), {k: str(v) for k, v in values.items()})

    def add_bridge(self, node: str | Node, ifname: str) -> None:
        """A plain learning bridge: no STP (ports forward at once), no multicast snooping
        (no querier here, so snooping could only ever drop neighbour discovery)."""
        _check_ifname(ifname)
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
        _check_ifname(a_if)
        _check_ifname(b_if)
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
        v4_octet, ula = _pick_ranges(self.id)
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
        self.add_node("router", sysctls=_ROUTER_SYSCTLS)
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
        self.add_node(gw, sysctls=_ROUTER_SYSCTLS)
        self.add_node(host)
        self.connect(gw, "wan", "switch", f"sw-{gw}"[:_IFNAME_MAX], b_master="br0")
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
        _check_ifname(dev)
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

    def _python(self, node: str | Node, script: str, *args: Any, timeout: float) -> str:
        cp = self.exec(node, sys.executable, "-c", script, *args, timeout=timeout)
        return cp.stdout.strip()

    def _resolve_dst(self, dst: str, family: int = 4) -> str:
        return self.addr(dst, family) if dst in self.nodes else dst

    def _start_server(
        self, cls: type[_LogServer], mode: str, node: str | Node, port: int, family: int, bind: str | None
    ) -> Any:
        n = self.node(node)
        addr = bind or self.addr(n.name, family)
        self._seq += 1
        base = self.tmpdir / f"{mode}-{n.name}-{port}-{self._seq}"
        log_path, ready = base.with_suffix(".jsonl"), base.with_suffix(".ready")
        err_path = base.with_suffix(".err")
        with open(err_path, "wb") as err:
            proc = self.popen(
                n, sys.executable, "-c", _SERVER_SCRIPT, mode, family, addr, port,
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
        return self._python(src_node, _CONNECT_SCRIPT, dst, port, timeout, timeout=timeout + 10)

    def udp_send(
        self, src_node: str | Node, dst_addr: str, port: int, payload: bytes | str, timeout: float = 2.0
    ) -> bytes | None:
        """Send one datagram from `src_node`; return the reply (udp_server echoes) or None."""
        dst = self._resolve_dst(dst_addr)
        data = payload.encode() if isinstance(payload, str) else payload
        out = self._python(src_node, _UDP_SEND_SCRIPT, dst, port, timeout,
                           base64.b64encode(data).decode(), timeout=timeout + 10)
        return base64.b64decode(out) if out else None

    def ping(self, src_node: str | Node, dst_addr: str, count: int = 1, timeout: float = 2) -> bool:
        """ICMP echo from `src_node`; True if any reply came back within `timeout` s each.
        (A raw-socket ping in Python, so iputils-ping need not be installed.)"""
        dst = self._resolve_dst(dst_addr)
        out = self._python(src_node, _PING_SCRIPT, dst, count, timeout, timeout=count * timeout + 10)
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
            _terminate(proc)
            raise
        return engine

    # ----------------------------------------------------------------- diagnostics

    def debug_report(self) -> str:
        """What to look at when a test failed: engine logs, router rules and addresses."""
        parts = [repr(self)]
        for e in self._engines:
            parts.append(f"--- engine {' '.join(e.argv[-4:])} pid {e.pid} "
                         f"({'running' if e.running() else f'exit {e.returncode}'}) log tail:\n"
                         f"{_tail(e.log(), 60)}")
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
                _terminate(proc)
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
        for pid in _pids_in_namespaces(names):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name in names:
            try:
                _remove_namespace(name)
            except Exception as exc:
                errors.append(f"removing {name}: {exc!r}")
        if self._owner_written:
            _owner_path(self.id).unlink(missing_ok=True)
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
        record = {"pid": owner_pid, "start": _proc_start_time(owner_pid), "tmp": str(self.tmpdir)}
        path = _owner_path(self.id)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)  # atomic: cleanup never reads a half-written record
        self._procs.clear()
        self._engines.clear()
        self._closed = True



def _check_ifname(name: str) -> None:
    if not name or len(name) > _IFNAME_MAX or "/" in name or " " in name:
        raise ValueError(f"interface name {name!r}: 1-{_IFNAME_MAX} chars, no '/' or spaces")


def _host_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
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


def _pick_ranges(lab_id: str) -> tuple[int, str]:
    """10.<n>.0.0/16 and a ULA /48 derived from the lab id, avoiding the host's networks.

    Lab namespaces have their own routing tables, so a clash could not break the host;
    avoiding its ranges keeps addresses in logs unambiguous and leaves no doubt about
    where a packet went.
    """
    host = _host_networks()
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
