"""nfhooks.packet (the hot-path parser) and nfhooks.fake.

Exact values on hand-built packets, agreement with scapy on scapy-built ones, and
property tests: whatever bytes arrive, parse() returns a Packet or raises Malformed, and
every lazy property of a returned Packet can be read.
"""

from __future__ import annotations

import copy
import pickle
import socket
import struct
import subprocess
import sys
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.packet import Raw

from nfhooks.fake import fake_bytes, fake_packet
from nfhooks.hooks import PlacementError
from nfhooks.packet import PROTO_NAMES, Malformed, Packet, parse

LAZY = (
    "src", "dst", "src_bytes", "dst_bytes", "iif", "oif", "truncated", "payload", "flags",
    "family", "proto_name", "frag_offset",
)


def read_everything(p: Packet) -> None:
    """Every lazy property but scapy, plus repr: none may raise on a parsed packet."""
    for name in LAZY:
        getattr(p, name)
    repr(p)
    assert 0 <= p.l4_offset <= p.captured
    assert len(p.payload) <= p.captured - p.l4_offset


def v4(proto: int, l4: bytes, *, frag: int = 0, ihl: int = 5, total: int | None = None,
       src: bytes = b"\x0a\x00\x00\x01", dst: bytes = b"\x0a\x00\x00\x02", ttl: int = 64) -> bytes:
    opts = b"\x01" * ((ihl - 5) * 4) if ihl > 5 else b""
    tot = 20 + len(opts) + len(l4) if total is None else total
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, tot, 7, frag, ttl, proto, 0, src, dst) + opts + l4


def tcp(sport: int = 1234, dport: int = 80, flags: int = 0x02, doff: int = 5, opts: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, doff << 4, flags, 1024, 0, 0) + opts


def ext(nh: int, units: int = 0) -> bytes:
    """A generic extension header (hop-by-hop / dest-opts / routing) of (units+1)*8 bytes."""
    return bytes((nh, units)) + b"\x01\x04\0\0\0\0" + b"\0" * (8 * units)


def v6(nh: int, rest: bytes, *, plen: int | None = None, hlim: int = 63) -> bytes:
    src = IPv6Address("2001:db8::1").packed
    dst = IPv6Address("2001:db8::2").packed
    n = len(rest) if plen is None else plen
    return struct.pack("!IHBB16s16s", 6 << 28, n, nh, hlim, src, dst) + rest


# -- exact values ------------------------------------------------------------------------


def test_ipv4_tcp_fields() -> None:
    raw = v4(6, tcp(flags=0x12) + b"hello", ttl=9)
    p = parse(raw, "INPUT", 0x10, 0, 0)
    assert (p.version, p.proto, p.ttl, p.length, p.captured) == (4, 6, 9, 45, 45)
    assert (p.l4_offset, p.sport, p.dport, p.tcp_flags, p.flags) == (20, 1234, 80, 0x12, "SA")
    assert (p.icmp_type, p.icmp_code, p.fragment, p.truncated) == (None, None, False, False)
    assert p.src == IPv4Address("10.0.0.1") and p.dst == IPv4Address("10.0.0.2")
    assert p.src is p.src  # cached
    assert (p.src_bytes, p.dst_bytes) == (b"\x0a\0\0\x01", b"\x0a\0\0\x02")
    assert (p.family, p.proto_name, p.payload, p.hook, p.mark) == ("ipv4", "tcp", b"hello", "INPUT", 0x10)
    assert repr(p) == "<Packet INPUT tcp 10.0.0.1:1234 -> 10.0.0.2:80 SA mark=0x10 len=45>"


def test_ipv4_options_and_tcp_options_shift_offsets() -> None:
    raw = v4(6, tcp(doff=7, opts=b"\x01" * 8) + b"data", ihl=6)
    p = parse(raw)
    assert (p.l4_offset, p.sport, p.dport, p.payload) == (24, 1234, 80, b"data")


