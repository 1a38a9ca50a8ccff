"""Reliability II, the engine's part: nothing a handler raises stops the engine, a stop under
load answers what is queued, rules removed under a live engine come back, and an engine that
ends on an error leaves fail-closed hooks closed."""

from __future__ import annotations

import signal
import sys
import textwrap

import pytest

from .conftest import metric, nfh_lines

RAISING = textwrap.dedent('''\
    """INPUT drops by default; udp/9100 raises what the payload names, else accepts."""
    from nfhooks import Policy, accept

    policy = Policy(name="raising", defaults={"INPUT": "drop"})


    class Custom(BaseException):
        pass


    @policy.input(iif="lo")
    def loopback(pkt):
        return accept()


    @policy.input(proto="udp", dport=9100)
    def explode(pkt):
        data = bytes(pkt.payload)
        if data.startswith(b"exit"):
            raise SystemExit(3)
        if data.startswith(b"kbd"):
            raise KeyboardInterrupt
        if data.startswith(b"genexit"):
            raise GeneratorExit
        if data.startswith(b"custom"):
            raise Custom("a BaseException of the policy's own")
        return accept()
    ''')

SLOW = textwrap.dedent('''\
    """A slow handler on a fail-open INPUT (default accept): the queue fills under load."""
    import time

    from nfhooks import Policy, accept

    policy = Policy(name="slow")


    @policy.input(proto="udp", dport=9200)
    def slow(pkt):
        time.sleep(0.0002)
        return accept()
    ''')

# Counts distinct sequence numbers; after the first datagram, 3 s of silence ends it.
SINK = textwrap.dedent('''\
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: the sink never overruns
    s.bind(("0.0.0.0", int(sys.argv[1])))
    open(sys.argv[2] + ".ready", "w").close()
    seen = set()
    s.settimeout(60)
    while True:
        try:
            seen.add(s.recv(64))
        except socket.timeout:
            break
        s.settimeout(3)
    open(sys.argv[2], "w").write(str(len(seen)))
    ''')

# A fixed 5-tuple (the conntrack table is machine-wide), N datagrams paced at RATE per second.
SENDER = textwrap.dedent('''\
    import socket, sys, time
    dst, port, n, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 47100))
    t0 = time.monotonic()
    for i in range(n):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        while True:
            try:
                s.sendto(b"%d" % i, (dst, port))
                break
            except BlockingIOError:
                time.sleep(0.0005)
    print(n, flush=True)
    ''')


def write(path, text):
    path.write_text(text)
    path.chmod(0o644)
    return str(path)


def waiting(lab, node="router") -> int:
    text = lab.exec(node, "cat", "/proc/net/netfilter/nfnetlink_queue").stdout
    return sum(int(line.split()[2]) for line in text.splitlines() if line.strip())


def nfhooks(lab, *args, node="router", check=False):
    return lab.exec(node, sys.executable, "-m", "nfhooks", *args, check=check, timeout=60)


def test_handler_base_exceptions_get_the_default_and_the_engine_goes_on(nfh_lab, tmp_path):
    """SystemExit, KeyboardInterrupt, GeneratorExit and a policy's own BaseException from a
    handler: the packet gets INPUT's default (drop), the engine keeps every rule and goes on."""
    lab = nfh_lab
    eng = lab.start_engine(write(tmp_path / "raising.py", RAISING))
    lab.udp_server("router", 9100, bind="0.0.0.0")
    router = lab.addr("router", facing="client")
    before = nfh_lines(lab)
    assert lab.udp_send("client", router, 9100, "ok1") == b"ok1"
    for payload in ("exit", "kbd", "genexit", "custom"):
        assert lab.udp_send("client", router, 9100, payload, timeout=1.0) is None, payload
        assert eng.running(), f"{payload}: the engine stopped\n{eng.log()[-3000:]}"
    assert nfh_lines(lab) == before  # every rule still there: INPUT still drops by default
    assert lab.udp_send("client", router, 9100, "ok2") == b"ok2"
    assert lab.udp_send("client", router, 9101, "x", timeout=1.0) is None
    assert metric(lab, "nfhooks_handler_errors_total", handler="explode") == 4
    assert "raised SystemExit: 3" in eng.log()  # the log is rate-limited per handler: the first one
    assert eng.stop() == 0
    assert nfh_lines(lab) == []


WORKERS = pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["engine", "workers"])


