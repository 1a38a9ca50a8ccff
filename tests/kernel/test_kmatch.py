"""Kernel-state matches on the real path: the kernel's limit/hashlimit/connlimit/owner matches in
the queue rule decide which packets reach Python; the rest fall through to the next rule.

Traffic from the client to the router (INPUT) or from a router process to the server (OUTPUT);
what reached the handler is read from the queue rules' kernel counters and the engine's metrics,
what fell through from the servers' logs.
"""

from __future__ import annotations

import sys

import pytest

from .conftest import metric, rule_counter

POLICY = '''\
from nfhooks import Policy, accept, drop, reject

policy = Policy("kmatch-test")

@policy.input(proto="udp", dport=7201, limit="10/second", burst=5)
def within(pkt):
    return accept()

@policy.input(proto="udp", dport=7202, limit="10/second", burst=5, limit_over=True)
def over(pkt):
    return accept()

@policy.input(proto="udp", dport=7203, hashlimit="1/minute", burst=2)
def per_source(pkt):
    return accept()

@policy.input(proto="tcp", dport=7210, ctstate="NEW", connlimit=2)
def third(pkt):
    return reject()

@policy.output(proto="udp", dport=7220, uid=4242)
def other_user(pkt):
    return drop()
'''

BURST = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
t0 = time.monotonic()
for i in range(n):
    s.sendto(b"%d" % i, (host, port))
print(time.monotonic() - t0)
"""

HOLD = r"""
import errno, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
held, out = [], []
for i in range(3):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(5)
    try:
        s.connect((host, port))
        out.append("ok")
        held.append(s)
    except ConnectionRefusedError:
        out.append("refused")
    except OSError as e:
        out.append(errno.errorcode.get(e.errno, type(e).__name__))
print(" ".join(out))
"""

SEND_ONE = r"""
import socket, sys
host, port, data = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(data.encode(), (host, port))
"""


def _lab(nfh_lab):
    policy = nfh_lab.tmpdir / "kmatch_policy.py"
    policy.write_text(POLICY)
    policy.chmod(0o644)
    return nfh_lab, str(policy)


def burst(lab, family: int, port: int, n: int = 50) -> float:
    """Send n datagrams at once from the client; the seconds the sending took."""
    out = lab.exec("client", sys.executable, "-c", BURST, lab.addr("router", family), port, n, timeout=30).stdout
    return float(out.strip())


def test_limit_lets_the_burst_through_and_the_rest_falls_through(nfh_lab):
    lab, policy = _lab(nfh_lab)
    sinks = {(f, p): lab.udp_server("router", p, f) for f in (4, 6) for p in (7201, 7202)}
    lab.start_engine(policy)
    for fam in (4, 6):  # a rule per family, so a bucket per family
        for port in (7201, 7202):
            took = burst(lab, fam, port)
            # every datagram arrived: the ones the handler did not see fell through to the default
            sinks[(fam, port)].wait_datagrams(50, timeout=10)
            # the burst of 5, plus 10/second for as long as the sending took (and one in flight)
            most = 5 + int(10 * took) + 1
            seen = rule_counter(lab, "within" if port == 7201 else "over", family=fam)
            if port == 7201:
                assert 5 <= seen <= most, (fam, seen, took)
            else:  # limit_over: the handler sees only the packets above the rate
                assert 50 - most <= seen <= 45, (fam, seen, took)
    lab.wait_for(lambda: metric(lab, "nfhooks_handler_packets_total", handler="within")
                 == rule_counter(lab, "within", family=4) + rule_counter(lab, "within", family=6),
                 timeout=5, what="the handler's count equal to its queue rules' (exactly those reached Python)")


def test_hashlimit_keeps_a_bucket_per_source(nfh_lab):
    lab, policy = _lab(nfh_lab)
    sink = lab.udp_server("router", 7203, bind="0.0.0.0")
    lab.start_engine(policy)
    burst(lab, 4, 7203, n=10)
    sink.wait_datagrams(10, timeout=10)  # all arrived: the other 8 fell through to the default
    assert rule_counter(lab, "per_source") == 2  # burst 2, then 1/minute: no more in the test's time
    burst(lab, 4, 7203, n=10)
    sink.wait_datagrams(20, timeout=10)
    assert rule_counter(lab, "per_source") == 2  # the client's bucket is empty
    # another source has its own bucket: the server's burst gets its 2
    lab.exec("server", sys.executable, "-c", BURST, lab.addr("router", facing="server"), 7203, 10, timeout=30)
    sink.wait_datagrams(30, timeout=10)
    assert rule_counter(lab, "per_source") == 4


def test_connlimit_above_two_sees_the_third_connection(nfh_lab):
    lab, policy = _lab(nfh_lab)
    for fam in (4, 6):
        lab.tcp_server("router", 7210, fam)
    lab.start_engine(policy)
    for fam in (4, 6):
        out = lab.exec("client", sys.executable, "-c", HOLD, lab.addr("router", fam), 7210, timeout=30).stdout
        assert out.split() == ["ok", "ok", "refused"], (fam, out)  # the third one reached Python: reject()
        assert rule_counter(lab, "third", family=fam) == 1
    assert metric(lab, "nfhooks_handler_packets_total", handler="third", verdict="reject") == 2


def test_uid_match_at_output_selects_the_other_users_packets(nfh_lab):
    lab, policy = _lab(nfh_lab)
    sinks = {f: lab.udp_server("server", 7220, f) for f in (4, 6)}
    lab.start_engine(policy)
    for fam in (4, 6):
        dst = lab.addr("server", fam)
        lab.exec("router", "setpriv", "--reuid", "4242", "--regid", "4242", "--clear-groups",
                 sys.executable, "-c", SEND_ONE, dst, 7220, "other", timeout=30)
        lab.exec("router", sys.executable, "-c", SEND_ONE, dst, 7220, "root", timeout=30)
    lab.wait_for(lambda: rule_counter(lab, "other_user", family=4) + rule_counter(lab, "other_user", family=6) == 2,
                 timeout=5, what="uid 4242's two datagrams queued")
    for fam in (4, 6):
        got = [data for _, data in sinks[fam].wait_datagrams(1, timeout=10)]
        assert got == [b"root"], (fam, got)  # root's went past the handler; uid 4242's were dropped by it
        assert rule_counter(lab, "other_user", family=fam) == 1
    assert metric(lab, "nfhooks_handler_packets_total", handler="other_user", verdict="drop") == 2


CONN_POLICY = '''\
from nfhooks import Policy, accept, connmark, drop

policy = Policy("kmatch-connmark")

@policy.input(proto="udp", dport=7230)
def tagger(pkt):
    if pkt.connmark & 0xff == 0:
        return connmark(0x5, 0xff)  # the first datagram: remember it in the connection
    return accept() if pkt.connmark & 0xffff == 0x5 else drop()

@policy.input(proto="udp", dport=7231, connmark=(0x5, 0xff))
def remembered(pkt):
    return accept()

@policy.input(proto="udp", dport=7231)
def first(pkt):
    return connmark(0x5, 0xff)

@policy.input(proto="udp", dport=7232)
def clean(pkt):
    return accept() if pkt.mark == 0 else drop()
'''

EXCHANGE = r"""
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
out = []
for i in range(n):  # one socket: one conntrack entry for all n datagrams
    s.sendto(b"%d" % i, (host, port))
    try:
        s.recv(100)
        out.append("ok")
    except TimeoutError:
        out.append("timeout")