def test_ipv4_udp() -> None:
    p = parse(v4(17, struct.pack("!HHHH", 5353, 53, 11, 0) + b"abc"))
    assert (p.proto, p.sport, p.dport, p.tcp_flags, p.flags, p.payload) == (17, 5353, 53, None, "", b"abc")
    assert p.proto_name == "udp"


def test_ipv4_icmp() -> None:
    p = parse(v4(1, struct.pack("!BBHHH", 3, 4, 0, 0, 1400) + b"inner"))
    assert (p.proto, p.icmp_type, p.icmp_code, p.sport, p.dport) == (1, 3, 4, None, None)
    assert p.payload == b"inner"
    assert repr(p) == "<Packet icmp 10.0.0.1 -> 10.0.0.2 type=3/4 len=33>"


def test_ipv4_sctp_ports() -> None:
    p = parse(v4(132, struct.pack("!HHII", 3868, 3869, 1, 0) + b"chunk"))
    assert (p.proto_name, p.sport, p.dport, p.payload) == ("sctp", 3868, 3869, b"chunk")


def test_unknown_protocol_payload_is_everything_after_ip() -> None:
    p = parse(v4(47, b"\0\0\x08\0grepayload"))
    assert (p.proto, p.proto_name, p.sport, p.payload) == (47, "gre", None, b"\0\0\x08\0grepayload")
    assert parse(v4(253, b"x")).proto_name == "253"


def test_ipv6_tcp() -> None:
    p = parse(v6(6, tcp(4321, 443, 0x11)), "OUTPUT")
    assert (p.version, p.proto, p.ttl, p.length, p.l4_offset) == (6, 6, 63, 60, 40)
    assert (p.sport, p.dport, p.flags, p.family) == (4321, 443, "FA", "ipv6")
    assert p.src == IPv6Address("2001:db8::1") and p.dst == IPv6Address("2001:db8::2")
    assert p.src_bytes == IPv6Address("2001:db8::1").packed
    assert repr(p) == "<Packet OUTPUT tcp [2001:db8::1]:4321 -> [2001:db8::2]:443 FA len=60>"


def test_ipv6_udp_and_icmpv6() -> None:
    u = parse(v6(17, struct.pack("!HHHH", 546, 547, 8, 0)))
    assert (u.proto, u.sport, u.dport, u.payload) == (17, 546, 547, b"")
    i = parse(v6(58, struct.pack("!BBHHH", 135, 0, 0, 0, 0) + b"target"))
    assert (i.proto, i.proto_name, i.icmp_type, i.icmp_code, i.payload) == (58, "icmpv6", 135, 0, b"target")


