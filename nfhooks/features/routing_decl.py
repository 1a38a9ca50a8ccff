"""Routing declarations: what ``policy.routing_table(...)`` and ``policy.routing(...)`` declare,
checked when the policy loads (pure data and validation: no kernel, no pyroute2).

The routing and shaping feature (nfhooks/routing.py has the design) compiles these into mark
fields and rules (routing_compile.py) and sets them up at start (routing_runtime.py).
``policy`` arguments below are a loaded policy.Policy (duck-typed: this module sits below
policy.py, which imports it).
"""

from __future__ import annotations

import ast
import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import KernelError, PolicyError
from ..introspect import is_option, option_value
from ..marks import Field, MarkLayout

__all__ = ["RTPROT_NFHOOKS", "DEFAULT_PRIORITY", "DEFAULT_TABLE_BASE", "DEFAULT_DYNAMIC_ROUTES", "RESTORE_CHAIN",
           "SAVE_CHAIN", "ROUTE_NAT_CHAIN", "RouteShapeError", "RouteSpec", "parse_route", "resolve_route",
           "RoutingTable", "RoutingSettings", "declare_table", "declare_settings", "uses_dynamic_routes",
           "check_references", "class_names", "route_slots", "RouteShapePlan"]

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


def resolve_route(item: Any) -> Any:
    """A route as declared: a string, a policy Option holding one, or a callable returning one
    (``lambda: f"default via {gw.value} dev up2"``), resolved after ``--set``."""
    if is_option(item):
        return option_value(item)
    if callable(item):
        return item()
    return item


@dataclass(frozen=True)
class RoutingTable:
    """A declared table: ``index`` is its value in the ``route`` mark field (1..N)."""

    name: str
    index: int
    table_id: int
    declared: tuple[Any, ...]  # strings, Options or callables (see resolve_route)
    masquerade: bool = False
    snat: tuple[str, ...] = ()  # per-family SNAT addresses
    file: str | None = None
    line: int | None = None

    @property
    def routes(self) -> tuple[RouteSpec, ...]:
        """The routes with the options' current values (parsed again: cheap, and --set wins)."""
        try:
            return tuple(parse_route(resolve_route(r)) for r in self.declared)
        except ValueError as e:
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


def declare_table(tables: dict[str, RoutingTable], name: str, routes: Iterable[str], *, table_id: int | None,
                  masquerade: bool, snat: Any, file: str, line: int) -> RoutingTable:
    """Check a ``policy.routing_table(...)`` declaration and add it to ``tables`` (the policy's)."""
    if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise PolicyError(f"routing_table({name!r}): name it with letters, digits, - and _", file, line)
    if name in tables:
        raise PolicyError(f"routing table {name!r} is declared twice", file, line)
    if isinstance(routes, str) or callable(routes) or is_option(routes):
        routes = [routes]
    declared = tuple(routes)
    try:
        specs = tuple(parse_route(resolve_route(r)) for r in declared)
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


def declare_settings(*, priority: int, main_first: bool, src_valid_mark: bool | None,
                     rp_filter: int | str | None, dynamic_routes: int, file: str, line: int) -> RoutingSettings:
    """Check a ``policy.routing(...)`` declaration: the settings the policy keeps."""
    rp = {"off": 0, "strict": 1, "loose": 2}.get(rp_filter, rp_filter) if isinstance(rp_filter, str) else rp_filter
    if rp is not None and rp not in (0, 1, 2):
        raise PolicyError(f"routing(rp_filter={rp_filter!r}): 0/'off', 1/'strict' or 2/'loose'", file, line)
    if not isinstance(priority, int) or not 0 < priority < 32000:
        raise PolicyError(f"routing(priority={priority!r}): an ip rule priority 1..31999 (main is 32766)", file, line)
    if not isinstance(dynamic_routes, int) or not 0 <= dynamic_routes <= 255:
        raise PolicyError(f"routing(dynamic_routes={dynamic_routes!r}): 0..255", file, line)
    return RoutingSettings(priority, bool(main_first), src_valid_mark, rp, dynamic_routes)


def uses_dynamic_routes(policy: Any) -> bool:
    """A handler calls ``route(via=...)`` / ``route(dev=...)``: reserve on-demand table slots."""
    for h in policy.handlers:
        if "route" in h.verdict_kinds:
            for _, call, _ in h.source.calls({"route"}):
                if any(k.arg in ("via", "dev") for k in call.keywords):
                    return True
    return False


def check_references(policy: Any) -> None:
    """A literal ``route("name")``/``shape("name")`` in a handler must name a declaration."""
    classes = {c for s in policy.shaping_decls.values() for c in s.classes}
    for h in policy.handlers:
        if not {"route", "shape"} & set(h.verdict_kinds):
            continue
        for fname, call, line in h.source.calls({"route", "shape"}):
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


def class_names(policy: Any) -> list[str]:
    """Every declared shaping class name, in declaration order (index = position + 1)."""
    out: list[str] = []
    for s in policy.shaping_decls.values():
        out += [c for c in s.classes if c not in out]
    return out


def route_slots(policy: Any) -> int:
    uses = any("route" in h.verdict_kinds for h in policy.handlers)
    dyn = policy.routing_settings.dynamic_routes if uses_dynamic_routes(policy) else 0
    if not policy.routing_tables and not uses:
        return 0
    return len(policy.routing_tables) + dyn


@dataclass(frozen=True)
class RouteShapePlan:
    """How route()/shape() verdicts are written into the mark: pure data the compiler puts on
    the RuleSet (``RuleSet.routeshape``). The feature's runtime (routing_runtime.RouteShape,
    made per generation by the engine) encodes packets and sets the kernel up from it; `check`
    describes it. Nothing here talks to the kernel, so a RuleSet stays data only."""

    route_field: Field | None
    class_field: Field | None
    classes: tuple[str, ...]  # shaping class names; a class's value is its position + 1
    tables: tuple[tuple[str, int, int], ...]  # (name, index, table id) of each declared table
    slots: int  # route values 1..slots: the declared tables, then the on-demand ones

    @classmethod
    def build(cls, policy: Any, layout: MarkLayout) -> "RouteShapePlan":
        return cls(layout["route"] if "route" in layout else None, layout["class"] if "class" in layout else None,
                   tuple(class_names(policy)),
                   tuple((t.name, t.index, t.table_id) for t in policy.routing_tables.values()),
                   route_slots(policy))

    def table_id(self, idx: int) -> int:
        """The kernel table of route value ``idx``: a declared table's id, else an on-demand one."""
        return next((tid for _, i, tid in self.tables if i == idx), DEFAULT_TABLE_BASE + idx)

    def clear_mask(self, kind: str) -> int:
        """The mark bits a ``route``/``shape`` verdict keeps (all but its field's)."""
        f = self.route_field if kind == "route" else self.class_field
        return ~f.mask & 0xFFFFFFFF if f is not None else 0xFFFFFFFF
