"""``nfhooks run --workers N`` at parity with one engine (issue 18.4, 16): address sets and
kernel verdicts, ``--audit``, hot reload. Real rules, real NFQUEUE, real traffic from the lab's
client (and server) to the router; both rule backends (conftest.py)."""

from __future__ import annotations

import shutil

import pytest

from .conftest import POLICIES, metric, rule_counter
from .test_ssh_guard import members, ssh_packets

needs_ipset = pytest.mark.skipif(shutil.which("ipset") is None,
                                 reason="address sets need the ipset program (Debian package ipset)")
PORT, MAX_NEW = 2022, 2


def our_sets(lab) -> list[str]:
    return [n for n in lab.exec("router", "ipset", "list", "-n").stdout.split() if n.startswith("nfh-")]


@needs_ipset
@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", [4, 6])
def test_a_source_banned_by_a_worker_is_dropped_by_the_kernel(nfh_lab, family):
    lab = nfh_lab
    eng = lab.start_engine(str(POLICIES / "ssh_guard.py"), "--workers", "2", "--queue-base", "20",
                           "--set", f"port={PORT}", "--set", f"max_new={MAX_NEW}", "--set", "ban=60")
    assert sorted(our_sets(lab)) == ["nfh-banned-4", "nfh-banned-6"]  # made by the main process
    lab.tcp_server("router", PORT, family, bind="::" if family == 6 else "0.0.0.0")
    to_router = lab.addr("router", family, facing="client")
    client = lab.addr("client", family)
    for i in range(MAX_NEW):
        assert lab.tcp_connect("client", to_router, PORT, timeout=2.0) == "ok", f"connection {i + 1}"
    # one more: the worker deciding this source adds it to the kernel set and drops the SYN
    assert lab.tcp_connect("client", to_router, PORT, timeout=0.5) == "timeout"
    assert members(lab, f"nfh-banned-{family}") == [client]
    seen = ssh_packets(lab)  # summed over both workers
    assert seen == MAX_NEW + 1
    dropped = rule_counter(lab, "kernel banned", family=family)
    assert lab.tcp_connect("client", to_router, PORT, timeout=0.5) == "timeout"
    assert ssh_packets(lab) == seen  # no more packets of it reach Python
    assert rule_counter(lab, "kernel banned", family=family) > dropped  # the kernel dropped them
    # the main endpoint: entries read from the kernel once, the workers' additions summed
    assert metric(lab, "nfhooks_set_entries", set="banned") == 1
    assert metric(lab, "nfhooks_set_additions_total", set="banned") == 1
    assert lab.tcp_connect("server", lab.addr("router", family, facing="server"), PORT, timeout=2.0) == "ok"
    assert eng.running(), eng.log()[-3000:]
    eng.stop()
    assert our_sets(lab) == []  # removed after the rules
    assert "Traceback" not in eng.log()


AUDIT_PORT = 7201
AUDIT_POLICY = f'''\
from nfhooks import Policy, drop

policy = Policy("workers-audit-test")

@policy.input(proto="udp", dport={AUDIT_PORT})
def blocked(pkt):
    return drop()
'''


@pytest.mark.timeout(120)
def test_audit_with_workers_accepts_drops_and_counts_them(nfh_lab, tmp_path):
    lab = nfh_lab
    pol = tmp_path / "workers_audit.py"
    pol.write_text(AUDIT_POLICY)
    pol.chmod(0o644)
    servers = {f: lab.udp_server("router", AUDIT_PORT, f, bind="::" if f == 6 else "0.0.0.0") for f in (4, 6)}
    eng = lab.start_engine(str(pol), "--workers", "2", "--audit", "--queue-base", "30")
    n = 3
    for fam in (4, 6):
        for i in range(n):  # the policy drops each; audit accepts it: the echo comes back
            assert lab.udp_send("client", lab.addr("router", fam, facing="client"), AUDIT_PORT,
                                f"a{fam}-{i}") == f"a{fam}-{i}".encode(), (fam, i)
    assert all(len(s.wait_datagrams(n)) == n for s in servers.values())
    assert metric(lab, "nfhooks_audit_mode") == 1  # once, not once per worker
    assert metric(lab, "nfhooks_handler_packets_total", handler="blocked", verdict="drop") == 2 * n
    assert metric(lab, "nfhooks_audit_overridden_packets_total", hook="INPUT", handler="blocked") == 2 * n
    assert metric(lab, "nfhooks_worker_up") == 2
    assert eng.running(), eng.log()[-3000:]
    eng.stop()
    assert "Traceback" not in eng.log()