@pytest.mark.parametrize(
    "byte, letters",
    [(0x00, ""), (0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"), (0x10, "A"), (0x20, "U"),
     (0x40, "E"), (0x80, "C"), (0x12, "SA"), (0x11, "FA"), (0x18, "PA"), (0x14, "RA"), (0xC2, "SEC"),
     (0xFF, "FSRPAUEC")],
)
def test_tcp_flags(byte: int, letters: str) -> None:
    p = parse(v4(6, tcp(flags=byte)))
    assert (p.tcp_flags, p.flags) == (byte, letters)


def test_ipv6_extension_chain_hbh_dstopts_fragment() -> None:
    chain = ext(60) + ext(44, 1) + struct.pack("!BBHI", 6, 0, 0x0001, 99)  # offset 0, M=1
    p = parse(v6(0, chain + tcp(1, 2, 0x02) + b"pl"))
    assert (p.proto, p.l4_offset, p.sport, p.dport, p.flags) == (6, 40 + 8 + 16 + 8, 1, 2, "S")
    assert (p.fragment, p.frag_offset, p.payload) == (True, 0, b"pl")


def test_ipv6_later_fragment_has_no_ports() -> None:
    chain = ext(44) + struct.pack("!BBHI", 17, 0, (185 << 3) | 1, 99)
    p = parse(v6(0, chain + b"\x12\x34\x56\x78rest of the datagram"))
    assert (p.proto, p.l4_offset, p.fragment, p.frag_offset) == (17, 56, True, 185 * 8)
    assert (p.sport, p.dport) == (None, None)
    assert p.payload == b"\x12\x34\x56\x78rest of the datagram"
    assert "frag" in repr(p)


def test_ipv6_routing_and_ah() -> None:
    ah = struct.pack("!BBHII", 17, 4, 0, 1, 1) + b"\0" * 12  # (4 + 2) * 4 = 24 bytes
    p = parse(v6(43, ext(51) + ah + struct.pack("!HHHH", 500, 4500, 8, 0)))
    assert (p.proto, p.l4_offset, p.sport, p.dport) == (17, 40 + 8 + 24, 500, 4500)


@pytest.mark.parametrize("stop", [50, 59])
def test_ipv6_esp_and_no_next_header_end_the_walk(stop: int) -> None:
    p = parse(v6(0, ext(stop) + b"\xde\xad\xbe\xef" * 4))
    assert (p.proto, p.l4_offset, p.sport, p.payload) == (stop, 48, None, b"\xde\xad\xbe\xef" * 4)


def test_ipv6_jumbogram_length() -> None:
    hbh = bytes((6, 0, 0xC2, 4)) + struct.pack("!I", 70000)
    p = parse(v6(0, hbh + tcp(), plen=0))
    assert (p.length, p.proto, p.sport, p.truncated) == (70040, 6, 1234, True)


def test_ipv4_first_fragment_has_ports() -> None:
    p = parse(v4(6, tcp(), frag=0x2000))  # MF, offset 0
    assert (p.fragment, p.frag_offset, p.sport, p.dport) == (True, 0, 1234, 80)


def test_ipv4_later_fragment_has_no_ports() -> None:
    p = parse(v4(6, tcp() + b"more", frag=185))  # offset 185*8, last fragment
    assert (p.fragment, p.frag_offset, p.sport, p.dport, p.tcp_flags, p.flags) == (True, 1480, None, None, None, "")
    assert p.payload == tcp() + b"more"


def test_ipv4_dont_fragment_is_not_a_fragment() -> None:
    p = parse(v4(6, tcp(), frag=0x4000))
    assert (p.fragment, p.frag_offset, p.sport) == (False, 0, 1234)


@pytest.mark.parametrize("cut", [0, 1, 4, 13, 19])
def test_truncated_tcp_header_is_not_malformed(cut: int) -> None:
    raw = v4(6, tcp())[: 20 + cut]
    p = parse(raw)
    assert (p.proto, p.sport, p.dport, p.tcp_flags, p.flags, p.payload) == (6, None, None, None, "", b"")
    assert p.truncated  # total length still claims the full header
    read_everything(p)


def test_transport_header_cut_by_claimed_length_is_truncated_too() -> None:
    """Trailing bytes past the IP total length are not the transport header."""
    raw = v4(17, struct.pack("!HHHH", 1, 2, 8, 0), total=24)
    p = parse(raw)
    assert (p.length, p.captured, p.sport, p.truncated) == (24, 28, None, False)


@pytest.mark.parametrize("cut", [1, 4, 7])
def test_truncated_udp_icmp(cut: int) -> None:
    assert parse(v4(17, struct.pack("!HHHH", 1, 2, 8, 0))[: 20 + cut]).sport is None
    p = parse(v4(1, struct.pack("!BBHHH", 8, 0, 0, 1, 1))[: 20 + cut])
    assert (p.icmp_type, p.icmp_code, p.payload) == (None, None, b"")


def test_truncated_capture() -> None:
    full = v4(6, tcp(flags=0x18) + b"x" * 1000)
    p = parse(full[:100])
    assert (p.length, p.captured, p.truncated) == (1040, 100, True)
    assert (p.sport, p.dport, p.flags) == (1234, 80, "PA")
    assert p.payload == b"x" * 60
    assert "captured=100" in repr(p)


def _bad_ext_chain() -> bytes:
    return v6(0, bytes((6, 4)) + b"\0" * 14)  # hop-by-hop claims 40 bytes, 16 captured


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"", "empty"),
        (bytes([0x55]) + b"\0" * 39, "version 5"),
        (bytes([0x00]) + b"\0" * 39, "version 0"),
        (v4(6, tcp())[:19], "IPv4 header needs 20"),
        (bytes([0x44]) + v4(6, tcp())[1:], "IHL 4 < 5"),
        (v4(6, b"", ihl=6)[:20] + b"\0" * 3, "IHL says 24"),
        (v4(6, tcp(), total=19), "total length 19"),
        (v4(6, b"", ihl=7, total=24), "total length 24 < header length 28"),
        (v6(6, tcp())[:39], "IPv6 header needs 40"),
        (v6(0, b"\x06"), "extension header at 40"),
        (_bad_ext_chain(), "runs past 56 captured"),
        (v6(60, ext(44) + b"\x06\0\0"), "fragment header at 48"),
        (v6(0, ext(6, 1) + tcp(), plen=8), "payload length 8 < extension headers' 16"),
        (v6(0, ext(6) + tcp(), plen=0), "payload length 0"),  # plen 0 without a jumbo option
    ],
)
def test_malformed(raw: bytes, why: str) -> None:
    with pytest.raises(Malformed, match=why.split(" ")[0]) as exc:
        parse(raw)
    assert why in str(exc.value)


