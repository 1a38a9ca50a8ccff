"""Connection verdicts on the real kernel path (nfhooks/connverdict.py): a handler that read the
payload decides the connection, the kernel decides the rest of it -- Python never sees it again.

``policies/inspect_then_offload.py`` on the router (FORWARD) between curl in the client namespace
and an HTTP server in the server namespace: an allowed Host gets its whole response while Python
sees the handshake and the request only, the kernel's rule counts the rest; a blocked Host gets a
reset at once. A test policy at INPUT shows drop(connection=True) staying dropped in the kernel
(TCP retransmissions, UDP datagrams of one flow) and accept(connection=True) for UDP.
IPv4 and IPv6, both rule backends (conftest.py).
"""

from __future__ import annotations

import sys
import time

import pytest

from .conftest import POLICIES, metric, nfh_lines, rule_counter

PORT = 8080
BODY = 1_000_000

HTTP_SERVER = r"""
import socket, sys, threading
port, size, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
srv = socket.socket(socket.AF_INET6)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # both families on one socket
srv.bind(("::", port))
srv.listen(64)
open(ready, "w").close()
def serve(c):
    c.settimeout(20)
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            d = c.recv(4096)
            if not d:
                return
            buf += d
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size + b"x" * size)
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def handled(lab, handler: str, verdict: str | None = None) -> float:
    labels = {"handler": handler} if verdict is None else {"handler": handler, "verdict": verdict}
    return metric(lab, "nfhooks_handler_packets_total", **labels)


def exported(lab, name: str, want: float, **labels: str) -> None:
    """Wait until the metric says ``want`` (the kernel counters are read at most once a second)."""
    lab.wait_for(lambda: metric(lab, name, **labels) == want, timeout=5, what=f"{name} {labels} == {want}")


def curl(lab, family: int, host: str, timeout: float = 10) -> tuple[int, str, float]:
    """(exit code, "<http code> <bytes>", seconds) of curl from the client to the server."""
    addr = lab.addr("server", family)
    url = f"http://[{addr}]:{PORT}/big" if family == 6 else f"http://{addr}:{PORT}/big"
    t0 = time.monotonic()
    cp = lab.exec("client", "curl", "-g", "-s", "-o", "/dev/null", "-m", str(timeout), "-H", f"Host: {host}",
                  "-w", "%{http_code} %{size_download}", url, check=False, timeout=timeout + 10)
    return cp.returncode, cp.stdout.strip(), time.monotonic() - t0


@pytest.fixture
def web_lab(nfh_lab):
    lab = nfh_lab
    ready = lab.tmpdir / "http.ready"
    lab.popen("server", sys.executable, "-c", HTTP_SERVER, PORT, BODY, ready)
    lab.wait_for(ready.exists, what="HTTP server in the server namespace")
    lab.start_engine(str(POLICIES / "inspect_then_offload.py"), "--set", f"port={PORT}",
                     "--set", "blocked=blocked.example,other.example")
    return lab


@pytest.mark.parametrize("family", [4, 6])
def test_allowed_host_offloaded_after_its_first_request_blocked_host_reset(web_lab, family):
    lab = web_lab
    code, out, _ = curl(lab, family, "allowed.example")
    assert code == 0 and out == f"200 {BODY}", (code, out)  # the whole response came through
    # Python saw the handshake and the request (SYN, ACK, GET): a few packets, not the connection
    seen = handled(lab, "http_forward")
    assert 2 <= seen <= 5, seen
    assert handled(lab, "http_forward", "accept") == seen
    assert metric(lab, "nfhooks_connection_verdicts_total", hook="FORWARD", handler="http_forward",
                  verdict="accept") == 1
    # the rest -- the server's response and the client's ACKs -- the kernel accepted by itself
    kernel = rule_counter(lab, "conn accept", family=family)
    assert kernel >= 20, kernel
    assert rule_counter(lab, "conn accept", family=10 - family) == 0
    lab.wait_for(lambda: metric(lab, "nfhooks_connection_verdict_packets_total", hook="FORWARD",
                                verdict="accept") >= kernel, timeout=5, what="the kernel's count exported")
    assert handled(lab, "http") == 0  # nothing for the router itself (INPUT)

    code, out, took = curl(lab, family, "Blocked.Example:8080")
    assert code == 56 and out.startswith("000"), (code, out)  # "Connection reset by peer"
    assert took < 3, took  # at once: a reset, not a timeout
    assert handled(lab, "http_forward", "reject") == 1
    assert rule_counter(lab, "conn reject http_forward", family=family) == 1  # decided once
    exported(lab, "nfhooks_connection_verdicts_total", 1, handler="http_forward", verdict="reject")
    # another allowed connection is decided afresh, once
    assert curl(lab, family, "allowed.example")[:2] == (0, f"200 {BODY}")
    exported(lab, "nfhooks_connection_verdicts_total", 2, handler="http_forward", verdict="accept")
    assert handled(lab, "http_forward") <= 2 * seen + 1 + 5


GATE = '''\
from nfhooks import Policy, accept, drop

policy = Policy("conn-gate")

@policy.input(proto="tcp", dport=7201)
def tcp_gate(pkt):
    if not pkt.payload:
        return accept()
    return drop(connection=True) if pkt.payload.startswith(b"bad") else accept(connection=True)

@policy.input(proto="udp", dport=7202)
def udp_gate(pkt):
    if pkt.payload.startswith(b"hello"):
        return accept()  # the flow's first datagram: conntrack confirms the connection with it
    return drop(connection=True) if pkt.payload.startswith(b"bad") else accept(connection=True)
'''

UDP_CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
for p in sys.argv[3:]:
    s.sendto(p.encode(), (host, port))
    try:
        got = s.recv(2048).decode()
    except OSError:
        got = "-"
    print(got)
"""

