"""What a handler declares it wants to see, compiled into the iptables rule that queues it.

The kernel checks the match, so only packets the policy cares about leave the kernel and the
dispatcher never re-checks them (a queue per handler tells it which handler matched).
``Match.matches`` exists for the fake-packet helper only: it lets a policy author test which
handler a packet would reach, without root. It is never on the per-packet path.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable

from .hooks import check_conntrack, check_ctstate, check_interfaces, check_owner
from .introspect import option_value
from .kmatch import Connlimit, KMatchError, Owner, Rate, parse_connlimit, parse_owner, parse_rate

PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "sctp": 132, "any": None}
PORT_PROTOS = ("tcp", "udp", "sctp")
#: Order in which iptables-save prints conntrack states (libxt_conntrack's bit order).
CTSTATES = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class MatchError(ValueError):
    """A match that cannot be compiled; the loader adds the policy file and line."""


@dataclass(frozen=True)
class Addr:
    net: Network
    negate: bool = False

    @property
    def family(self) -> int:
        return self.net.version

    def text(self) -> str:
        return str(self.net)


@dataclass(frozen=True)
class SetRef:
    """``src=banned`` / ``src=~banned``: the kernel's set match on a declared address set
    (sets.py); one kernel set per family (``nfh-<name>-4``, ``nfh-<name>-6``)."""

    name: str
    kind: str  # "ip", "net" or "ip,port"
    families: tuple[int, ...]
    negate: bool = False
    members: Any = field(default=None, compare=False, repr=False)  # answers ``in`` for fake packets

    def __invert__(self) -> "SetRef":
        return SetRef(self.name, self.kind, self.families, not self.negate, self.members)

    def kernel_name(self, family: int) -> str:
        return f"nfh-{self.name}-{family}"

    def directions(self, what: str) -> str:
        """``--match-set`` flags: the address of ``what``; an ip,port set's port is the
        destination port (the service) either way."""
        return f"{what},dst" if self.kind == "ip,port" else what

    def text(self) -> str:
        return f"{'!' if self.negate else ''}set {self.name}"


@dataclass(frozen=True)
class Ports:
    """A port set: single ports and inclusive ranges, possibly negated."""

    items: tuple[tuple[int, int], ...]
    negate: bool = False

    @property
    def simple(self) -> bool:
        return len(self.items) == 1

    def text(self) -> str:
        return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in self.items)

    def contains(self, port: int | None) -> bool:
        hit = port is not None and any(a <= port <= b for a, b in self.items)
        return hit != self.negate


@dataclass(frozen=True)
class Iface:
    name: str
    negate: bool = False

    def matches(self, name: str | None) -> bool:
        if name is None:
            hit = False
        elif self.name.endswith("+"):
            hit = name.startswith(self.name[:-1])
        else:
            hit = name == self.name
        return hit != self.negate


@dataclass(frozen=True)
class Match:
    """A normalized handler match. Build it with ``Match.build(**kwargs)``."""

    proto: str | None = None
    src: Addr | None = None
    dst: Addr | None = None
    sport: Ports | None = None
    dport: Ports | None = None
    iif: Iface | None = None
    oif: Iface | None = None
    ctstate: tuple[str, ...] | None = None
    mark: tuple[int, int, bool] | None = None  # value, mask, negate
    family: int | None = None
    src_set: SetRef | None = None  # src=a_set (sets.py)
    dst_set: SetRef | None = None
    # kernel state (kmatch.py): rate, connection count, socket owner, connection mark
    rate: Rate | None = None
    connlimit: Connlimit | None = None
    owner: Owner | None = None
    connmark: tuple[int, int, bool] | None = None  # value, mask, negate

    @classmethod
    def build(cls, *, proto: str | int | None = None, src: Any = None, dst: Any = None,
              sport: Any = None, dport: Any = None, iif: Any = None, oif: Any = None,
              ctstate: Any = None, mark: Any = None, family: Any = None, limit: Any = None,
              burst: Any = None, limit_over: Any = None, hashlimit: Any = None, hashlimit_by: Any = None,
              connlimit: Any = None, connlimit_mask: Any = None, uid: Any = None, gid: Any = None,
              connmark: Any = None) -> "Match":
        p = _proto(proto)
        if (sport is not None or dport is not None) and p not in PORT_PROTOS:
            raise MatchError(
                f"a port match needs proto='tcp', 'udp' or 'sctp' (got proto={proto!r}): "
                "the kernel reads ports from the transport header, so it must know which one"
            )
        fam = _family(family)
        ss, ds = _set_ref(src), _set_ref(dst)
        s, d = (None if ss else _addr(src, "src")), (None if ds else _addr(dst, "dst"))
        fam = _set_family(fam, ss, ds, s, d)
        if s is not None and d is not None and s.family != d.family:
            raise MatchError(f"src {s.text()} is IPv{s.family} and dst {d.text()} is IPv{d.family}: src and dst "
                             "are of different address families; a packet has one (write two handlers)")
        for a in (s, d):
            if a is not None:
                if fam is not None and a.family != fam:
                    raise MatchError(f"address {a.text()} is IPv{a.family} but the handler asks for family=ipv{fam}")
                fam = a.family
        if p == "icmp":
            if fam == 6:
                raise MatchError("proto='icmp' is IPv4's ICMP; for IPv6 use proto='icmpv6'")
            fam = 4
        elif p == "icmpv6":
            if fam == 4:
                raise MatchError("proto='icmpv6' is IPv6 only; for IPv4 use proto='icmp'")
            fam = 6
        try:
            rate = parse_rate(limit, hashlimit, burst, limit_over, hashlimit_by, p in PORT_PROTOS)
            conns = parse_connlimit(connlimit, connlimit_mask, (fam,) if fam else (4, 6))
            owner = parse_owner(uid, gid)
        except KMatchError as e:
            raise MatchError(str(e)) from None
        return cls(
            proto=p, src=s, dst=d, src_set=ss, dst_set=ds, sport=_ports(sport, "sport"), dport=_ports(dport, "dport"),
            iif=_iface(iif, "iif"), oif=_iface(oif, "oif"), ctstate=_ctstate(ctstate),
            mark=_mark(mark), family=fam, rate=rate, connlimit=conns, owner=owner,
            connmark=_mark(connmark, "connmark"),
        )

    def families(self) -> tuple[int, ...]:
        return (self.family,) if self.family else (4, 6)

    def check_placement(self, hook: str, table: str) -> None:
        if self.ctstate is not None:
            check_ctstate(table)
        if self.connlimit is not None:
            check_conntrack(table, "a connlimit match", "it counts the connections conntrack tracks")
        if self.connmark is not None:
            check_conntrack(table, "a connmark match", "the connection mark is kept by conntrack")
        check_interfaces(hook, self.iif, self.oif)
        if self.owner is not None:
            check_owner(hook)

    def describe(self) -> str:
        parts = []
        if self.family:
            parts.append(f"ipv{self.family}")
        if self.proto:
            parts.append(self.proto)
        for name in ("src", "dst"):
            a = getattr(self, name)
            if a:
                parts.append(f"{name} {'!' if a.negate else ''}{a.text()}")
            ref = getattr(self, name + "_set")
            if ref:
                parts.append(f"{name} {ref.text()}")
        for name in ("sport", "dport"):
            pr = getattr(self, name)
            if pr:
                parts.append(f"{name} {'!' if pr.negate else ''}{pr.text()}")
        for name in ("iif", "oif"):
            i = getattr(self, name)
            if i:
                parts.append(f"{name} {'!' if i.negate else ''}{i.name}")
        if self.ctstate:
            parts.append("ctstate " + ",".join(self.ctstate))
        if self.mark:
            v, m, n = self.mark
            parts.append(f"mark {'!' if n else ''}{v:#x}/{m:#x}")
        if self.connmark:
            v, m, n = self.connmark
            parts.append(f"connmark {'!' if n else ''}{v:#x}/{m:#x}")
        parts += [x.describe() for x in (self.owner, self.connlimit, self.rate) if x is not None]
        return " ".join(parts) or "all packets"

    # -- testing only (fake packets): evaluate the match in Python -----------------------
    def matches(self, pkt: Any, ctstate: str | None = None) -> bool:
        """True if the kernel rule would match ``pkt``. ``ctstate`` stands in for conntrack;
        rates, connection counts and the socket owner are kernel state and count as matching."""
        if self.family and pkt.version != self.family:
            return False
        if self.proto and PROTOS[self.proto] != pkt.proto:
            return False
        for a, v in ((self.src, pkt.src), (self.dst, pkt.dst)):
            if a is not None and ((v.version == a.family and v in a.net) == a.negate):
                return False
        for ref, v in ((self.src_set, pkt.src), (self.dst_set, pkt.dst)):
            if ref is not None and ((ref.members is not None and v in ref.members) == ref.negate):
                return False
        if self.sport and not self.sport.contains(pkt.sport):
            return False
        if self.dport and not self.dport.contains(pkt.dport):
            return False
        if self.iif and not self.iif.matches(pkt.iif):
            return False
        if self.oif and not self.oif.matches(pkt.oif):
            return False
        if self.ctstate is not None:
            state = (ctstate or "NEW").upper()
            if state not in self.ctstate:
                return False
        if self.mark is not None:
            v, m, n = self.mark
            if ((pkt.mark & m) == v) == n:
                return False
        if self.connmark is not None:
            v, m, n = self.connmark
            if ((getattr(pkt, "connmark", 0) & m) == v) == n:
                return False
        return True


def _neg(value: Any) -> tuple[Any, bool]:
    if isinstance(value, str) and value.startswith("!"):
        return value[1:].strip(), True
    return value, False


def _proto(proto: Any) -> str | None:
    if proto is None:
        return None
    if isinstance(proto, int):
        names = {v: k for k, v in PROTOS.items() if v is not None}
        if proto not in names:
            raise MatchError(f"protocol number {proto} is not supported; use one of {', '.join(PROTOS)}")
        return names[proto]
    name = str(proto).lower()
    if name in ("ipv6-icmp", "icmp6"):
        name = "icmpv6"
    if name not in PROTOS:
        raise MatchError(f"unknown protocol {proto!r}: one of {', '.join(PROTOS)}")
    return None if name == "any" else name


def _family(family: Any) -> int | None:
    if family in (None, "any", "both"):
        return None
    if family in (4, "4", "ipv4", "inet"):
        return 4
    if family in (6, "6", "ipv6", "inet6"):
        return 6
    raise MatchError(f"family must be 'ipv4', 'ipv6' or None, not {family!r}")


def _addr(value: Any, what: str) -> Addr | None:
    value = option_value(value)
    if value is None:
        return None
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return Addr(value)
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return Addr(ipaddress.ip_network(value))
    text, negate = _neg(str(value).strip())
    try:
        return Addr(ipaddress.ip_network(text, strict=False), negate)
    except ValueError:
        raise MatchError(f"{what}={value!r} is not an address or CIDR network "
                         "(e.g. '10.0.0.0/8', '!192.0.2.1', 'fd00::/64')") from None


def _set_ref(value: Any) -> SetRef | None:
    """A declared set (``policy.set()``, or ``~set``) given as src/dst, else None."""
    value = option_value(value)
    if isinstance(value, SetRef):
        return value
    ref = getattr(value, "set_ref", None)
    return ref if isinstance(ref, SetRef) else None


def _set_family(fam: int | None, ss: SetRef | None, ds: SetRef | None, s: Addr | None,
                d: Addr | None) -> int | None:
    """The handler's family given its set matches: a one-family set decides it."""
    for ref in (ss, ds):
        if ref is None:
            continue
        other = s or d
        for want, why in ((fam, "the handler asks for"), (other.family if other else None, "the address is")):
            if want is not None and want not in ref.families:
                raise MatchError(f"set {ref.name!r} holds IPv{ref.families[0]} only but {why} IPv{want}")
        if len(ref.families) == 1:
            fam = ref.families[0]
    if ss and ds and not set(ss.families) & set(ds.families):
        raise MatchError(f"sets {ss.name!r} and {ds.name!r} are of different address families")
    return fam