print(" ".join(out))
"""


def _conn_lab(nfh_lab):
    policy = nfh_lab.tmpdir / "kmatch_connmark.py"
    policy.write_text(CONN_POLICY)
    policy.chmod(0o644)
    for fam in (4, 6):
        for port in (7230, 7231, 7232):
            nfh_lab.udp_server("router", port, fam)
    nfh_lab.start_engine(str(policy))
    return nfh_lab


def exchange(lab, family: int, port: int, n: int = 2) -> list[str]:
    return lab.exec("client", sys.executable, "-c", EXCHANGE, lab.addr("router", family), port, n,
                    timeout=30).stdout.split()


def handled(lab, handler: str, verdict: str) -> float:
    return metric(lab, "nfhooks_handler_packets_total", handler=handler, verdict=verdict)


def test_pkt_connmark_reads_back_what_a_connmark_verdict_wrote(nfh_lab):
    lab = _conn_lab(nfh_lab)
    for fam in (4, 6):
        assert exchange(lab, fam, 7230) == ["ok", "ok"], fam
    # each connection was marked once; its second datagram saw the mark and was accepted
    # (without the restore rule it would read 0 and be marked again)
    assert handled(lab, "tagger", "connmark") == 2
    assert handled(lab, "tagger", "accept") == 2
    assert handled(lab, "tagger", "drop") == 0
    assert rule_counter(lab, "restore tagger", family=4) == 2 and rule_counter(lab, "restore tagger", family=6) == 2


def test_connmark_match_selects_the_remembered_connections(nfh_lab):
    lab = _conn_lab(nfh_lab)
    for fam in (4, 6):
        assert exchange(lab, fam, 7231, n=3) == ["ok", "ok", "ok"], fam
    assert handled(lab, "first", "connmark") == 2  # the first datagram of each connection
    assert handled(lab, "remembered", "accept") == 4  # every later one went to the connmark match
    assert rule_counter(lab, "remembered", family=4) == 2 and rule_counter(lab, "remembered", family=6) == 2


def test_pkt_mark_shows_only_the_users_bits(nfh_lab):
    lab = _conn_lab(nfh_lab)
    for fam in (4, 6):
        assert exchange(lab, fam, 7232, n=1) == ["ok"], fam
    assert handled(lab, "clean", "accept") == 2
