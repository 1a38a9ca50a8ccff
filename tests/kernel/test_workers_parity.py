"""``nfhooks run --workers N`` at parity with one engine (issue 18.4, 16): address sets and
kernel verdicts, ``--audit``, hot reload. Real rules, real NFQUEUE, real traffic from the lab's
client (and server) to the router; both rule backends (conftest.py)."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from .conftest import POLICIES, metric, nfh_lines, rule_counter
from .test_reload import TOGGLE, nfhooks, write
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


# --------------------------------------------------------------------------- hot reload

def _worker_pids(log: str) -> set[int]:
    return {int(m) for m in re.findall(r"worker \d+ pid (\d+): queues", log)}


def test_reload_with_workers_swaps_the_verdict_and_keeps_it_on_errors(nfh_lab, tmp_path):
    lab = nfh_lab
    pol = tmp_path / "toggle.py"
    write(pol, TOGGLE.format(tag=1, verdict="drop"))
    router = lab.addr("router", facing="client")
    eng = lab.start_engine(str(pol), "--workers", "2", "--queue-base", "40")
    lab.tcp_server("router", 8080, bind="0.0.0.0")
    assert lab.tcp_connect("client", router, 8080, timeout=1.0) == "timeout"
    first = _worker_pids(eng.log())
    assert len(first) == 2, eng.log()

    write(pol, TOGGLE.format(tag=2, verdict="accept"))
    r = nfhooks(lab, "reload")
    assert r.returncode == 0, r.stderr + eng.log()[-3000:]
    assert "reloaded policy toggle2" in r.stderr and "generation 2" in r.stderr
    assert lab.tcp_connect("client", router, 8080) == "ok"  # decided by the new generation's workers
    lab.wait_for(lambda: not any(line.startswith(":NFH-INPUT ") for line in nfh_lines(lab)),
                 timeout=15, what="generation 1 chains removed")
    assert any(line.startswith(":NFH-INPUT-2 ") for line in nfh_lines(lab))
    lab.wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in first), timeout=15,
                 what="the old generation's workers stopped")
    assert metric(lab, "nfhooks_worker_up") == 2  # the new generation's
    assert "generation 1 retired, its workers stopped" in eng.log()
    assert metric(lab, "nfhooks_handler_packets_total", handler="port8080_2", verdict="accept") >= 1

    # a broken file: the command says so (file:line), the running policy stays in force
    write(pol, "from nfhooks import Policy\npolicy = Policy()\n\n@policy.input(\ndef oops(:\n")
    r = nfhooks(lab, "reload")
    assert r.returncode == 1 and "reload failed" in r.stderr and f"{pol}:5" in r.stderr, r.stderr
    assert lab.tcp_connect("client", router, 8080) == "ok"
    assert metric(lab, "nfhooks_policy_reload_errors_total") == 1
    assert metric(lab, "nfhooks_policy_reloads_total") == 1
    assert metric(lab, "nfhooks_policy_info", policy="toggle2") == 1

    # SIGHUP to the main process does the same; back to generation 1 and to dropping
    write(pol, TOGGLE.format(tag=3, verdict="drop"))
    eng.proc.send_signal(1)
    eng.wait_log("reloaded policy toggle3", timeout=30)
    assert lab.tcp_connect("client", router, 8080, timeout=1.0) == "timeout"
    lab.wait_for(lambda: not any(line.startswith(":NFH-INPUT-2 ") for line in nfh_lines(lab)),
                 timeout=15, what="generation 2 chains removed")
    assert metric(lab, "nfhooks_policy_reloads_total") == 2
    assert eng.running(), eng.log()[-3000:]
    assert eng.stop() == 0
    assert nfh_lines(lab) == []
    assert "Traceback" not in eng.log()


@needs_ipset
@pytest.mark.timeout(120)
def test_reload_with_workers_keeps_a_ban_and_the_new_workers_add_to_the_set(nfh_lab):
    lab = nfh_lab
    eng = lab.start_engine(str(POLICIES / "ssh_guard.py"), "--workers", "2", "--queue-base", "20",
                           "--set", f"port={PORT}", "--set", f"max_new={MAX_NEW}", "--set", "ban=60")
    lab.tcp_server("router", PORT, 4, bind="0.0.0.0")
    for node in ("client", "server"):  # each source banned by the worker its address hashes to
        to_router = lab.addr("router", facing=node)
        if node == "server":
            r = nfhooks(lab, "reload")  # between the two bans: the set and its entry stay
            assert r.returncode == 0, r.stderr + eng.log()[-3000:]
            assert members(lab, "nfh-banned-4") == [lab.addr("client")]
            assert lab.tcp_connect("client", lab.addr("router", facing="client"), PORT, timeout=0.5) == "timeout"
        for i in range(MAX_NEW):
            assert lab.tcp_connect(node, to_router, PORT, timeout=2.0) == "ok", (node, i)
        assert lab.tcp_connect(node, to_router, PORT, timeout=0.5) == "timeout", node
    assert sorted(members(lab, "nfh-banned-4")) == sorted([lab.addr("client"), lab.addr("server")])
    assert metric(lab, "nfhooks_set_entries", set="banned") == 2
    assert metric(lab, "nfhooks_set_additions_total", set="banned") == 2  # one per generation's worker
    assert eng.running(), eng.log()[-3000:]
    eng.stop()
    assert our_sets(lab) == []
    assert "Traceback" not in eng.log()
