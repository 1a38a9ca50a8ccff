"""Fake packets for testing policies without root, a queue or an interface.

The packets are real bytes (valid IP and transport checksums) run through the same
:func:`nfhooks.packet.parse` the queue uses, so a policy that passes its unit tests sees
identical ``Packet`` objects in production. Built with ``struct`` alone: importing scapy
would make every policy test suite pay for its import.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from ipaddress import IPv6Address, ip_address
from typing import Final

from nfhooks.hooks import check_interfaces, normalize_hook
from nfhooks.mangle import checksum
from nfhooks.packet import TCP_FLAG_LETTERS, Packet, parse

__all__ = ["fake_packet", "fake_bytes"]

_PROTO_NUMBERS: Final[dict[str, int]] = {
    "tcp": 6,
    "udp": 17,
    "icmp": 1,
    "icmpv6": 58,
    "sctp": 132,
    "udplite": 136,
}
_ECHO_REQUEST: Final = {1: 8, 58: 128}
_L4_HEADER: Final = {6: 20, 17: 8, 136: 8, 1: 8, 58: 8, 132: 12}

_IP4: Final = struct.Struct("!BBHHHBBH4s4s")
_IP6: Final = struct.Struct("!IHBB16s16s")
_TCP: Final = struct.Struct("!HHIIBBHHH")
_UDP: Final = struct.Struct("!HHHH")
_ICMP: Final = struct.Struct("!BBHHH")
_SCTP: Final = struct.Struct("!HHII")


def _tcp_flags(flags: str | int) -> int:
    if isinstance(flags, int):
        if not 0 <= flags <= 0xFF:
            raise ValueError(f"TCP flags {flags:#x} do not fit the flag byte")
        return flags
    value = 0
    for letter in flags.upper():
        i = TCP_FLAG_LETTERS.find(letter)
        if i < 0:
            raise ValueError(f"unknown TCP flag {letter!r} in {flags!r}: use {TCP_FLAG_LETTERS}")
        value |= 1 << i
    return value


def fake_bytes(
    *,
    src: str | None = None,
    dst: str | None = None,
    proto: str | int = "tcp",
    sport: int = 40000,
    dport: int = 80,
    flags: str | int = "S",
    ttl: int = 64,
    payload: bytes = b"",
    hook: str = "INPUT",
    iif: str | None = None,
    oif: str | None = None,
    mark: int = 0,
    icmp_type: int | None = None,
    icmp_code: int = 0,
) -> bytes:
    """The bytes :func:`fake_packet` would parse. hook/iif/oif/mark are accepted (and
    ignored) so both functions take the same arguments. An address left out is a documentation
    address (192.0.2.1/.2, or 2001:db8::1/::2) of the other one's family."""
    v6_given = any(a is not None and ":" in a for a in (src, dst))
    src = src if src is not None else ("2001:db8::1" if v6_given else "192.0.2.1")
    dst = dst if dst is not None else ("2001:db8::2" if v6_given else "192.0.2.2")
    s_addr, d_addr = ip_address(src), ip_address(dst)
    if type(s_addr) is not type(d_addr):
        raise ValueError(f"src {src} and dst {dst} are different address families")
    v6 = isinstance(s_addr, IPv6Address)
    if isinstance(proto, str):
        try:
            pnum = _PROTO_NUMBERS[proto.lower()]
        except KeyError:
            raise ValueError(
                f"unknown protocol {proto!r}: one of {', '.join(_PROTO_NUMBERS)} or a number"
            ) from None
    else:
        pnum = proto
    if not 0 <= pnum <= 255:
        raise ValueError(f"protocol number {pnum} out of range")
    if pnum == 1 and v6:
        raise ValueError("ICMP is IPv4's; for IPv6 addresses use proto='icmpv6'")
    if pnum == 58 and not v6:
        raise ValueError("ICMPv6 needs IPv6 addresses; for IPv4 use proto='icmp'")

    room = 0xFFFF - (0 if v6 else 20) - _L4_HEADER.get(pnum, 0)
    if len(payload) > room:
        raise ValueError(f"a payload of {len(payload)} bytes does not fit one packet ({room} max)")

    sb, db = s_addr.packed, d_addr.packed
    if pnum == 6:
        tf = _tcp_flags(flags)
        hdr = _TCP.pack(sport, dport, 1000, 2000 if tf & 0x10 else 0, 5 << 4, tf, 64240, 0, 0)
        l4 = _with_checksum(hdr + payload, 16, pnum, sb, db)
    elif pnum in (17, 136):
        hdr = _UDP.pack(sport, dport, 8 + len(payload), 0)
        l4 = _with_checksum(hdr + payload, 6, pnum, sb, db, zero_means_none=True)
    elif pnum in (1, 58):
        itype = _ECHO_REQUEST[pnum] if icmp_type is None else icmp_type
        echo = itype in (0, 8, 128, 129)
        hdr = _ICMP.pack(itype, icmp_code, 0, 1 if echo else 0, 1 if echo else 0)
        l4 = _with_checksum(hdr + payload, 2, pnum, sb, db)
    elif pnum == 132:
        # SCTP's CRC32c is not worth a dependency here; the checksum is left 0.
        l4 = _SCTP.pack(sport, dport, 1, 0) + payload
    else:
        l4 = payload

    if v6:
        return _IP6.pack(6 << 28, len(l4), pnum, ttl, sb, db) + l4
    ip = bytearray(_IP4.pack(0x45, 0, 20 + len(l4), 1, 0, ttl, pnum, 0, sb, db))
    struct.pack_into("!H", ip, 10, checksum(bytes(ip)))
    return bytes(ip) + l4


