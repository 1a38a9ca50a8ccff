"""Packet rewrites without root: every checksum compared with scapy's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from nfhooks import Policy, PolicyError, accept, clamp_mss, payload, set_dscp, set_tos, set_ttl
from nfhooks.mangle import MangleError, TruncatedPacket, checksum, rewrite
from nfhooks.loader import load_policy
from nfhooks.verdict import Mangle

scapy = pytest.importorskip("scapy")
from scapy.layers.inet import ICMP, IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6  # noqa: E402
from scapy.packet import Raw  # noqa: E402

ROOT = Path(__file__).parents[2]
V4 = dict(src="192.0.2.1", dst="198.51.100.7")
V6 = dict(src="2001:db8::1", dst="2001:db8::2")

PACKETS = {
    "tcp4-syn": IP(**V4) / TCP(sport=40000, dport=80, flags="S", options=[("MSS", 1460), ("SAckOK", b""), ("NOP", None)]),
    "tcp6-syn": IPv6(**V6) / TCP(sport=40000, dport=80, flags="S", options=[("MSS", 1440)]),
    "tcp4-data": IP(**V4) / TCP(sport=40000, dport=80, flags="PA", seq=7) / b"password=hunter2",
    "udp4": IP(**V4) / UDP(sport=5000, dport=53) / b"hello",
    "udp6": IPv6(**V6) / UDP(sport=5000, dport=53) / b"hello",
    "icmp4": IP(**V4) / ICMP() / b"ping-data",
    "icmp6": IPv6(**V6) / ICMPv6EchoRequest() / b"ping6",
}


def scapy_fixed(raw: bytes) -> bytes:
    """scapy's own rendering of ``raw`` with every length and checksum recomputed."""
    p = (IPv6 if raw[0] >> 4 == 6 else IP)(raw)
    for layer in (p, p.payload):
        for f in ("chksum", "cksum", "len", "plen"):
            if f in layer.fields:
                setattr(layer, f, None)
    return bytes(p.__class__(bytes(p)))


@pytest.mark.parametrize("name", PACKETS)
@pytest.mark.parametrize("verdict", [set_ttl(7), set_dscp(46), set_tos(0xB9), clamp_mss(1000),
                                     payload(b"REPLACED-WITH-MORE", allow_resize=True),
                                     set_ttl(9) | set_dscp(10) | clamp_mss(1200)], ids=str)
def test_checksums_and_lengths_equal_scapys(name, verdict):
    raw = bytes(PACKETS[name])
    out = rewrite(raw, verdict)
    assert out == scapy_fixed(out)


def test_each_rewrite_does_what_it_says():
    v4 = IP(rewrite(bytes(PACKETS["udp4"]), set_ttl(3) | set_dscp(46)))
    assert (v4.ttl, v4.tos) == (3, 46 << 2)
    ecn = IP(rewrite(bytes(IP(tos=0x03, **V4) / UDP()), set_dscp(10)))
    assert ecn.tos == (10 << 2) | 0x03  # ECN bits kept, as the DSCP target does
    v6 = IPv6(rewrite(bytes(IPv6(tc=0x01, fl=0xABCDE, **V6) / UDP()), set_ttl(5) | set_dscp(46)))
    assert (v6.hlim, v6.tc, v6.fl) == (5, (46 << 2) | 0x01, 0xABCDE)
    syn = IP(rewrite(bytes(PACKETS["tcp4-syn"]), clamp_mss(1000)))
    assert dict(syn[TCP].options)["MSS"] == 1000 and len(syn) == len(PACKETS["tcp4-syn"])
    udp = IP(rewrite(bytes(PACKETS["udp4"]), payload(b"a much longer payload")))
    assert bytes(udp[UDP].payload) == b"a much longer payload" and udp[UDP].len == 8 + 21


def test_mss_only_lowered_only_on_syns_and_added_like_tcpmss():
    raw = bytes(PACKETS["tcp4-syn"])
    assert rewrite(raw, clamp_mss(1500)) is raw  # already lower: untouched
    data = bytes(PACKETS["tcp4-data"])
    assert rewrite(data, clamp_mss(100)) is data  # not a SYN
    bare = bytes(IP(**V4) / TCP(flags="S"))
    added = IP(rewrite(bare, clamp_mss(1000)))
    assert dict(added[TCP].options)["MSS"] == 536 and added[TCP].dataofs == 6  # the RFC 1122 default is lower
    bare6 = bytes(IPv6(**V6) / TCP(flags="S"))
    added6 = IPv6(rewrite(bare6, clamp_mss(1000)))
    assert dict(added6[TCP].options)["MSS"] == 1000 and added6.plen == 24
    assert rewrite(bytes(added6), clamp_mss(1000)) == bytes(added6)


