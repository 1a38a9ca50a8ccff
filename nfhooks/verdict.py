"""Verdicts a handler returns.

Plain immutable values: a handler builds one, the engine applies it (see engine.py), the
metrics label it. ``kind`` is the key into hooks.PLACEMENTS, which says where each works.
Returning ``None`` means "not mine": the packet resumes in the kernel after this handler.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

from .introspect import option_value

RejectWith = Literal["auto", "tcp-reset", "port-unreachable", "host-unreachable", "admin-prohibited"]


class Verdict:
    """Base of every verdict; ``kind`` names it in metrics, errors and hooks.PLACEMENTS.
    ``connection``: the verdict is kept on the connection (connverdict.py), not just this packet."""

    kind: ClassVar[str] = "verdict"
    connection: ClassVar[bool] = False
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Accept(Verdict):
    kind: ClassVar[str] = "accept"


@dataclass(frozen=True, slots=True)
class Drop(Verdict):
    kind: ClassVar[str] = "drop"


@dataclass(frozen=True, slots=True)
class Reject(Verdict):
    """Refuse visibly: TCP reset or ICMP/ICMPv6 unreachable, sent by the kernel's REJECT."""

    kind: ClassVar[str] = "reject"
    with_: RejectWith = "auto"

    def __post_init__(self) -> None:
        if self.with_ not in ("auto", "tcp-reset", "port-unreachable", "host-unreachable", "admin-prohibited"):
            raise ValueError(f"reject(with_={self.with_!r}): use auto, tcp-reset, port-unreachable, "
                             "host-unreachable or admin-prohibited")


@dataclass(frozen=True, slots=True)
class Mark(Verdict):
    """Set user mark bits (``value`` under ``mask``) and accept; ``connmark`` also saves them
    on the connection, so later packets and other rules (``-m connmark``) see them."""

    kind: ClassVar[str] = "mark"
    value: int
    mask: int = 0xFFFFFFFF
    connmark: bool = False

    def __post_init__(self) -> None:
        if not (0 <= self.value <= 0xFFFFFFFF and 0 <= self.mask <= 0xFFFFFFFF):
            raise ValueError("mark value and mask are 32-bit unsigned integers")

    @property
    def placement_kind(self) -> str:
        return "connmark" if self.connmark else "mark"


@dataclass(frozen=True, slots=True)
class Nat(Verdict):
    """Base of the NAT verdicts. The kernel's nat table carries them out: the verdict sets
    the ``nat`` mark field to the index of a rule nfhooks owns in the nat table (see nat.py),
    and conntrack translates the replies and the rest of the connection.

    ``addr`` is the canonical address (or ``a-b`` range) text, ``ports`` a port or ``p-q``
    range, ``family`` 4/6 (None: the target has no address and fits either family).
    """

    kind: ClassVar[str] = "nat"
    target: ClassVar[str] = ""
    option: ClassVar[str] = ""
    addr: str | None = None
    ports: str | None = None
    family: int | None = None

    def target_text(self) -> str:
        """The target option's value as iptables prints it (IPv6 with a port in brackets)."""
        if self.addr is None:
            return self.ports or ""
        if self.ports is None:
            return self.addr
        return f"[{self.addr}]:{self.ports}" if self.family == 6 else f"{self.addr}:{self.ports}"

    def target_opts(self) -> tuple[tuple[str, str], ...]:
        text = self.target_text()
        return ((self.option, text),) if text else ()

    def __str__(self) -> str:
        return f"{self.kind}({self.target_text()})"


@dataclass(frozen=True, slots=True)
class Dnat(Nat):
    kind: ClassVar[str] = "dnat"
    target: ClassVar[str] = "DNAT"
    option: ClassVar[str] = "to-destination"


@dataclass(frozen=True, slots=True)
class Snat(Nat):
    kind: ClassVar[str] = "snat"
    target: ClassVar[str] = "SNAT"
    option: ClassVar[str] = "to-source"


@dataclass(frozen=True, slots=True)
class Masquerade(Nat):
    kind: ClassVar[str] = "masquerade"
    target: ClassVar[str] = "MASQUERADE"
    option: ClassVar[str] = "to-ports"


@dataclass(frozen=True, slots=True)
class Redirect(Nat):
    kind: ClassVar[str] = "redirect"
    target: ClassVar[str] = "REDIRECT"
    option: ClassVar[str] = "to-ports"


