"""Rewrite a queued packet's bytes for a ``Mangle`` verdict: TTL / hop limit, DSCP / TOS,
TCP MSS clamp, payload replacement -- with lengths and checksums made right again.

Pure functions over bytes (struct, no scapy), so they are unit-tested against scapy's own
checksums without root. The engine hands the result to NetfilterQueue's ``set_payload``;
the kernel copies it over the packet and marks its checksum as not yet verified
(CHECKSUM_NONE), so every checksum written here must be complete and correct.

Checksums are recomputed in full (not incrementally) for what changed: the IPv4 header
checksum after any IPv4 header change; the TCP/UDP/ICMP/ICMPv6 checksum after the
transport bytes or the length changed. TTL and DSCP are outside the transport
pseudo-header, so they never touch it (and work on fragments).

Refused with :class:`MangleError`, packet untouched: a truncated queued copy (writing it
back would cut the packet at the copy range -- :class:`TruncatedPacket`), transport
rewrites of fragments (the checksum covers bytes this packet does not have), SCTP payloads
(CRC32c), and a TCP payload of a new length without ``allow_resize`` (the sequence numbers
the peers count would no longer match the bytes sent).
"""

from __future__ import annotations

import struct
from typing import Final

from .packet import Malformed, Packet, parse
from .verdict import Mangle

__all__ = ["MangleError", "TruncatedPacket", "checksum", "rewrite", "fix_checksums"]

_U16: Final = struct.Struct("!H")
_TCP_P, _UDP_P, _ICMP_P, _ICMP6_P, _SCTP_P, _UDPLITE_P = 6, 17, 1, 58, 132, 136
#: Offset of the checksum inside each transport header we recompute.
_CSUM_AT: Final = {_TCP_P: 16, _UDP_P: 6, _ICMP_P: 2, _ICMP6_P: 2}
_SYN: Final = 0x02
#: RFC 1122 / RFC 8200 default MSS when a SYN carries none (what xt_TCPMSS assumes too).
_DEFAULT_MSS: Final = {4: 536, 6: 1220}


class MangleError(ValueError):
    """A rewrite nfhooks refuses; the packet is left as it was."""


class TruncatedPacket(MangleError):
    """The queued copy is shorter than the packet: rewriting it would cut the packet."""