def test_malformed_is_a_value_error() -> None:
    assert issubclass(Malformed, ValueError)


# -- callers' fields, interfaces, object protocol ----------------------------------------


def test_caller_fields_and_interface_lookup() -> None:
    index, name = socket.if_nameindex()[0]
    p = parse(v4(6, tcp()), "FORWARD", 7, index, 0)
    assert (p.hook, p.mark, p.iif_index, p.oif_index) == ("FORWARD", 7, index, 0)
    assert (p.iif, p.oif) == (name, None)
    assert p.iif is p.iif


def test_unknown_interface_index_is_none() -> None:
    assert parse(v4(6, tcp()), iif_index=2**31 - 1, oif_index=-1).iif is None
    assert parse(v4(6, tcp()), oif_index=-1).oif is None


def test_set_ifnames_pins_names() -> None:
    p = parse(v4(6, tcp()), iif_index=2**31 - 1)
    p.set_ifnames("wan0", None)
    assert (p.iif, p.oif) == ("wan0", None)


def test_packet_constructor_is_parse_and_accepts_buffers() -> None:
    raw = v4(6, tcp())
    assert repr(Packet(raw, "INPUT")) == repr(parse(raw, "INPUT"))
    assert parse(bytearray(raw)).raw == raw and parse(memoryview(raw)).sport == 1234
    assert type(parse(bytearray(raw)).raw) is bytes
    with pytest.raises(Malformed):
        Packet(b"")


def test_slots_no_dict() -> None:
    p = parse(v4(6, tcp()))
    assert not hasattr(p, "__dict__")
    with pytest.raises(AttributeError):
        p.bogus = 1  # type: ignore[attr-defined]


