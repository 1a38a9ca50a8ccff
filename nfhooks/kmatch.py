"""Matches on state the kernel keeps: rate limits (``limit=``, ``hashlimit=``), connection
counts (``connlimit=``) and the owner of a local socket (``uid=``, ``gid=``).

They live in the handler's queue rule, so the kernel decides them before a packet is queued:
a packet the rate or count leaves out never reaches Python (it falls through to the next
rule, as with any other match that fails). Parsed once at load (names resolved with pwd/grp
then) and rendered exactly as ``iptables-save`` prints them (xt_limit, xt_hashlimit,
xt_connlimit, xt_owner; the same text for legacy and nft iptables).

What the keywords select, as iptables does by default (``-m limit``, ``--hashlimit-upto``,
``--connlimit-above``): ``limit=``/``hashlimit=`` the packets *within* the rate (``burst=``
packets at once, then the rate), ``limit_over=True`` the ones *above* it; ``connlimit=N``
the packets of a source (or of its ``connlimit_mask`` network) that has *more than* N
connections. Pure: no root, no kernel.
"""

from __future__ import annotations

import grp
import hashlib
import pwd
from dataclasses import dataclass
from typing import Any

from .introspect import option_value

__all__ = ["KMatchError", "Rate", "Connlimit", "Owner", "parse_rate", "parse_connlimit", "parse_owner",
           "rate_text", "hashlimit_name", "hashlimit_expire_ms", "RATE_UNITS", "BURST_DEFAULT", "BURST_MAX"]

#: Unit -> seconds. iptables accepts any prefix of the unit's name ("s", "sec", "second").
RATE_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
#: The names iptables-save prints, longest period first (libxt_limit/libxt_hashlimit print_rate).
_SAVE_UNITS = (("day", 86400), ("hour", 3600), ("min", 60), ("sec", 1))
LIMIT_SCALE = 10_000  # XT_LIMIT_SCALE: xt_limit's time unit is 1/10000 s
HASHLIMIT_SCALE = 1_000_000  # XT_HASHLIMIT_SCALE_v2 (revisions 2 and 3, what iptables 1.8 writes)
BURST_DEFAULT = 5
BURST_MAX = 10_000
#: hashlimit_by words -> --hashlimit-mode names, in the order iptables-save prints them.
HASH_MODES = {"src": "srcip", "sport": "srcport", "dst": "dstip", "dport": "dstport"}
UID_MAX = 0xFFFFFFFE  # (uid_t)-1 means "no user" to the kernel


class KMatchError(ValueError):
    """A kernel-state match that cannot be compiled (match.MatchError derives its message)."""


@dataclass(frozen=True)
class Rate:
    """A token bucket: ``count`` packets per ``per`` seconds, ``burst`` at once.

    ``by`` empty and ``kind == "limit"``: one bucket for the rule (xt_limit); otherwise
    xt_hashlimit, one bucket per key (``by``: hashlimit modes, e.g. ``("srcip",)``).
    """

    kind: str  # "limit" or "hashlimit" (the keyword used)
    count: int
    per: int  # seconds: 1, 60, 3600, 86400
    burst: int = BURST_DEFAULT
    over: bool = False
    by: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        """xt_limit cannot be inverted, so ``limit_over`` is a hashlimit with no key."""
        return "limit" if self.kind == "limit" and not self.over else "hashlimit"

    def text(self) -> str:
        unit = next(n for n, s in RATE_UNITS.items() if s == self.per)
        return f"{self.count}/{unit}"

    def describe(self) -> str:
        out = f"{self.kind} {'over ' if self.over else ''}{self.text()} burst {self.burst}"
        if self.kind == "hashlimit":
            out += " by " + (",".join(k for k, v in HASH_MODES.items() if v in self.by) or "rule")
        return out


@dataclass(frozen=True)
class Connlimit:
    """More than ``above`` connections from one source address (or its network)."""

    above: int
    mask4: int = 32
    mask6: int = 128

    def mask(self, family: int) -> int:
        return self.mask4 if family == 4 else self.mask6

    def describe(self) -> str:
        masks = "" if (self.mask4, self.mask6) == (32, 128) else f" per /{self.mask4},/{self.mask6}"
        return f"connlimit above {self.above}{masks}"


