"""Policy routing decided in Python, done by the kernel's routing tables.

A policy declares routing tables (``policy.routing_table("uplink2", routes=[...])``); a
handler at PREROUTING (forwarded traffic) or OUTPUT (local traffic) returns
``route("uplink2")`` for a connection's first packet. Python never routes a packet: the
verdict writes the table's index into the ``route`` mark field and accepts, and what nfhooks
installed does the rest::

    ip rule add priority 10000 lookup main suppress_prefixlength 0   # main's specific routes win
    ip rule add priority 10000+i fwmark <i>/<route mask> lookup <table id>   # IPv4 and IPv6
    ip route add <each declared route> table <table id>

At PREROUTING the routing decision comes right after mangle; at OUTPUT the kernel re-routes a
locally generated packet whose mark changed in the mangle table (``ip_route_me_harder``, also
done by ``nf_reinject`` when a queue verdict changed the mark). A re-routed local packet keeps
the source address chosen for the first route, so pair each uplink with source NAT
(``routing_table(..., masquerade=True)`` or ``snat="ADDR"``: a nat POSTROUTING rule nfhooks
owns, matching the table's mark and outgoing interface).

Connection stickiness (for route and, in the same way, the shaping ``class`` field, see
shaping.py): every packet of a connection must take the same table, but only the first one
is queued (route/shape handlers get ``--ctstate NEW`` like NAT handlers). So:

* ``NFH-SAVE`` (mangle POSTROUTING, first rule): a packet carrying a route/class value copies
  it to its connection (``CONNMARK --save-mark`` with ``--nfmask/--ctmask`` of that field);
* ``NFH-RESTORE`` (mangle PREROUTING and OUTPUT, first rule): a packet whose connection has
  route/class bits gets them back (``CONNMARK --restore-mark``, masked) before routing: later
  packets, and replies -- which is why main's specific routes come first
  (``suppress_prefixlength 0``: a reply to a LAN host finds the LAN's connected route in
  main; only what main would send by its default route goes to the uplink's table). The
  restore only fires when the connection has such bits, and writes only those bits, so it
  never wipes nfhooks' other fields (the loop the design notes warn about).

rp_filter and src_valid_mark: with strict reverse-path filtering a reply arriving on uplink 2
fails the check (main routes its source via uplink 1) unless the check uses the mark
(``net.ipv4.conf.all.src_valid_mark=1``) or is loose (``rp_filter=2``). nfhooks changes
these only when the policy asks: ``policy.routing(src_valid_mark=True, rp_filter=2)``, in the
engine's own network namespace, restoring the old values on exit.

Ownership: every ip rule and route nfhooks adds carries the routing protocol
:data:`RTPROT_NFHOOKS` (``ip rule``/``ip route`` show ``proto 78``); removal on exit, and of a
stale set after a crash, deletes exactly those. A declared table that already holds routes of
someone else is refused (give ``table_id=``).
"""

from __future__ import annotations

import ast
import inspect
import ipaddress
import logging
import socket
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import KernelError
from .marks import MarkLayout, bits_for

if TYPE_CHECKING:
    from .packet import Packet
    from .policy import Policy
    from .rules import Rule, RuleSet
    from .shaping import Shaping

log = logging.getLogger("nfhooks.routing")

#: The routing protocol number of nfhooks' ip rules and routes (rt_protos has no name for it).
RTPROT_NFHOOKS = 78
#: Default first ip rule priority (main first), then one per table index.
DEFAULT_PRIORITY = 10000
#: Table ids are DEFAULT_TABLE_BASE + index unless a declaration gives ``table_id``.
DEFAULT_TABLE_BASE = 4200
#: Tables ``route(via=..., dev=...)`` may create on demand when a handler asks for one.
DEFAULT_DYNAMIC_ROUTES = 3
#: Chain names (``NFH-RESTORE-2`` ... for generation 2 during a hot reload, rules.chain_name).
RESTORE_CHAIN = "RESTORE"
SAVE_CHAIN = "SAVE"
ROUTE_NAT_CHAIN = "ROUTE-NAT"
_RESERVED_TABLES = {0, 253, 254, 255}


class RouteShapeError(KernelError):
    """A route/shape verdict or declaration that cannot be carried out; says why and what to do."""


# ------------------------------------------------------------------------------ declarations

