"""``nfhooks run --workers N`` at parity with one engine (issue 18.4, 16): address sets and
kernel verdicts, ``--audit``, hot reload. Real rules, real NFQUEUE, real traffic from the lab's
client (and server) to the router; both rule backends (conftest.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from .conftest import POLICIES, metric, nfh_lines, rule_counter
from .test_reload import (STREAM, TOGGLE, broken_reload_keeps_the_policy, nfhooks,
                          sighup_reloads_back_to_dropping, stream_decided, stream_through_reloads, write)
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

    broken_reload_keeps_the_policy(lab, pol, router)

    sighup_reloads_back_to_dropping(lab, eng, pol, router, timeout=30)  # to the main process
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


@pytest.mark.timeout(180)
def test_reload_with_workers_under_traffic_decides_every_packet_once(nfh_lab, tmp_path):
    """test_reload.py's stream under --workers 2: a PREROUTING verdict of one generation and an
    INPUT verdict of the other would drop the datagram; none is lost, none decided twice."""
    lab = nfh_lab
    pol = tmp_path / "stream.py"
    write(pol, STREAM.format(tag=1))
    eng = lab.start_engine(str(pol), "--workers", "2", "--queue-base", "50")
    n, tags = 3000, [2, 1, 2, 1]
    stream_through_reloads(lab, eng, pol, tags, n)
    lab.wait_for(lambda: "generation 2 retired" in eng.log().rsplit("reloaded policy stream1", 1)[-1],
                 timeout=20, what="the last old generation retired")

    assert stream_decided(lab, "pre", "mark") == n  # one PREROUTING verdict per packet, summed over generations
    assert stream_decided(lab, "in", "accept") == n  # and one INPUT verdict, from the same generation
    assert stream_decided(lab, "in", "drop") == 0
    for t in (1, 2):
        assert metric(lab, "nfhooks_handler_packets_total", handler=f"in{t}") > 100
    assert metric(lab, "nfhooks_policy_reloads_total") == len(tags)
    assert eng.stop() == 0
    assert "Traceback" not in eng.log()


SET_POLICY = '''\
from nfhooks import Policy, {verdict}

policy = Policy("workers-set-{verdict}")
seen = policy.set("seen", kind="ip", timeout={timeout})

@policy.input(proto="tcp", dport=8080)
def web(pkt):
    seen.add(pkt.src)
    return {verdict}()
'''


@needs_ipset
@pytest.mark.timeout(120)
def test_a_reload_the_kernel_refuses_is_undone_and_the_old_workers_keep_serving(nfh_lab, tmp_path):
    lab = nfh_lab
    pol = tmp_path / "set_policy.py"
    write(pol, SET_POLICY.format(verdict="accept", timeout=60))
    router = lab.addr("router", facing="client")
    eng = lab.start_engine(str(pol), "--workers", "2", "--queue-base", "60")
    lab.tcp_server("router", 8080, bind="0.0.0.0")
    assert lab.tcp_connect("client", router, 8080) == "ok"
    first = _worker_pids(eng.log())
    write(pol, SET_POLICY.format(verdict="drop", timeout=30))  # the set's timeout changed: refused
    r = nfhooks(lab, "reload")
    assert r.returncode == 1 and "reload failed installing generation 2" in r.stderr, r.stderr
    assert "set 'seen' changed" in r.stderr, r.stderr
    assert lab.tcp_connect("client", router, 8080) == "ok"  # the old policy, the old workers
    assert not any(line.startswith(":NFH-INPUT-2 ") for line in nfh_lines(lab))
    assert metric(lab, "nfhooks_worker_up") == 2
    assert all(os.path.exists(f"/proc/{p}") for p in first)
    assert members(lab, "nfh-seen-4") == [lab.addr("client")]
    assert metric(lab, "nfhooks_policy_reload_errors_total") == 1
    assert eng.running(), eng.log()[-3000:]
    assert eng.stop() == 0
    assert nfh_lines(lab) == [] and our_sets(lab) == []
    assert "Traceback" not in eng.log()


HOLD_QUEUE = '''\
import sys, time
from netfilterqueue import NetfilterQueue
q = NetfilterQueue()
q.bind(int(sys.argv[1]), lambda p: p.accept())
print("bound", flush=True)
time.sleep(120)
'''


def _children(pid: int) -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.add(int(d))
            except (OSError, ValueError, IndexError):
                continue
    return out


@pytest.mark.timeout(120)
def test_a_new_generation_whose_worker_cannot_bind_is_taken_down_again(nfh_lab, tmp_path):
    lab = nfh_lab
    pol = tmp_path / "toggle.py"
    write(pol, TOGGLE.format(tag=1, verdict="accept"))
    router = lab.addr("router", facing="client")
    eng = lab.start_engine(str(pol), "--workers", "2", "--queue-base", "60")
    lab.tcp_server("router", 8080, bind="0.0.0.0")
    assert lab.tcp_connect("client", router, 8080) == "ok"
    first = _worker_pids(eng.log())
    main = eng.pid
    assert _children(main) == first
    # the next generation's balanced queues are 62:63 (clear of 60:61): another program holds 62
    holder = lab.popen("router", sys.executable, "-c", HOLD_QUEUE, "62", text=True, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "bound"
        write(pol, TOGGLE.format(tag=2, verdict="drop"))
        r = nfhooks(lab, "reload")
        assert r.returncode == 1, r.stderr
        assert "reload failed installing generation 2" in r.stderr and "cannot bind NFQUEUE 62" in r.stderr, r.stderr
        assert lab.tcp_connect("client", router, 8080) == "ok"  # the old policy, the old workers
        assert not any(line.startswith(":NFH-INPUT-2 ") for line in nfh_lines(lab))
        lab.wait_for(lambda: _children(main) == first, timeout=15, what="the new generation's workers gone")
        assert metric(lab, "nfhooks_worker_up") == 2
        holder.kill()
        holder.wait()
        r = nfhooks(lab, "reload")  # the queue is free again: the same file now loads
        assert r.returncode == 0, r.stderr + eng.log()[-3000:]
        assert lab.tcp_connect("client", router, 8080, timeout=1.0) == "timeout"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert eng.running(), eng.log()[-3000:]
    assert eng.stop() == 0
    assert nfh_lines(lab) == []


PCAP_PORT = 7301
PCAP_POLICY = '''\
from nfhooks import Policy, accept

policy = Policy("workers-pcap-{tag}")

@policy.input(proto="udp", dport={port}, name="echo_{tag}")
def echo(pkt):
    return accept()
'''


@pytest.mark.timeout(120)
def test_pcap_with_workers_records_each_workers_decisions_in_its_own_file(nfh_lab, tmp_path):
    from nfhooks.pcap import read_packets

    lab = nfh_lab
    pol = tmp_path / "pcap_policy.py"
    write(pol, PCAP_POLICY.format(tag=1, port=PCAP_PORT))
    cap = tmp_path / "cap.pcapng"
    for f in (4, 6):
        lab.udp_server("router", PCAP_PORT, f, bind="::" if f == 6 else "0.0.0.0")
    eng = lab.start_engine(str(pol), "--workers", "2", "--pcap", str(cap), "--queue-base", "70")
    n = 3

    def send(tag: int) -> None:
        for fam in (4, 6):
            for i in range(n):
                msg = f"g{tag}-{fam}-{i}"
                assert lab.udp_send("client", lab.addr("router", fam, facing="client"), PCAP_PORT, msg) == msg.encode()

    send(1)
    write(pol, PCAP_POLICY.format(tag=2, port=PCAP_PORT))
    r = nfhooks(lab, "reload")
    assert r.returncode == 0, r.stderr + eng.log()[-3000:]
    send(2)
    assert metric(lab, "nfhooks_pcap_packets_total") >= 2 * n  # the new generation's, summed
    assert eng.stop() == 0
    assert not cap.exists()  # the main process records nothing
    files = sorted(p.name for p in tmp_path.glob("cap.pcapng.w*"))
    assert files and all(re.fullmatch(r"cap\.pcapng\.w[01](\.g2)?", f) for f in files), files
    comments = [c for p in tmp_path.glob("cap.pcapng.w*") for _, _, c in read_packets(p)]
    for tag in (1, 2):
        got = [c for c in comments if f"handler=echo_{tag} verdict=accept" in c]
        assert len(got) == 2 * n, (tag, comments)
    assert any(f.endswith(".g2") for f in files) and any(not f.endswith(".g2") for f in files), files
    assert "Traceback" not in eng.log()