def test_copy_and_pickle_keep_state() -> None:
    p = fake_packet(hook="FORWARD", iif="a", oif="b", mark=3)
    p.mark = 9
    for q in (copy.copy(p), copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert (q.raw, q.hook, q.mark, q.iif, q.oif, q.sport) == (p.raw, "FORWARD", 9, "a", "b", 40000)


def test_scapy_property_is_lazy_and_cached() -> None:
    p = parse(v4(6, tcp()))
    s = p.scapy
    assert s is p.scapy and s[TCP].dport == 80
    assert isinstance(parse(v6(6, tcp())).scapy, IPv6)


def test_parse_and_fake_never_import_scapy() -> None:
    code = (
        "import sys; from nfhooks.fake import fake_packet; from nfhooks.packet import parse\n"
        "p = fake_packet(src='2001:db8::1', dst='2001:db8::2', iif='x', hook='PREROUTING')\n"
        "[getattr(p, n) for n in %r]; repr(p)\n"
        "assert not [m for m in sys.modules if m.startswith('scapy')], 'scapy imported'\n" % (LAZY,)
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_proto_names() -> None:
    assert {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}.items() <= PROTO_NAMES.items()


# -- agreement with scapy ----------------------------------------------------------------

SCAPY_CASES = [
    IP(src="10.1.2.3", dst="10.3.2.1", ttl=3) / TCP(sport=1, dport=65535, flags="S"),
    IP(src="10.1.2.3", dst="10.3.2.1") / TCP(sport=22, dport=5000, flags="PA") / Raw(b"ssh"),
    IP(src="10.1.2.3", dst="10.3.2.1") / TCP(dport=443, flags="FA", options=[("MSS", 1460), ("NOP", None)]),
    IP(src="172.16.0.1", dst="224.0.0.251", options=[b"\x94\x04\0\0"]) / UDP(sport=5353, dport=5353),
    IP(src="198.51.100.7", dst="203.0.113.9") / ICMP(type=11, code=1),
    IP(src="198.51.100.7", dst="203.0.113.9", flags="MF") / UDP(sport=9, dport=9) / Raw(b"z" * 40),
    IPv6(src="fe80::1", dst="ff02::1", hlim=255) / ICMPv6EchoRequest(),
    IPv6(src="2001:db8::a", dst="2001:db8::b") / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting()
    / IPv6ExtHdrDestOpt() / UDP(sport=53, dport=53000),
    IPv6(src="2001:db8::a", dst="2001:db8::b") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
    / IPv6ExtHdrFragment(offset=0, m=1) / TCP(sport=8080, dport=34567, flags="SAEC"),
    IPv6(src="2001:db8::a", dst="2001:db8::b") / AH(nh=6, payloadlen=4, spi=5, icv=b"\0" * 12) / TCP(flags="R"),
]


def _scapy_l4(s):  # type: ignore[no-untyped-def]
    for layer in (TCP, UDP):
        if layer in s:
            return s[layer]
    return None


def _assert_agrees(raw: bytes) -> Packet:
    p = parse(raw)
    s = IP(raw) if p.version == 4 else IPv6(raw)
    assert p.src == ip_address(s.src) and p.dst == ip_address(s.dst)  # scapy spells ::ffff:0.0.0.0
    assert p.ttl == (s.ttl if p.version == 4 else s.hlim)
    l4 = _scapy_l4(s)
    if l4 is not None:
        assert (p.sport, p.dport) == (l4.sport, l4.dport)
        assert p.proto == (6 if isinstance(l4, TCP) else 17)
    if TCP in s:
        assert p.flags == str(s[TCP].flags)
        assert p.tcp_flags == int(s[TCP].flags) & 0xFF
        assert p.payload == bytes(s[TCP].payload)
    elif ICMP in s:
        assert (p.proto, p.icmp_type, p.icmp_code) == (1, s[ICMP].type, s[ICMP].code)
    elif ICMPv6EchoRequest in s:
        assert (p.proto, p.icmp_type, p.icmp_code) == (58, 128, 0)
    return p


@pytest.mark.parametrize("pkt", SCAPY_CASES, ids=lambda s: s.summary())
def test_agrees_with_scapy(pkt) -> None:  # type: ignore[no-untyped-def]
    _assert_agrees(bytes(pkt))


ports = st.integers(0, 65535)
v4_addr = st.ip_addresses(v=4).map(str)
v6_addr = st.ip_addresses(v=6).map(str)


@settings(max_examples=60, deadline=None)
@given(
    v6_=st.booleans(), a=st.data(), sport=ports, dport=ports, flags=st.integers(0, 255),
    ttl=st.integers(0, 255), payload=st.binary(max_size=40), udp=st.booleans(),
)
def test_agrees_with_scapy_property(v6_, a, sport, dport, flags, ttl, payload, udp) -> None:  # type: ignore[no-untyped-def]
    addr = v6_addr if v6_ else v4_addr
    src, dst = a.draw(addr), a.draw(addr)
    if v6_:
        ip = IPv6(src=src, dst=dst, hlim=ttl)
    else:
        ip = IP(src=src, dst=dst, ttl=ttl)
    l4 = UDP(sport=sport, dport=dport) if udp else TCP(sport=sport, dport=dport, flags=flags)
    p = _assert_agrees(bytes(ip / l4 / Raw(payload)))
    assert p.payload == payload


# -- property tests: anything in, Packet or Malformed out --------------------------------


def _parse_or_malformed(raw: bytes) -> None:
    try:
        p = parse(raw)
    except Malformed:
        return
    read_everything(p)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes(raw: bytes) -> None:
    _parse_or_malformed(raw)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x61]), st.binary(max_size=200))