@dataclass(frozen=True)
class RouteSpec:
    """One route of a table, parsed from ``ip route`` syntax: ``default via 10.0.2.1 dev up2``,
    ``10.9.0.0/16 dev up2``, ``default dev wg0``, optionally ``src ADDR`` and ``metric N``."""

    dst: str  # a network, "0.0.0.0/0" / "::/0" for default
    family: int
    via: str | None = None
    dev: str | None = None
    src: str | None = None
    metric: int | None = None

    @property
    def text(self) -> str:
        dst = "default" if ipaddress.ip_network(self.dst).prefixlen == 0 else self.dst
        parts = [dst] + [f"{k} {v}" for k, v in (("via", self.via), ("dev", self.dev), ("src", self.src),
                                                 ("metric", self.metric)) if v is not None]
        return " ".join(parts)


def parse_route(text: str, family: int | None = None) -> RouteSpec:
    """Parse one route of a declaration (``ip route`` words, no shell: split on spaces)."""
    if not isinstance(text, str) or not text.split():
        raise ValueError(f"route {text!r}: write it as ip route does, e.g. 'default via 10.0.2.1 dev up2'")
    words = text.split()
    dst_word, rest = words[0], words[1:]
    if len(rest) % 2:
        raise ValueError(f"route {text!r}: expected KEY VALUE pairs after the destination "
                         "(via ADDR, dev IF, src ADDR, metric N)")
    kv: dict[str, str] = {}
    for k, v in zip(rest[::2], rest[1::2]):
        if k not in ("via", "dev", "src", "metric"):
            raise ValueError(f"route {text!r}: unknown key {k!r} (via, dev, src, metric)")
        if k in kv:
            raise ValueError(f"route {text!r}: {k} given twice")
        kv[k] = v
    fams: set[int] = {family} if family else set()
    for k in ("via", "src"):
        if k in kv:
            try:
                fams.add(ipaddress.ip_address(kv[k]).version)
            except ValueError:
                raise ValueError(f"route {text!r}: {k} {kv[k]!r} is not an IP address") from None
    if dst_word != "default":
        try:
            net = ipaddress.ip_network(dst_word, strict=False)
        except ValueError:
            raise ValueError(f"route {text!r}: {dst_word!r} is not 'default' or a network") from None
        fams.add(net.version)
    if len(fams) > 1:
        raise ValueError(f"route {text!r}: mixes IPv4 and IPv6")
    fam = fams.pop() if fams else 4  # a bare 'default dev IF' is IPv4; write '::/0 dev IF' for IPv6
    if dst_word == "default":
        dst = "0.0.0.0/0" if fam == 4 else "::/0"
    else:
        dst = str(ipaddress.ip_network(dst_word, strict=False))
    if "via" not in kv and "dev" not in kv:
        raise ValueError(f"route {text!r}: give a next hop (via ADDR) or an interface (dev IF)")
    dev = kv.get("dev")
    if dev is not None and (len(dev) > 15 or "/" in dev):
        raise ValueError(f"route {text!r}: {dev!r} is not an interface name")
    metric = None
    if "metric" in kv:
        try:
            metric = int(kv["metric"])
        except ValueError:
            raise ValueError(f"route {text!r}: metric {kv['metric']!r} is not an integer") from None
    return RouteSpec(dst, fam, kv.get("via"), dev, kv.get("src"), metric)


def _resolve(item: Any) -> Any:
    """A route as declared: a string, a policy Option holding one, or a callable returning one
    (``lambda: f"default via {gw.value} dev up2"``), resolved after ``--set``."""
    if hasattr(item, "option_name"):
        return item.value
    if callable(item):
        return item()
    return item


@dataclass(frozen=True)
class RoutingTable:
    """A declared table: ``index`` is its value in the ``route`` mark field (1..N)."""

    name: str
    index: int
    table_id: int
    declared: tuple[Any, ...]  # strings, Options or callables (see _resolve)
    masquerade: bool = False
    snat: tuple[str, ...] = ()  # per-family SNAT addresses
    file: str | None = None
    line: int | None = None

    @property
    def routes(self) -> tuple[RouteSpec, ...]:
        """The routes with the options' current values (parsed again: cheap, and --set wins)."""
        try:
            return tuple(parse_route(_resolve(r)) for r in self.declared)
        except ValueError as e:
            from .policy import PolicyError

            raise PolicyError(f"routing table {self.name!r}: {e}", self.file, self.line) from None

    @property
    def devs(self) -> list[str]:
        return sorted({r.dev for r in self.routes if r.dev})