def _with_checksum(
    seg: bytes, at: int, pnum: int, sb: bytes, db: bytes, zero_means_none: bool = False
) -> bytes:
    """Fill the transport checksum at offset `at`. ICMPv4 sums the message alone; TCP,
    UDP and ICMPv6 include the pseudo-header (RFC 793, RFC 768, RFC 8200 8.1)."""
    if pnum != 1:
        if len(sb) == 4:
            ph = sb + db + struct.pack("!BBH", 0, pnum, len(seg))
        else:
            ph = sb + db + struct.pack("!I3xB", len(seg), pnum)
    else:
        ph = b""
    csum = checksum(ph + seg)
    if zero_means_none and csum == 0:
        csum = 0xFFFF  # UDP: 0 would mean "no checksum" (and is invalid over IPv6)
    return seg[:at] + struct.pack("!H", csum) + seg[at + 2:]


def fake_packet(
    *,
    src: str | None = None,
    dst: str | None = None,
    proto: str | int = "tcp",
    sport: int = 40000,
    dport: int = 80,
    flags: str | int = "S",
    ttl: int = 64,
    payload: bytes = b"",
    hook: str = "INPUT",
    iif: str | None = None,
    oif: str | None = None,
    mark: int = 0,
    icmp_type: int | None = None,
    icmp_code: int = 0,
) -> Packet:
    """A parsed packet as a handler at `hook` would receive it.

    `iif`/`oif` are names, pinned on the packet (its ifindexes stay 0: there is no real
    interface). An interface the kernel cannot give at that hook (an oif at INPUT, an iif
    at OUTPUT) is refused, so a test cannot pass on a packet production never sees.
    """
    if hook:
        hook = normalize_hook(hook)
        check_interfaces(hook, iif, oif)
    raw = fake_bytes(
        src=src, dst=dst, proto=proto, sport=sport, dport=dport, flags=flags, ttl=ttl,
        payload=payload, icmp_type=icmp_type, icmp_code=icmp_code,
    )
    pkt = parse(raw, hook=hook, mark=mark)
    pkt.set_ifnames(iif, oif)
    return pkt



@dataclass
class FakeQueuedPacket:
    """Stands in for ``netfilterqueue.Packet`` when a test drives the dispatcher without root:
    records every verdict call (``calls``), every mark written and the rewritten payload."""

    payload: bytes
    mark: int = 0
    indev: int = 0
    outdev: int = 0
    calls: list[str] = field(default_factory=list)
    set_marks: list[int] = field(default_factory=list)
    new_payload: bytes | None = None
    id: int = 1  # the kernel's packet id (a batch verdict answers every id up to one: vbatch.py)

    def get_payload(self) -> bytes:
        return self.payload

    def set_mark(self, m: int) -> None:
        assert 0 <= m <= 0xFFFFFFFF, "a packet mark is an unsigned 32-bit value"
        self.set_marks.append(m)

    def set_payload(self, b: bytes) -> None:
        self.new_payload = b
        self.calls.append("set_payload")

    def accept(self) -> None:
        self.calls.append("accept")

    def drop(self) -> None:
        self.calls.append("drop")

    def repeat(self) -> None:
        self.calls.append("repeat")
