"""GSO by default (gso.py), without root: the per-queue decision, the check that tells a packet
taken whole from its segmented form, and the guard that switches a queue off and repeats."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from nfhooks import Policy, accept, payload
from nfhooks.gso import GsoCollector, GsoGuard, GsoRepeat, decide, differs, pseudo_sum
from nfhooks.packet import Packet, parse


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _tcp4(body: bytes = b"GET / HTTP/1.1\r\n", *, length: int | None = None, partial: bool = False,
          csum: int = 0x1234) -> bytes:
    """An IPv4 TCP packet; ``length`` claims more than is there (a truncated copy);
    ``partial`` puts the pseudo-header sum in the checksum field, as CHECKSUM_PARTIAL does."""
    total = length if length is not None else 40 + len(body)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    if partial:
        csum = pseudo_sum(ip, 4, 6, total - 20)
    return ip + struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x18, 65535, csum, 0) + body


def _udp6(body: bytes, partial: bool) -> bytes:
    src, dst = bytes(15) + b"\x01", bytes(15) + b"\x02"
    ip = struct.pack("!IHBB16s16s", 6 << 28, 8 + len(body), 17, 64, src, dst)
    csum = pseudo_sum(ip, 6, 17, 8 + len(body)) if partial else 0x4242
    return ip + struct.pack("!HHHH", 5000, 53, 8 + len(body), csum) + body


def _handler(pol: Policy, name: str) -> object:
    return next(h for h in pol.handlers if h.name == name)


def test_decide_per_mode_and_handler():
    pol = Policy()

    @pol.input(proto="tcp", dport=80)
    def ports(pkt):
        return accept() if pkt.sport > 1024 else None

    @pol.input(proto="tcp", dport=81)
    def reads(pkt):
        return accept() if pkt.payload else None

    @pol.forward(table="mangle", proto="udp", dport=7)
    def rewrites(pkt):
        return payload(b"x")

    h, r, w = (_handler(pol, n) for n in ("ports", "reads", "rewrites"))
    assert decide("auto", h)[:2] == (True, True)  # the default: on, guarded at run time
    assert decide("on", h)[:2] == (True, False)  # --gso: on, as before, unguarded
    assert decide("off", h) == (False, False, "--no-gso")
    for mode in ("auto", "on"):
        assert decide(mode, r) == (False, False, "it reads pkt.payload")
        assert decide(mode, w) == (False, False, "it can rewrite packets")
    assert decide("auto", SimpleNamespace(verdict_kinds={}, func=len))[0] is False  # no source: no GSO
    with pytest.raises(ValueError):
        decide("yes", h)


def test_pseudo_sum_is_what_a_partial_checksum_holds():
    """A completed checksum over the pseudo-header and the segment folds to 0xFFFF; the
    partial one is the pseudo-header's sum alone -- check pseudo_sum against both facts."""
    raw = bytearray(_tcp4(b"abc", csum=0))
    ip, seg = bytes(raw[:20]), bytes(raw[20:] + b"\0")
    ps = pseudo_sum(ip, 4, 6, len(raw) - 20)
    words = sum(struct.unpack(f"!{len(seg) // 2}H", seg))
    full = (~_fold(ps + words)) & 0xFFFF
    raw[36:38] = struct.pack("!H", full)
    assert _fold(ps + sum(struct.unpack(f"!{len(seg) // 2}H", bytes(raw[20:]) + b"\0"))) == 0xFFFF
    assert differs(parse(bytes(raw))) == ""  # a completed checksum: the packet a plain queue gives


def test_differs_names_what_a_queue_without_gso_would_not_deliver():
    assert differs(parse(_tcp4())) == ""
    assert "truncated" in differs(parse(_tcp4(length=60000)))
    assert "CHECKSUM_PARTIAL" in differs(parse(_tcp4(partial=True)))
    assert "CHECKSUM_PARTIAL" in differs(parse(_udp6(b"q" * 20, partial=True)))
    assert differs(parse(_udp6(b"q" * 20, partial=False))) == ""
    big = parse(_tcp4(b"z" * 2000), iif_index=7)
    assert "MTU 1500" in differs(big, lambda index: 1500 if index == 7 else 0)
    assert differs(big, lambda index: 65536) == ""  # loopback-sized links: as today


def _armed(ids: int = 100) -> tuple[GsoGuard, list[int]]:
    switched: list[int] = []

    def switch_off(packet_id: int) -> int:
        switched.append(packet_id)
        return ids

    g = GsoGuard("h", mtu=lambda index: 0)
    g.arm(switch_off)
    return g, switched


def test_headers_only_handler_never_trips_and_sees_super_packets():
    g, switched = _armed()
    seen = []

    def ports(pkt):
        seen.append((pkt.length, pkt.sport, str(pkt.src), pkt.dst_bytes, repr(pkt)))
        return accept()

    v = g.call(ports, parse(_tcp4(length=60000)), SimpleNamespace(id=1))
    assert v == accept() and seen[0][:3] == (60000, 40000, "10.0.0.1") and not switched
    assert g.active and g.repeats == 0


