"""Flow offload on the real kernel path: Python sees a connection once, the kernel the rest.

Traffic: a client in the client namespace pushes data to a sink on the router (INPUT) in
phases of SIZE bytes; the sink answers each phase with the byte count, so a phase is done
when the client has its answer. Handler packet counts come from the engine's metrics, the
packets that skipped Python from the offload rules' kernel counters.
"""

from __future__ import annotations

import re
import sys

import pytest

from .conftest import metric, nfh_lines, rule_counter

SIZE = 2_000_000

POLICY = '''\
from nfhooks import Policy, accept, drop

policy = Policy("offload-test")

@policy.input(proto="tcp", dport=7101, flow=True)
def flow_web(pkt):
    return accept()

@policy.input(proto="tcp", dport=7102)
def every_packet(pkt):
    return accept()

@policy.input(proto="tcp", dport=7103, flow=True)
def flow_drop(pkt):
    return drop()

@policy.input(proto="tcp", dport=7104, flow=True)
def flow_none(pkt):
    return None
'''

SINK = r"""
import socket, sys, threading
host, port, size, ready = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(16)
open(ready, "w").close()
def serve(c):
    while True:
        got = 0
        while got < size:
            d = c.recv(65536)
            if not d:
                return
            got += len(d)
        c.sendall(b"%d\n" % got)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import os, socket, sys, time
host, port, size, phases, go, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
s = socket.create_connection((host, port), timeout=30)  # IPv4 or IPv6 by the address
for i in range(1, phases + 1):
    if i > 1:
        deadline = time.monotonic() + 60
        while not os.path.exists(go + str(i)) and time.monotonic() < deadline:
            time.sleep(0.02)
    s.sendall(b"x" * size)
    buf = b""
    while not buf.endswith(b"\n"):
        d = s.recv(64)
        if not d:
            break
        buf += d
    with open(out, "a") as f:
        f.write("phase%d %s\n" % (i, buf.decode().strip()))
s.close()
"""


@pytest.fixture
def offload_lab(nfh_lab):
    lab = nfh_lab
    policy = lab.tmpdir / "offload_policy.py"
    policy.write_text(POLICY)
    policy.chmod(0o644)
    for port in (7101, 7102, 7104):
        ready = lab.tmpdir / f"sink-{port}.ready"
        lab.popen("router", sys.executable, "-c", SINK, lab.addr("router"), port, SIZE, ready)
        lab.wait_for(ready.exists, what=f"sink on port {port}")
    return lab, str(policy)


def start_client(lab, port: int, phases: int, name: str, family: int = 4):
    go, out = lab.tmpdir / f"{name}.go", lab.tmpdir / f"{name}.out"
    proc = lab.popen("client", sys.executable, "-c", CLIENT, lab.addr("router", family), port, SIZE, phases, go, out)
    return proc, (lambda i: (lab.tmpdir / f"{name}.go{i}").touch()), out


def phases_done(out) -> list[str]:
    return out.read_text().splitlines() if out.exists() else []


def handled(lab, handler: str, verdict: str = "accept") -> float:
    return metric(lab, "nfhooks_handler_packets_total", handler=handler, verdict=verdict)


def flow_generation(lab) -> int:
    """The generation the installed offload rules expect in the connmark (flowgen field)."""
    text = "\n".join(nfh_lines(lab))
    m = re.search(r'connmark ! --mark (0x[0-9a-f]+)/(0x[0-9a-f]+) -m comment --comment "nfhooks flow generation"',
                  text)
    assert m, text
    value, mask = int(m.group(1), 16), int(m.group(2), 16)
    return value // (mask & -mask)


def test_flow_handler_sees_one_packet_per_connection_non_flow_sees_all(offload_lab):
    lab, policy = offload_lab
    lab.start_engine(policy)
    clients = [start_client(lab, 7101, 2, f"flow{i}") for i in range(2)]
    clients.append(start_client(lab, 7102, 2, "every"))
    clients.append(start_client(lab, 7104, 2, "none"))
    for _, go, _ in clients:
        go(2)
    for proc, _, out in clients:
        assert proc.wait(60) == 0
        assert phases_done(out) == [f"phase1 {SIZE}", f"phase2 {SIZE}"], out  # the transfer completed
    # the flow handler: exactly the first packet of each connection (the SYN) reached Python
    assert handled(lab, "flow_web") == 2
    assert rule_counter(lab, "flow_web") == 2
    assert metric(lab, "nfhooks_offloaded_flows_total", handler="flow_web", hook="INPUT") == 2
    skipped = rule_counter(lab, "offload flow_web")
    assert skipped >= 20, skipped  # every later client packet (data, ACKs, FIN) was accepted by the kernel
    lab.wait_for(lambda: metric(lab, "nfhooks_offloaded_packets_total", handler="flow_web") >= skipped,
                 timeout=5, what="the offload rule counters exported")
    # a non-flow handler sees every packet of its connection (the rule counts a GSO aggregate
    # once; the queue hands it to Python segmented, so Python counts at least as many)
    every = handled(lab, "every_packet")
    assert every >= rule_counter(lab, "every_packet") >= 20
    assert every >= SIZE * 2 // 65536
    # a flow handler that falls through is not offloaded: it sees every packet too
    assert handled(lab, "flow_none", "continue") >= rule_counter(lab, "flow_none") >= 20
    assert rule_counter(lab, "offload flow_none") == 0
    assert metric(lab, "nfhooks_offloaded_flows_total", handler="flow_none") == 0