@dataclass
class RoutingSettings:
    """``policy.routing(...)``: ip rule placement and the sysctls nfhooks may set for routing."""

    priority: int = DEFAULT_PRIORITY
    main_first: bool = True
    src_valid_mark: bool | None = None
    rp_filter: int | None = None
    dynamic_routes: int = DEFAULT_DYNAMIC_ROUTES


def declare_table(policy: "Policy", name: str, routes: Iterable[str], *, table_id: int | None,
                  masquerade: bool, snat: Any, file: str, line: int) -> RoutingTable:
    from .policy import PolicyError

    tables: dict[str, RoutingTable] = policy.routing_tables
    if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise PolicyError(f"routing_table({name!r}): name it with letters, digits, - and _", file, line)
    if name in tables:
        raise PolicyError(f"routing table {name!r} is declared twice", file, line)
    if isinstance(routes, str) or callable(routes) or hasattr(routes, "option_name"):
        routes = [routes]
    declared = tuple(routes)
    try:
        specs = tuple(parse_route(_resolve(r)) for r in declared)
    except ValueError as e:
        raise PolicyError(f"routing table {name!r}: {e}", file, line) from None
    if not specs:
        raise PolicyError(f"routing table {name!r}: give its routes, e.g. routes=['default via 10.0.2.1 dev up2']",
                          file, line)
    seen: set[tuple[str, int | None]] = set()
    for r in specs:
        if (r.dst, r.metric) in seen:
            raise PolicyError(f"routing table {name!r}: two routes to {r.dst}", file, line)
        seen.add((r.dst, r.metric))
    index = len(tables) + 1
    tid = DEFAULT_TABLE_BASE + index if table_id is None else table_id
    if not isinstance(tid, int) or not 0 < tid < 2**32 or tid in _RESERVED_TABLES:
        raise PolicyError(f"routing table {name!r}: table_id {tid!r} must be 1..2^32-1, not local (255), "
                          "main (254) or default (253)", file, line)
    if any(t.table_id == tid for t in tables.values()):
        raise PolicyError(f"routing table {name!r}: table_id {tid} is used by another declared table", file, line)
    snats: tuple[str, ...] = ()
    if snat is not None:
        items = [snat] if isinstance(snat, str) else list(snat)
        try:
            addrs = [ipaddress.ip_address(a) for a in items]
        except ValueError as e:
            raise PolicyError(f"routing table {name!r}: snat: {e}", file, line) from None
        if len({a.version for a in addrs}) != len(addrs):
            raise PolicyError(f"routing table {name!r}: snat: one address per family", file, line)
        snats = tuple(str(a) for a in addrs)
        if masquerade:
            raise PolicyError(f"routing table {name!r}: give masquerade=True or snat=..., not both", file, line)
    t = RoutingTable(name, index, tid, declared, bool(masquerade), snats, file, line)
    tables[name] = t
    return t


def declare_settings(policy: "Policy", *, priority: int, main_first: bool, src_valid_mark: bool | None,
                     rp_filter: int | str | None, dynamic_routes: int, file: str, line: int) -> RoutingSettings:
    from .policy import PolicyError

    rp = {"off": 0, "strict": 1, "loose": 2}.get(rp_filter, rp_filter) if isinstance(rp_filter, str) else rp_filter
    if rp is not None and rp not in (0, 1, 2):
        raise PolicyError(f"routing(rp_filter={rp_filter!r}): 0/'off', 1/'strict' or 2/'loose'", file, line)
    if not isinstance(priority, int) or not 0 < priority < 32000:
        raise PolicyError(f"routing(priority={priority!r}): an ip rule priority 1..31999 (main is 32766)", file, line)
    if not isinstance(dynamic_routes, int) or not 0 <= dynamic_routes <= 255:
        raise PolicyError(f"routing(dynamic_routes={dynamic_routes!r}): 0..255", file, line)
    policy.routing_settings = RoutingSettings(priority, bool(main_first), src_valid_mark, rp, dynamic_routes)
    return policy.routing_settings


def _calls(func: Callable[..., Any], names: set[str]) -> list[tuple[str, ast.Call, int]]:
    """(factory name, call node, file line) of calls to ``names`` in a handler's source."""
    try:
        lines, start = inspect.getsourcelines(func)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            n = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if n in names:
                out.append((n, node, start + node.lineno - 1))
    return out