TCP_CLIENT = r"""
import socket, sys, time
host, port, first, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
s = socket.create_connection((host, port), timeout=5)
s.sendall(first + b"\r\n\r\n")
s.settimeout(wait)
try:
    print(len(s.recv(65536)))
except OSError as e:
    print(type(e).__name__)
"""


@pytest.fixture
def gate_lab(nfh_lab):
    lab = nfh_lab
    policy = lab.tmpdir / "gate.py"
    policy.write_text(GATE)
    policy.chmod(0o644)
    ready = lab.tmpdir / "tcp.ready"
    lab.popen("router", sys.executable, "-c", HTTP_SERVER, 7201, 1000, ready)
    lab.wait_for(ready.exists, what="TCP server on the router")
    return lab, lab.start_engine(str(policy))


def udp_flow(lab, family: int, *payloads: str) -> list[str]:
    cp = lab.exec("client", sys.executable, "-c", UDP_CLIENT, lab.addr("router", family), 7202, *payloads,
                  timeout=30)
    return cp.stdout.split()


@pytest.mark.parametrize("family", [4, 6])
def test_a_dropped_connection_stays_dropped_in_the_kernel(gate_lab, family):
    lab, _ = gate_lab
    lab.udp_server("router", 7202, family)
    to_router = lab.addr("router", family)
    # TCP: the request decides; the client's retransmissions of it are dropped by the kernel
    cp = lab.exec("client", sys.executable, "-c", TCP_CLIENT, to_router, 7201, "bad request", 2.5, timeout=30)
    assert cp.stdout.strip() == "TimeoutError", cp.stdout  # no answer: the request never got through
    assert handled(lab, "tcp_gate", "drop") == 1  # decided once in Python
    assert rule_counter(lab, "conn drop", family=family) >= 2  # retransmissions (0.2 s, 0.6 s, 1.4 s ...)
    assert rule_counter(lab, "conn drop tcp_gate", family=family) == 1
    assert handled(lab, "tcp_gate") <= 4  # SYN, ACK, the request: never its retransmissions
    cp = lab.exec("client", sys.executable, "-c", TCP_CLIENT, to_router, 7201, "GET / HTTP/1.0", 5, timeout=30)
    assert cp.stdout.strip().isdigit() and int(cp.stdout) > 0, cp.stdout  # another connection: served

    # UDP, one flow (one socket): allowed datagrams come back, then 'bad' is the last one Python sees
    assert udp_flow(lab, family, "hello", "bad1", "again1", "again2", "again3") == ["hello", "-", "-", "-", "-"]
    assert handled(lab, "udp_gate", "drop") == 1 and handled(lab, "udp_gate") == 2
    assert rule_counter(lab, "conn drop", family=family) >= 2 + 3
    # accept(connection=True): the flow's later datagrams are echoed, never queued
    assert udp_flow(lab, family, "hello", "ok", *(f"d{i}" for i in range(10))) == ["hello", "ok",
                                                                                  *(f"d{i}" for i in range(10))]
    assert handled(lab, "udp_gate") == 4
    assert rule_counter(lab, "conn accept", family=family) >= 10
    lab.wait_for(lambda: metric(lab, "nfhooks_connection_verdict_packets_total", hook="INPUT",
                                verdict="drop") >= 5, timeout=5, what="the kernel's drops exported")