def test_arbitrary_bytes_behind_a_plausible_first_byte(first: int, rest: bytes) -> None:
    _parse_or_malformed(bytes([first]) + rest)


def _frag6(nh: int, offset: int, more: bool) -> bytes:
    return struct.pack("!BBHI", nh, 0, offset << 3 | more, 1)


VALID = [
    fake_bytes(),
    fake_bytes(flags="PA", payload=b"GET / HTTP/1.1\r\n\r\n"),
    fake_bytes(proto="udp", dport=53, payload=b"\0" * 30),
    fake_bytes(proto="icmp", payload=b"ping"),
    fake_bytes(proto="sctp"),
    fake_bytes(src="2001:db8::1", dst="2001:db8::2", proto="icmpv6"),
    fake_bytes(src="2001:db8::1", dst="2001:db8::2", proto="udp", payload=b"q"),
    v4(6, tcp(doff=8, opts=b"\x01" * 12) + b"abc", ihl=7),
    v4(17, b"\0" * 16, frag=0x2000),
    v4(17, b"\0" * 16, frag=3),
    v6(0, ext(60) + ext(43, 1) + ext(44) + _frag6(6, 0, True) + tcp() + b"xy"),
    v6(60, ext(44) + _frag6(17, 9, False) + b"\0" * 20),
    v6(51, struct.pack("!BBHII", 6, 1, 0, 0, 0) + tcp()),
    v6(0, bytes((6, 0, 0xC2, 4)) + struct.pack("!I", 100) + tcp(), plen=0),
    bytes(SCAPY_CASES[7]),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(raw) - 1))
        if draw(st.booleans()):
            raw[i] ^= 1 << draw(st.integers(0, 7))
        else:
            raw[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(raw)))
    return bytes(raw[:cut] if draw(st.booleans()) else raw)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_valid_packets(raw: bytes) -> None:
    _parse_or_malformed(raw)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(VALID), st.data())
def test_any_truncation_of_a_valid_packet_is_never_worse_than_malformed(raw: bytes, data) -> None:  # type: ignore[no-untyped-def]
    full = parse(raw)
    cut = data.draw(st.integers(0, len(raw)))
    try:
        p = parse(raw[:cut])
    except Malformed:
        return
    read_everything(p)
    assert (p.version, p.length, p.l4_offset) == (full.version, full.length, full.l4_offset)
    if p.sport is not None:  # a cut never changes what is found, only whether
        assert (p.sport, p.dport, p.tcp_flags) == (full.sport, full.dport, full.tcp_flags)