def uses_dynamic_routes(policy: "Policy") -> bool:
    """A handler calls ``route(via=...)`` / ``route(dev=...)``: reserve on-demand table slots."""
    for h in policy.handlers:
        if "route" in h.verdict_kinds:
            for _, call, _ in _calls(h.func, {"route"}):
                if any(k.arg in ("via", "dev") for k in call.keywords):
                    return True
    return False


def check_references(policy: "Policy") -> None:
    """A literal ``route("name")``/``shape("name")`` in a handler must name a declaration."""
    from .policy import PolicyError

    classes = {c for s in policy.shaping_decls.values() for c in s.classes}
    for h in policy.handlers:
        if not {"route", "shape"} & set(h.verdict_kinds):
            continue
        for fname, call, line in _calls(h.func, {"route", "shape"}):
            arg = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg in ("table", "cls")), None)
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                continue
            if fname == "route" and arg.value not in policy.routing_tables:
                known = ", ".join(policy.routing_tables) or "none declared"
                raise PolicyError(f"handler {h.name!r} returns route({arg.value!r}), but no routing table "
                                  f"{arg.value!r} is declared (policy.routing_table(...); tables: {known})",
                                  h.file, line)
            if fname == "shape" and arg.value not in classes:
                raise PolicyError(f"handler {h.name!r} returns shape({arg.value!r}), but no shaping class "
                                  f"{arg.value!r} is declared (policy.shaping(dev, classes=...); classes: "
                                  f"{', '.join(sorted(classes)) or 'none declared'})", h.file, line)


# ------------------------------------------------------------------------------ compile (pure)

def class_names(policy: "Policy") -> list[str]:
    """Every declared shaping class name, in declaration order (index = position + 1)."""
    out: list[str] = []
    for s in policy.shaping_decls.values():
        out += [c for c in s.classes if c not in out]
    return out


def route_slots(policy: "Policy") -> int:
    uses = any("route" in h.verdict_kinds for h in policy.handlers)
    dyn = policy.routing_settings.dynamic_routes if uses_dynamic_routes(policy) else 0
    if not policy.routing_tables and not uses:
        return 0
    return len(policy.routing_tables) + dyn


def mark_fields(policy: "Policy") -> list[tuple[str, int]]:
    """The mark fields routing/shaping need (none unless the policy uses them)."""
    out = []
    n = route_slots(policy)
    if n:
        out.append(("route", bits_for(n)))
    classes = class_names(policy)
    if classes or any("shape" in h.verdict_kinds for h in policy.handlers):
        out.append(("class", bits_for(len(classes))))
    return out


def per_connection(h: Any) -> bool:
    """The handler decides a connection's route/class: queue only its first packet (NEW)."""
    return "route" in h.verdict_kinds or "shape" in h.verdict_kinds


def compile_rules(rs: "RuleSet", policy: "Policy") -> None:
    """Add the restore/save chains, the CLASSIFY rules and the uplink NAT to ``rs``."""
    from .rules import COMMENT, FAMILIES, MatchSpec, Rule, chain_name
    from .shaping import classify_rules

    restore_chain, save_chain = chain_name(RESTORE_CHAIN, rs.generation), chain_name(SAVE_CHAIN, rs.generation)
    nat_chain = chain_name(ROUTE_NAT_CHAIN, rs.generation)
    layout = rs.layout
    fields = [layout[n] for n in ("route", "class") if n in layout]
    if not fields:
        return
    check_references(policy)
    rs.routeshape = RouteShape(policy, layout)
    both = sum(f.mask for f in fields)
    comment = MatchSpec("comment", ((("comment", f"{COMMENT} route-shape", False)),))

    def mark(v: int, m: int, neg: bool = False, module: str = "mark") -> MatchSpec:
        return MatchSpec(module, (("mark", f"{v:#x}/{m:#x}", neg),))

    for fam in FAMILIES:
        key = (fam, "mangle")
        rules = [Rule(restore_chain, "CONNMARK", (("restore-mark", ""), ("nfmask", f"{both:#x}"),
                                                  ("ctmask", f"{both:#x}")),
                      matches=(mark(0, both, True, "connmark"), comment))]
        rules += [Rule(save_chain, "CONNMARK", (("save-mark", ""), ("nfmask", f"{f.mask:#x}"),
                                                ("ctmask", f"{f.mask:#x}")),
                       matches=(mark(0, f.mask, True), comment)) for f in fields]
        if "class" in layout:
            rules += classify_rules(save_chain, policy, layout["class"], comment)
        jumps = [Rule(h, c, matches=(MatchSpec("comment", (("comment", COMMENT, False),)),))
                 for h, c in (("PREROUTING", restore_chain), ("OUTPUT", restore_chain), ("POSTROUTING", save_chain))]
        _add(rs, key, [restore_chain, save_chain], rules, jumps)
        if "route" in layout:
            nat = nat_rules(policy, layout, fam, nat_chain)
            if nat:
                _add(rs, (fam, "nat"), [nat_chain], nat,
                     [Rule("POSTROUTING", nat_chain, matches=(MatchSpec("comment", (("comment", COMMENT, False),)),))])


