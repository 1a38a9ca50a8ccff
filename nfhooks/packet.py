"""Per-packet header parsing for the NFQUEUE hot path.

Every queued packet waits in the kernel until its handler returns a verdict, so the time
spent here is added to the latency of each packet (and, once the queue fills, to its
loss). The parser therefore:

* uses no scapy. Importing scapy costs a noticeable fraction of a second and
  dissecting one packet ~65 us, over 100 times this parser; a policy that only looks at
  ports would pay that for every packet. ``Packet.scapy`` builds the full dissection on
  demand for the handlers that want it, and is the only place scapy is imported.
* reads the fixed header fields with precompiled ``struct.Struct.unpack_from`` straight
  from the queued bytes: no copies, no regex, no per-packet dicts (``__slots__``).
* is lazy about everything that allocates or calls into the system: ``ipaddress``
  objects, interface names (a syscall per lookup), the payload slice, the flag letters.
  Each is computed on first access and, where it costs something, cached on the packet.

What counts as a truncated transport header mirrors the kernel's own matches (xt_tcpudp,
xt_sctp, icmp_match): ports, flags and ICMP type/code are known only when the whole fixed
transport header (TCP 20, UDP/UDP-Lite 8, SCTP 12, ICMP/ICMPv6 8 bytes) lies inside both
the captured bytes and the length the IP header claims. Such packets are not malformed --
the kernel queues them -- the fields are just ``None``. Only a packet whose IP layer
cannot be walked raises :class:`Malformed`.
"""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

__all__ = ["Malformed", "Packet", "parse", "PROTO_NAMES", "TCP_FLAG_LETTERS"]

#: IANA protocol numbers nfhooks names in messages, metrics and ``Packet.proto_name``.
PROTO_NAMES: Final[dict[int, str]] = {
    0: "hopopt",
    1: "icmp",
    2: "igmp",
    4: "ipip",
    6: "tcp",
    17: "udp",
    41: "ipv6",
    43: "ipv6-route",
    44: "ipv6-frag",
    47: "gre",
    50: "esp",
    51: "ah",
    58: "icmpv6",
    59: "ipv6-nonxt",
    60: "ipv6-opts",
    89: "ospf",
    103: "pim",
    112: "vrrp",
    115: "l2tp",
    132: "sctp",
    136: "udplite",
}

#: TCP flag letters, least significant bit first -- scapy's order, so "SA" reads the same
#: here and in ``packet.scapy[TCP].flags``. (scapy's ninth letter, N, lives outside the
#: flag byte and is not reported.)
TCP_FLAG_LETTERS: Final = "FSRPAUEC"

# IPv4: version/IHL, total length, flags+fragment offset, TTL, protocol.
_V4: Final = struct.Struct("!BxHxxHBB")
# IPv6: payload length, next header, hop limit.
_V6: Final = struct.Struct("!4xHBB")
# TCP: ports and the flag byte (offset 13).
_TCP: Final = struct.Struct("!HH9xB")
_PORTS: Final = struct.Struct("!HH")
_TYPE_CODE: Final = struct.Struct("!BB")
_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")

_TCP_P: Final = 6
_UDP_P: Final = 17
_ICMP_P: Final = 1
_ICMP6_P: Final = 58
_SCTP_P: Final = 132
_UDPLITE_P: Final = 136
_FRAG6_P: Final = 44
_AH_P: Final = 51
#: IPv6 extension headers walked to find the transport protocol (ESP and no-next-header
#: end the walk: nothing after them can be read).
_V6_EXT: Final = frozenset((0, 43, 44, 51, 60))
#: Fixed transport header sizes: what must be present for ports/type to be reported.
_PORT_HDR: Final = {_UDP_P: 8, _UDPLITE_P: 8, _SCTP_P: 12}

#: Flag byte -> letters, precomputed so ``Packet.flags`` is a tuple index.
_FLAG_STR: Final = tuple(
    "".join(c for i, c in enumerate(TCP_FLAG_LETTERS) if b >> i & 1) for b in range(256)
)

#: Builds a Packet without running ``Packet.__new__`` (which is parse() itself).
_new: Final = object.__new__


class Malformed(ValueError):
    """The IP layer cannot be walked. Callers decide what to do with such packets (usually
    count and drop); a truncated *transport* header is not this, see :func:`parse`."""


