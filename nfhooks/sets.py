"""Address sets: ``banned = policy.set("banned", kind="ip", timeout=600)``, matched by the
kernel (``src=banned``, ``src=~banned``) and changed from handlers (``banned.add(pkt.src,
timeout=60)``, ``.remove()``, ``in``, ``len()``).

A set is kernel state of the namespace, like the chains: one ipset per family
(``nfh-<name>-4``, ``nfh-<name>-6``), created by the sets feature (features/sets.py) before
the rules and destroyed after them. This module is the declaration and the handler-facing
object only; it never runs a program. The engine binds each set to the feature's runtime
(:meth:`AddressSet.bind`); unbound (``nfhooks check``, fake-packet tests) a set keeps its
entries in a Python dict so ``policy.decide()`` answers as the kernel would.

``policy.kernel_verdict("INPUT", drop(), src=blocked)`` is a rule whose verdict lives in the
kernel: a plain ``-j DROP`` (``ACCEPT``, ``REJECT``) at the top of nfhooks' chains at that
hook, before every handler's queue rule, so the packets it takes never reach Python.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from .errors import PolicyError
from .introspect import is_option, option_value
from .match import Match, MatchError, SetRef

__all__ = ["AddressSet", "KernelVerdict", "SetError", "SetOps", "KINDS", "MAX_TIMEOUT", "declare_set",
           "declare_kernel_verdict", "entry_lines", "parse_entry"]

#: kind -> the ipset type that stores it
KINDS = {"ip": "hash:ip", "net": "hash:net", "ip,port": "hash:ip,port"}
PORT_PROTOS = ("tcp", "udp", "sctp")
MAX_TIMEOUT = 2147483  # seconds: the kernel's bound on an ipset timeout
DEFAULT_SIZE = 65536  # ipset's default maxelem
_NAME = re.compile(r"^[A-Za-z0-9_]{1,25}$")  # nfh-<name>-4 fits ipset's 31 characters


class SetError(ValueError):
    """An entry a set cannot hold, or a change the kernel refused (a handler may catch it)."""


class SetOps(Protocol):
    """What a bound set asks the feature's runtime (features/sets.py) to do in the kernel."""

    def add(self, aset: "AddressSet", family: int, entry: str, timeout: int | None) -> None: ...

    def remove(self, aset: "AddressSet", family: int, entry: str) -> None: ...

    def test(self, aset: "AddressSet", family: int, entry: str) -> bool: ...

    def count(self, aset: "AddressSet") -> int: ...


def _families(family: Any) -> tuple[int, ...]:
    if family in (None, "any", "both"):
        return (4, 6)
    if family in (4, "4", "ipv4", "inet"):
        return (4,)
    if family in (6, "6", "ipv6", "inet6"):
        return (6,)
    raise ValueError(f"family must be 'ipv4', 'ipv6' or None (both), not {family!r}")


def parse_entry(kind: str, value: Any) -> tuple[int, str]:
    """(family, the entry as ipset writes it) for ``value`` in a set of ``kind``.

    ip: an address; net: an address or CIDR network; ip,port: ``"ADDR,PORT"``,
    ``"ADDR,udp:PORT"`` or a tuple ``(addr, port)`` / ``(addr, proto, port)`` (tcp by default).
    Only literal addresses: a name would make ipset resolve it.
    """
    port = ""
    if kind == "ip,port":
        if isinstance(value, tuple):
            parts = [str(v) for v in value]
        else:
            parts = str(value).rsplit(",", 1)
        if len(parts) == 2:
            parts = [parts[0], *(parts[1].split(":", 1) if ":" in parts[1] else ["tcp", parts[1]])]
        if len(parts) != 3:
            raise SetError(f"{value!r}: an ip,port entry is 'ADDR,PORT', 'ADDR,PROTO:PORT' or (addr, port)")
        value, proto, num = parts
        proto = proto.strip().lower()
        if proto not in PORT_PROTOS or not num.strip().isdigit() or not 0 <= int(num) <= 65535:
            raise SetError(f"{value},{proto}:{num}: the port is 0..65535 of {', '.join(PORT_PROTOS)}")
        port = f",{proto}:{int(num)}"
    try:
        if kind == "net":
            net = ipaddress.ip_network(str(value).strip(), strict=False)
            if net.prefixlen == 0:
                raise SetError(f"{value!r}: a /0 network is every address; the kernel's hash:net refuses it")
            return net.version, str(net)
        addr = value if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)) \
            else ipaddress.ip_address(str(value).strip())
    except ValueError:
        want = "an address or CIDR network" if kind == "net" else "an address (kind='net' holds networks)"
        raise SetError(f"{value!r} is not {want}") from None
    return addr.version, f"{addr}{port}"


