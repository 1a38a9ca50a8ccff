"""Flow offload and NAT under ``nfhooks run --workers``.

Flow offload: the decision lives in the kernel (connmark and the offload rules the main
process installs), so each worker's dispatcher only marks a flow handler's accept; the main
process exports ``nfhooks_offloaded_*`` from the rule counters. Traffic as in
test_offload.py: clients in the client namespace push SIZE bytes per phase to a sink on the
router (INPUT), which answers each phase with the byte count.

NAT: the main process owns the one NatTargets (workers.NatServer); each worker asks it for a
target it has not seen (workers.NatClient) -- one nat rule per target, whichever worker asked.
"""

from __future__ import annotations

import re
import sys
import threading
from multiprocessing import Pipe

import pytest

from nfhooks import dnat, masquerade
from nfhooks.fake import fake_packet
from nfhooks.marks import core_layout
from nfhooks.nat import NatError, NatTargets
from nfhooks.workers import NatClient, NatServer, check_supported

from .conftest import POLICIES, metric, rule_counter, save, saved
from .test_nat import gauge
from .test_offload import SINK, SIZE, phases_done, start_client

PORT = 7101
POLICY = f'''\
from nfhooks import Policy, accept

policy = Policy("workers-offload-test")

@policy.input(proto="tcp", dport={PORT}, flow=True)
def flow_web(pkt):
    return accept()
'''


@pytest.mark.timeout(120)
def test_flow_offload_with_two_workers(nfh_lab, tmp_path):
    lab = nfh_lab
    pol = tmp_path / "workers_flow.py"
    pol.write_text(POLICY)
    pol.chmod(0o644)
    ready = lab.tmpdir / f"sink-{PORT}.ready"
    lab.popen("router", sys.executable, "-c", SINK, lab.addr("router"), PORT, SIZE, ready)
    lab.wait_for(ready.exists, what=f"sink on port {PORT}")
    eng = lab.start_engine(str(pol), "--workers", "2", "--queue-base", "20")
    saved = save(lab)
    assert "--queue-balance 20:21" in saved and '"nfhooks offload flow_web"' in saved, saved

    n_conns, phases = 2, 2  # 2 connections x 2 phases x 2 MB
    clients = [start_client(lab, PORT, phases, f"wflow{i}") for i in range(n_conns)]
    for _, go, _ in clients:
        go(2)
    for proc, _, out in clients:
        assert proc.wait(60) == 0
        assert phases_done(out) == [f"phase{i} {SIZE}" for i in range(1, phases + 1)], out
    assert eng.running(), eng.log()[-3000:]

    # Python (summed over both workers) decided each connection's first packet only
    decided = metric(lab, "nfhooks_handler_packets_total", handler="flow_web", verdict="accept")
    assert decided == n_conns, decided
    assert rule_counter(lab, "flow_web") == n_conns  # the queue rule saw no more than that
    skipped = rule_counter(lab, "offload flow_web")
    assert skipped >= 20 * n_conns, skipped  # the rest went through the kernel's offload rule
    # the main process's endpoint shows the offloaded flows once (not once per worker)
    assert metric(lab, "nfhooks_offloaded_flows_total", handler="flow_web", hook="INPUT") == n_conns
    lab.wait_for(lambda: metric(lab, "nfhooks_offloaded_packets_total", handler="flow_web") >= skipped,
                 timeout=5, what="the offload rule counters exported")
    assert metric(lab, "nfhooks_worker_up") == 2
    print(f"workers + flow offload: {decided:.0f} packets decided in Python, {skipped} offloaded, "
          f"{n_conns * phases * SIZE} bytes sent")


# --------------------------------------------------------------------------- NAT