def nat_rules(policy: "Policy", layout: MarkLayout, family: int, chain: str = "NFH-" + ROUTE_NAT_CHAIN) -> list["Rule"]:
    """Source NAT paired with each uplink table: the table's mark, out of its interfaces."""
    from .rules import COMMENT, MatchSpec, Rule

    f = layout["route"]
    out = []
    for t in policy.routing_tables.values():
        if t.masquerade:
            target, opts = "MASQUERADE", ()
        else:
            addr = next((a for a in t.snat if ipaddress.ip_address(a).version == family), None)
            if addr is None:
                continue
            target, opts = "SNAT", (("to-source", addr),)
        matches = (MatchSpec("mark", (("mark", f"{f.encode(t.index):#x}/{f.mask:#x}", False),)),
                   MatchSpec("comment", (("comment", f"{COMMENT} route {t.name}", False),)))
        from .match import Iface

        for dev in (t.devs or [None]):
            out.append(Rule(chain, target, opts, oif=Iface(dev) if dev else None, matches=matches))
    return out


def _add(rs: "RuleSet", key: tuple[int, str], chains: list[str], rules: list["Rule"], jumps: list["Rule"]) -> None:
    """Our chains into ``rs``; our jumps go first at their hook (they must run before
    nfhooks' per-hook chain: restore before any handler, save before the hook's verdicts)."""
    from .hooks import HOOKS

    rs.rules.setdefault(key, []).extend(rules)
    rs.chains.setdefault(key, []).extend(chains)
    merged = jumps + rs.jumps.get(key, [])
    rs.jumps[key] = sorted(merged, key=lambda r: HOOKS.index(r.chain))  # stable: ours first per hook


# ------------------------------------------------------------------------------ runtime