class Packet:
    """One queued packet: cheap header fields parsed eagerly, the rest on demand.

    Build it with :func:`parse` (or :func:`nfhooks.fake.fake_packet` in tests). All
    attributes are plain slots and may be assigned; the lazy ones are properties.
    """

    __slots__ = (
        "raw",
        "version",
        "proto",
        "ttl",
        "length",
        "captured",
        "l4_offset",
        "sport",
        "dport",
        "tcp_flags",
        "icmp_type",
        "icmp_code",
        "fragment",
        "hook",
        "mark",
        "iif_index",
        "oif_index",
        "_src",
        "_dst",
        "_iif",
        "_oif",
        "_scapy",
    )

    raw: bytes
    version: int
    proto: int
    ttl: int
    length: int
    captured: int
    l4_offset: int
    sport: int | None
    dport: int | None
    tcp_flags: int | None
    icmp_type: int | None
    icmp_code: int | None
    fragment: bool
    hook: str
    mark: int
    iif_index: int
    oif_index: int
    _src: IPv4Address | IPv6Address | None
    _dst: IPv4Address | IPv6Address | None
    _iif: str | None  # unset until first read (or set_ifnames)
    _oif: str | None
    _scapy: Any

    def __new__(
        cls, raw: bytes, hook: str = "", mark: int = 0, iif_index: int = 0, oif_index: int = 0
    ) -> Packet:
        """``Packet(raw, ...)`` is :func:`parse` (which builds instances without this)."""
        return parse(raw, hook, mark, iif_index, oif_index)

    def __getnewargs__(self) -> tuple[bytes, str, int, int, int]:
        """copy/pickle rebuild through __new__, then restore every slot from the state."""
        return (self.raw, self.hook, self.mark, self.iif_index, self.oif_index)

    # -- addresses -------------------------------------------------------------------

    @property
    def src_bytes(self) -> bytes:
        return self.raw[12:16] if self.version == 4 else self.raw[8:24]

    @property
    def dst_bytes(self) -> bytes:
        return self.raw[16:20] if self.version == 4 else self.raw[24:40]

    @property
    def src(self) -> IPv4Address | IPv6Address:
        a = self._src
        if a is None:
            a = self._src = (
                IPv4Address(self.raw[12:16]) if self.version == 4 else IPv6Address(self.raw[8:24])
            )
        return a

    @property
    def dst(self) -> IPv4Address | IPv6Address:
        a = self._dst
        if a is None:
            a = self._dst = (
                IPv4Address(self.raw[16:20]) if self.version == 4 else IPv6Address(self.raw[24:40])
            )
        return a

    @property
    def family(self) -> str:
        return "ipv4" if self.version == 4 else "ipv6"

    @property
    def proto_name(self) -> str:
        """Name for messages and metric labels; unknown protocols by number."""
        return PROTO_NAMES.get(self.proto) or str(self.proto)

    @property
    def connmark(self) -> int:
        """The connection mark's user bits. NetfilterQueue does not pass the conntrack mark up,
        so nfhooks restores it into the packet mark (``CONNMARK --restore-mark`` of the user
        bits) before the queue rule of a handler whose source reads ``pkt.connmark``: there
        it equals ``pkt.mark``. Elsewhere it is just the packet mark."""
        return self.mark

    # -- interfaces ------------------------------------------------------------------

    @property
    def iif(self) -> str | None:
        try:
            return self._iif
        except AttributeError:
            name = self._iif = _ifname(self.iif_index)
            return name

    @property
    def oif(self) -> str | None:
        try:
            return self._oif
        except AttributeError:
            name = self._oif = _ifname(self.oif_index)
            return name

    def set_ifnames(self, iif: str | None, oif: str | None) -> None:
        """Pin the interface names so no lookup ever runs.

        For callers that know the names without a kernel interface to ask: test fakes,
        replays of captured traffic, or an interface that has since been deleted.
        """
        self._iif = iif
        self._oif = oif

    # -- transport -------------------------------------------------------------------

    @property
    def truncated(self) -> bool:
        """NetfilterQueue copies at most its copy range (~4 KB) of each packet."""
        return self.length > self.captured

    @property
    def frag_offset(self) -> int:
        """Where this fragment's data sits in the original payload, in bytes (0 for the
        first fragment and for unfragmented packets). Only a later fragment lacks the
        transport header, which is why its ports are None."""
        if not self.fragment:
            return 0
        raw = self.raw
        if self.version == 4:
            return (_U16.unpack_from(raw, 6)[0] & 0x1FFF) << 3
        # Re-walk the chain parse() already validated; fragments are rare.
        proto, off = raw[6], 40
        while proto in _V6_EXT and off + 8 <= len(raw):
            if proto == _FRAG6_P:
                fo = _U16.unpack_from(raw, off + 2)[0] & 0xFFF8
                if fo:  # parse() stops at the first later-fragment header too
                    return fo
                hlen = 8
            else:
                hlen = (raw[off + 1] + 2) * 4 if proto == _AH_P else (raw[off + 1] + 1) * 8
            proto = raw[off]
            off += hlen
        return 0

    @property
    def flags(self) -> str:
        f = self.tcp_flags
        return "" if f is None else _FLAG_STR[f]

    @property
    def payload(self) -> bytes:
        """Bytes after the transport header, as far as captured and as far as the IP
        length claims. For protocols without a header parsed here (and for non-first
        fragments, whose data continues an earlier payload) everything after the IP
        headers. b"" when the transport header itself is truncated."""
        off = self.l4_offset
        end = min(self.captured, self.length)
        p = self.proto
        if not (self.fragment and self.frag_offset):
            if p == _TCP_P:
                if self.tcp_flags is None:
                    return b""
                hlen = (self.raw[off + 12] >> 4) * 4
                off += hlen if hlen > 20 else 20
            elif p == _ICMP_P or p == _ICMP6_P:
                if self.icmp_type is None:
                    return b""
                off += 8
            elif p in _PORT_HDR:
                if self.sport is None:
                    return b""
                off += _PORT_HDR[p]
        return self.raw[off:end] if off < end else b""

    # -- full dissection -------------------------------------------------------------

    @property
    def scapy(self) -> Any:
        """scapy's dissection of the captured bytes, built once on demand.

        scapy is imported here, on demand (and by the engine at start when a handler's
        source names it, so the first packet does not pay for the import): importing it at
        module level would add about a second to every process start, and dissecting costs
        far more than the fields above. Modifying the returned object does not change the packet.
        """
        try:
            return self._scapy
        except AttributeError:
            pass
        if self.version == 4:
            from scapy.layers.inet import IP as layer
        else:
            from scapy.layers.inet6 import IPv6 as layer
        s = self._scapy = layer(self.raw)
        return s

    def __repr__(self) -> str:
        src, dst = str(self.src), str(self.dst)
        if self.sport is not None:
            if self.version == 6:
                src, dst = f"[{src}]", f"[{dst}]"
            src, dst = f"{src}:{self.sport}", f"{dst}:{self.dport}"
        parts = ["<Packet"]
        if self.hook:
            parts.append(self.hook)
        parts += [self.proto_name, src, "->", dst]
        if self.tcp_flags is not None:
            parts.append(self.flags or "-")
        if self.icmp_type is not None:
            parts.append(f"type={self.icmp_type}/{self.icmp_code}")
        if self.fragment:
            parts.append("frag")
        if self.mark:
            parts.append(f"mark={self.mark:#x}")
        if self.truncated:
            parts.append(f"len={self.length} captured={self.captured}>")
        else:
            parts.append(f"len={self.length}>")
        return " ".join(parts)


