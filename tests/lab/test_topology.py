"""The namespace lab itself: reachability, servers, teardown, engine start, stale cleanup.

Kernel tests: they create real namespaces (only ever named nfhlab-<id>-<node>), never
touch the machine's own namespace, and skip where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nfhooks.testing import requires_netns

pytestmark = pytest.mark.kernel

_REASON = requires_netns(probe=False)
needs_netns = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _lab_id() -> str:
    """Ids for labs these tests build by hand: "C" marks this test suite's namespaces."""
    return "C" + secrets.token_hex(3)


# A stand-in for `python -m nfhooks run`: reports where it runs, says ready, exits 0 on TERM.
STANDIN = textwrap.dedent(
    """
    import os, signal, sys, time
    def bye(*_):
        print("standin stopping", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
    print("netns", os.stat("/proc/self/ns/net").st_ino, "pid", os.getpid(), flush=True)
    print("nfhooks ready", flush=True)
    while True:
        time.sleep(1)
    """
)


# ----------------------------------------------------------------------------- traffic


def test_ping_v4_and_v6_through_router(nfh_lab):
    lab = nfh_lab
    for fam in (4, 6):
        assert lab.ping("client", lab.addr("server", fam)), f"IPv{fam} client -> server"
        assert lab.ping("client", lab.addr("proxy", fam)), f"IPv{fam} client -> proxy"
        assert lab.ping("server", lab.addr("client", fam)), f"IPv{fam} server -> client"
    assert lab.ping("server", "proxy")  # node name: its first IPv4 address, same segment
    assert not lab.ping("client", "10.255.255.1", timeout=0.3)  # nothing there


def test_addresses_interfaces_and_forwarding_only_in_router(nfh_lab):
    lab = nfh_lab
    n = lab.addr("client").split(".")[1]
    assert lab.addr("client") == f"10.{n}.1.2"
    assert lab.addr("router") == f"10.{n}.1.1"
    assert lab.addr("router", facing="server") == f"10.{n}.2.1"
    assert lab.addr("server") == f"10.{n}.2.2" and lab.addr("proxy") == f"10.{n}.2.3"
    assert lab.addr("client", 6).endswith(":1::2") and lab.addr("server", 6).endswith(":2::2")
    assert lab.iface("router", "client") == "lan"
    assert lab.iface("router", "server") == lab.iface("router", "proxy") == "wan"
    assert lab.iface("client", "router") == lab.iface("server", "proxy") == "eth0"
    with pytest.raises(KeyError):
        lab.iface("client", "server")  # not on one segment
    assert all(ns.startswith(f"nfhlab-{lab.id}-") for ns in (n.ns for n in lab.nodes.values()))

    def sysctl(node: str, key: str) -> str:
        return lab.exec(node, "cat", "/proc/sys/" + key.replace(".", "/")).stdout.strip()

    assert sysctl("router", "net.ipv4.ip_forward") == "1"
    assert sysctl("router", "net.ipv6.conf.all.forwarding") == "1"
    assert sysctl("client", "net.ipv4.ip_forward") == "0"
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "0"  # the machine's
    v6 = lab.exec("client", "ip", "-6", "addr", "show", "dev", "eth0").stdout
    assert "nodad" in v6 and "tentative" not in v6


def test_tcp_server_sees_client_address(nfh_lab):
    lab = nfh_lab
    for fam in (4, 6):
        srv = lab.tcp_server("server", 8080, family=fam)
        assert lab.tcp_connect("client", lab.addr("server", fam), 8080) == "ok"
        assert srv.wait_peers(1) == [lab.addr("client", fam)]
    # a real client gets the tiny HTTP answer
    out = lab.exec("client", "curl", "-s", "-m", "5", f"http://{lab.addr('server')}:8080/").stdout
    assert out.strip() == "nfhooks-lab server"


def test_tcp_connect_closed_port_refused_and_dropped_times_out(nfh_lab):
    lab = nfh_lab
    assert lab.tcp_connect("client", lab.addr("server"), 8081) == "refused"
    assert lab.tcp_connect("client", lab.addr("server", 6), 8081) == "refused"
    lab.tcp_server("server", 8082)
    # inside the router namespace only; matching the lab's interface name
    lab.exec("router", "iptables", "-A", "FORWARD", "-i", lab.iface("router", "client"),
             "-p", "tcp", "--dport", "8082", "-j", "DROP")
    assert lab.tcp_connect("client", lab.addr("server"), 8082, timeout=0.5) == "timeout"
    assert lab.tcp_connect("proxy", lab.addr("server"), 8082) == "ok"  # same segment, not routed