@dataclass
class RouteShape:
    """The engine's routing and shaping: encodes verdicts into mark bits (per packet), and
    sets up / tears down the ip rules, routes, sysctls and qdisc trees (once)."""

    policy: "Policy"
    layout: MarkLayout
    dynamic: dict[tuple[str | None, str | None], int] = field(default_factory=dict)
    failed: dict[tuple[str | None, str | None], str] = field(default_factory=dict)
    saved_sysctls: dict[str, str] = field(default_factory=dict)
    shapers: list[Any] = field(default_factory=list)
    started: bool = False

    def __post_init__(self) -> None:
        self.tables = self.policy.routing_tables
        self.settings: RoutingSettings = self.policy.routing_settings
        self.route_field = self.layout["route"] if "route" in self.layout else None
        self.class_field = self.layout["class"] if "class" in self.layout else None
        self.classes = {n: i for i, n in enumerate(class_names(self.policy), 1)}
        self.slots = route_slots(self.policy)

    # -- per packet ---------------------------------------------------------------------
    def clear_mask(self, kind: str) -> int:
        f = self.route_field if kind == "route" else self.class_field
        return ~f.mask & 0xFFFFFFFF if f is not None else 0xFFFFFFFF

    def bits(self, pkt: "Packet", v: Any) -> int:
        """The mark field value for a route/shape verdict (a new via/dev table is set up first)."""
        if v.kind == "shape":
            if self.class_field is None:
                raise RouteShapeError(f"returned {v}, but the policy declares no shaping "
                                      "(policy.shaping(dev, classes=...))")
            idx = self.classes.get(v.cls)
            if idx is None:
                raise RouteShapeError(f"returned {v}: no shaping class {v.cls!r} is declared "
                                      f"(classes: {', '.join(self.classes) or 'none'})")
            return self.class_field.encode(idx)
        if self.route_field is None:
            raise RouteShapeError(f"returned {v}, but the policy declares no routing table "
                                  "(policy.routing_table(name, routes=[...]))")
        if v.table is not None:
            t = self.tables.get(v.table)
            if t is None:
                raise RouteShapeError(f"returned {v}: no routing table {v.table!r} is declared "
                                      f"(tables: {', '.join(self.tables) or 'none'})")
            return self.route_field.encode(t.index)
        return self.route_field.encode(self._dynamic(v, pkt.version))

    def _dynamic(self, v: Any, family: int) -> int:
        key = (v.via, v.dev)
        idx = self.dynamic.get(key)
        if idx is not None:
            return idx
        if key in self.failed:
            raise RouteShapeError(self.failed[key])
        if v.via is not None and ipaddress.ip_address(v.via).version != family:
            raise RouteShapeError(f"{v} is an IPv{ipaddress.ip_address(v.via).version} next hop for an "
                                  f"IPv{family} packet")
        idx = len(self.tables) + len(self.dynamic) + 1
        if idx > self.slots:
            raise RouteShapeError(
                f"{v} would be on-demand route {len(self.dynamic) + 1}, past the "
                f"{self.slots - len(self.tables)} policy.routing(dynamic_routes=...) reserves "
                "(declare the uplinks with policy.routing_table instead, or raise dynamic_routes)")
        fam = family if v.via is None else ipaddress.ip_address(v.via).version
        spec = RouteSpec("0.0.0.0/0" if fam == 4 else "::/0", fam, v.via, v.dev)
        try:
            with _ipr() as ipr:
                _add_route(ipr, self._table_id(idx), spec)
        except Exception as e:  # noqa: BLE001 -- pyroute2's netlink errors
            self.failed[key] = f"the kernel refused the route for {v} ({spec.text}): {e}"
            raise RouteShapeError(self.failed[key]) from None
        self.dynamic[key] = idx
        return idx

    def _table_id(self, idx: int) -> int:
        for t in self.tables.values():
            if t.index == idx:
                return t.table_id
        return DEFAULT_TABLE_BASE + idx

    def describe(self) -> list[str]:
        """What `run` will set up besides iptables, as the equivalent ip/tc commands (`check`)."""
        from .shaping import tree_commands

        out: list[str] = []
        p = self.settings.priority
        if self.route_field is not None:
            f = self.route_field
            if self.settings.main_first:
                out.append(f"ip rule add priority {p} lookup main suppress_prefixlength 0")
            for idx in range(1, self.slots + 1):
                out.append(f"ip rule add priority {p + idx} fwmark {f.encode(idx):#x}/{f.mask:#x} "
                           f"lookup {self._table_id(idx)}   # and ip -6 rule")
            for t in self.tables.values():
                for r in t.routes:
                    out.append(f"ip {'-6 ' if r.family == 6 else ''}route add {r.text} table {t.table_id}"
                               f"   # table {t.name!r}")
        for decl in self.policy.shaping_decls.values():
            out += [" ".join(cmd) for cmd in tree_commands(decl, self.classes)]
        return out

    # -- lifecycle ----------------------------------------------------------------------
    def setup(self) -> None:
        """Remove a stale set, then install ip rules, routes, sysctls and qdisc trees."""
        from .shaping import Shaper, probe_kernel

        stale = remove_owned()
        if stale:
            log.warning("removed stale routing state left by an engine that is gone: %s", "; ".join(stale))
        self.started = True
        if self.policy.shaping_decls:
            probe_kernel()
        if self.route_field is not None:
            with _ipr() as ipr:
                self._check_tables(ipr)
                self._install_rules(ipr)
                for t in self.tables.values():
                    for r in t.routes:
                        try:
                            _add_route(ipr, t.table_id, r)
                        except Exception as e:  # noqa: BLE001
                            raise RouteShapeError(f"routing table {t.name!r} ({t.file}:{t.line}): the kernel "
                                                  f"refused `ip route add {r.text} table {t.table_id}`: {e}") from None
        self._sysctls()
        for decl in self.policy.shaping_decls.values():
            s = Shaper(decl, self.classes)
            self.shapers.append(s)
            s.build()

    def _check_tables(self, ipr: Any) -> None:
        ids = {t.table_id for t in self.tables.values()} | {
            DEFAULT_TABLE_BASE + i for i in range(len(self.tables) + 1, self.slots + 1)}
        for fam in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.route("dump", family=fam):
                tid = r.get_attr("RTA_TABLE")
                if tid in ids and r["proto"] != RTPROT_NFHOOKS:
                    raise RouteShapeError(
                        f"routing table {tid} already holds routes nfhooks did not add (ip route show table "
                        f"{tid}); give the declaration another table_id=")

    def _install_rules(self, ipr: Any) -> None:
        f = self.route_field
        assert f is not None
        p = self.settings.priority
        for fam in (socket.AF_INET, socket.AF_INET6):
            if self.settings.main_first:
                ipr.rule("add", family=fam, priority=p, table=254, suppress_prefixlen=0, protocol=RTPROT_NFHOOKS)
            for idx in range(1, self.slots + 1):
                ipr.rule("add", family=fam, priority=p + idx, table=self._table_id(idx),
                         fwmark=f.encode(idx), fwmask=f.mask, protocol=RTPROT_NFHOOKS)

    def _sysctls(self) -> None:
        want: dict[str, str] = {}
        st = self.settings
        if st.src_valid_mark is not None:
            want["net/ipv4/conf/all/src_valid_mark"] = "1" if st.src_valid_mark else "0"
        if st.rp_filter is not None:
            devs = sorted({d for t in self.tables.values() for d in t.devs})
            for d in ["all", "default", *devs]:
                want[f"net/ipv4/conf/{d}/rp_filter"] = str(st.rp_filter)
        for key, value in want.items():
            path = "/proc/sys/" + key
            try:
                with open(path) as fh:
                    old = fh.read().strip()
                with open(path, "w") as fh:
                    fh.write(value)
            except OSError as e:
                raise RouteShapeError(f"cannot set {key.replace('/', '.')}={value} in this namespace: {e}") from None
            self.saved_sysctls.setdefault(key, old)

    def teardown(self) -> list[str]:
        """Undo everything setup did (also after a failed setup); returns what was removed."""
        done: list[str] = []
        errors: list[str] = []
        for s in reversed(self.shapers):
            try:
                done += s.remove()
            except Exception as e:  # noqa: BLE001 -- keep tearing down
                errors.append(str(e))
        self.shapers.clear()
        if self.route_field is not None or self.started:  # tag-based: also a set this object never made
            try:
                done += remove_owned()
            except Exception as e:  # noqa: BLE001
                errors.append(str(e))
        for key, old in self.saved_sysctls.items():
            try:
                with open("/proc/sys/" + key, "w") as fh:
                    fh.write(old)
                done.append(f"{key.replace('/', '.')}={old} restored")
            except OSError as e:
                errors.append(f"restoring {key}: {e}")
        self.saved_sysctls.clear()
        self.dynamic.clear()
        self.started = False
        if errors:
            raise RouteShapeError("; ".join(errors))
        return done


