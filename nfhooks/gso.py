"""GSO by default where it is safe: which queues take GSO/GRO super-packets whole, and the
run-time guard that turns a queue back to segments the moment its handler reads a payload.

Why: without NFQA_CFG_F_GSO the kernel segments every GSO/GRO packet before queueing it
(``nfqnl_enqueue_packet``: ``skb_gso_segment``, one queue entry per segment) and completes
every CHECKSUM_PARTIAL checksum in software (``nfqnl_build_packet_message``:
``skb_checksum_help``). A bulk TCP flow then costs Python one decision per ~1.4 KB segment
instead of one per super-packet of up to 64 KB: ~10x the throughput for a header-only handler.

The decision (:func:`decide`), per queue, ``--gso auto`` (the default):

1. *inferred*: :func:`gso_safe` scans the handler's own source. A handler that can return a
   rewrite, or names ``pkt.payload``/``raw``/``scapy``/``captured``/``truncated``, or whose
   source cannot be read, gets no GSO -- exactly today's packets.
2. *verified at run time*: the scan does not follow helper functions, so on a GSO queue the
   handler sees each packet through a :class:`GsoView`: its payload accessors first check
   that the packet is what a queue without GSO would have delivered (:func:`differs`: not a
   truncated copy, no unfinished checksum, not longer than its link's MTU). If it is not,
   the guard switches the queue's GSO off (netlink config, on the queue's own socket) and
   raises :class:`GsoRepeat`: the dispatcher answers NF_REPEAT without touching the mark.
   ``nf_reinject`` re-runs the same table, the queue rule queues it again and
   ``nfqnl_enqueue_packet``, now without the flag, segments it: the handler sees only the
   segments, exactly today's packets. A handler that returns ``mangle`` for a packet that
   differs is treated the same way (its rewrite needs the whole segment).

Packets queued before the switch may still arrive whole: the guard keeps checking until
a packet id beyond the kernel's ``id_sequence`` at the switch (read from /proc) shows up,
then steps out of the way for good. ``--gso`` forces step 1 alone (no guard, today's
``--gso``); ``--no-gso`` turns GSO off everywhere. docs/gso.md has the details.
"""

from __future__ import annotations

import ast
import fcntl
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, Final

from .introspect import Source
from .introspect import parse as parse_source
from .packet import Packet
from .qcounters import QueueCounters
from .verdict import Accept, Mangle

__all__ = ["GSO_MODES", "GsoCollector", "GsoGuard", "GsoRepeat", "GsoView", "decide", "differs", "gso_safe",
           "link_mtu", "pseudo_sum"]

log = logging.getLogger("nfhooks.queue")
#: ``--gso`` values: auto (default), on (``--gso``: inferred only), off (``--no-gso``).
GSO_MODES: Final = ("auto", "on", "off")
_PAYLOAD_ATTRS: Final = frozenset({"payload", "scapy", "raw", "captured", "truncated", "get_payload"})
_RAW: Final = Packet.__dict__["raw"]  # the slots' own descriptors: GsoView shadows them
_CAPTURED: Final = Packet.__dict__["captured"]
_U16: Final = struct.Struct("!H")
_SIOCGIFMTU: Final = 0x8921
#: Where the checksum field sits in the transport header.
_CSUM_AT: Final = {6: 16, 17: 6}


class GsoRepeat(BaseException):
    """The handler read the payload of a packet its queue took whole: the dispatcher queues
    it again (NF_REPEAT), segmented. A BaseException, so ``except Exception`` in a handler
    does not swallow it (the guard notices a swallowed one anyway)."""


def gso_safe(handler: Any) -> tuple[bool, str]:
    """May ``handler``'s queue take GSO super-packets whole? ``(ok, reason)``.

    With NFQA_CFG_F_GSO the kernel queues a GSO/GRO packet (up to 64 KB) as one packet: its
    copy is truncated to MAX_COPY bytes and its transport checksum may be unfinished
    (CHECKSUM_PARTIAL: only the pseudo-header sum is in the field). Headers, ports,
    addresses and the conntrack state are right (the length is the super-packet's), which is
    all most handlers read. Not safe: a handler that can return a rewrite (the rewrite needs
    the whole packet), or whose source reads the payload (``pkt.payload``, ``pkt.scapy``,
    ``pkt.raw``...). A best-effort scan of the handler's own source (a helper it calls is
    not followed): ``--gso auto`` verifies it at run time (:class:`GsoGuard`).
    """
    kinds = getattr(handler, "verdict_kinds", {}) or {}
    if "mangle" in kinds:
        return False, "it can rewrite packets"
    src = getattr(handler, "source", None)
    if not isinstance(src, Source) or not src.readable:
        src = parse_source(getattr(handler, "func", None))
    if not src.readable:
        return False, "its source cannot be read"
    for node in src.walk():
        if isinstance(node, ast.Attribute) and node.attr in _PAYLOAD_ATTRS:
            return False, f"it reads pkt.{node.attr}"
    return True, "headers only"