def _sum16(data: bytes | bytearray | memoryview) -> int:
    if len(data) % 2:
        data = bytes(data) + b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 Internet checksum of ``data`` (plus a pre-summed ``initial``)."""
    s = _sum16(data) + initial
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _pseudo(buf: bytearray, version: int, proto: int, l4_len: int) -> int:
    if version == 4:
        return _sum16(buf[12:20]) + proto + l4_len
    return _sum16(buf[8:40]) + (l4_len >> 16) + (l4_len & 0xFFFF) + proto


def fix_checksums(buf: bytearray, p: Packet, transport: bool = True) -> None:
    """Set the IP length field(s) to ``len(buf)`` and recompute the checksums in place.

    ``p`` is the parse of ``buf`` (its l4 offset and protocol). ``transport``: also the
    TCP/UDP/ICMP/ICMPv6 checksum (and the UDP length), which needs the whole datagram.
    """
    n = len(buf)
    off = p.l4_offset
    if p.version == 4:
        if n > 0xFFFF:
            raise MangleError(f"the rewritten IPv4 packet would be {n} bytes, over 65535")
        _U16.pack_into(buf, 2, n)
    else:
        if n - 40 > 0xFFFF:
            raise MangleError(f"the rewritten IPv6 payload would be {n - 40} bytes, over 65535")
        _U16.pack_into(buf, 4, n - 40)
    if transport and p.proto in _CSUM_AT and off < n and not p.fragment:
        l4 = n - off
        at = off + _CSUM_AT[p.proto]
        if at + 2 > n:
            raise MangleError(f"the {p.proto_name} header is cut short ({l4} bytes)")
        if p.proto == _UDP_P:
            _U16.pack_into(buf, off + 4, l4)
        _U16.pack_into(buf, at, 0)
        pseudo = 0 if p.proto == _ICMP_P else _pseudo(buf, p.version, p.proto, l4)
        c = checksum(memoryview(buf)[off:], pseudo)
        if p.proto == _UDP_P and c == 0:
            c = 0xFFFF  # RFC 768: 0 means "no checksum"; its ones' complement twin is sent
        _U16.pack_into(buf, at, c)
    if p.version == 4:
        ihl = (buf[0] & 0x0F) * 4
        _U16.pack_into(buf, 10, 0)
        _U16.pack_into(buf, 10, checksum(memoryview(buf)[:ihl]))


def _l4_payload_start(p: Packet) -> int:
    return p.length - len(p.payload)


def _check_transport(p: Packet, what: str) -> None:
    if p.fragment:
        raise MangleError(f"{what} of a fragment: the transport checksum covers the whole datagram, "
                          "which this packet does not carry")
    if p.proto == _SCTP_P or p.proto == _UDPLITE_P:
        raise MangleError(f"{what} of {p.proto_name}: its checksum is not recomputed by nfhooks")


def _clamp_mss(buf: bytearray, p: Packet, mss: int) -> bool:
    """Lower the MSS option of a SYN (or add one, as xt_TCPMSS does). True if changed."""
    if p.proto != _TCP_P or p.tcp_flags is None or not p.tcp_flags & _SYN or p.fragment:
        return False
    off = p.l4_offset
    hlen = (buf[off + 12] >> 4) * 4
    i, end = off + 20, min(off + hlen, len(buf))
    while i < end:
        kind = buf[i]
        if kind == 0:  # end of options
            break
        if kind == 1:  # no-op
            i += 1
            continue
        if i + 1 >= end or buf[i + 1] < 2:
            return False  # a broken option list: leave it alone, as the kernel does
        olen = buf[i + 1]
        if kind == 2 and olen == 4 and i + 4 <= end:
            old = _U16.unpack_from(buf, i + 2)[0]
            if old <= mss:
                return False
            _U16.pack_into(buf, i + 2, mss)
            return True
        i += olen
    # No MSS option: the peer assumes the protocol default; add one if that is larger.
    if len(buf) > off + hlen or hlen >= 60:
        return False  # data after the header, or no room for options (same rule as xt_TCPMSS)
    new = min(mss, _DEFAULT_MSS[p.version])
    buf[off + hlen:off + hlen] = bytes((2, 4)) + _U16.pack(new)
    buf[off + 12] = (((hlen + 4) // 4) << 4) | (buf[off + 12] & 0x0F)
    return True


def rewrite(raw: bytes, v: Mangle, parsed: Packet | None = None) -> bytes:
    """The packet ``raw`` rewritten as ``v`` says, lengths and checksums recomputed.

    Returns ``raw`` itself when nothing changes (e.g. an MSS clamp on a non-SYN). Raises
    :class:`TruncatedPacket` for a truncated queued copy and :class:`MangleError` for a
    rewrite nfhooks refuses; the caller then leaves the packet as it was.
    """
    p = parsed if parsed is not None else parse(raw)
    if p.truncated:
        raise TruncatedPacket(f"the queued copy has {p.captured} of the packet's {p.length} bytes "
                              "(NFQUEUE copy range): it cannot be rewritten, only accepted as it is")
    buf = bytearray(raw[:p.length])
    transport = False
    if v.packet is not None:
        try:
            q = parse(v.packet)
        except Malformed as e:
            raise MangleError(f"the replacement packet is not an IP packet: {e}") from None
        if q.version != p.version:
            raise MangleError(f"the replacement is IPv{q.version}, the packet IPv{p.version}")
        if q.truncated:
            raise MangleError(f"the replacement packet's length field says {q.length} bytes, "
                              f"it has {q.captured}")
        _check_transport(q, "replacing the packet")
        if p.proto == _TCP_P == q.proto and len(q.payload) != len(p.payload) and not v.allow_resize:
            raise MangleError(_resize_msg(len(p.payload), len(q.payload)))
        buf = bytearray(v.packet)
        p, transport = q, True
    elif v.payload is not None:
        _check_transport(p, "replacing the payload")
        if p.proto in (_TCP_P, _UDP_P, _ICMP_P, _ICMP6_P) and p.sport is None and p.icmp_type is None:
            raise MangleError(f"the {p.proto_name} header is incomplete: no payload to replace")
        start = _l4_payload_start(p)
        if p.proto == _TCP_P and len(v.payload) != p.length - start and not v.allow_resize:
            raise MangleError(_resize_msg(p.length - start, len(v.payload)))
        buf[start:] = v.payload
        transport = True
    if v.mss is not None:
        transport |= _clamp_mss(buf, p, v.mss)
    header = False
    if v.ttl is not None:
        buf[8 if p.version == 4 else 7] = v.ttl
        header = True
    tos = v.tos if v.tos is not None else None
    if v.dscp is not None:
        old = buf[1] if p.version == 4 else ((buf[0] & 0x0F) << 4) | (buf[1] >> 4)
        tos = (v.dscp << 2) | (old & 0x03)
    if tos is not None:
        if p.version == 4:
            buf[1] = tos
        else:
            buf[0] = 0x60 | (tos >> 4)
            buf[1] = ((tos & 0x0F) << 4) | (buf[1] & 0x0F)
        header = True
    if not (transport or header):
        return raw
    if transport:
        p = parse(bytes(buf))  # offsets after the change (the length field is fixed below)
    fix_checksums(buf, p, transport)
    return bytes(buf)


def _resize_msg(old: int, new: int) -> str:
    return (f"the new TCP payload is {new} bytes, the packet's {old}: a length change breaks the "
            "sequence numbers both peers count, so the connection would stall. Pass "
            "allow_resize=True to payload() if the protocol copes (or keep the length)")