def test_nat_client_asks_the_main_process_once_per_target():
    """No lab: two clients (as two workers) against one NatServer over real pipes."""
    rules: list[tuple[int, str, str, str]] = []
    layout = core_layout(1, extra=[("nat", 6)])
    real = NatTargets(layout, 2, lambda fam, table, hook, rule: rules.append((fam, table, hook, rule.render())))
    pipes = [Pipe() for _ in range(2)]
    server = NatServer(real, [p[0] for p in pipes])
    server.start()
    clients = [NatClient(p[1], layout, 2) for p in pipes]
    syn = fake_packet(hook="POSTROUTING", dport=80)
    got: list[int] = []
    threads = [threading.Thread(target=lambda c=c: got.append(c.mark_bits(syn, masquerade()))) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert got == [got[0]] * 2 and layout["nat"].decode(got[0]) == 1  # the same index for both workers
    assert len(rules) == 1 and "-j MASQUERADE" in rules[0][3]  # and one rule
    assert clients[0].mark_bits(syn, masquerade()) == got[0]  # cached: no request
    pre = fake_packet(hook="PREROUTING", dport=2222)
    assert layout["nat"].decode(clients[1].mark_bits(pre, dnat("10.0.0.2:22"))) == 2
    with pytest.raises(NatError, match="past the bound of 2"):
        clients[0].mark_bits(pre, dnat("10.0.0.3:22"))
    assert len(clients[0].failed) == 1  # not asked again per packet
    with pytest.raises(NatError, match="IPv6 target for an IPv4 packet"):
        clients[0].mark_bits(pre, dnat("[fd00::1]:22"))  # checked in the worker, as in one engine
    assert len(server) == 2 and len(rules) == 2
    server.close()  # the engine is stopping: nothing more is installed
    with pytest.raises(NatError, match="stopping"):
        clients[1].mark_bits(fake_packet(hook="OUTPUT"), dnat("10.0.0.4:80"))
    for a, b in pipes:
        b.close()
    for t in server.threads:
        t.join(5)
        assert not t.is_alive()  # a worker gone ends its thread
    for a, _ in pipes:
        a.close()


_CONNECT_FROM = r"""
import socket, sys
dst, port, srcs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
ok = 0
for a in srcs:
    s = socket.socket()
    s.settimeout(5)
    s.bind((a, 0))
    s.connect((dst, port))
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    ok += b"nfhooks-lab" in data
print(ok)
"""


def _add_addrs(lab, node: str, dev: str, first: str, n: int, start: int) -> list[str]:
    """`n` more /32 addresses in `first`'s /24, inside the node's namespace only."""
    prefix = first.rsplit(".", 1)[0]
    addrs = [f"{prefix}.{i}" for i in range(start, start + n)]
    lab.exec(node, "ip", "-batch", "-", input="".join(f"addr add {a}/32 dev {dev}\n" for a in addrs))
    return addrs


def _per_queue(lab, handler: str) -> dict[str, float]:
    text = lab.exec("router", "curl", "-s", "-m", "5", "http://127.0.0.1:9477/metrics").stdout
    out = {}
    for line in text.splitlines():
        if line.startswith("nfhooks_queue_received_packets_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if labels["handler"] == handler:
                out[labels["queue"]] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.timeout(120)
def test_nat_verdicts_with_two_workers(nfh_lab):
    lab = nfh_lab
    web = lab.tcp_server("server", 8080)
    ssh = lab.tcp_server("client", 22)
    eng = lab.start_engine(str(POLICIES / "nat.py"), "--workers", "2", "--queue-base", "30",
                           "--set", f"inside={lab.addr('client')}:22", "--set", f"proxy={lab.addr('proxy')}:8080")
    router_wan = lab.addr("router", facing="server")
    # --queue-balance hashes addresses: many sources, so both workers see new connections
    n_out, n_in = 40, 20
    clients = _add_addrs(lab, "client", "eth0", lab.addr("client"), n_out, 20)
    outsiders = _add_addrs(lab, "server", "eth0", lab.addr("server"), n_in, 100)
    out = lab.exec("client", sys.executable, "-c", _CONNECT_FROM, lab.addr("server"), 8080, *clients, timeout=60)
    assert out.stdout.split() == [str(n_out)], out.stdout + eng.log()[-3000:]
    out = lab.exec("server", sys.executable, "-c", _CONNECT_FROM, router_wan, 2222, *outsiders, timeout=60)
    assert out.stdout.split() == [str(n_in)], out.stdout + eng.log()[-3000:]
    # masquerade: the server saw only the router's outside address; port forward: the inside
    # host saw every outside source (DNAT keeps it)
    assert web.wait_peers(n_out) == [router_wan] * n_out
    assert sorted(ssh.wait_peers(n_in)) == sorted(outsiders)
    # both workers decided connections of both handlers (one queue per worker per handler)
    for handler, n in (("masquerade_outside", n_out), ("port_forward", n_in)):
        counts = lab.wait_for(lambda h=handler, n=n: (c if sum((c := _per_queue(lab, h)).values()) >= n else None),
                              timeout=10, what=f"{n} packets of {handler} over the workers")
        assert len(counts) == 2 and all(v > 0 for v in counts.values()), (handler, counts)
        assert sum(counts.values()) == n, (handler, counts)  # only the first packet of each connection
    assert metric(lab, "nfhooks_handler_packets_total", handler="masquerade_outside", verdict="masquerade") == n_out
    assert metric(lab, "nfhooks_handler_packets_total", handler="port_forward", verdict="dnat") == n_in
    assert metric(lab, "nfhooks_handler_errors_total") == 0
    # exactly one nat rule per target, though both workers asked for both targets
    nat_rules = [line for line in save(lab, "router", 4, "-t", "nat").splitlines()
                 if line.startswith("-A NFH-") and "nfhooks nat" in line]
    assert len(nat_rules) == 2, nat_rules
    assert sum("-j MASQUERADE" in r for r in nat_rules) == 1, nat_rules
    assert sum(f"--to-destination {lab.addr('client')}:22" in r for r in nat_rules) == 1, nat_rules
    assert gauge(lab, "nfhooks_nat_targets") == 2  # the main process's count, once
    assert eng.running(), eng.log()[-3000:]
    eng.stop()
    assert [line for line in saved(lab).splitlines() if "NFH-" in line or "nfhooks" in line] == []
    print(f"workers + NAT: {n_out} masqueraded and {n_in} port-forwarded connections, {len(nat_rules)} nat rules")


def test_nat_policies_are_served_by_workers(tmp_path):
    from nfhooks.loader import load_policy
    from nfhooks.rules import compile_policy

    p = tmp_path / "pol.py"
    p.write_text("from nfhooks import Policy, dnat\npolicy = Policy()\n"
                 "@policy.prerouting(proto='tcp', dport=80)\ndef lb(pkt):\n    return dnat('10.0.0.1:8080')\n")
    check_supported(compile_policy(load_policy(p), queue_base=10), 2)  # no longer refused