def _ports(value: Any, what: str) -> Ports | None:
    value = option_value(value)
    if value is None:
        return None
    negate = False
    if isinstance(value, str):
        value, negate = _neg(value)
        items: Iterable[Any] = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple, set, frozenset, range)):
        if isinstance(value, range):
            if value.step != 1 or not value:
                raise MatchError(f"{what}: only contiguous ranges (step 1) become a kernel port range")
            items = [f"{value.start}:{value.stop - 1}"]
        else:
            items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
    else:
        items = [value]
    out: list[tuple[int, int]] = []
    for item in items:
        try:
            if isinstance(item, str) and (":" in item or "-" in item):
                a, b = item.replace("-", ":").split(":")
                lo, hi = int(a), int(b)
            else:
                lo = hi = int(item)
        except (TypeError, ValueError):
            raise MatchError(f"{what}={value!r}: ports are numbers, 'lo:hi' ranges or lists of them") from None
        if not (0 <= lo <= hi <= 65535):
            raise MatchError(f"{what}={value!r}: ports run 0..65535 and ranges low to high")
        out.append((lo, hi))
    if not out:
        raise MatchError(f"{what}: empty port list")
    if len(out) > 15 or sum(1 if a == b else 2 for a, b in out) > 15:
        raise MatchError(f"{what}: the kernel's multiport match takes at most 15 ports (a range counts 2)")
    return Ports(tuple(out), negate)