UDP_PHASES = r"""
import os, socket, sys, time
host, port, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
for p in sys.argv[4:]:
    if p == "|":  # wait for the test to say go (one flow, one socket, across the pause)
        deadline = time.monotonic() + 60
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.02)
        continue
    s.sendto(p.encode(), (host, port))
    try:
        print(s.recv(2048).decode(), flush=True)
    except OSError:
        print("-", flush=True)
"""


def test_a_reload_decides_every_connection_again(gate_lab):
    lab, eng = gate_lab
    lab.udp_server("router", 7202, 4)
    go, out = lab.tmpdir / "reload.go", lab.tmpdir / "reload.out"
    with open(out, "w") as f:
        proc = lab.popen("client", sys.executable, "-c", UDP_PHASES, lab.addr("router"), 7202, go,
                         "hello", "ok", "d1", "|", "d2", "d3", "d4", stdout=f)
    lab.wait_for(lambda: len(out.read_text().split()) == 3, timeout=15, what="the flow decided, d1 echoed")
    assert handled(lab, "udp_gate") == 2  # hello (plain accept), ok (accept(connection=True))
    r = lab.exec("router", sys.executable, "-m", "nfhooks", "reload", check=False, timeout=60)
    assert r.returncode == 0 and "generation 2" in r.stderr, r.stderr
    lab.wait_for(lambda: "NFH-CONN-INPUT " not in "\n".join(nfh_lines(lab)), timeout=15,
                 what="the retired generation's NFH-CONN-INPUT chains removed")
    go.touch()
    assert proc.wait(30) == 0
    assert out.read_text().split() == ["hello", "ok", "d1", "d2", "d3", "d4"]
    # the reloaded policy asked Python once more (d2: its connmark had the old generation), then
    # the kernel took the rest again
    assert handled(lab, "udp_gate") == 3
    assert rule_counter(lab, "conn accept") >= 2
    eng.stop()
    assert nfh_lines(lab) == []  # every chain of ours went, NFH-CONN-* included


def test_connection_verdicts_under_workers(nfh_lab):
    """--workers: each worker's dispatcher keeps decisions in the same kernel rules; the main
    process exports the counts (it reads the rules)."""
    lab = nfh_lab
    policy = lab.tmpdir / "gate.py"
    policy.write_text(GATE)
    policy.chmod(0o644)
    lab.udp_server("router", 7202, 4)
    lab.start_engine(str(policy), "--workers", "2")
    later = [f"d{i}" for i in range(8)]
    assert udp_flow(lab, 4, "hello", "ok", *later) == ["hello", "ok", *later]
    assert udp_flow(lab, 4, "hello", "bad", "again") == ["hello", "-", "-"]
    assert rule_counter(lab, "conn accept") >= 8 and rule_counter(lab, "conn drop") >= 1
    exported(lab, "nfhooks_connection_verdicts_total", 1, handler="udp_gate", verdict="accept")
    exported(lab, "nfhooks_connection_verdicts_total", 1, handler="udp_gate", verdict="drop")
    assert handled(lab, "udp_gate") == 4