@dataclass(frozen=True, slots=True)
class Mangle(Verdict):
    """Rewrite the packet, then accept it (nfhooks.mangle does the bytes and checksums).

    ``payload`` replaces the transport payload, ``packet`` the whole IP packet (a scapy
    packet the handler built); lengths and checksums are recomputed either way. A TCP
    payload of another length is refused unless ``allow_resize`` (sequence numbers would no
    longer match what the peers count). Combine rewrites with ``|``.
    """

    kind: ClassVar[str] = "mangle"
    ttl: int | None = None
    dscp: int | None = None
    tos: int | None = None
    mss: int | None = None
    payload: bytes | None = None
    packet: bytes | None = None
    allow_resize: bool = False

    def __post_init__(self) -> None:
        for name, lo, hi in (("ttl", 1, 255), ("dscp", 0, 63), ("tos", 0, 255), ("mss", 1, 65535)):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or not lo <= value <= hi):
                raise ValueError(f"{name}={value!r}: an integer {lo}..{hi}")
        if self.dscp is not None and self.tos is not None:
            raise ValueError("give dscp or tos, not both (tos is the whole byte: DSCP and ECN)")
        if self.payload is not None and self.packet is not None:
            raise ValueError("replace the payload or the whole packet, not both")

    def __or__(self, other: "Mangle") -> "Mangle":
        if not isinstance(other, Mangle):
            return NotImplemented
        changes = {f: getattr(other, f) for f in ("ttl", "dscp", "tos", "mss", "payload", "packet")
                   if getattr(other, f) is not None}
        return replace(self, allow_resize=self.allow_resize or other.allow_resize, **changes)


@dataclass(frozen=True, slots=True)
class Route(Verdict):
    """Route the packet, and the rest of its connection, by another routing table.

    ``table`` names a table the policy declared (``policy.routing_table(...)``); ``via``/``dev``
    instead ask for a one-route table ``default via VIA dev DEV`` that nfhooks creates on
    first use. The verdict writes the table's index into the ``route`` mark field; nfhooks'
    ``ip rule fwmark ... lookup`` does the routing and the connmark keeps the connection on
    it (see nfhooks/routing.py).
    """

    kind: ClassVar[str] = "route"
    table: str | None = None
    via: str | None = None
    dev: str | None = None

    def __post_init__(self) -> None:
        if (self.table is None) == (self.via is None and self.dev is None):
            raise ValueError("route(): give a declared table name, or via=ADDRESS and/or dev=INTERFACE")
        if self.via is not None:
            try:
                ipaddress.ip_address(self.via)
            except ValueError:
                raise ValueError(f"route(via={self.via!r}): not an IP address") from None
        if self.dev is not None and (not self.dev or len(self.dev) > 15 or "/" in self.dev or " " in self.dev):
            raise ValueError(f"route(dev={self.dev!r}): not an interface name")

    def __str__(self) -> str:
        if self.table is not None:
            return f"route({self.table})"
        return "route(" + " ".join(f"{k} {v}" for k, v in (("via", self.via), ("dev", self.dev)) if v) + ")"


@dataclass(frozen=True, slots=True)
class Shape(Verdict):
    """Put the packet, and the rest of its connection, in a shaping class the policy declared
    (``policy.shaping(dev, classes=...)``); nfhooks' CLASSIFY rule puts it in that htb class
    on the way out (see nfhooks/shaping.py)."""

    kind: ClassVar[str] = "shape"
    cls: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.cls, str) or not self.cls:
            raise ValueError(f"shape({self.cls!r}): give the name of a declared shaping class")

    def __str__(self) -> str:
        return f"shape({self.cls})"


#: reject(connection=True): what the kernel's REJECT rule can send to every later packet
CONNECTION_REJECTS = ("auto", "tcp-reset", "port-unreachable")


@dataclass(frozen=True, slots=True)
class AcceptConnection(Accept):
    """accept(connection=True): this packet and the rest of its connection at this hook are
    accepted; the later packets by a kernel rule on the connmark, never queued (connverdict.py)."""

    connection: ClassVar[bool] = True

    def __str__(self) -> str:
        return "accept(connection=True)"


@dataclass(frozen=True, slots=True)
class DropConnection(Drop):
    """drop(connection=True): the connection's later packets at this hook are dropped by the
    kernel. Needs a connection conntrack has confirmed: a connection's very first packet,
    dropped, leaves none to remember it on (connverdict.py)."""

    connection: ClassVar[bool] = True

    def __str__(self) -> str:
        return "drop(connection=True)"


