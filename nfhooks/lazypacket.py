"""A packet parsed on its first read, for handlers whose source never reads their packet.

Behind a kernel match most handlers decide without looking (``return accept()``): the queue
number already says which match fired. For them :func:`~nfhooks.packet.parse` builds a dozen
fields nobody reads, the largest part of the engine's own per-packet Python (issue 18.2:
~0.7 us of the 1.6 us it added to a bare NetfilterQueue loop under a UDP flood).
:func:`parse_lazy` checks what ``parse`` would refuse as :class:`~nfhooks.packet.Malformed`
on the common shapes (IPv4 without options, IPv6 without extension headers) and stores only
what the dispatcher itself needs: the bytes, the captured and IP lengths, the hook, the mark
and the interface indexes. The first read (or write) of any other field parses the packet
whole, fills the slots and turns the object into a plain :class:`~nfhooks.packet.Packet`
(``__class__`` assignment: same slots), so whatever reads it -- a helper the source scan did
not see, an applier -- gets exactly the packet ``parse`` gives. Every other shape (IPv4
options, IPv6 extension headers, anything malformed) is parsed eagerly by ``parse`` itself.
"""

from __future__ import annotations

from typing import Any, Final

from .packet import Packet, parse

__all__ = ["LazyPacket", "LAZY_FIELDS", "parse_lazy"]

#: What a LazyPacket leaves unset until first read; the other slots it stores (raw, captured,
#: length, hook, mark, iif_index, oif_index) or, like Packet, leaves for their own caches.
LAZY_FIELDS: Final = ("version", "proto", "ttl", "l4_offset", "sport", "dport", "tcp_flags",
                      "icmp_type", "icmp_code", "fragment", "_src", "_dst")
_SLOTS: Final = tuple(Packet.__dict__[n] for n in LAZY_FIELDS)  # Packet's own slot descriptors
_RAW: Final = Packet.__dict__["raw"]
#: IPv6 next headers parse() walks as extension headers (packet._V6_EXT): those go eager
_V6_EXT: Final = frozenset((0, 43, 44, 51, 60))
_new: Final = object.__new__


class LazyPacket(Packet):
    """A :class:`Packet` whose header fields are parsed on first access (see the module)."""

    __slots__ = ()

    def __reduce_ex__(self, protocol: Any) -> Any:
        """copy/pickle a plain Packet (reading the state would switch the class midway)."""
        _fill(self)
        return Packet.__reduce_ex__(self, protocol)


def _fill(p: Any) -> None:
    """Parse ``p`` whole into its slots; from now on it is a plain Packet."""
    q = parse(_RAW.__get__(p), p.hook, p.mark, p.iif_index, p.oif_index)
    for d in _SLOTS:
        d.__set__(p, d.__get__(q))
    p.__class__ = Packet


def _lazy(slot: Any) -> property:
    def get(self: Any) -> Any:
        _fill(self)
        return slot.__get__(self)

    def put(self: Any, value: Any) -> None:
        _fill(self)
        slot.__set__(self, value)

    return property(get, put)


for _name, _slot in zip(LAZY_FIELDS, _SLOTS):
    setattr(LazyPacket, _name, _lazy(_slot))


def parse_lazy(raw: bytes, hook: str = "", mark: int = 0, iif_index: int = 0, oif_index: int = 0) -> Packet:
    """:func:`~nfhooks.packet.parse`, the fields left for their first read where the shape allows.

    Raises Malformed exactly where ``parse`` does (the shapes taken lazily cannot be malformed).
    """
    if type(raw) is not bytes:
        raw = bytes(raw)
    captured = len(raw)
    if captured < 20:
        return parse(raw, hook, mark, iif_index, oif_index)
    first = raw[0]
    if first == 0x45:
        length = (raw[2] << 8) | raw[3]
        if length < 20:
            return parse(raw, hook, mark, iif_index, oif_index)
    elif first >> 4 == 6 and captured >= 40 and raw[6] not in _V6_EXT:
        length = ((raw[4] << 8) | raw[5]) + 40
    else:
        return parse(raw, hook, mark, iif_index, oif_index)
    p = _new(LazyPacket)
    p.raw = raw
    p.captured = captured
    p.length = length
    p.hook = hook
    p.mark = mark
    p.iif_index = iif_index
    p.oif_index = oif_index
    return p
