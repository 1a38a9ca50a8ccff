"""Hot reload on the real kernel: SIGHUP / `nfhooks reload`, bad policies kept out, and no
packet decided by neither or both generations while traffic flows."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from .conftest import metric, nfh_lines

TOGGLE = textwrap.dedent('''\
    """Reload test policy: tcp/8080 to the router is {verdict}."""
    from nfhooks import Policy, accept, drop

    policy = Policy(name="toggle{tag}")


    @policy.input(proto="tcp", dport=8080, name="port8080_{tag}")
    def port8080(pkt):
        return {verdict}()
    ''')

# Stamped per generation: the PREROUTING handler of generation TAG sets user bit 1 << TAG and
# the INPUT handler of the same generation accepts only packets carrying that bit, so a packet
# decided at PREROUTING by one generation and at INPUT by the other would be dropped.
STREAM = textwrap.dedent('''\
    from nfhooks import Policy, accept, drop, mark

    TAG = {tag}
    BIT = 1 << TAG
    policy = Policy(name=f"stream{{TAG}}")


    @policy.prerouting(proto="udp", dport=7000, name=f"pre{{TAG}}")
    def pre(pkt):
        return mark(BIT, BIT)


    @policy.input(proto="udp", dport=7000, name=f"in{{TAG}}")
    def inp(pkt):
        return accept() if pkt.mark & BIT else drop()
    ''')

SENDER = textwrap.dedent('''\
    import socket, sys, time
    dst, n, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 47000))  # one fixed 5-tuple: the conntrack table is machine-wide
    t0 = time.monotonic()
    for i in range(n):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        s.sendto(b"seq %d" % i, (dst, 7000))
    print(n, flush=True)
    ''')


def nfhooks(lab, *args, node="router", check=False):
    return lab.exec(node, sys.executable, "-m", "nfhooks", *args, check=check, timeout=60)


def write(path, text):
    path.write_text(text)
    path.chmod(0o644)


def broken_reload_keeps_the_policy(lab, pol, router) -> None:
    """After a reload to toggle2 (accepting): a broken file, and the command says so (file:line)
    while the running policy stays in force (the engine's and --workers' reload alike)."""
    write(pol, "from nfhooks import Policy\npolicy = Policy()\n\n@policy.input(\ndef oops(:\n")
    r = nfhooks(lab, "reload")
    assert r.returncode == 1 and "reload failed" in r.stderr and f"{pol}:5" in r.stderr, r.stderr
    assert lab.tcp_connect("client", router, 8080) == "ok"
    assert metric(lab, "nfhooks_policy_reload_errors_total") == 1
    assert metric(lab, "nfhooks_policy_reloads_total") == 1
    assert metric(lab, "nfhooks_policy_info", policy="toggle2") == 1


def sighup_reloads_back_to_dropping(lab, eng, pol, router, timeout: float) -> None:
    """SIGHUP does the same as the command: back to generation 1 and to dropping."""
    write(pol, TOGGLE.format(tag=3, verdict="drop"))
    eng.proc.send_signal(1)
    eng.wait_log("reloaded policy toggle3", timeout=15)
    assert lab.tcp_connect("client", router, 8080, timeout=1.0) == "timeout"
    lab.wait_for(lambda: not any(line.startswith(":NFH-INPUT-2 ") for line in nfh_lines(lab)),
                 timeout=15, what="generation 2 chains removed")
    assert metric(lab, "nfhooks_policy_reloads_total") == 2


def test_reload_swaps_policy_and_keeps_it_on_errors(nfh_lab, tmp_path):
    lab = nfh_lab
    pol = tmp_path / "toggle.py"
    write(pol, TOGGLE.format(tag=1, verdict="drop"))
    router = lab.addr("router", facing="client")
    eng = lab.start_engine(str(pol))
    lab.tcp_server("router", 8080, bind="0.0.0.0")
    assert lab.tcp_connect("client", router, 8080, timeout=1.0) == "timeout"

    write(pol, TOGGLE.format(tag=2, verdict="accept"))
    r = nfhooks(lab, "reload")
    assert r.returncode == 0, r.stderr
    assert "reloaded policy toggle2" in r.stderr and "generation 2" in r.stderr
    assert lab.tcp_connect("client", router, 8080) == "ok"
    lab.wait_for(lambda: not any(line.startswith(":NFH-INPUT ") for line in nfh_lines(lab)),
                 timeout=15, what="generation 1 chains removed")
    assert any(line.startswith(":NFH-INPUT-2 ") for line in nfh_lines(lab))

    broken_reload_keeps_the_policy(lab, pol, router)

    sighup_reloads_back_to_dropping(lab, eng, pol, router, timeout=15)

    assert eng.stop() == 0
    assert nfh_lines(lab) == []


def test_reload_without_engine_says_so(nfh_lab):
    r = nfhooks(nfh_lab, "reload")
    assert r.returncode == 2 and "no nfhooks engine runs" in r.stderr


def stream_through_reloads(lab, eng, pol, tags=(2, 1, 2, 1), n: int = 3000, rate: float = 1000.0) -> None:
    """Send ``n`` numbered datagrams client -> router (7000) and reload to ``STREAM`` with each of
    ``tags`` in turn, each after 200 more datagrams arrived; every datagram must arrive."""
    server = lab.udp_server("router", 7000, bind="0.0.0.0")
    sender = lab.popen("client", sys.executable, "-c", SENDER, lab.addr("router", facing="client"), str(n),
                       str(rate), text=True, stdout=subprocess.PIPE)
    try:
        for tag in tags:
            # wait for some traffic under the current generation, then swap
            seen = len(server.datagrams())
            lab.wait_for(lambda: len(server.datagrams()) >= seen + 200, timeout=20,
                         what="traffic under the current generation")
            write(pol, STREAM.format(tag=tag))
            r = nfhooks(lab, "reload")
            assert r.returncode == 0, r.stderr + eng.log()[-3000:]
        assert sender.wait(timeout=60) == 0
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    got = server.wait_datagrams(n, timeout=20)
    seqs = {int(p.split()[1]) for _, p in got}
    assert seqs == set(range(n)), f"{n - len(seqs)} datagram(s) never arrived"


def stream_decided(lab, prefix: str, verdict: str) -> float:
    """Verdicts of STREAM's ``prefix`` handlers, summed over both generations."""
    return sum(metric(lab, "nfhooks_handler_packets_total", handler=f"{prefix}{t}", verdict=verdict)
               for t in (1, 2))


def test_reload_under_traffic_every_packet_decided_by_exactly_one_generation(nfh_lab, tmp_path):
    lab = nfh_lab
    pol = tmp_path / "stream.py"
    write(pol, STREAM.format(tag=1))
    eng = lab.start_engine(str(pol))
    n, tags = 3000, [2, 1, 2, 1]
    stream_through_reloads(lab, eng, pol, tags, n)

    assert stream_decided(lab, "pre", "mark") == n    # exactly one PREROUTING verdict per packet
    assert stream_decided(lab, "in", "accept") == n   # and one INPUT verdict, from the same generation
    assert stream_decided(lab, "in", "drop") == 0
    for t in (1, 2):                            # both generations really served traffic
        assert metric(lab, "nfhooks_handler_packets_total", handler=f"in{t}") > 100
    assert metric(lab, "nfhooks_policy_reloads_total") == len(tags)
    assert "Traceback" not in eng.log()