def _ipr() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _add_route(ipr: Any, table: int, r: RouteSpec) -> None:
    kw: dict[str, Any] = {"dst": r.dst, "table": table, "proto": RTPROT_NFHOOKS,
                          "family": socket.AF_INET if r.family == 4 else socket.AF_INET6}
    if r.via:
        kw["gateway"] = r.via
    if r.dev:
        idx = ipr.link_lookup(ifname=r.dev)
        if not idx:
            raise RouteShapeError(f"no interface {r.dev!r} in this network namespace")
        kw["oif"] = idx[0]
    if r.src:
        kw["prefsrc"] = r.src
    if r.metric is not None:
        kw["priority"] = r.metric
    ipr.route("add", **kw)


def remove_owned() -> list[str]:
    """Delete every ip rule and route carrying nfhooks' protocol number, both families."""
    removed: list[str] = []
    with _ipr() as ipr:
        for fam in (socket.AF_INET, socket.AF_INET6):
            n_rules = n_routes = 0
            for r in ipr.get_rules(family=fam):
                if r.get_attr("FRA_PROTOCOL") != RTPROT_NFHOOKS:
                    continue
                kw: dict[str, Any] = {"family": fam, "priority": r.get_attr("FRA_PRIORITY"),
                                      "table": r.get_attr("FRA_TABLE"), "protocol": RTPROT_NFHOOKS}
                if r.get_attr("FRA_FWMARK") is not None:
                    kw.update(fwmark=r.get_attr("FRA_FWMARK"), fwmask=r.get_attr("FRA_FWMASK"))
                ipr.rule("del", **kw)
                n_rules += 1
            for r in ipr.route("dump", family=fam):
                if r["proto"] != RTPROT_NFHOOKS:
                    continue
                dst = r.get_attr("RTA_DST") or ("0.0.0.0" if fam == socket.AF_INET else "::")
                ipr.route("del", family=fam, table=r.get_attr("RTA_TABLE"), dst=dst, dst_len=r["dst_len"],
                          proto=RTPROT_NFHOOKS, priority=r.get_attr("RTA_PRIORITY"))
                n_routes += 1
            if n_rules or n_routes:
                removed.append(f"ipv{4 if fam == socket.AF_INET else 6}: {n_rules} ip rule(s), {n_routes} route(s)")
    return removed