def decide(mode: str, handler: Any) -> tuple[bool, bool, str]:
    """``(gso, guarded, why)`` for ``handler``'s queue under ``--gso mode``."""
    if mode not in GSO_MODES:
        raise ValueError(f"--gso {mode!r}: give one of {', '.join(GSO_MODES)}")
    if mode == "off":
        return False, False, "--no-gso"
    ok, why = gso_safe(handler)
    if not ok:
        return False, False, why
    if mode == "on":
        return True, False, f"{why}; --gso: not guarded at run time"
    return True, True, f"{why}; a payload read switches it off"


def pseudo_sum(raw: bytes, version: int, proto: int, l4_len: int) -> int:
    """The folded pseudo-header sum: what a CHECKSUM_PARTIAL packet holds in its checksum
    field (``~tcp_v4_check(len, saddr, daddr, 0)`` and the IPv6 and UDP equivalents)."""
    addrs = raw[12:20] if version == 4 else raw[8:40]
    s = sum(struct.unpack(f"!{len(addrs) // 2}H", addrs)) + proto + (l4_len >> 16) + (l4_len & 0xFFFF)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def differs(p: Packet, mtu: Callable[[int], int] = lambda index: 0) -> str:
    """Why ``p`` may not be the packet a queue without GSO would deliver ("" if it is).

    A truncated copy (a super-packet is up to 64 KB, the copy MAX_COPY bytes), a TCP/UDP
    checksum field holding just the pseudo-header sum (CHECKSUM_PARTIAL: the kernel would
    have completed it, and a GSO/GRO packet always is one; a real checksum equals it with
    odds of 1 in 65536, which costs one needless repeat), or longer than the MTU of the
    link it came in on (out on, at OUTPUT) -- a tunnel's super-packet, say.
    """
    raw, captured = _RAW.__get__(p), _CAPTURED.__get__(p)
    if p.length > captured:
        return f"a truncated copy ({captured} of {p.length} bytes)"
    at = _CSUM_AT.get(p.proto)
    if at is not None and p.sport is not None and not p.fragment:
        pos = p.l4_offset + at
        if pos + 2 <= captured:
            stored = _U16.unpack_from(raw, pos)[0]
            if stored and stored == pseudo_sum(raw, p.version, p.proto, p.length - p.l4_offset):
                return "its checksum is unfinished (CHECKSUM_PARTIAL)"
    limit = mtu(p.iif_index or p.oif_index)
    if limit and p.length > limit:
        return f"{p.length} bytes, longer than the link MTU {limit}"
    return ""


def link_mtu(index: int) -> int:
    """The MTU of interface ``index`` in this namespace (0: unknown)."""
    try:
        name = socket.if_indextoname(index)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            out = fcntl.ioctl(s, _SIOCGIFMTU, struct.pack("16si", name.encode(), 0))
        return int(struct.unpack("16si", out)[1])
    except (OSError, ValueError, OverflowError):
        return 0


class GsoView(Packet):
    """A packet on a guarded GSO queue: the payload accessors check it first.

    ``raw`` and ``captured`` (and through them ``payload``, ``scapy``, ``truncated``) ask the
    queue's guard (the ``_guard`` class attribute of a per-queue subclass) whether the packet
    differs from its segmented form; the header accessors read the bytes directly, so a
    header-only handler pays nothing. Same slots as Packet: the dispatcher's packet is switched
    to this class for the handler's call and back (``__class__`` assignment).
    """

    __slots__ = ()
    _guard: GsoGuard

    @property
    def raw(self) -> bytes:  # type: ignore[override]
        self._guard.check(self, "raw")
        return _RAW.__get__(self)  # type: ignore[no-any-return]

    @property
    def captured(self) -> int:  # type: ignore[override]
        self._guard.check(self, "captured")
        return _CAPTURED.__get__(self)  # type: ignore[no-any-return]

    @property
    def payload(self) -> bytes:
        self._guard.check(self, "payload")
        return _plain(self, Packet.payload.fget)  # type: ignore[attr-defined,no-any-return]

    @property
    def truncated(self) -> bool:
        self._guard.check(self, "truncated")
        return _plain(self, Packet.truncated.fget)  # type: ignore[attr-defined,no-any-return]

    @property
    def scapy(self) -> Any:
        self._guard.check(self, "scapy")
        return _plain(self, Packet.scapy.fget)  # type: ignore[attr-defined]

    @property
    def src_bytes(self) -> bytes:
        r = _RAW.__get__(self)
        return r[12:16] if self.version == 4 else r[8:24]  # type: ignore[no-any-return]

    @property
    def dst_bytes(self) -> bytes:
        r = _RAW.__get__(self)
        return r[16:20] if self.version == 4 else r[24:40]  # type: ignore[no-any-return]

    @property
    def src(self) -> Any:
        a = self._src
        if a is None:
            a = self._src = _plain(self, Packet.src.fget)  # type: ignore[attr-defined]
        return a

    @property
    def dst(self) -> Any:
        a = self._dst
        if a is None:
            a = self._dst = _plain(self, Packet.dst.fget)  # type: ignore[attr-defined]
        return a

    @property
    def frag_offset(self) -> int:
        return _plain(self, Packet.frag_offset.fget)  # type: ignore[attr-defined,no-any-return]

    def __repr__(self) -> str:
        return _plain(self, Packet.__repr__)  # type: ignore[no-any-return]