@dataclass(frozen=True, slots=True)
class RejectConnection(Reject):
    """reject(connection=True): this and every later packet of the connection at this hook get
    a TCP reset (TCP) or a port unreachable (other protocols) from the kernel."""

    connection: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.with_ not in CONNECTION_REJECTS:
            raise ValueError(f"reject(with_={self.with_!r}, connection=True): a connection is rejected with "
                             "auto, tcp-reset or port-unreachable (the kernel rule keeps one reject kind)")

    def __str__(self) -> str:
        return "reject(connection=True)"


ACCEPT = Accept()
DROP = Drop()
ACCEPT_CONNECTION = AcceptConnection()
DROP_CONNECTION = DropConnection()


def accept(*, connection: bool = False) -> Accept:
    """Accept the packet; ``connection=True``: and the rest of its connection, in the kernel."""
    return ACCEPT_CONNECTION if connection else ACCEPT


def drop(*, connection: bool = False) -> Drop:
    """Drop the packet; ``connection=True``: and the rest of its connection, in the kernel."""
    return DROP_CONNECTION if connection else DROP


def reject(with_: RejectWith = "auto", *, connection: bool = False) -> Reject:
    """Reject the packet; ``connection=True``: and every later packet of its connection, in the kernel."""
    return RejectConnection(with_) if connection else Reject(with_)


def mark(value: int, mask: int = 0xFFFFFFFF, *, connmark: bool = False) -> Mark:
    return Mark(value, mask, connmark)


def connmark(value: int, mask: int = 0xFFFFFFFF) -> Mark:
    return Mark(value, mask, True)


def _ports(value: Any, what: str) -> str | None:
    """A port or an inclusive range ("8080", 8080, "8000-8010", (8000, 8010)) as iptables text."""
    if value is None:
        return None
    if isinstance(value, tuple) and len(value) == 2:
        lo, hi = value
    elif isinstance(value, str) and "-" in value:
        lo, _, hi = value.partition("-")
    else:
        lo = hi = value
    try:
        a, b = int(lo), int(hi)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {value!r} is not a port or port range") from None
    if not (0 < a <= b < 65536):
        raise ValueError(f"{what}: {value!r} is not a port (1..65535) or range low-high")
    return str(a) if a == b else f"{a}-{b}"


def _addr_range(text: str, what: str) -> tuple[str, int]:
    """'10.0.0.1' or '10.0.0.1-10.0.0.9' (same family, low <= high) -> (text, family)."""
    parts = text.split("-")
    if len(parts) > 2:
        raise ValueError(f"{what}: {text!r} is not an address or range low-high")
    try:
        ips = [ipaddress.ip_address(x.strip()) for x in parts]
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not an IP address") from None
    if len(ips) == 2 and (ips[0].version != ips[1].version or ips[0] > ips[1]):
        raise ValueError(f"{what}: {text!r}: a range is low-high of one family")
    return "-".join(str(a) for a in ips), ips[0].version