def _read_file(path: str, kind: str) -> list[tuple[int, str]]:
    """Entries of a list file: one a line, ``#`` starts a comment, blank lines are skipped."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                text = line.split("#", 1)[0].strip()
                if text:
                    try:
                        out.append(parse_entry(kind, text))
                    except SetError as e:
                        raise PolicyError(f"set entries: {e}", path, n) from None
    except OSError as e:
        raise PolicyError(f"cannot read the set's entries: {e.strerror}", path) from None
    return out


@dataclass(eq=False)
class AddressSet:
    """A declared set (see the module docstring). Handlers call add/remove/in/len."""

    name: str
    kind: str
    families: tuple[int, ...]
    timeout: int | None  # default seconds of an add(); None: entries stay until removed
    size: int | None  # maxelem; None: 65536, or twice the declared entries if more
    entries_arg: Any = ()  # as declared: a list, or an Option (resolved at load)
    file_arg: Any = None  # a path or an Option holding one
    decl_file: str | None = None
    decl_line: int | None = None
    ops: SetOps | None = field(default=None, repr=False)
    _local: dict[str, float | None] = field(default_factory=dict, repr=False)  # unbound: entry -> expiry
    _loaded: "tuple[str, list[tuple[int, str]]] | None" = field(default=None, repr=False)
    _seeded: bool = field(default=False, repr=False)

    # -- compile side -------------------------------------------------------------------
    @property
    def set_ref(self) -> SetRef:
        """What ``src=this_set`` compiles to (match.py)."""
        return SetRef(self.name, self.kind, self.families, False, self)

    def __invert__(self) -> SetRef:
        """``src=~banned``: packets whose source is not in the set."""
        return ~self.set_ref

    def kernel_name(self, family: int) -> str:
        return self.set_ref.kernel_name(family)

    def source(self) -> str:
        path = option_value(self.file_arg)
        return f"file {path}" if path else "entries="

    def declared(self) -> list[tuple[int, str]]:
        """The declared entries (``entries=`` then ``file=``), read and checked once per path."""
        path = option_value(self.file_arg)
        key = f"{path}|{id(self.entries_arg)}"
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1]
        out: list[tuple[int, str]] = []
        items = option_value(self.entries_arg) or ()
        if isinstance(items, str):
            items = [x for x in re.split(r"[\s,]+", items) if x] if self.kind != "ip,port" else items.split()
        for item in items:
            try:
                out.append(parse_entry(self.kind, item))
            except SetError as e:
                raise PolicyError(f"set {self.name!r}: entries: {e}", self.decl_file, self.decl_line) from None
        if path:
            out += _read_file(str(path), self.kind)
        bad = sorted({f for f, _ in out} - set(self.families))
        if bad:
            raise PolicyError(f"set {self.name!r} is family IPv{self.families[0]} but its entries include "
                              f"IPv{bad[0]} ones", self.decl_file, self.decl_line)
        if self.size is not None and max((sum(1 for f, _ in out if f == fam) for fam in self.families),
                                         default=0) > self.size:
            raise PolicyError(f"set {self.name!r}: {len(out)} declared entries do not fit size={self.size}",
                              self.decl_file, self.decl_line)
        self._loaded = (key, out)
        return out

    def maxelem(self, family: int) -> int:
        if self.size is not None:
            return self.size
        n = sum(1 for f, _ in self.declared() if f == family)
        return max(DEFAULT_SIZE, 1 << (2 * n - 1).bit_length())  # room to grow: a power of two >= 2n

    def options(self, family: int) -> tuple[str, str, int, int | None]:
        """What must be equal for a running set to be kept across a reload (the size as
        declared: an automatic one only has to hold the declared entries, see fits())."""
        return (KINDS[self.kind], "inet6" if family == 6 else "inet", self.timeout or 0, self.size)

    def fits(self, family: int, maxelem: int) -> bool:
        return sum(1 for f, _ in self.declared() if f == family) <= maxelem

    def create_line(self, family: int) -> str:
        typ, fam, timeout, _ = self.options(family)
        return f"create {self.kernel_name(family)} {typ} family {fam} timeout {timeout} maxelem {self.maxelem(family)}"

    # -- handler side -------------------------------------------------------------------
    def bind(self, ops: SetOps | None) -> None:
        """Called by the sets feature's runtime (None: back to the Python-only dict)."""
        self.ops = ops

    def _entry(self, value: Any) -> tuple[int, str]:
        fam, text = parse_entry(self.kind, value)
        if fam not in self.families:
            raise SetError(f"set {self.name!r} holds IPv{self.families[0]} entries only, not {text}")
        return fam, text

    def add(self, value: Any, timeout: int | None = None) -> None:
        """Add (or refresh) an entry; ``timeout`` seconds (0: never expires), default the set's."""
        fam, text = self._entry(value)
        if timeout is not None and not (isinstance(timeout, int) and 0 <= timeout <= MAX_TIMEOUT):
            raise SetError(f"timeout={timeout!r}: whole seconds 0..{MAX_TIMEOUT} (0: never expires)")
        if self.ops is not None:
            self.ops.add(self, fam, text, timeout)
            return
        secs = self.timeout if timeout is None else timeout
        self._entries()[text] = time.monotonic() + secs if secs else None

    def remove(self, value: Any) -> None:
        """Remove an entry (no error if it is not there)."""
        fam, text = self._entry(value)
        if self.ops is not None:
            self.ops.remove(self, fam, text)
        else:
            self._entries().pop(text, None)

    def __contains__(self, value: Any) -> bool:
        try:
            fam, text = self._entry(value)
        except SetError:
            return False
        if self.ops is not None:
            return self.ops.test(self, fam, text)
        local = self._entries()
        if self.kind == "net":
            addr = ipaddress.ip_network(text)
            return any(addr.version == n.version and addr.subnet_of(n)  # type: ignore[arg-type]
                       for n in map(ipaddress.ip_network, local))
        return text in local

    def __len__(self) -> int:
        if self.ops is not None:
            return self.ops.count(self)
        return len(self._entries())

    def _entries(self) -> dict[str, float | None]:
        """Unbound: the declared entries, then what handlers changed, expired ones dropped."""
        if not self._seeded:
            self._seeded = True
            for _, text in self.declared():
                self._local.setdefault(text, None)
        now = time.monotonic()
        for k in [k for k, t in self._local.items() if t is not None and t <= now]:
            del self._local[k]
        return self._local