def test_udp_server_records_datagram(nfh_lab):
    lab = nfh_lab
    srv = lab.udp_server("server", 5353)
    assert lab.udp_send("client", lab.addr("server"), 5353, b"hello\x00lab") == b"hello\x00lab"
    assert srv.wait_datagrams(1) == [(lab.addr("client"), b"hello\x00lab")]
    srv6 = lab.udp_server("proxy", 5354, family=6)
    lab.exec("client", sys.executable, "-c",
             "import socket,sys; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM);"
             "s.sendto(b'x6', (sys.argv[1], 5354))", lab.addr("proxy", 6))
    assert srv6.wait_datagrams(1) == [(lab.addr("client", 6), b"x6")]
    assert srv6.log_peers() == [lab.addr("client", 6)]


def test_wait_for_returns_value_or_times_out_with_reason(nfh_lab):
    calls = iter([0, None, "", "done"])
    assert nfh_lab.wait_for(lambda: next(calls), interval=0.001) == "done"
    with pytest.raises(TimeoutError, match=r"timed out after 0.1s waiting for the moon"):
        nfh_lab.wait_for(lambda: False, timeout=0.1, what="the moon")


def test_exec_failure_shows_stderr(nfh_lab):
    from nfhooks.lab import LabCommandError

    with pytest.raises(LabCommandError, match="in lab node 'client'.*(?s:.*)nope") as info:
        nfh_lab.exec("client", "sh", "-c", "echo nope >&2; exit 3")
    assert info.value.returncode == 3
    assert nfh_lab.exec("client", "sh", "-c", "exit 3", check=False).returncode == 3
    assert nfh_lab.exec("client", "cat", input="piped").stdout == "piped"


# ----------------------------------------------------------------------------- teardown


@needs_netns
def test_close_removes_every_namespace_and_is_idempotent():
    from nfhooks.lab import Lab

    links_before = _root_links()
    lab = Lab.router_topology(prefix=_lab_id())
    names = {n.ns for n in lab.nodes.values()}
    assert names <= _netns_list()
    assert _root_links() == links_before  # no veth ever appeared in the root namespace
    sleeper = lab.popen("server", "sleep", "60")
    lab.close()
    lab.close()
    assert not names & _netns_list()
    assert sleeper.poll() is not None
    assert lab._tmp is not None and not lab._tmp.exists()
    assert not Path(f"/run/nfhlab/{lab.id}.json").exists()


@needs_netns
def test_context_manager_closes_when_body_raises():
    from nfhooks.lab import Lab

    names: set[str] = set()
    with pytest.raises(ZeroDivisionError):
        with Lab.router_topology(prefix=_lab_id()) as lab:
            names = {n.ns for n in lab.nodes.values()}
            assert names <= _netns_list()
            1 / 0
    assert names and not names & _netns_list()


@needs_netns
def test_id_in_use_is_refused_and_other_lab_survives():
    from nfhooks.lab import Lab

    with Lab.router_topology(prefix=_lab_id()) as first:
        second = Lab(prefix=first.id)
        with pytest.raises(FileExistsError, match="already in use"):
            second.add_node("client")
        second.close()  # must not sweep away the first lab's namespaces
        assert {n.ns for n in first.nodes.values()} <= _netns_list()
        assert first.ping("client", "server")


@needs_netns
def test_failed_build_leaves_nothing():
    from nfhooks.lab import Lab

    lab = Lab(prefix=_lab_id())
    lab.add_node("a")
    with pytest.raises(ValueError, match="interface name"):
        lab.connect("a", "x" * 16, "a", "y")
    lab.close()
    assert not any(n.startswith(f"nfhlab-{lab.id}-") for n in _netns_list())


@needs_netns
def test_fixture_tears_down_when_test_fails(tmp_path):
    """Runs a failing test that uses nfh_lab in a child pytest (the plugin arrives via the
    installed entry point) and checks its namespaces are gone and the report has the lab."""
    record = tmp_path / "names.json"
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent(
            """
            import json, os
            def test_boom(nfh_lab):
                names = [n.ns for n in nfh_lab.nodes.values()]
                with open(os.environ["NFH_RECORD"], "w") as f:
                    json.dump(names, f)
                raise RuntimeError("boom in test body")
            """
        )
    )
    env = {**os.environ, "NFH_RECORD": str(record), "NFHOOKS_LAB_PREFIX": "C"}
    cp = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100,
    )
    assert cp.returncode == 1, cp.stdout + cp.stderr
    assert "boom in test body" in cp.stdout
    assert "nfhooks lab" in cp.stdout  # debug report attached to the failure
    names = set(json.loads(record.read_text()))
    assert len(names) == 5 and all(n.startswith("nfhlab-C") for n in names)
    assert not names & _netns_list()