def _ifname(index: int) -> str | None:
    if not index:
        return None
    try:
        return socket.if_indextoname(index)
    except (OSError, OverflowError, ValueError, TypeError):
        # Interface gone since the packet was queued, or a bogus index.
        return None


def parse(
    raw: bytes,
    hook: str = "",
    mark: int = 0,
    iif_index: int = 0,
    oif_index: int = 0,
) -> Packet:
    """Parse the IP and transport headers of a queued packet.

    Raises :class:`Malformed` when the IP layer cannot be walked: empty, version not 4/6,
    IPv4 shorter than 20 bytes or with IHL < 5 or IHL*4 > captured, IPv6 shorter than 40,
    an IPv6 extension header running past the captured bytes, or a total length shorter
    than the IP headers. A truncated transport header is *not* malformed (the kernel
    queues such packets): its fields are None.
    """
    if type(raw) is not bytes:
        raw = bytes(raw)
    captured = len(raw)
    if not captured:
        raise Malformed("empty packet")
    version = raw[0] >> 4
    sport = dport = tcp_flags = icmp_type = icmp_code = None

    if version == 4:
        if captured < 20:
            raise Malformed(f"IPv4 header needs 20 bytes, got {captured}")
        vihl, length, frag, ttl, proto = _V4.unpack_from(raw)
        off = (vihl & 0x0F) << 2
        if off < 20:
            raise Malformed(f"IPv4 IHL {off >> 2} < 5")
        if off > captured:
            raise Malformed(f"IPv4 IHL says {off} header bytes, only {captured} captured")
        if length < off:
            raise Malformed(f"IPv4 total length {length} < header length {off}")
        fragment = (frag & 0x3FFF) != 0
        first = (frag & 0x1FFF) == 0

    elif version == 6:
        if captured < 40:
            raise Malformed(f"IPv6 header needs 40 bytes, got {captured}")
        plen, proto, ttl = _V6.unpack_from(raw)
        off = 40
        fragment = False
        first = True
        jumbo = plen == 0 and proto == 0
        while proto in _V6_EXT:
            if proto == _FRAG6_P:
                hlen = 8
                if off + 8 > captured:
                    raise Malformed(f"IPv6 fragment header at {off} runs past {captured} captured bytes")
                fragment = True
                first = (_U16.unpack_from(raw, off + 2)[0] & 0xFFF8) == 0
            else:
                if off + 2 > captured:
                    raise Malformed(f"IPv6 extension header at {off} runs past {captured} captured bytes")
                hlen = (raw[off + 1] + 2) * 4 if proto == _AH_P else (raw[off + 1] + 1) * 8
                if off + hlen > captured:
                    raise Malformed(
                        f"IPv6 extension header {proto} at {off} ({hlen} bytes) runs past "
                        f"{captured} captured bytes"
                    )
            proto = raw[off]
            off += hlen
            if not first:
                # The rest is fragment data, not headers: proto names what it continues.
                break
        if jumbo:
            plen = _jumbo_length(raw)
        length = plen + 40
        if length < off:
            raise Malformed(f"IPv6 payload length {plen} < extension headers' {off - 40} bytes")

    else:
        raise Malformed(f"IP version {version} (first byte {raw[0]:#04x})")

    if first:
        end = captured if captured < length else length
        if proto == _TCP_P:
            if off + 20 <= end:
                sport, dport, tcp_flags = _TCP.unpack_from(raw, off)
        elif proto == _UDP_P or proto == _UDPLITE_P:
            if off + 8 <= end:
                sport, dport = _PORTS.unpack_from(raw, off)
        elif proto == _ICMP_P or proto == _ICMP6_P:
            if off + 8 <= end:
                icmp_type, icmp_code = _TYPE_CODE.unpack_from(raw, off)
        elif proto == _SCTP_P:
            if off + 12 <= end:
                sport, dport = _PORTS.unpack_from(raw, off)

    # Stores straight into the slots: ~100 ns less than passing 17 arguments to __init__.
    # Most handlers read an address, so its cache starts as None (a store is cheaper than
    # the AttributeError a miss would raise); the rarely read caches (_iif, _oif, _scapy)
    # stay unset until first read.
    p = _new(Packet)
    p._src = p._dst = None
    p.raw = raw
    p.version = version
    p.proto = proto
    p.ttl = ttl
    p.length = length
    p.captured = captured
    p.l4_offset = off
    p.sport = sport
    p.dport = dport
    p.tcp_flags = tcp_flags
    p.icmp_type = icmp_type
    p.icmp_code = icmp_code
    p.fragment = fragment
    p.hook = hook
    p.mark = mark
    p.iif_index = iif_index
    p.oif_index = oif_index
    return p


def _jumbo_length(raw: bytes) -> int:
    """RFC 2675: payload length 0 plus a Jumbo Payload option in the hop-by-hop header.

    Returns the jumbo length, or 0 if the option is absent (the caller then sees a
    length too short for the headers). Rare enough to sit off the main path.
    """
    end = min(len(raw), 40 + (raw[41] + 1) * 8) if len(raw) > 41 else 0
    i = 42
    while i < end:
        opt = raw[i]
        if opt == 0:  # Pad1
            i += 1
            continue
        if i + 1 >= end:
            break
        olen = raw[i + 1]
        if opt == 0xC2 and olen == 4 and i + 6 <= end:
            return _U32.unpack_from(raw, i + 2)[0]
        i += 2 + olen
    return 0