def test_same_length_tcp_payload_and_resizes_refused_without_asking():
    raw = bytes(PACKETS["tcp4-data"])
    out = IP(rewrite(raw, payload(b"********=hunter2")))
    assert bytes(out[TCP].payload) == b"********=hunter2" and out[TCP].seq == 7
    with pytest.raises(MangleError, match="sequence numbers.*allow_resize=True"):
        rewrite(raw, payload(b"short"))
    assert bytes(IP(rewrite(raw, payload(b"short", allow_resize=True)))[TCP].payload) == b"short"


def test_a_scapy_packet_the_handler_built_replaces_the_whole_packet():
    s = IP(bytes(PACKETS["udp4"]))  # as pkt.scapy gives it: stale lengths and checksums after edits
    s[UDP].remove_payload()
    s[UDP].add_payload(Raw(b"hello|tagged"))
    s.ttl = 20
    v = payload(s)
    assert v.packet is not None and v.payload is None
    out = rewrite(bytes(PACKETS["udp4"]), v)
    assert out == scapy_fixed(out) and IP(out).ttl == 20 and bytes(IP(out)[UDP].payload) == b"hello|tagged"
    with pytest.raises(MangleError, match="IPv6, the packet IPv4"):
        rewrite(bytes(PACKETS["udp4"]), payload(IPv6(**V6) / UDP()))
    assert payload(Raw(b"abc")).payload == b"abc"  # not an IP layer: the transport payload


def test_truncated_copies_and_fragments_are_never_rewritten():
    raw = bytes(IP(**V4) / UDP() / (b"x" * 1000))
    with pytest.raises(TruncatedPacket, match="256 of the packet's 1028 bytes"):
        rewrite(raw[:256], set_ttl(5))
    frag = bytes(IP(flags="MF", **V4) / UDP() / b"first")
    with pytest.raises(MangleError, match="fragment"):
        rewrite(frag, payload(b"other"))
    assert IP(rewrite(frag, set_ttl(5))).ttl == 5  # header-only rewrites are fine on fragments


def test_checksum_matches_rfc1071_examples():
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == ~0xDDF2 & 0xFFFF  # RFC 1071 section 3
    assert checksum(b"\x01") == ~0x0100 & 0xFFFF  # odd length: padded with a zero byte


@pytest.mark.parametrize("kw,message", [
    (dict(ttl=0), "ttl=0"), (dict(dscp=64), "dscp=64"), (dict(mss=0), "mss=0"),
    (dict(dscp=1, tos=4), "dscp or tos"),
])
def test_bad_mangle_values(kw, message):
    with pytest.raises(ValueError, match=message):
        Mangle(**kw)
    with pytest.raises(TypeError):
        payload("text is not bytes")


def test_mangle_needs_the_mangle_table_and_the_example_loads():
    p = Policy()
    with pytest.raises(PolicyError, match="mangle cannot be decided from the filter table.*mangle"):
        @p.input(proto="udp", table="filter")
        def in_filter(pkt):
            return set_ttl(5)

    @p.input(proto="udp")
    def picked(pkt):
        return set_ttl(5)
    assert p.handlers[-1].table == "mangle"  # chosen for it: header rewrites are mangle work
    pol = load_policy(ROOT / "policies" / "mangle.py")
    assert {h.table for h in pol.handlers} == {"mangle"}


def dispatcher(dispatch, func, hook="FORWARD"):
    return dispatch(defaults={hook: "drop"}).add(hook, func, table="mangle", proto="udp")


def test_dispatcher_rewrites_then_accepts(dispatch):
    d = dispatcher(dispatch, lambda pkt: set_ttl(9))
    pk = d.send(bytes(PACKETS["udp4"]))
    assert pk.calls == ["set_payload", "accept"] and IP(pk.new_payload).ttl == 9
    assert d.sample("nfhooks_handler_packets_total",
                    {"hook": "FORWARD", "handler": "<lambda>", "verdict": "mangle"}) == 1


def test_dispatcher_accepts_a_truncated_copy_unchanged_and_counts_it(dispatch, caplog):
    d = dispatcher(dispatch, lambda pkt: set_ttl(9))
    pk = d.send(bytes(IP(**V4) / UDP() / (b"x" * 1000))[:256])
    assert pk.calls == ["accept"] and pk.new_payload is None
    assert d.sample("nfhooks_truncated_packets_total", {"hook": "FORWARD"}) == 1
    assert "cannot be rewritten" in caplog.text and "<lambda>" in caplog.text


def test_dispatcher_refused_rewrite_is_a_handler_error(dispatch):
    def grow(pkt):
        return payload(b"longer than before", allow_resize=False) if pkt.proto == 6 else accept()

    d = dispatch(defaults={"FORWARD": "drop"}).add("FORWARD", grow, table="mangle", proto="tcp")
    pk = d.send(bytes(PACKETS["tcp4-data"]))
    assert pk.calls == ["drop"]  # the FORWARD default
    assert d.sample("nfhooks_handler_errors_total", {"hook": "FORWARD", "handler": "grow"}) == 1
