"""`nfhooks run --pcap`: the capture of a real run in the namespace lab, read back.

The router runs a policy with an accept, a drop, a handler that raises and a header rewrite;
traffic goes through each; the capture must hold those packets (right addresses, IPv4 and
IPv6) with the hook, table, handler and verdict actually applied in their comments, the
rewritten packet as it left, be readable while the engine runs (periodic flush), and stay
within --pcap-max-bytes x --pcap-files when it rotates.
"""

from __future__ import annotations

import os

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.utils import rdpcap

from nfhooks.pcap import read_packets, rotated_names



def metric(lab, name: str) -> float:
    """A label-less sample scraped inside the router (conftest's helper wants labels)."""
    text = lab.exec("router", "curl", "-s", "-m", "2", "http://127.0.0.1:9477/metrics").stdout
    (value,) = [float(line.split()[1]) for line in text.splitlines() if line.split()[:1] == [name]]
    return value

POLICY = '''
from nfhooks import Policy, accept, drop, set_ttl

policy = Policy()


@policy.input(proto="tcp", dport=7001)
def allow_web(pkt):
    return accept()


@policy.input(proto="tcp", dport=7023)
def block_telnet(pkt):
    return drop()


@policy.input(proto="tcp", dport=7009)
def broken(pkt):
    raise RuntimeError("a bug, on purpose")


@policy.forward(table="mangle", proto="udp", dport=5353)
def low_ttl(pkt):
    return set_ttl(7)
'''


def comment(pkt) -> dict[str, str]:
    (c,) = pkt.comments
    return dict(kv.split("=", 1) for kv in c.decode().split())


def ip(pkt):
    return pkt[IPv6] if pkt.haslayer(IPv6) else pkt[IP]


@pytest.fixture
def pcap_policy(nfh_lab):
    path = nfh_lab.tmpdir / "pcap_policy.py"
    path.write_text(POLICY)
    return str(path)


@pytest.mark.timeout(90)
def test_capture_records_packets_with_their_verdicts(nfh_lab, pcap_policy):
    lab = nfh_lab
    cap = lab.tmpdir / "decisions.pcapng"
    lab.tcp_server("router", 7001)
    lab.udp_server("server", 5353)
    engine = lab.start_engine(pcap_policy, "--pcap", str(cap))
    client, router, router6 = lab.addr("client"), lab.addr("router"), lab.addr("router", 6)

    assert lab.tcp_connect("client", router, 7023, timeout=0.5) == "timeout"

    # readable while the engine runs: the periodic flush (1 s) writes it out, no stop needed
    def dropped_in_file():
        return [c for _, _, c in read_packets(cap) if "handler=block_telnet" in c]

    assert lab.wait_for(dropped_in_file, timeout=5, what="the drop in the pcap while running")

    assert lab.tcp_connect("client", router, 7001) == "ok"
    assert lab.tcp_connect("client", router6, 7023, timeout=0.5) == "timeout"
    assert lab.tcp_connect("client", router, 7009) == "refused"  # the INPUT default: accept
    assert lab.udp_send("client", lab.addr("server"), 5353, b"query") == b"query"
    scraped = metric(lab, "nfhooks_pcap_packets_total")
    assert engine.stop() == 0  # flushes and closes the capture

    pkts = rdpcap(str(cap))
    assert len(pkts) == scraped > 0  # the metric counts what the file holds
    by = {}
    for p in pkts:
        by.setdefault(comment(p)["handler"], []).append(p)
    assert set(by) == {"allow_web", "block_telnet", "broken", "low_ttl"}, [comment(p) for p in pkts]

    drops = by["block_telnet"]
    assert {ip(p).src for p in drops} == {client, lab.addr("client", 6)}
    assert {ip(p).dst for p in drops} == {router, router6}
    for p in drops:
        assert comment(p) == {"hook": "INPUT", "table": "filter", "handler": "block_telnet",
                              "verdict": "drop"}
        assert p[TCP].dport == 7023 and p[TCP].flags == "S"

    accepted = by["allow_web"]
    assert {comment(p)["verdict"] for p in accepted} == {"accept"}
    assert any(p[TCP].flags == "S" for p in accepted)
    assert all(p[IP].src == client and p[IP].dst == router and p[TCP].dport == 7001 for p in accepted)

    # a handler error: the hook's default, which is what the packet got
    assert {tuple(sorted(comment(p).items())) for p in by["broken"]} == {
        (("handler", "broken"), ("hook", "INPUT"), ("table", "filter"), ("verdict", "accept"),
         ("via", "error"))}

    # the rewrite is recorded as the packet left: TTL 7, not the 63 it arrived with
    (m,) = by["low_ttl"]
    assert comment(m) == {"hook": "FORWARD", "table": "mangle", "handler": "low_ttl", "verdict": "mangle"}
    assert m[IP].ttl == 7 and m[IP].src == client and m[IP].dst == lab.addr("server")
    assert bytes(m[UDP].payload) == b"query"

    ts = [float(p.time) for p in pkts]
    assert ts == sorted(ts) and ts[-1] - ts[0] < 60 and abs(ts[0] - os.path.getmtime(cap)) < 60


@pytest.mark.timeout(90)
def test_capture_rotates_within_its_bound(nfh_lab, pcap_policy):
    lab = nfh_lab
    cap = lab.tmpdir / "rotating.pcapng"
    limit, files = 2048, 2
    lab.tcp_server("router", 7001)
    engine = lab.start_engine(pcap_policy, "--pcap", str(cap), "--pcap-max-bytes", str(limit),
                              "--pcap-files", str(files))
    for _ in range(8):  # ~10 packets of ~100 bytes each: several rotations
        assert lab.tcp_connect("client", lab.addr("router"), 7001) == "ok"
    rotations = metric(lab, "nfhooks_pcap_rotations_total")
    assert engine.stop() == 0
    names = rotated_names(str(cap), files)
    assert [os.path.exists(n) for n in names] == [True, True]
    assert not os.path.exists(f"{cap}.{files}")
    sizes = [os.path.getsize(n) for n in names]
    assert all(s <= limit for s in sizes) and sum(sizes) <= limit * files, sizes
    assert rotations >= 2
    for n in names:  # each file a complete capture of its own
        got = rdpcap(n)
        assert got and all(comment(p)["handler"] == "allow_web" for p in got)