def test_payload_read_of_a_super_packet_switches_off_once_and_repeats():
    g, switched = _armed(ids=50)
    calls = []

    def helper(pkt):  # the AST scan of the handler would not see this read
        return pkt.payload.startswith(b"GET")

    def dpi(pkt):
        calls.append(pkt.length)
        return accept() if helper(pkt) else None

    whole = parse(_tcp4(length=60000))
    with pytest.raises(GsoRepeat):
        g.call(dpi, whole, SimpleNamespace(id=10))
    assert switched == [10] and g.switch_offs == 1 and g.repeats == 1 and type(whole) is Packet
    assert "read pkt.payload" in g.reason and "truncated copy" in g.reason
    with pytest.raises(GsoRepeat):  # queued before the switch (id <= 50), also whole: again, no 2nd switch
        g.call(dpi, parse(_tcp4(partial=True)), SimpleNamespace(id=11))
    assert switched == [10] and g.repeats == 2
    assert g.call(dpi, parse(_tcp4()), SimpleNamespace(id=12)) == accept()  # a plain segment: decided
    assert g.active
    # the first id past the switch: the queue segments everything now, the guard steps aside
    assert g.call(dpi, parse(_tcp4(length=60000)), SimpleNamespace(id=51)) == accept()
    assert not g.active and g.repeats == 2


def test_a_swallowed_repeat_and_a_mangle_verdict_still_repeat():
    g, _ = _armed()

    def swallows(pkt):
        try:
            return pkt.raw
        except BaseException:  # noqa: BLE001 -- what a careless handler does
            return accept()

    with pytest.raises(GsoRepeat):
        g.call(swallows, parse(_tcp4(partial=True)), SimpleNamespace(id=1))
    g2, _ = _armed()
    with pytest.raises(GsoRepeat):  # a rewrite needs the whole segment
        g2.call(lambda pkt: payload(b"x"), parse(_tcp4(length=9000)), SimpleNamespace(id=1))
    assert g2.call(lambda pkt: payload(b"x"), parse(_tcp4()), SimpleNamespace(id=2)) == payload(b"x")


def test_refused_switch_never_loops():
    g = GsoGuard("h", mtu=lambda index: 0)
    g.arm(lambda packet_id: None)  # the kernel refused the config
    assert g.call(lambda pkt: len(pkt.payload), parse(_tcp4(length=60000)), SimpleNamespace(id=1)) > 0
    assert not g.active and g.repeats == 0 and g.switch_offs == 0


def test_inert_guard_and_collector():
    g = GsoGuard("h")
    assert not g.active
    g2, _ = _armed()
    with pytest.raises(GsoRepeat):
        g2.call(lambda pkt: pkt.payload, parse(_tcp4(length=60000)), SimpleNamespace(id=1))
    bound = {3: SimpleNamespace(hook="INPUT", handler="dpi", guard=g2), 4: SimpleNamespace(hook="INPUT", handler="x",
                                                                                          guard=None)}
    fams = {f.name: f for f in GsoCollector(bound).collect()}
    assert [(s.labels["handler"], s.value) for s in fams["nfhooks_queue_gso_switch_offs"].samples
            if s.name.endswith("_total")] == [("dpi", 1)]
    assert list(GsoCollector({}).collect()) == []


def test_the_dispatcher_answers_a_tripped_packet_with_one_repeat_and_no_mark_change(dispatch):
    """Through Dispatcher.callback, as queue.py arms it: the packet taken whole gets exactly one
    verdict, NF_REPEAT, its mark untouched (the queue rule queues it again, segmented) and no
    verdict counted; a header-only packet on the same armed queue is decided as usual."""
    def first_bytes(pkt):
        return pkt.payload[:1]

    def dpi(pkt):
        first_bytes(pkt)
        return accept()

    d = dispatch().add("INPUT", dpi, proto="tcp", dport=80)
    cb = d.callback("dpi")
    guard = cb.gso
    assert isinstance(guard, GsoGuard) and not guard.active  # inert until bound with GSO
    switched = []
    guard.arm(lambda packet_id: switched.append(packet_id) or 7)

    from nfhooks.fake import FakeQueuedPacket
    whole = FakeQueuedPacket(_tcp4(length=60000), mark=0x5)
    whole.id = 3  # type: ignore[attr-defined]
    cb(whole)
    assert whole.calls == ["repeat"] and whole.set_marks == [] and switched == [3]
    labels = {"hook": "INPUT", "table": "filter", "verdict": "accept"}
    assert not d.sample("nfhooks_packets_total", labels)
    seg = FakeQueuedPacket(_tcp4())
    seg.id = 8  # type: ignore[attr-defined] -- past the switch: the guard steps aside
    cb(seg)
    assert seg.calls == ["accept"] and not guard.active
    assert d.sample("nfhooks_packets_total", labels) == 1