def declare_set(sets: dict[str, AddressSet], name: str, *, kind: str = "ip", timeout: int | None = None,
                size: int | None = None, family: Any = None, entries: Any = (), file: Any = None,
                decl_file: str | None = None, decl_line: int | None = None) -> AddressSet:
    """Check a ``policy.set()`` declaration and record it in ``sets``."""
    def fail(msg: str) -> PolicyError:
        return PolicyError(f"set {name!r}: {msg}", decl_file, decl_line)

    if not isinstance(name, str) or not _NAME.match(name):
        raise fail("a set name is 1..25 letters, digits or _ (the kernel's set is nfh-<name>-4/-6)")
    if name in sets:
        raise fail("declared twice")
    if kind not in KINDS:
        raise fail(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
    for what, v, hi in (("timeout", timeout, MAX_TIMEOUT), ("size", size, 1 << 27)):
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 < v <= hi):
            raise fail(f"{what}={v!r}: a whole number 1..{hi}")
    try:
        fams = _families(family)
    except ValueError as e:
        raise fail(str(e)) from None
    s = AddressSet(name, kind, fams, timeout, size, entries, file, decl_file, decl_line)
    if not is_option(file) and not is_option(entries):
        s.declared()  # errors now, at the declaration's line; an Option is read once --set applied
    sets[name] = s
    return s


@dataclass(frozen=True)
class KernelVerdict:
    """``policy.kernel_verdict(hook, verdict, **match)``: a queue-free rule (features/sets.py)."""

    hook: str
    verdict: Any  # a verdict.Accept / Drop / Reject
    match_args: dict[str, Any]
    name: str
    file: str | None = None
    line: int | None = None

    def match(self) -> Match:
        """Built at each compile, so an Option in the match carries its --set value."""
        try:
            return Match.build(**self.match_args)
        except (MatchError, TypeError) as e:
            raise PolicyError(f"kernel verdict {self.name!r}: {e}", self.file, self.line) from None


def declare_kernel_verdict(found: list[KernelVerdict], hook: str, verdict: Any, match: dict[str, Any],
                           name: str | None, file: str | None, line: int | None) -> KernelVerdict:
    """Check a ``policy.kernel_verdict()`` declaration and append it to ``found``."""
    from .hooks import PlacementError, check_verdict, decision_table, normalize_hook

    kind = getattr(verdict, "kind", None)
    if kind not in ("accept", "drop", "reject"):
        raise PolicyError(f"kernel_verdict: the kernel carries out accept(), drop() or reject() by itself, "
                          f"not {verdict!r}; anything else needs a handler", file, line)
    try:
        h = normalize_hook(hook)
        check_verdict(kind, h, decision_table(h))
    except (PlacementError, ValueError) as e:
        raise PolicyError(f"kernel_verdict at {hook}: {e}", file, line) from None
    refs = [v for v in (match.get("src"), match.get("dst")) if v is not None]
    label = name or "_".join([kind, *(getattr(getattr(r, "set_ref", r), "name", "") for r in refs)]).strip("_")
    kv = KernelVerdict(h, verdict, dict(match), label, file, line)
    try:
        kv.match().check_placement(h, decision_table(h))
    except PlacementError as e:
        raise PolicyError(f"kernel_verdict at {hook}: {e}", file, line) from None
    found.append(kv)
    return kv


def entry_lines(aset: AddressSet, family: int, entries: Iterable[str], verb: str = "add") -> Iterable[str]:
    """``ipset restore`` lines; declared entries never expire (``timeout 0``)."""
    name = aset.kernel_name(family)
    for e in entries:
        yield f"{verb} {name} {e} timeout 0" if verb == "add" else f"{verb} {name} {e}"