@WORKERS
def test_sigterm_under_load_answers_what_is_queued(nfh_lab, tmp_path, workers):
    """A slow fail-open hook under load, stopped with SIGTERM while thousands of packets wait
    in its queue: none is lost (answered by the handler, or by the fail mode once closed)."""
    lab = nfh_lab
    eng = lab.start_engine(write(tmp_path / "slow.py", SLOW), "--queue-maxlen", "3000", *workers)
    out = tmp_path / "sink.count"
    sink = lab.popen("router", sys.executable, "-c", SINK, "9200", str(out))
    lab.wait_for(lambda: (tmp_path / "sink.count.ready").exists(), timeout=10, what="the sink")
    n = 12000
    sender = lab.popen("client", sys.executable, "-c", SENDER, lab.addr("router", facing="client"),
                       "9200", str(n), "8000")
    try:
        lab.wait_for(lambda: waiting(lab) >= 1500, timeout=10, what="1500 packets waiting in the queue")
        assert eng.stop() == 0
        assert sender.wait(30) == 0
        sink.wait(30)
    finally:
        for p in (sender, sink):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert int(out.read_text()) == n, eng.log()[-2000:]
    assert "not answered" not in eng.log()
    if not workers:
        assert "every queued packet answered" in eng.log()
    assert nfh_lines(lab) == []


@WORKERS
def test_rules_removed_under_the_engine_come_back(nfh_lab, tmp_path, workers):
    """`nfhooks flush --force` under a running engine: noticed at the next scrape (and by the
    engine's own periodic check), said loudly, counted, re-installed; filtering resumes."""
    lab = nfh_lab
    eng = lab.start_engine(write(tmp_path / "raising.py", RAISING), *workers)
    lab.udp_server("router", 9100, bind="0.0.0.0")
    router = lab.addr("router", facing="client")
    installed = sorted(nfh_lines(lab))
    # 1: a scrape notices
    flushed = nfhooks(lab, "flush", "--force")
    assert flushed.returncode == 0 and "will notice and re-install" in flushed.stderr
    assert nfh_lines(lab) == []
    lab.exec("router", "curl", "-s", "-m", "2", "-o", "/dev/null", "http://127.0.0.1:9477/metrics")
    lab.wait_for(lambda: sorted(nfh_lines(lab)) == installed, timeout=5, what="rules back after a scrape")
    # 2: no scrape: the engine's own check
    assert nfhooks(lab, "flush", "--force").returncode == 0
    lab.wait_for(lambda: sorted(nfh_lines(lab)) == installed, timeout=15, what="rules back by the periodic check")
    assert "were removed under the running engine" in eng.log()
    assert metric(lab, "nfhooks_rules_missing_total") == 2
    assert metric(lab, "nfhooks_rules_restored_total") == 2
    assert lab.udp_send("client", router, 9100, "ok") == b"ok"
    lab.udp_server("router", 9101, bind="0.0.0.0")
    assert lab.udp_send("client", router, 9101, "x", timeout=1.0) is None  # INPUT drops by default again
    assert eng.stop() == 0
    assert nfh_lines(lab) == []


def test_engine_ended_by_an_error_leaves_fail_closed_hooks_closed(nfh_lab, tmp_path):
    """An internal error ends the loop (simulated with NFHOOKS_FAILPOINT=sighup): the rules stay as
    after a kill -9, so the fail-closed INPUT keeps dropping; the next start replaces them."""
    lab = nfh_lab
    pol = write(tmp_path / "raising.py", RAISING)
    eng = lab.start_engine(pol, env={"NFHOOKS_FAILPOINT": "sighup"})
    lab.udp_server("router", 9100, bind="0.0.0.0")
    router = lab.addr("router", facing="client")
    assert lab.udp_send("client", router, 9100, "ok") == b"ok"
    installed = sorted(nfh_lines(lab))
    eng.proc.send_signal(signal.SIGHUP)  # wakes the loop, where the failpoint raises
    assert eng.proc.wait(15) == 1, eng.log()
    assert "leaving its rules in place" in eng.log() and "rules left in place" in eng.log()
    assert sorted(nfh_lines(lab)) == installed
    assert lab.udp_send("client", router, 9100, "after", timeout=1.0) is None  # fail-closed: dropped
    eng2 = lab.start_engine(pol)
    assert "stale" in eng2.log()
    assert lab.udp_send("client", router, 9100, "again") == b"again"
    assert eng2.stop() == 0
    assert nfh_lines(lab) == []
