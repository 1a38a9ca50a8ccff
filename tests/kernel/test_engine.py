"""The engine on the real kernel path: verdicts as the client observes them."""

from __future__ import annotations

import pytest

from .conftest import POLICIES, TEST_POLICIES, ipt, metric, nfh_lines, rule_counter


@pytest.fixture
def verdicts(nfh_lab):
    """policies/verdicts.py on the router; servers on the router's ports 7001-7009."""
    lab = nfh_lab
    servers = {p: lab.tcp_server("router", p) for p in (7001, 7002, 7003, 7005, 7006, 7007, 7009)}
    lab.tcp_server("router", 7003, family=6)
    eng = lab.start_engine(str(POLICIES / "verdicts.py"))
    return lab, eng, servers


def test_each_verdict_as_the_client_sees_it(verdicts):
    lab, eng, servers = verdicts
    r = lab.addr("router")
    assert lab.tcp_connect("client", r, 7001) == "ok"
    assert lab.tcp_connect("client", r, 7002, timeout=1.5) == "timeout"
    assert lab.tcp_connect("client", r, 7003) == "refused"
    assert lab.tcp_connect("client", r, 7009, timeout=1.5) == "timeout"  # raised -> INPUT default drop
    assert servers[7001].wait_peers(1) == [lab.addr("client")]
    assert servers[7002].log_peers() == [] and servers[7009].log_peers() == []
    assert metric(lab, "nfhooks_handler_errors_total", handler="broken") >= 1
    assert "a bug in the policy" in eng.log() and "verdicts.py" in eng.log()
    assert metric(lab, "nfhooks_handler_packets_total", handler="rejected", verdict="reject") >= 1


def test_reject_ipv6_and_udp_admin_prohibited(verdicts):
    lab, eng, _ = verdicts
    assert lab.tcp_connect("client", lab.addr("router", 6), 7003) == "refused"
    # UDP: the kernel answers with ICMP admin-prohibited; a connected UDP socket reports it
    code = lab.exec("client", "python3", "-c", (
        "import socket,sys\n"
        "s=socket.socket(); s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
        f"s.connect(('{lab.addr('router')}', 7004)); s.send(b'x')\n"
        "try:\n s.recv(10); print('answer')\n"
        "except socket.timeout: print('timeout')\n"
        "except OSError as e: print(e.errno)\n"), check=False).stdout.strip()
    assert code == "113"  # EHOSTUNREACH: ICMP type 3 code 13 (administratively prohibited)


def test_fall_through_matches_the_kernel_counters(verdicts):
    """not_mine returns None; the packet resumes after it in the kernel and range_accept takes it."""
    lab, eng, servers = verdicts
    for _ in range(3):
        assert lab.tcp_connect("client", lab.addr("router"), 7007) == "ok"
    assert len(servers[7007].wait_peers(3)) == 3
    fell = metric(lab, "nfhooks_handler_packets_total", handler="not_mine", verdict="continue")
    took = metric(lab, "nfhooks_handler_packets_total", handler="range_accept", verdict="accept")
    # the kernel's own counters on the same traffic agree with what Python saw
    assert fell == rule_counter(lab, "not_mine") == 3
    assert took == rule_counter(lab, "range_accept") == 3
    assert rule_counter(lab, "resume") >= 3


def test_mark_and_connmark_seen_by_later_kernel_rules(verdicts):
    lab, eng, servers = verdicts
    # another tool's counting rules in the security table (runs after filter at INPUT)
    lab.exec("router", ipt(4), "-w", "-t", "security", "-A", "INPUT", "-p", "tcp",
             "-m", "mark", "--mark", "0x5/0xffff")
    lab.exec("router", ipt(4), "-w", "-t", "security", "-A", "INPUT", "-p", "tcp",
             "-m", "connmark", "--mark", "0x6/0xffff")
    assert lab.tcp_connect("client", lab.addr("router"), 7005) == "ok"
    assert lab.tcp_connect("client", lab.addr("router"), 7006) == "ok"
    out = lab.exec("router", ipt(4), "-t", "security", "-L", "INPUT", "-v", "-n", "-x").stdout
    rows = [line.split() for line in out.splitlines() if "mark match" in line]
    counts = {("connmark" if "connmark" in " ".join(r) else "mark"): int(r[0]) for r in rows}
    assert counts["mark"] >= 1, out      # the SYN to 7005 carried mark 0x5
    assert counts["connmark"] >= 2, out  # the SYN's connection was marked: later packets match too


