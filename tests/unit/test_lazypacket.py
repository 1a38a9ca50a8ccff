"""The packet parsed on first read (lazypacket.py) and who gets it (obs_verdicts.reads_packet,
the dispatcher): it must read exactly as parse()'s packet, refuse what parse() refuses, and
leave every count, the latency histogram and the GSO guard of packet-reading handlers alone."""

from __future__ import annotations

import copy
import functools
import pickle
import struct

import pytest

from nfhooks import accept, drop, mark
from nfhooks.fake import fake_bytes
from nfhooks.lazypacket import LAZY_FIELDS, LazyPacket, parse_lazy
from nfhooks.obs_verdicts import reads_packet
from nfhooks.packet import Malformed, Packet, parse
from nfhooks.policy import Policy

_FIELDS = ("raw", "version", "proto", "ttl", "length", "captured", "l4_offset", "sport", "dport", "tcp_flags",
           "icmp_type", "icmp_code", "fragment", "hook", "mark", "iif_index", "oif_index", "src", "dst",
           "payload", "flags", "truncated", "frag_offset", "family")


def _v4_options() -> bytes:
    b = bytearray(fake_bytes(src="10.0.0.1", dst="10.0.0.2", proto="udp", sport=1, dport=2, payload=b"abc"))
    opt = b"\x01\x01\x01\x00"  # NOPs and an end of options: IHL 6
    out = bytearray(b[:20] + opt + b[20:])
    out[0] = 0x46
    struct.pack_into("!H", out, 2, len(out))
    return bytes(out)


def _v6_frag() -> bytes:
    b = bytearray(fake_bytes(src="2001:db8::1", dst="2001:db8::2", proto="udp", sport=1, dport=2, payload=b"x" * 8))
    frag = struct.pack("!BBHI", b[6], 0, 0x0001, 7)  # first fragment, more follow
    out = bytearray(b[:40] + frag + b[40:])
    out[6] = 44
    struct.pack_into("!H", out, 4, len(out) - 40)
    return bytes(out)