def _plain(p: Packet, fn: Callable[[Packet], Any]) -> Any:
    """``fn(p)`` with ``p`` a plain Packet for the call (no checks inside)."""
    cls = p.__class__
    p.__class__ = Packet
    try:
        return fn(p)
    finally:
        p.__class__ = cls


class GsoGuard:
    """One queue's run-time GSO check (see the module docstring).

    Inert (``active`` False) until queue.py's bind arms it for a guarded GSO queue with
    ``switch_off(packet_id)``: turns the queue's NFQA_CFG_F_GSO off and returns the highest
    packet id the queue may have taken whole (the kernel's ``id_sequence`` just after), or
    None if the kernel refused. The dispatcher calls :meth:`call` instead
    of the handler while ``active``.
    """

    def __init__(self, name: str = "", mtu: Callable[[int], int] = link_mtu) -> None:
        self.name = name
        self.active = False
        self.view: type[GsoView] = type("GsoView", (GsoView,), {"__slots__": (), "_guard": self})
        self.switch_offs = 0  # 0 or 1: a queue is switched off once
        self.repeats = 0  # packets answered NF_REPEAT to be queued again, segmented
        self.until: int | None = None  # after a switch: ids up to this may still be whole
        self.reason = ""
        self._switch: Callable[[int], int | None] = lambda packet_id: packet_id
        self._mtu, self._mtus = mtu, {}  # type: ignore[var-annotated]
        self._ok: Packet | None = None  # the last packet found to be as without GSO
        self._nf: Any = None  # the queued packet of the call in progress (its id, at a switch)

    def arm(self, switch_off: Callable[[int], int | None]) -> None:
        self._switch = switch_off
        self.active = True

    def mtu(self, index: int) -> int:
        m = self._mtus.get(index)
        if m is None:
            m = self._mtus[index] = self._mtu(index) if index else 0
        return m  # type: ignore[no-any-return]

    def call(self, func: Callable[[Packet], Any], pkt: Packet, nfpkt: Any) -> Any:
        """``func(pkt)`` with ``pkt`` seen through the view; raises GsoRepeat if it must be
        queued again. Per packet: two class switches and a few compares (~0.14 us)."""
        self._nf = nfpkt
        if self.until is not None and 0 < (getattr(nfpkt, "id", 0) - self.until) & 0xFFFFFFFF < 0x80000000:
            self.active = False  # queued after the switch: segmented like every later packet
            return func(pkt)
        before = self.repeats
        pkt.__class__ = self.view
        try:
            v = func(pkt)
        finally:
            pkt.__class__ = Packet
        if self.repeats != before:  # it tripped and the handler swallowed GsoRepeat
            raise GsoRepeat(self.reason)
        if type(v) is not Accept and isinstance(v, Mangle):
            self.check(pkt, "mangle")
        return v

    def check(self, p: Packet, what: str) -> None:
        """Raise GsoRepeat (after switching the queue off, once) if ``p`` differs."""
        if self._ok is p:
            return
        why = differs(p, self.mtu)
        if not why:
            self._ok = p
            return
        self.reason = f"handler {self.name!r} read pkt.{what} of a packet taken whole ({why})"
        if self.switch_offs == 0:
            until = self._switch(getattr(self._nf, "id", 0))  # run --audit's packet has no id
            if until is None:  # the kernel refused: a repeat would come back whole, forever
                self.active, self._ok = False, p
                log.error("queue of %s: could not switch GSO off; %s", self.name, self.reason)
                return
            self.switch_offs, self.until = 1, until
            log.warning("queue of %s: GSO switched off: %s; that packet is queued again, "
                        "segmented", self.name, self.reason)
        self.repeats += 1
        raise GsoRepeat(self.reason)


class GsoCollector(QueueCounters):
    """``nfhooks_queue_gso_switch_offs_total`` and ``nfhooks_queue_gso_repeated_packets_total``
    per guarded queue, read at scrape time from the guards (queue.py's ``BoundQueue.guard``)."""

    def __init__(self, bound: Any) -> None:
        super().__init__(bound, "guard", (
            ("nfhooks_queue_gso_switch_offs", "Queues taken off GSO at run time: their handler read the "
             "payload of a packet taken whole (docs/gso.md).", "switch_offs"),
            ("nfhooks_queue_gso_repeated_packets", "Packets answered NF_REPEAT to be queued again, segmented, "
             "after their handler read the payload of a packet taken whole.", "repeats")))