# ----------------------------------------------------------------------------- engine


def test_start_engine_with_standin(nfh_lab):
    lab = nfh_lab
    eng = lab.start_engine("policy.py", _argv=[sys.executable, "-c", STANDIN])
    assert eng.running()
    words = eng.log().split()
    router_ino = os.stat(f"/run/netns/{lab.node('router').ns}").st_ino
    assert int(words[words.index("netns") + 1]) == router_ino  # it runs in the router
    assert int(words[words.index("pid") + 1]) == eng.pid  # ip netns exec execs: signals land
    assert eng.stop() == 0
    assert "standin stopping" in eng.log()
    assert eng.stop() == 0  # already stopped: just the code

    crash = lab.start_engine("p", _argv=[sys.executable, "-c", STANDIN])
    assert crash.kill9() == -signal.SIGKILL


def test_start_engine_failure_and_timeout(nfh_lab):
    lab = nfh_lab
    with pytest.raises(RuntimeError, match=r"exited with 3(?s:.*)policy has a syntax error"):
        lab.start_engine("p", _argv=[sys.executable, "-c",
                                     "print('policy has a syntax error'); raise SystemExit(3)"])
    with pytest.raises(TimeoutError, match="nfhooks ready"):
        lab.start_engine("p", ready_timeout=0.5,
                         _argv=[sys.executable, "-c", "import time; print('slow'); time.sleep(30)"])
    assert all(p.poll() is not None for p in lab._procs)  # the slow one was stopped


def test_start_engine_default_command(nfh_lab):
    assert nfh_lab.engine_argv("pol.py", "--metrics", "9100") == [
        sys.executable, "-m", "nfhooks", "run", "pol.py", "--metrics", "9100"
    ]


def test_close_stops_running_engine(nfh_lab):
    eng = nfh_lab.start_engine("p", _argv=[sys.executable, "-c", STANDIN])
    nfh_lab.close()
    assert eng.returncode == 0  # SIGTERM first: the stand-in's handler ran


# ----------------------------------------------------------------------------- stale cleanup


@needs_netns
def test_cleanup_stale_removes_leftovers_and_spares_live_labs():
    from pyroute2 import netns

    from nfhooks.lab import Lab, cleanup_stale

    stale_id = _lab_id()
    orphan = f"nfhlab-{stale_id}-client"  # as if its owner had been SIGKILLed long ago
    netns.create(orphan)
    dead_id = _lab_id()
    dead = f"nfhlab-{dead_id}-router"
    netns.create(dead)
    owner = Path(f"/run/nfhlab/{dead_id}.json")
    owner.parent.mkdir(exist_ok=True)
    # owner PID above the kernel's maximum pid_max: certainly not running
    owner.write_text(json.dumps({"pid": 2**22 + 1, "start": 1, "tmp": None}))
    try:
        with Lab.router_topology(prefix=_lab_id()) as live:
            live_names = {n.ns for n in live.nodes.values()}
            # a live lab is never touched, even by a pattern that matches it
            assert cleanup_stale(f"nfhlab-{live.id}") == []
            assert not cleanup_stale(f"nfhlab-{stale_id}", orphans=False)
            assert cleanup_stale(f"nfhlab-{stale_id}") == [orphan]
            assert cleanup_stale(f"nfhlab-{dead_id}-*", orphans=False) == [dead]
            assert live_names <= _netns_list()
        assert not {orphan, dead} & _netns_list()
        assert not owner.exists()
    finally:
        for n in (orphan, dead):
            if n in _netns_list():
                netns.remove(n)
        owner.unlink(missing_ok=True)


def test_cleanup_stale_ignores_names_without_the_marker():
    from nfhooks.lab.namespaces import NS_RE, remove_namespace

    assert NS_RE.fullmatch("nfhlab-C1a2b3-router")
    for name in ("nfhA-r", "nfhC-x", "nfhlabX-1-r", "other"):
        assert not NS_RE.fullmatch(name)
        with pytest.raises(ValueError, match="not a lab namespace"):
            remove_namespace(name)


def test_lab_id_validation_and_ranges():
    from nfhooks.lab import Lab
    from nfhooks.lab.topology import pick_ranges

    with pytest.raises(ValueError):
        Lab(prefix="bad-id")
    assert Lab(prefix="nfhlab-C12").id == "C12"
    octet, ula = pick_ranges("C12")
    assert 16 <= octet <= 239 and ula.startswith("fd")
    assert pick_ranges("C12") == (octet, ula)  # derived from the id: reproducible