def _nat_to(to: Any, port: Any, what: str) -> tuple[str, str | None, int]:
    """Parse a NAT destination: '10.0.2.10:8080', '[fd00::1]:80', 'fd00::1', an address
    object, or an Option holding one of those; ``port`` may give the port separately."""
    to = option_value(to)  # a policy Option
    if isinstance(to, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        to = str(to)
    if not isinstance(to, str) or not to.strip():
        raise ValueError(f"{what}: {to!r} is not an address (e.g. '10.0.2.10:8080' or '[fd00::1]:80')")
    text, ports = to.strip(), None
    if text.startswith("["):
        addr, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{what}: {to!r}: write IPv6 with a port as [addr]:port")
        text, ports = addr, (rest[1:] or None)
    elif text.count(":") == 1:
        text, ports = text.split(":")
    if ports is not None and port is not None:
        raise ValueError(f"{what}: the port is given twice ({to!r} and port={port!r})")
    addr, family = _addr_range(text, what)
    return addr, _ports(ports if port is None else port, what), family


def dnat(to: Any, port: Any = None) -> Dnat:
    """Destination NAT (iptables -j DNAT --to-destination): PREROUTING or OUTPUT.

    ``to``: '10.0.2.10:8080', '10.0.2.10', '[fd00::1]:80', a range 'a-b', an address object,
    a Dnat (so ``policy.option(..., type=dnat)`` checks an option at load), or such an Option.
    """
    to = option_value(to)
    if isinstance(to, Dnat) and port is None:
        return to
    addr, ports, family = _nat_to(to, port, "dnat")
    return Dnat(addr, ports, family)


def snat(to: Any, port: Any = None) -> Snat:
    """Source NAT to a fixed address (iptables -j SNAT --to-source): POSTROUTING or INPUT."""
    to = option_value(to)
    if isinstance(to, Snat) and port is None:
        return to
    addr, ports, family = _nat_to(to, port, "snat")
    return Snat(addr, ports, family)


def masquerade(ports: Any = None) -> Masquerade:
    """Source NAT to the outgoing interface's address (-j MASQUERADE): POSTROUTING only."""
    return Masquerade(None, _ports(ports, "masquerade"), None)


def redirect(ports: Any = None) -> Redirect:
    """Destination NAT to this host (-j REDIRECT --to-ports): PREROUTING or OUTPUT."""
    return Redirect(None, _ports(ports, "redirect"), None)


def route(table: Any = None, *, via: Any = None, dev: str | None = None) -> Route:
    """Route by a declared table (``route("uplink2")``) or a next hop (``route(via=..., dev=...)``):
    PREROUTING (forwarded traffic) or OUTPUT (local traffic), before routing is final."""
    table = option_value(table)
    via = option_value(via)
    return Route(table, None if via is None else str(via), dev)


def shape(cls: Any) -> Shape:
    """Send the packet's connection through the declared shaping class ``cls``."""
    cls = option_value(cls)
    return Shape(cls)


def mangle(*, ttl: int | None = None, dscp: int | None = None, tos: int | None = None,
           mss: int | None = None) -> Mangle:
    """Several header rewrites in one verdict (each is also its own factory below)."""
    return Mangle(ttl=ttl, dscp=dscp, tos=tos, mss=mss)


def set_ttl(ttl: int) -> Mangle:
    """Set the IPv4 TTL / IPv6 hop limit (iptables -j TTL --ttl-set / HL --hl-set)."""
    return Mangle(ttl=ttl)


def set_dscp(dscp: int) -> Mangle:
    """Set the DSCP (6 bits), keeping the ECN bits (iptables -j DSCP --set-dscp)."""
    return Mangle(dscp=dscp)


def set_tos(tos: int) -> Mangle:
    """Set the whole IPv4 TOS / IPv6 traffic class byte, ECN bits included."""
    return Mangle(tos=tos)


def clamp_mss(mss: int) -> Mangle:
    """Lower the MSS option of TCP SYNs to ``mss`` (iptables -j TCPMSS --set-mss, which
    also adds the option, at most the protocol default, to a SYN that has none)."""
    return Mangle(mss=mss)


def payload(data: Any, allow_resize: bool = False) -> Mangle:
    """Replace the payload: bytes replace the transport payload; a scapy IP/IPv6 packet
    replaces the whole packet (its lengths and checksums are recomputed by nfhooks)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return Mangle(payload=bytes(data), allow_resize=allow_resize)
    if type(data).__module__.startswith("scapy") and hasattr(data, "haslayer"):
        if getattr(data, "name", "") in ("IP", "IPv6"):
            return Mangle(packet=bytes(data), allow_resize=allow_resize)
        return Mangle(payload=bytes(data), allow_resize=allow_resize)
    raise TypeError(f"payload(): bytes or a scapy packet, not {type(data).__name__}")


def placement_kind(v: Verdict) -> str:
    return v.placement_kind if isinstance(v, Mark) else v.kind


#: Names of verdict factories a handler may call; policy loading scans handler source for them.
FACTORIES: dict[str, str] = {
    "accept": "accept", "drop": "drop", "reject": "reject", "mark": "mark", "connmark": "connmark",
    "dnat": "dnat", "snat": "snat", "masquerade": "masquerade", "redirect": "redirect",
    "mangle": "mangle", "set_ttl": "mangle", "set_dscp": "mangle", "set_tos": "mangle",
    "clamp_mss": "mangle", "payload": "mangle", "route": "route", "shape": "shape",
}
NAT_KINDS = frozenset(("dnat", "snat", "masquerade", "redirect"))
#: Verdicts decided once per connection and kept on it by the connmark (routing.py, shaping.py).
ROUTESHAPE_KINDS = frozenset(("route", "shape"))


def parse_default(v: "Verdict | str") -> Verdict:
    """A hook default given as a verdict or as 'accept' / 'drop' / 'reject'."""
    if isinstance(v, (Accept, Drop, Reject)):
        return v
    if isinstance(v, str) and v.lower() in ("accept", "drop", "reject"):
        return {"accept": ACCEPT, "drop": DROP, "reject": Reject()}[v.lower()]
    raise ValueError(f"a hook default must be accept, drop or reject, not {v!r}")