def _iface(value: Any, what: str) -> Iface | None:
    value = option_value(value)
    if value is None:
        return None
    text, negate = _neg(str(value))
    if not text or len(text) > 15 or any(c in text for c in " /"):
        raise MatchError(f"{what}={value!r} is not an interface name (at most 15 characters; 'eth+' matches a prefix)")
    return Iface(text, negate)


def _ctstate(value: Any) -> tuple[str, ...] | None:
    value = option_value(value)
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    states: set[str] = set()
    for item in items:
        for s in str(item).split(","):
            s = s.strip().upper()
            if s not in CTSTATES:
                raise MatchError(f"unknown conntrack state {s!r}: one of {', '.join(CTSTATES[:5])}")
            states.add(s)
    if not states:
        raise MatchError("ctstate: give at least one state")
    return tuple(s for s in CTSTATES if s in states)


def _mark(value: Any, what: str = "mark") -> tuple[int, int, bool] | None:
    value = option_value(value)
    if value is None:
        return None
    negate = False
    if isinstance(value, str):
        text, negate = _neg(value)
        v, _, m = text.partition("/")
        try:
            value = (int(v, 0), int(m, 0) if m else 0xFFFFFFFF)
        except ValueError:
            raise MatchError(f"{what}={value!r}: use an int, (value, mask) or 'value/mask'") from None
    if isinstance(value, int):
        value = (value, 0xFFFFFFFF)
    try:
        v, m = value
    except (TypeError, ValueError):
        raise MatchError(f"{what}={value!r}: use an int, (value, mask) or 'value/mask'") from None
    if not (0 <= v <= 0xFFFFFFFF and 0 <= m <= 0xFFFFFFFF):
        raise MatchError(f"{what} value and mask are 32-bit unsigned integers")
    return (v & m, m, negate)