# -- fake packets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(flags="FA", sport=1, dport=2, ttl=1, payload=b"bye"),
        dict(proto="udp", dport=53, payload=b"query"),
        dict(src="2001:db8::1", dst="2001:db8::2", flags="SA", payload=b"v6"),
        dict(src="2001:db8::1", dst="2001:db8::2", proto="udp", sport=546, dport=547),
        dict(proto=6, flags=0x18),
    ],
)
def test_fake_round_trip_tcp_udp(kw: dict) -> None:  # type: ignore[type-arg]
    p = fake_packet(**kw)
    want = {"src": "192.0.2.1", "dst": "192.0.2.2", "proto": "tcp", "sport": 40000, "dport": 80,
            "flags": "S", "ttl": 64, "payload": b""} | kw
    assert (str(p.src), str(p.dst)) == (want["src"], want["dst"])
    assert (p.sport, p.dport, p.ttl, p.payload) == (want["sport"], want["dport"], want["ttl"], want["payload"])
    if want["proto"] in ("tcp", 6):
        flags = want["flags"]
        assert p.proto == 6 and (p.tcp_flags == flags if isinstance(flags, int) else p.flags == flags)
    else:
        assert (p.proto, p.tcp_flags) == (17, None)
    assert p.raw == fake_bytes(**kw)
    assert (p.hook, p.mark, p.iif, p.oif, p.iif_index, p.oif_index) == ("INPUT", 0, None, None, 0, 0)
    _assert_agrees(p.raw)


def test_fake_checksums_are_valid() -> None:
    for kw in (dict(payload=b"odd"), dict(proto="udp", payload=b"x"), dict(proto="icmp"),
               dict(src="::1", dst="::2", proto="icmpv6", payload=b"hi"), dict(src="::1", dst="::2")):
        raw = fake_bytes(**kw)
        s = IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)
        fresh = s.copy()
        for layer in (fresh, fresh.payload):
            for field in ("chksum", "cksum"):
                if field in layer.fields:
                    setattr(layer, field, None)
        assert bytes(fresh) == raw, kw


def test_fake_icmp_defaults() -> None:
    p = fake_packet(proto="icmp")
    assert (p.proto, p.icmp_type, p.icmp_code, p.sport) == (1, 8, 0, None)
    q = fake_packet(src="2001:db8::1", dst="2001:db8::2", proto="icmpv6")
    assert (q.proto, q.icmp_type, q.icmp_code) == (58, 128, 0)
    r = fake_packet(proto="icmp", icmp_type=3, icmp_code=13, payload=b"orig")
    assert (r.icmp_type, r.icmp_code, r.payload) == (3, 13, b"orig")


def test_fake_other_protocol_number() -> None:
    p = fake_packet(proto=47, payload=b"\0\0\x08\0")
    assert (p.proto, p.proto_name, p.sport, p.payload) == (47, "gre", None, b"\0\0\x08\0")


def test_fake_hook_interfaces_and_mark() -> None:
    p = fake_packet(hook="forward", iif="eth0", oif="eth1", mark=0x42)
    assert (p.hook, p.iif, p.oif, p.mark) == ("FORWARD", "eth0", "eth1", 0x42)
    assert fake_packet(hook="OUTPUT", oif="wg0").oif == "wg0"
    with pytest.raises(PlacementError, match="oif"):
        fake_packet(hook="INPUT", oif="eth0")
    with pytest.raises(PlacementError, match="iif"):
        fake_packet(hook="POSTROUTING", iif="eth0")
    with pytest.raises(PlacementError, match="unknown hook"):
        fake_packet(hook="INPTU")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(src="2001:db8::1", dst="192.0.2.2"), "different address families"),
        (dict(src="2001:db8::1", dst="2001:db8::2", proto="icmp"), "icmpv6"),
        (dict(proto="icmpv6"), "IPv6 addresses"),
        (dict(proto="quic"), "unknown protocol"),
        (dict(flags="SX"), "unknown TCP flag"),
        (dict(src="300.1.1.1"), "does not appear to be"),
        (dict(payload=b"x" * 65496), "does not fit one packet"),
    ],
)
def test_fake_refuses_nonsense(kw: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        fake_bytes(**kw)