def test_a_dropped_connection_is_not_remembered_each_retry_asks_python(offload_lab):
    lab, policy = offload_lab
    lab.start_engine(policy)
    assert lab.tcp_connect("client", lab.addr("router"), 7103, timeout=2.5) == "timeout"
    # the SYN and at least one retransmission (1 s later) were each decided in Python
    assert handled(lab, "flow_drop", "drop") >= 2
    assert rule_counter(lab, "offload flow_drop") == 0
    assert metric(lab, "nfhooks_offloaded_flows_total", handler="flow_drop") == 0


def test_restart_invalidates_earlier_decisions(offload_lab):
    lab, policy = offload_lab
    eng = lab.start_engine(policy)
    gen1 = flow_generation(lab)
    proc, go, out = start_client(lab, 7101, 3, "restart")
    lab.wait_for(lambda: phases_done(out), timeout=30, what="phase 1 of the open connection")
    assert handled(lab, "flow_web") == 1
    assert rule_counter(lab, "offload flow_web") >= 10
    eng.stop()
    assert not [line for line in nfh_lines(lab) if "NFQUEUE" in line]  # no rules while stopped
    lab.start_engine(policy)
    gen2 = flow_generation(lab)
    assert gen2 != gen1 and 1 <= gen2 <= 7
    go(2)  # the still-open connection sends again: its connmark carries the old generation
    lab.wait_for(lambda: len(phases_done(out)) == 2, timeout=30, what="phase 2 after the restart")
    # the new engine asked Python again (the first packet, plus those already queued behind it
    # in the same burst before its verdict was saved), and counted the connection once
    asked = handled(lab, "flow_web")
    assert asked >= 1
    assert metric(lab, "nfhooks_offloaded_flows_total", handler="flow_web") == 1
    assert rule_counter(lab, "offload flow_web") >= 1
    go(3)  # re-decided: the rest of the connection skips Python again
    assert proc.wait(60) == 0
    assert phases_done(out) == [f"phase1 {SIZE}", f"phase2 {SIZE}", f"phase3 {SIZE}"]
    assert handled(lab, "flow_web") == asked
    assert rule_counter(lab, "offload flow_web") >= 10


def test_installed_offload_rules_are_what_the_compiler_renders(offload_lab):
    """python-iptables writes the conntrack --ctdir, connmark (negated) and CONNMARK --set-xmark
    options exactly as compiled (iptables-save of the router = RuleSet.render())."""
    from nfhooks import load_policy
    from nfhooks.rules import compile_policy

    lab, policy = offload_lab
    lab.start_engine(policy)
    from nfhooks.backends import get_backend

    want = get_backend().save_header() + compile_policy(load_policy(policy), flow_generation=flow_generation(lab)).render()
    got = lab.exec("router", sys.executable, "-m", "nfhooks", "rules", "--save", timeout=30).stdout
    assert got == want
    assert "--ctdir REPLY" in got and "-g NFH-FLOW-INPUT" in got


def test_hot_reload_invalidates_earlier_decisions_and_cleans_its_chains(offload_lab):
    lab, policy = offload_lab
    lab.start_engine(policy)
    gen1 = flow_generation(lab)
    proc, go, out = start_client(lab, 7101, 3, "reload")
    lab.wait_for(lambda: phases_done(out), timeout=30, what="phase 1 of the open connection")
    assert handled(lab, "flow_web") == 1

    def reload(expect_generation: int) -> None:
        r = lab.exec("router", sys.executable, "-m", "nfhooks", "reload", check=False, timeout=60)
        assert r.returncode == 0 and f"generation {expect_generation}" in r.stderr, r.stderr
        # the retired generation's chains (its flow-save chain included) go once its queues are empty
        lab.wait_for(lambda: sum(line.startswith(":NFH-FLOW-INPUT") for line in nfh_lines(lab)) == 2,
                     timeout=15, what="one NFH-FLOW-INPUT chain per family after the reload")

    reload(2)
    assert flow_generation(lab) != gen1
    go(2)  # decided by the old policy: the reloaded one asks Python again
    lab.wait_for(lambda: len(phases_done(out)) == 2, timeout=30, what="phase 2 after the reload")
    asked = handled(lab, "flow_web")
    assert asked >= 2
    go(3)
    assert proc.wait(60) == 0
    assert phases_done(out) == [f"phase1 {SIZE}", f"phase2 {SIZE}", f"phase3 {SIZE}"]
    assert handled(lab, "flow_web") == asked  # re-decided once, then offloaded again
    reload(1)  # back to generation 1's chain names: nothing of the first generation 1 is left over


def test_ipv6_connection_is_offloaded_too(offload_lab):
    lab, policy = offload_lab
    ready = lab.tmpdir / "sink6.ready"
    lab.popen("router", sys.executable, "-c", SINK, lab.addr("router", 6), 7101, SIZE, ready)
    lab.wait_for(ready.exists, what="IPv6 sink")
    lab.start_engine(policy)
    proc, go, out = start_client(lab, 7101, 2, "v6", family=6)
    go(2)
    assert proc.wait(60) == 0
    assert phases_done(out) == [f"phase1 {SIZE}", f"phase2 {SIZE}"]
    assert handled(lab, "flow_web") == 1
    assert rule_counter(lab, "offload flow_web", family=6) >= 20
    assert rule_counter(lab, "offload flow_web", family=4) == 0