SAMPLES = {
    "udp4": fake_bytes(src="10.0.0.1", dst="10.0.0.2", proto="udp", sport=1000, dport=53, payload=b"q" * 20),
    "tcp4": fake_bytes(src="192.168.1.1", dst="10.0.0.2", proto="tcp", sport=40000, dport=443, flags="SA",
                       payload=b"hello"),
    "icmp4": fake_bytes(src="10.0.0.1", dst="10.0.0.2", proto="icmp", icmp_type=8),
    "tcp6": fake_bytes(src="2001:db8::1", dst="2001:db8::2", proto="tcp", sport=1, dport=22, flags="S"),
    "icmp6": fake_bytes(src="2001:db8::1", dst="2001:db8::2", proto="icmpv6", icmp_type=128),
    "v4 options": _v4_options(),
    "v6 fragment": _v6_frag(),
    "truncated udp4": fake_bytes(src="10.0.0.1", dst="10.0.0.2", proto="udp", sport=1, dport=2, payload=b"z" * 50)[:30],
    "v4 header only": fake_bytes(src="10.0.0.1", dst="10.0.0.2", proto="tcp", sport=1, dport=2)[:20],
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("first", ["sport", "src", "payload", "proto", "_dst"])
def test_a_lazy_packet_reads_as_the_parsed_one(name, first):
    raw = SAMPLES[name]
    want = parse(raw, "INPUT", 0x10, 3, 4)
    got = parse_lazy(raw, "INPUT", 0x10, 3, 4)
    lazy = type(got) is LazyPacket
    assert lazy == (name not in ("v4 options", "v6 fragment"))  # extension headers, options: parsed eagerly
    assert (got.length, got.captured, got.raw, got.mark) == (want.length, want.captured, want.raw, 0x10)
    assert got.truncated == want.truncated and (type(got) is LazyPacket) == lazy  # eager slots: still lazy
    getattr(got, first)
    assert type(got) is Packet  # the first read of a lazy field parsed it whole
    for f in _FIELDS:
        assert getattr(got, f) == getattr(want, f), f
    assert repr(got) == repr(want)


def test_the_lazy_shapes_are_parse_s_own():
    """lazypacket keeps its own copy of the IPv6 extension headers parse() walks: they must agree."""
    from nfhooks import lazypacket, packet

    assert lazypacket._V6_EXT == packet._V6_EXT


@pytest.mark.parametrize("raw", [b"", b"\x45" + bytes(10), b"\x44" + bytes(30), b"\x60" + bytes(20),
                                 b"\x45\x00\x00\x10" + bytes(16), b"\x70" + bytes(40)])
def test_a_lazy_parse_refuses_what_parse_refuses(raw):
    with pytest.raises(Malformed) as lazy:
        parse_lazy(raw)
    with pytest.raises(Malformed) as eager:
        parse(raw)
    assert str(lazy.value) == str(eager.value)


def test_writes_copies_and_pickles_see_the_whole_packet():
    raw = SAMPLES["udp4"]
    p = parse_lazy(raw, "INPUT", 1)
    p.sport = 7  # a write to a lazy field parses first, then sets it
    assert type(p) is Packet and p.sport == 7 and p.dport == 53
    for clone in (copy.copy(parse_lazy(raw)), copy.deepcopy(parse_lazy(raw)), pickle.loads(pickle.dumps(parse_lazy(raw)))):
        assert type(clone) is Packet and clone.dport == 53 and str(clone.src) == "10.0.0.1"
    q = parse_lazy(raw)
    q.mark = 5  # an eager slot: no parse
    assert type(q) is LazyPacket and q.mark == 5 and set(LAZY_FIELDS) >= {"sport", "_src"}


def _named(pol: Policy, fn):
    pol.input(proto="udp", dport=53)(fn)
    return pol.handlers[-1]


def test_reads_packet_only_false_for_a_body_that_never_names_its_packet():
    pol = Policy("t")

    def blind(pkt):
        return accept()

    def reads(pkt):
        return accept() if pkt.dport == 53 else drop()

    def passes_on(pkt):
        return _helper(pkt)

    def frame(pkt):
        return accept() if locals() else drop()

    def nested(pkt):
        def inner():
            return pkt.sport
        return accept() if inner() else drop()

    def marks(p):
        return mark(0x1)

    assert reads_packet(_named(pol, blind)) is False
    assert reads_packet(_named(pol, marks)) is False
    for fn in (reads, passes_on, frame, nested):
        assert reads_packet(_named(pol, fn)) is True, fn.__name__
    pol.input(proto="udp", dport=54)(lambda pkt: accept())
    assert reads_packet(pol.handlers[-1]) is True  # no def to read: assume it reads

    def logs(func):
        @functools.wraps(func)
        def wrapper(pkt):
            print(pkt.payload)
            return func(pkt)
        return wrapper

    @logs
    def wrapped(pkt):
        return accept()

    assert reads_packet(_named(pol, wrapped)) is True  # the wrapper runs, and it reads


def _helper(pkt):
    return accept()


def _spy(monkeypatch) -> list:
    """The packets the dispatcher parsed, lazily or not (a blind handler cannot tell us itself)."""
    import nfhooks.dispatch as dispatch_mod

    made: list = []
    for name in ("parse", "parse_lazy"):
        real = getattr(dispatch_mod, name)
        monkeypatch.setattr(dispatch_mod, name, lambda *a, _real=real: made.append(_real(*a)) or made[-1])
    return made


def _blind(pkt):
    return accept()


def _reads(pkt):
    return accept() if pkt.dport else drop()


def test_the_dispatcher_gives_a_blind_handler_a_lazy_packet_and_counts_the_same(dispatch, monkeypatch):
    made = _spy(monkeypatch)
    d = dispatch(defaults={"INPUT": "drop"})
    d.add("INPUT", _blind, proto="udp", dport=53).add("INPUT", _reads, proto="udp", dport=54)
    raw = fake_bytes(src="10.0.0.1", dst="10.0.0.2", proto="udp", sport=1, dport=53, payload=b"x" * 10)
    q = d.send(raw, handler="_blind", mark=0x20)
    assert type(made[-1]) is LazyPacket and q.calls == ["accept"]
    hist = d.metrics.decision_histogram("INPUT")
    assert sum(hist.counts) == 1 and hist.sum > 0
    labels = {"hook": "INPUT", "table": "filter", "verdict": "accept"}
    assert d.sample("nfhooks_packets_total", labels) == 1 and d.sample("nfhooks_bytes_total", labels) == len(raw)
    q = d.send(fake_bytes(src="10.0.0.1", dst="10.0.0.2", proto="udp", sport=1, dport=54), handler="_reads")
    assert type(made[-1]) is Packet and q.calls == ["accept"] and sum(hist.counts) == 2
    assert d.sample("nfhooks_packets_total", labels) == 2
    q = d.send(b"\x45" + bytes(10), handler="_blind")  # malformed: the default, counted
    assert q.calls == ["drop"] and d.sample("nfhooks_malformed_packets_total", {"hook": "INPUT"}) == 1
    assert sum(hist.counts) == 3


def test_a_guarded_gso_queue_keeps_its_view_for_readers_only(dispatch):
    d = dispatch(defaults={"INPUT": "drop"})
    d.add("INPUT", _blind, proto="udp", dport=53).add("INPUT", _reads, proto="udp", dport=54)
    viewed = []
    for name, port in (("_blind", 53), ("_reads", 54)):
        guard = d.callback(name).gso
        guard.arm(lambda packet_id: packet_id)  # as queue.py arms a guarded GSO queue
        real = guard.call
        guard.call = lambda func, pkt, nfpkt, _real=real: viewed.append(func.__name__) or _real(func, pkt, nfpkt)
        q = d.send(fake_bytes(src="10.0.0.1", dst="10.0.0.2", proto="udp", sport=1, dport=port), handler=name)
        assert q.calls == ["accept"]
    assert viewed == ["_reads"]  # the blind handler cannot read a payload: no view to pay for