def test_all_five_hooks_decide_ipv4_and_ipv6(nfh_lab):
    lab = nfh_lab
    lab.tcp_server("server", 8080)
    lab.tcp_server("server", 8080, family=6)
    lab.tcp_server("router", 8080)
    lab.tcp_server("router", 8080, family=6)
    lab.start_engine(str(TEST_POLICIES / "all_hooks.py"))
    for fam in (4, 6):
        assert lab.tcp_connect("client", lab.addr("server", fam), 8080) == "ok"   # PRE, FWD, POST
        assert lab.tcp_connect("client", lab.addr("router", fam), 8080) == "ok"   # PRE, INPUT
        assert lab.tcp_connect("router", lab.addr("server", fam), 8080) == "ok"   # OUTPUT, POST
    for hook in ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"):
        assert metric(lab, "nfhooks_packets_total", hook=hook, verdict="accept") > 0, hook


def test_firewall_example(nfh_lab):
    lab = nfh_lab
    ssh = lab.tcp_server("router", 22)
    lab.tcp_server("router", 22, family=6)  # listening: a refusal must come from the policy
    lab.tcp_server("router", 23)
    web = lab.tcp_server("server", 80)
    lab.tcp_server("server", 8081)
    client_net = lab.addr("client") + "/32"
    lab.start_engine(str(POLICIES / "firewall.py"), "--set", f"trusted={client_net}")
    r = lab.addr("router")
    assert lab.ping("client", r) and lab.ping("client", lab.addr("router", 6))
    assert lab.tcp_connect("client", r, 22) == "ok" and ssh.wait_peers(1)
    assert lab.tcp_connect("client", r, 23) == "refused"
    assert lab.tcp_connect("client", lab.addr("router", 6), 22) == "refused"  # trusted is IPv4 only
    # the seed's example: locally generated HTTP to port 80 is dropped at OUTPUT
    assert lab.tcp_connect("router", lab.addr("server"), 80, timeout=1.5) == "timeout"
    assert web.log_peers() == []
    assert lab.tcp_connect("router", lab.addr("server"), 8081) == "ok"
    assert lab.tcp_connect("client", lab.addr("server"), 80) == "ok"  # forwarded: not OUTPUT
    assert any("NFH-INPUT" in line for line in nfh_lines(lab))


def test_handler_lookup_does_not_deadlock_on_its_own_packets(nfh_lab):
    lab = nfh_lab
    svc = lab.tcp_server("server", 8081)
    target = lab.tcp_server("server", 8082)
    lab.start_engine(str(TEST_POLICIES / "self_lookup.py"), "--set", f"lookup={lab.addr('server')}:8081")
    assert lab.tcp_connect("router", lab.addr("server"), 8082, timeout=5) == "ok"
    assert target.wait_peers(1) and svc.wait_peers(1)  # the handler's own lookup got through
    assert metric(lab, "nfhooks_handler_packets_total", handler="ask_first", verdict="accept") == 1


def test_a_flooded_slow_handler_does_not_starve_other_queues(nfh_lab):
    lab = nfh_lab
    lab.tcp_server("router", 7001)
    lab.start_engine(str(TEST_POLICIES / "slow_and_fast.py"))
    flood = lab.popen("client", "python3", "-c", (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('', 40998))\n"  # fixed 5-tuple
        f"for _ in range(200000): s.sendto(b'x' * 32, ('{lab.addr('router')}', 9000))\n"))
    lab.wait_for(lambda: metric(lab, "nfhooks_handler_packets_total", handler="slow") > 200,
                 what="the slow handler busy with the flood")
    # the slow queue holds seconds of work; a SYN on another queue is still answered at once
    assert lab.tcp_connect("client", lab.addr("router"), 7001, timeout=2) == "ok"
    assert flood.poll() is None or metric(lab, "nfhooks_handler_packets_total", handler="slow") > 0


def test_top_shows_the_engine_verdicts_per_hook(nfh_lab):
    lab = nfh_lab
    lab.tcp_server("router", 7001)
    lab.start_engine(str(POLICIES / "verdicts.py"))
    assert lab.tcp_connect("client", lab.addr("router"), 7003) == "refused"
    import sys
    out = lab.exec("router", sys.executable, "-m", "nfhooks", "top", "--once").stdout
    row = next(line for line in out.splitlines() if "INPUT" in line)
    assert "filter" in row and "reject" in out
    r = lab.exec("client", sys.executable, "-m", "nfhooks", "top", "--once", check=False)
    assert r.returncode == 2 and "cannot read" in r.stderr  # no engine in the client's namespace