def start(ruleset: "RuleSet") -> None:
    """Engine.start: set up routing/shaping when the policy has any (a no-op otherwise).

    Runs before the iptables rules are installed, so the ip rules, routes and qdiscs exist
    before any packet can carry a route or class mark.
    """
    rs = getattr(ruleset, "routeshape", None)
    if rs is not None:
        rs.setup()
        _install_nat(ruleset)


def _signature(rs: "RouteShape | None") -> Any:
    if rs is None:
        return None
    tables = [(t.name, t.index, t.table_id, t.routes, t.masquerade, t.snat) for t in rs.tables.values()]
    shaping = [(d.dev, d.classes, d.default, d.rate) for d in rs.policy.shaping_decls.values()]
    fields = [(f.shift, f.width) if f is not None else None for f in (rs.route_field, rs.class_field)]
    return tables, shaping, fields, rs.slots, vars(rs.settings), rs.classes


def reload(old: "RuleSet", new: "RuleSet") -> None:
    """Hot reload, before ``install(new)``: the new generation takes over the running routing
    and shaping when the policy changed neither (tables, routes, classes, settings, mark
    fields); otherwise RouteShapeError, and the reload should fail with the old policy kept
    (ip rules and qdiscs are not generation-aware: changing them needs a restart)."""
    o, n = getattr(old, "routeshape", None), getattr(new, "routeshape", None)
    if _signature(o) != _signature(n):
        raise RouteShapeError("the new policy changes its routing tables, shaping classes or their mark bits; "
                              "hot reload keeps those as they are: restart the engine to change them")
    if o is None or n is None:
        return
    n.dynamic, n.failed, n.saved_sysctls, n.shapers, n.started = o.dynamic, o.failed, o.saved_sysctls, o.shapers, o.started
    _install_nat(new)


def _install_nat(ruleset: "RuleSet", restore: Callable[..., None] | None = None) -> None:
    """The uplink NAT chain, through the backend's ``restore`` (``ip(6)tables-*-restore
    --noflush``, one commit per family), taken out of what the backend's install does: the
    legacy backend's python-iptables cannot create MASQUERADE/SNAT for both families in one
    process (see backends/legacy.py). The chain is ``NFH-*`` and the jump tagged ``nfhooks``,
    so the backend's remove() removes them as usual. ``restore`` None: the backend
    $NFHOOKS_BACKEND names (else auto; `nfhooks run` exports its choice there)."""
    if restore is None:
        from .backends import get_backend
        restore = get_backend().restore

    for fam in (4, 6):
        key = (fam, "nat")
        chains = [c for c in ruleset.chains.get(key, []) if c.startswith("NFH-" + ROUTE_NAT_CHAIN)]
        if not chains:
            continue
        rules = [r for r in ruleset.rules[key] if r.chain in chains]
        jumps = [j for j in ruleset.jumps[key] if j.target in chains]
        ruleset.rules[key] = [r for r in ruleset.rules[key] if r.chain not in chains]
        ruleset.jumps[key] = [j for j in ruleset.jumps[key] if j.target not in chains]
        ruleset.chains[key] = [c for c in ruleset.chains[key] if c not in chains]
        if not ruleset.chains[key]:
            del ruleset.chains[key], ruleset.rules[key], ruleset.jumps[key]
        restore(fam, ["*nat", *(f":{c} - [0:0]" for c in chains), *(r.render() for r in rules),
                      *("-I" + j.render()[2:] for j in reversed(jumps)), "COMMIT"], "the uplink NAT rules")


def stop(ruleset: "RuleSet", owned: bool = True) -> None:
    """Engine.stop: remove what start set up (safe when start failed or never ran). Never
    raises: the engine's own teardown must go on. ``owned`` False (another engine owns this
    namespace) touches nothing: the ip rules and routes carrying our tag would be its."""
    rs = getattr(ruleset, "routeshape", None)
    if rs is None or not owned:
        return
    try:
        removed = rs.teardown()
    except Exception as e:  # noqa: BLE001
        log.error("removing routing/shaping state: %s", e)
        return
    if removed:
        log.info("removed: %s", "; ".join(removed))
