"""Mangle verdicts on the real kernel path: what the receiver observes on the wire."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import POLICIES, metric

scapy_inet = pytest.importorskip("scapy.layers.inet")
from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402

# Capture IP packets arriving on an interface (AF_PACKET, so the bytes are exactly what the
# receiver's kernel got) of one protocol to one port; print each as hex.
SNIFF = r"""
import socket, sys, time
iface, proto, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((iface, 0))
s.settimeout(0.2)
print("ready", flush=True)
end, got = time.time() + timeout, 0
while got < count and time.time() < end:
    try:
        frame, addr = s.recvfrom(65535)
    except socket.timeout:
        continue
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    eth, ip = int.from_bytes(frame[12:14], "big"), frame[14:]
    if eth == 0x0800:
        p, off, n = ip[9], (ip[0] & 15) * 4, int.from_bytes(ip[2:4], "big")
    elif eth == 0x86DD:
        p, off, n = ip[6], 40, 40 + int.from_bytes(ip[4:6], "big")
    else:
        continue
    if p == proto and int.from_bytes(ip[off + 2:off + 4], "big") == port:
        print(ip[:n].hex(), flush=True)
        got += 1
"""

SEND = r"""
import socket, sys
host, port, data = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.settimeout(3)
s.connect((host, port))
s.sendall(data)
s.recv(100)
"""


class Sniffer:
    def __init__(self, lab, node: str, proto: int, port: int, count: int = 1, timeout: float = 8) -> None:
        self.proc = lab.popen(node, sys.executable, "-c", SNIFF, "eth0", proto, port, count, timeout,
                              stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def packets(self) -> list:
        out, _ = self.proc.communicate(timeout=15)
        return [(IPv6 if raw[0] >> 4 == 6 else IP)(raw) for raw in map(bytes.fromhex, out.split())]


def checksums_valid(pkt) -> bool:
    """scapy recomputes every length and checksum; equal bytes mean ours were right."""
    again = pkt.copy()
    for layer in (again, again.payload):
        for f in ("chksum", "len", "plen"):
            if f in layer.fields:
                setattr(layer, f, None)
    return bytes(again.__class__(bytes(again))) == bytes(pkt)


@pytest.fixture
def mangle_lab(nfh_lab):
    lab = nfh_lab
    eng = lab.start_engine(str(POLICIES / "mangle.py"), "--set", "mss=1000", "--set", "ttl=33")
    return lab, eng


@pytest.mark.parametrize("family", [4, 6])
def test_ttl_and_dscp_seen_by_the_receiver(mangle_lab, family):
    lab, _ = mangle_lab
    lab.udp_server("server", 5060, family=family)
    sniff = Sniffer(lab, "server", 17, 5060)
    assert lab.udp_send("client", lab.addr("server", family), 5060, b"voice") == b"voice"
    (p,) = sniff.packets()
    if family == 4:
        assert (p.ttl, p.tos >> 2) == (33, 46)
    else:
        assert (p.hlim, p.tc >> 2) == (33, 46)
    assert checksums_valid(p) and bytes(p[UDP].payload) == b"voice"


def test_mss_clamp_visible_in_the_syn(mangle_lab):
    lab, _ = mangle_lab
    lab.tcp_server("server", 8090)
    sniff = Sniffer(lab, "server", 6, 8090)
    assert lab.tcp_connect("client", lab.addr("server"), 8090) == "ok"
    (syn,) = sniff.packets()
    assert syn[TCP].flags == "S" and dict(syn[TCP].options)["MSS"] == 1000
    assert checksums_valid(syn)


def test_payload_replaced_same_length_tcp_and_resized_udp(mangle_lab):
    lab, _ = mangle_lab
    srv = lab.tcp_server("server", 8080)
    lab.exec("client", sys.executable, "-c", SEND, lab.addr("server"), 8080, "user=bob password=hunter2")
    assert lab.wait_for(srv.received, what="data at the server") == [b"user=bob ********=hunter2"]
    udp = lab.udp_server("server", 7777)
    sniff = Sniffer(lab, "server", 17, 7777)
    lab.udp_send("client", lab.addr("server"), 7777, b"hello")
    assert udp.wait_datagrams(1)[0][1] == b"hello|tagged"  # the kernel verified our checksums
    (p,) = sniff.packets()
    assert checksums_valid(p) and p[UDP].len == 8 + len(b"hello|tagged")
    assert metric(lab, "nfhooks_handler_packets_total", handler="tag", verdict="mangle") >= 1


def test_resizing_tcp_refused_and_truncated_copy_accepted_unchanged(nfh_lab, tmp_path):
    lab = nfh_lab
    pol = tmp_path / "resize.py"
    pol.write_text(
        "from nfhooks import Policy, accept, payload\n"
        "policy = Policy()\n"
        "@policy.forward(table='mangle', proto='tcp', dport=8080)\n"
        "def grow(pkt):\n"
        "    return payload(pkt.payload + b'!') if pkt.payload else accept()\n"
        "@policy.forward(table='mangle', proto='udp', dport=7777)\n"
        "def shout(pkt):\n"
        "    return payload(pkt.payload.upper())\n"
    )
    # an engine whose queues copy only 256 bytes of each packet, so big ones arrive truncated
    argv = [sys.executable, "-c",
            "import sys, nfhooks.queue as q; q.COPY_RANGE = 256\n"
            "from nfhooks.cli import main; sys.argv = ['nfhooks', 'run', sys.argv[1]]; main()", str(pol)]
    eng = lab.start_engine(str(pol), _argv=argv)
    srv = lab.tcp_server("server", 8080)
    lab.exec("client", sys.executable, "-c", SEND, lab.addr("server"), 8080, "abc", check=False)
    assert "allow_resize=True" in eng.wait_log("sequence numbers")
    assert srv.received() == [b"abc"]  # FORWARD default accept: the data went unchanged
    udp = lab.udp_server("server", 7777)
    assert lab.udp_send("client", lab.addr("server"), 7777, b"small") == b"SMALL"
    big = b"x" * 1000
    assert lab.udp_send("client", lab.addr("server"), 7777, big) == big  # not rewritten
    assert [d for _, d in udp.wait_datagrams(2)] == [b"SMALL", big]
    assert metric(lab, "nfhooks_truncated_packets_total", hook="FORWARD") == 1
    assert "cannot be rewritten" in eng.wait_log("cannot be rewritten") and "shout" in eng.log()