@dataclass(frozen=True)
class Owner:
    """The socket owner of a locally generated packet: uid and/or gid ranges, each negatable."""

    uid: tuple[int, int, bool] | None = None  # low, high, negate
    gid: tuple[int, int, bool] | None = None

    @staticmethod
    def _text(r: tuple[int, int, bool]) -> str:
        return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"

    def opts(self) -> tuple[tuple[str, str, bool], ...]:
        """``--uid-owner``/``--gid-owner`` options (iptables-save order: uid first)."""
        out = []
        for name, r in (("uid-owner", self.uid), ("gid-owner", self.gid)):
            if r is not None:
                out.append((name, self._text(r), r[2]))
        return tuple(out)

    def describe(self) -> str:
        return " ".join(f"{n[:3]} {'!' if r[2] else ''}{self._text(r)}"
                        for n, r in (("uid", self.uid), ("gid", self.gid)) if r is not None)


def _rate(value: Any, what: str) -> tuple[int, int]:
    value = option_value(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise KMatchError(f"{what}={value!r}: give a rate such as '10/second', '5/minute' (or an int: per second)")
    text = str(value).strip()
    num, sep, unit = text.partition("/")
    per = 1
    if sep:
        u = unit.strip().lower()
        hits = [s for n, s in RATE_UNITS.items() if u and n.startswith(u)]
        if not hits:
            raise KMatchError(f"{what}={value!r}: the unit is one of second, minute, hour, day")
        per = hits[0]
    try:
        count = int(num)
    except ValueError:
        raise KMatchError(f"{what}={value!r}: give a rate such as '10/second', '5/minute'") from None
    if count <= 0:
        raise KMatchError(f"{what}={value!r}: the rate must be at least 1 per unit")
    if count > LIMIT_SCALE * per:
        raise KMatchError(f"{what}={value!r}: faster than the kernel can count (at most {LIMIT_SCALE}/second)")
    return count, per


def parse_rate(limit: Any = None, hashlimit: Any = None, burst: Any = None, over: Any = None,
               by: Any = None, port_proto: bool = False) -> Rate | None:
    """The handler's rate match from its keywords (None when it has none)."""
    limit, hashlimit, burst, over, by = (option_value(v) for v in (limit, hashlimit, burst, over, by))
    if limit is None and hashlimit is None:
        for name, v in (("burst", burst), ("limit_over", over), ("hashlimit_by", by)):
            if v is not None:
                raise KMatchError(f"{name}= needs a rate: give limit='10/second' or hashlimit='5/minute' too")
        return None
    if limit is not None and hashlimit is not None:
        raise KMatchError("limit= and hashlimit= together: a handler has one rate (limit= for all its "
                          "packets together, hashlimit= for each source)")
    if by is not None and hashlimit is None:
        raise KMatchError("hashlimit_by= keys a per-source rate: use it with hashlimit=, not limit=")
    kind = "limit" if limit is not None else "hashlimit"
    count, per = _rate(limit if limit is not None else hashlimit, kind)
    b = BURST_DEFAULT if burst is None else burst
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= BURST_MAX:
        raise KMatchError(f"burst={burst!r}: a whole number of packets, 1..{BURST_MAX}")
    if over is not None and not isinstance(over, bool):
        raise KMatchError(f"limit_over={over!r}: True (the packets above the rate) or False (within it)")
    modes: tuple[str, ...] = ()
    if kind == "hashlimit":
        words = [w.strip().lower() for w in str(by if by is not None else "src").split(",") if w.strip()]
        bad = [w for w in words if w not in HASH_MODES]
        if bad or not words:
            raise KMatchError(f"hashlimit_by={by!r}: a comma list of {', '.join(HASH_MODES)} (e.g. 'src' "
                              "or 'src,dport')")
        if any(w in ("sport", "dport") for w in words) and not port_proto:
            raise KMatchError(f"hashlimit_by={by!r} keys on ports: give proto='tcp', 'udp' or 'sctp'")
        modes = tuple(v for k, v in HASH_MODES.items() if k in words)
    rate = Rate(kind, count, per, b, bool(over), modes)
    _check_bucket(rate)
    return rate


def _check_bucket(r: Rate) -> None:
    """Refuse a bucket the kernel cannot hold: it keeps burst x period in credits of a fixed-width
    integer (xt_limit 32 bits, xt_hashlimit 64; HZ x credits-per-jiffy is the same 32000 or
    2^37 x 1000 for HZ 250 and 1000), and a slow rate with a large burst overflows it."""
    scale, hz_cpj, bits = (LIMIT_SCALE, 32_000, 32) if r.module == "limit" else (HASHLIMIT_SCALE, 1000 << 37, 64)
    user = scale * r.per // r.count * r.burst
    top = 1 << bits
    credits = (user // scale) * hz_cpj if user > (top - 1) // hz_cpj else user * hz_cpj // scale
    if user >= top or credits >= top:
        raise KMatchError(f"{r.kind}={r.text()} with burst {r.burst}: the kernel's token bucket cannot hold so "
                          "slow a rate with so large a burst; use a faster rate (e.g. per hour instead of per "
                          "day) or a smaller burst")


def rate_text(r: Rate) -> str:
    """The rate as iptables-save prints it (``10/sec``, ``5/min``): the kernel stores a period
    in 1/scale seconds, and libxt's print_rate picks the longest unit that shows it whole."""
    scale = LIMIT_SCALE if r.module == "limit" else HASHLIMIT_SCALE
    period = scale * r.per // r.count
    mults = [(n, scale * s) for n, s in _SAVE_UNITS]
    i = 1
    while i < len(mults):
        mult = mults[i][1]
        if period > mult or mult // period < mult % period:
            break
        i += 1
    name, mult = mults[i - 1]
    return f"{mult // period}/{name}"


def hashlimit_name(r: Rate, key: str) -> str:
    """The kernel's name for a hashlimit's buckets (/proc/net/ipt_hashlimit/NAME): our prefix
    and a digest of the rate and the handler's match (``key``), so two different rules never
    share buckets, and a reload keeps the buckets of an unchanged rule."""
    digest = hashlib.sha1(f"{r.describe()}|{key}".encode()).hexdigest()[:10]
    return f"NFH-{digest}"  # 14 characters: xt_hashlimit names hold at most 15


def hashlimit_expire_ms(r: Rate) -> int:
    """How long an idle key's bucket is kept: until it would have refilled from empty (burst at
    the rate) plus one rate unit. iptables' own default is one rate unit, which forgets a key
    whose bucket is still part-empty (a slow limit with a burst would reset early); and
    python-iptables, re-parsing what the extension saves, drops that default (expire 0: EINVAL),
    so it is always given -- and printed by iptables-save."""
    return r.per * 1000 * r.burst // r.count + r.per * 1000


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise KMatchError(f"{what}={value!r}: a whole number {lo}..{hi}")
    return value


def parse_connlimit(value: Any, mask: Any, families: tuple[int, ...]) -> Connlimit | None:
    value, mask = option_value(value), option_value(mask)
    if value is None:
        if mask is not None:
            raise KMatchError("connlimit_mask= needs connlimit=N (the connection count it groups)")
        return None
    above = _int(value, "connlimit", 0, 0xFFFFFFFF)
    if mask is None:
        return Connlimit(above)
    if isinstance(mask, (tuple, list)):
        if len(mask) != 2:
            raise KMatchError(f"connlimit_mask={mask!r}: one prefix length, or (ipv4, ipv6) e.g. (24, 64)")
        return Connlimit(above, _int(mask[0], "connlimit_mask (IPv4)", 0, 32),
                         _int(mask[1], "connlimit_mask (IPv6)", 0, 128))
    if families == (4,):
        return Connlimit(above, _int(mask, "connlimit_mask", 0, 32))
    if families == (6,):
        return Connlimit(above, mask6=_int(mask, "connlimit_mask", 0, 128))
    raise KMatchError(f"connlimit_mask={mask!r} is one prefix length, but this handler matches IPv4 and IPv6 "
                      "(a /24 means different things in each): give connlimit_mask=(24, 64), or family=")


def _id_range(value: Any, what: str, lookup: Any) -> tuple[int, int, bool] | None:
    value = option_value(value)
    if value is None:
        return None
    negate = False
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("!"):
            negate, text = True, text[1:].strip()
        lo_s, sep, hi_s = text.partition("-")
        if sep and lo_s.isdigit() and hi_s.isdigit():
            lo, hi = int(lo_s), int(hi_s)
        elif text.isdigit():
            lo = hi = int(text)
        else:
            try:
                lo = hi = lookup(text)
            except KeyError:
                raise KMatchError(f"{what}={value!r}: no such {'user' if what == 'uid' else 'group'} on this "
                                  "host (names are resolved when the policy loads)") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        lo = hi = value
    else:
        raise KMatchError(f"{what}={value!r}: a number, a name, a 'low-high' range, '!' to negate")
    if not 0 <= lo <= hi <= UID_MAX:
        raise KMatchError(f"{what}={value!r}: ids run 0..{UID_MAX}, ranges low to high")
    return lo, hi, negate


def parse_owner(uid: Any, gid: Any) -> Owner | None:
    """The owner match, with user and group names resolved now (pwd/grp) so the rule has numbers."""
    u = _id_range(uid, "uid", lambda n: pwd.getpwnam(n).pw_uid)
    g = _id_range(gid, "gid", lambda n: grp.getgrnam(n).gr_gid)
    return None if u is None and g is None else Owner(u, g)
