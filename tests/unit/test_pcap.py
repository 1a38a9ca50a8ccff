"""The --pcap writer (nfhooks/pcap.py): pcapng that scapy (and tshark, where installed) reads
back with each packet's comment; rotation that bounds the disk; the engine's tap."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest
from prometheus_client import CollectorRegistry
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.utils import PcapNgReader, rdpcap

from nfhooks import Policy, accept, drop, set_ttl
from nfhooks.fake import FakeQueuedPacket, fake_bytes
from nfhooks.pcap import (
    LINKTYPE_RAW,
    PcapWriter,
    comment_text,
    file_header,
    read_blocks,
    read_packets,
    rotated_names,
)

V4 = bytes(IP(src="10.1.0.2", dst="10.2.0.3", ttl=61) / TCP(sport=40000, dport=23, flags="S"))
V6 = bytes(IPv6(src="fd00::2", dst="fd00::3") / UDP(sport=5000, dport=53) / b"abc")  # 51: padded


def parse_comment(c: bytes | str) -> dict[str, str]:
    text = c.decode() if isinstance(c, bytes) else c
    return dict(kv.split("=", 1) for kv in text.split())


def writer(path, **kw) -> PcapWriter:
    kw.setdefault("flush_interval", None)
    return PcapWriter(path, **kw)


def test_round_trip_with_scapy(tmp_path):
    path = tmp_path / "cap.pcapng"
    w = writer(path, clock=lambda: 1_700_000_000.123456)
    w.write_packet(V4, comment_text("INPUT", "filter", "block_telnet", "drop"))
    w.write_packet(V6, comment_text("FORWARD", "mangle", "", "accept", via_default=True))
    w.close()

    with PcapNgReader(str(path)) as r:
        r.read_packet()
        assert [i[:2] for i in r.interfaces] == [(LINKTYPE_RAW, 65535)]
    pkts = rdpcap(str(path))
    assert len(pkts) == 2
    a, b = pkts
    assert a.haslayer(IP) and a[IP].src == "10.1.0.2" and a[IP].dst == "10.2.0.3" and a[TCP].dport == 23
    assert bytes(a) == V4 and bytes(b) == V6  # padding is not part of the packet
    assert b.haslayer(IPv6) and b[IPv6].dst == "fd00::3" and bytes(b[UDP].payload) == b"abc"
    assert float(a.time) == pytest.approx(1_700_000_000.123456, abs=1e-6)
    assert parse_comment(a.comments[0]) == {"hook": "INPUT", "table": "filter",
                                            "handler": "block_telnet", "verdict": "drop"}
    assert parse_comment(b.comments[0]) == {"hook": "FORWARD", "table": "mangle", "handler": "-",
                                            "verdict": "accept", "via": "default"}
    # our own reader agrees (the kernel test uses it on files still being written)
    assert [(p, parse_comment(c)["handler"]) for _, p, c in read_packets(path)] == [
        (V4, "block_telnet"), (V6, "-")]
    assert w.packets == 2 and w.bytes_written == os.path.getsize(path)


def test_blocks_are_well_formed(tmp_path):
    """Every block: length a multiple of 4, trailing length equal to the leading one."""
    path = tmp_path / "cap.pcapng"
    w = writer(path)
    for i in range(1, 9):
        w.write_packet(V4 + b"x" * i, "c" * i)  # every padding case of data and comment
    w.close()
    data = path.read_bytes()
    off, types = 0, []
    while off < len(data):
        btype, blen = struct.unpack_from("<II", data, off)
        assert blen % 4 == 0 and struct.unpack_from("<I", data, off + blen - 4)[0] == blen
        types.append(btype)
        off += blen
    assert off == len(data) and types == [0x0A0D0D0A, 1] + [6] * 8
    assert [c for _, _, c in read_packets(path)] == ["c" * i for i in range(1, 9)]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed (Debian: tshark)")
def test_tshark_reads_the_comments(tmp_path):
    path = tmp_path / "cap.pcapng"
    w = writer(path)
    w.write_packet(V4, comment_text("INPUT", "filter", "block_telnet", "drop"))
    w.close()
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "ip.dst",
                          "-e", "frame.comment"], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split("\t")[0] == "10.2.0.3"
    assert "handler=block_telnet verdict=drop" in out.stdout


def test_rotation_bounds_the_disk(tmp_path):
    path = tmp_path / "cap.pcapng"
    limit, files = 4096, 3
    w = writer(path, max_bytes=limit, files=files)
    n = 500
    for i in range(n):
        w.write_packet(V4 + i.to_bytes(4, "big"), f"n={i}")
    w.close()
    names = rotated_names(str(path), files)
    present = [p for p in names if os.path.exists(p)]
    assert present == names  # FILE, FILE.1, FILE.2
    assert not os.path.exists(f"{path}.{files}")  # nothing beyond the kept files
    sizes = [os.path.getsize(p) for p in present]
    assert all(s <= limit for s in sizes), sizes
    assert sum(sizes) <= limit * files
    assert w.rotations > files
    # each file is a complete capture on its own; together: the newest packets, in order
    seen = []
    for p in reversed(present):  # oldest first
        seen += [int(pkt.comments[0].decode().split("=")[1]) for pkt in rdpcap(p)]
    assert seen == list(range(n - len(seen), n)) and len(seen) > 50
    assert w.bytes_written > sum(sizes)  # more was written than is kept


def test_one_file_kept_and_oversized_packet_truncated(tmp_path):
    path = tmp_path / "cap.pcapng"
    w = writer(path, max_bytes=1024, files=1)
    big = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP() / (b"z" * 3000))
    w.write_packet(big, "big")
    w.write_packet(V4, "small")
    w.write_packet(big, "big2")
    w.close()
    assert not os.path.exists(f"{path}.1") and os.path.getsize(path) <= 1024
    (ts, data, comment), = list(read_packets(path))  # only the newest file's packet
    assert comment == "big2" and big.startswith(data) and 800 < len(data) < len(big)
    # the block keeps the original length, so readers show the truncation
    body = [b for t, b in read_blocks(path) if t == 6][0]
    assert struct.unpack_from("<II", body, 12) == (len(data), len(big))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="pcap-files"):
        PcapWriter(tmp_path / "x", files=0)
    with pytest.raises(ValueError, match="pcap-max-bytes"):
        PcapWriter(tmp_path / "x", max_bytes=100)
    with pytest.raises(OSError):
        PcapWriter(tmp_path / "missing-dir" / "x")


def test_write_errors_are_counted_not_raised(tmp_path):
    w = writer(tmp_path / "cap.pcapng")
    w.close()
    w.write_packet(V4, "after close")  # the engine must never see an exception from the tap
    assert w.errors == 1 and w.packets == 0


def test_periodic_flush_makes_packets_readable_while_running(tmp_path):
    path = tmp_path / "cap.pcapng"
    w = PcapWriter(path, flush_interval=0.05)
    try:
        w.write_packet(V4, "one")
        assert os.path.getsize(path) == 0  # buffered: nothing written per packet
        import time

        deadline = time.monotonic() + 5
        while not list(read_packets(path)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [c for _, _, c in read_packets(path)] == ["one"]
    finally:
        w.close()


def test_metrics(tmp_path):
    reg = CollectorRegistry()
    w = writer(tmp_path / "cap.pcapng", registry=reg, max_bytes=2048, files=2)
    for _ in range(30):
        w.write_packet(V4, "x")
    w.flush()
    assert reg.get_sample_value("nfhooks_pcap_packets_total") == 30
    assert reg.get_sample_value("nfhooks_pcap_bytes_written_total") == w.bytes_written > 30 * len(V4)
    assert reg.get_sample_value("nfhooks_pcap_rotations_total") == w.rotations >= 1
    assert reg.get_sample_value("nfhooks_pcap_errors_total") == 0
    w.close()


def test_header_is_what_readers_expect():
    h = file_header()
    assert h[:4] == b"\x0a\x0d\x0d\x0a" and h[8:12] == b"\x4d\x3c\x2b\x1a"
    shb_len = struct.unpack_from("<I", h, 4)[0]
    assert struct.unpack_from("<IIHH", h, shb_len)[0] == 1  # then the IDB
    assert struct.unpack_from("<H", h, shb_len + 8)[0] == LINKTYPE_RAW


# --------------------------------------------------------------------------- the engine's tap


class LeavingPacket(FakeQueuedPacket):
    """NetfilterQueue 1.1.0: get_payload() returns what set_payload() gave (the packet that leaves)."""

    def get_payload(self) -> bytes:
        return self.new_payload if self.new_payload is not None else self.payload


def tapped(dispatch, policy: Policy, path, handler_index=0):
    w = writer(path)
    return dispatch(policy).use(tap=w).callback(handler_index), w


def comments(path) -> list[dict[str, str]]:
    return [parse_comment(c) for _, _, c in read_packets(path)]


def test_tap_records_the_applied_verdicts(dispatch, tmp_path):
    p = Policy(defaults={"INPUT": "drop"})

    @p.input(proto="tcp", dport=23)
    def block_telnet(pkt):
        return drop()

    @p.input(proto="tcp", dport=22)
    def broken(pkt):
        raise RuntimeError("on purpose")

    @p.input(proto="tcp", dport=80)
    def not_mine(pkt):
        return None

    path = tmp_path / "cap.pcapng"
    w = writer(path)
    d = dispatch(p).use(tap=w)
    raws = [fake_bytes(proto="tcp", dport=port) for port in (23, 22, 80)]
    pkts = [d.send(r, handler=i) for i, r in enumerate(raws)]
    d.send(b"\x45\x00", handler=0)  # malformed: the INPUT default, recorded as such
    w.close()
    assert [pk.calls for pk in pkts] == [["drop"], ["drop"], ["repeat"]]  # verdicts unchanged
    got = comments(path)
    assert got == [
        {"hook": "INPUT", "table": "filter", "handler": "block_telnet", "verdict": "drop"},
        {"hook": "INPUT", "table": "filter", "handler": "broken", "verdict": "drop", "via": "error"},
        {"hook": "INPUT", "table": "filter", "handler": "not_mine", "verdict": "continue"},
        {"hook": "INPUT", "table": "filter", "handler": "block_telnet", "verdict": "drop", "via": "malformed"},
    ]
    assert [pkt for _, pkt, _ in read_packets(path)][:3] == raws
    # the metrics still count as before (the tap wraps the counters, it does not replace them)
    assert d.sample("nfhooks_handler_packets_total",
                    {"hook": "INPUT", "handler": "block_telnet", "verdict": "drop"}) == 1
    assert d.sample("nfhooks_handler_packets_total",
                    {"hook": "INPUT", "handler": "broken", "verdict": "drop", "via": "error"}) == 1
    assert d.sample("nfhooks_handler_packets_total",
                    {"hook": "INPUT", "handler": "block_telnet", "verdict": "drop", "via": "malformed"}) == 1


def test_tap_records_a_mangled_packet_as_it_left(dispatch, tmp_path):
    p = Policy()

    @p.handler("FORWARD", table="mangle", proto="udp")
    def low_ttl(pkt):
        return set_ttl(9)

    cb, w = tapped(dispatch, p, tmp_path / "cap.pcapng")
    raw = bytes(IP(src="10.1.0.2", dst="10.2.0.3", ttl=64) / UDP(dport=53) / b"q")
    pk = LeavingPacket(raw)
    cb(pk)
    w.close()
    ((_, data, comment),) = list(read_packets(tmp_path / "cap.pcapng"))
    assert parse_comment(comment)["verdict"] == "mangle"
    assert data == pk.new_payload != raw and IP(data).ttl == 9


def test_without_tap_the_callback_and_counters_are_the_plain_ones(dispatch):
    p = Policy()

    @p.input(proto="tcp")
    def ok(pkt):
        return accept()

    cb = dispatch(p).callback(0)
    assert cb.__name__ == "on_packet"  # not the recording wrapper
    counters = [c.cell_contents for c in cb.__closure__ if isinstance(c.cell_contents, dict)
                and "accept" in c.cell_contents]
    assert counters and all(type(v).__name__ == "VerdictCounter" for d_ in counters for v in d_.values())


def test_capture_files_are_private(tmp_path):
    w = writer(tmp_path / "cap.pcapng", max_bytes=1024, files=2)
    for _ in range(20):
        w.write_packet(V4, "x")
    w.close()
    for name in rotated_names(str(tmp_path / "cap.pcapng"), 2):
        assert os.stat(name).st_mode & 0o777 == 0o600
