"""Policies: plain Python modules that declare handlers next to their match.

Like a mitmproxy addon script, a policy is an ordinary module. It creates a ``Policy`` named
``policy`` and decorates handler functions with the hook and the match they care about::

    policy = Policy(defaults={"INPUT": reject()})
    trusted = policy.option("trusted", default="10.0.0.0/8", type="network")

    @policy.input(proto="tcp", dport=22, src=trusted)
    def ssh(pkt):
        return accept()

Loading (nfhooks/loader.py) compiles the checked source text itself -- never cached bytecode --
into a fresh module under a private name (two policies never share module state), applies ``--set`` options, and validates everything it can before a single rule exists:
impossible hook/table combinations, verdicts the kernel cannot carry out where a handler would
return them (found by reading the handler's source), matches that cannot work at the hook.
Every error names the policy file and line.
"""

from __future__ import annotations

import ast
import inspect
import ipaddress
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import PolicyError
from .hooks import HOOKS, TABLE_ORDER, PlacementError, check_table, check_verdict, default_table, normalize_hook
from .features.routing_decl import RoutingSettings, RoutingTable, declare_settings, declare_table
from .features.offload_decl import FlowError, check_flow
from .features.shaping_decl import Shaping, declare_shaping
from .introspect import Source
from .introspect import parse as parse_source
from .match import Match, MatchError
from .policy_metrics import PolicyMetric, declare_metric
from .sets import AddressSet, KernelVerdict, declare_kernel_verdict, declare_set
from .verdict import ACCEPT, FACTORIES, Reject, Verdict, parse_default

T = TypeVar("T")
HandlerFunc = Callable[[Any], "Verdict | None"]

#: nfhooks' "self" mark bit while an engine decides packets in this context (0: none), what
#: Policy.socket() marks its sockets with. Given by the engine around its serve loop
#: (:func:`self_marked`), never written into the Policy: a policy is not changed after it loads.
_SELF_MARK: ContextVar[int] = ContextVar("nfhooks_self_mark", default=0)


@contextmanager
def self_marked(mark: int) -> Iterator[None]:
    """Inside this block (an engine's or a worker's serve loop), ``Policy.socket()`` marks its
    sockets with ``mark``: the layout's "self" bit, which every queue rule excludes."""
    token = _SELF_MARK.set(mark)
    try:
        yield
    finally:
        _SELF_MARK.reset(token)


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


def _parse_port(text: str) -> int:
    p = int(text)
    if not 0 < p < 65536:
        raise ValueError(f"{text!r} is not a port (1..65535)")
    return p


OPTION_TYPES: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": _parse_bool,
    "port": _parse_port,
    "network": lambda s: ipaddress.ip_network(s, strict=False),
    "address": ipaddress.ip_address,
}


@dataclass
class Option(Generic[T]):
    """A typed policy setting, changeable with ``--set name=value``.

    Pass the option itself as a match value (``src=trusted``): it is resolved when the policy
    is compiled, so the kernel rule carries the configured value.
    """

    option_name: str
    default: Any
    type: str | Callable[[str], Any] = "str"
    help: str = ""
    file: str | None = None
    line: int | None = None
    value: Any = None

    def parse(self, text: str) -> Any:
        conv = OPTION_TYPES[self.type] if isinstance(self.type, str) else self.type
        return conv(text)

    @property
    def type_name(self) -> str:
        return self.type if isinstance(self.type, str) else getattr(self.type, "__name__", "custom")


@dataclass
class Handler:
    name: str
    hook: str
    table: str
    match: Match
    func: HandlerFunc
    file: str
    line: int
    verdict_kinds: dict[str, int] = field(default_factory=dict)  # kind -> source line
    index: int = 0  # position in the policy, which is also its queue offset
    match_args: dict[str, Any] = field(default_factory=dict)  # as declared, options unresolved
    flow: bool = False  # decided once per connection, later packets offloaded (offload.py)
    source: Source = field(default_factory=Source, repr=False, compare=False)  # parsed once (introspect.py)

    def __post_init__(self) -> None:
        if not self.source.name and self.func is not None:  # built without the decorator (tests)
            self.source = parse_source(self.func)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _caller() -> tuple[str, int]:
    frame = inspect.currentframe()
    assert frame is not None
    f = frame.f_back.f_back  # type: ignore[union-attr]
    while f is not None and f.f_globals.get("__name__", "").startswith("nfhooks."):
        f = f.f_back
    return (f.f_code.co_filename, f.f_lineno) if f is not None else ("<unknown>", 0)


class Policy:
    """The handlers, defaults and options of one policy module."""

    def __init__(self, name: str | None = None, *, defaults: dict[str, "Verdict | str"] | None = None,
                 description: str = "", version: str = "1") -> None:
        self.file, self.line = _caller()
        self.name = name
        self.description = description
        self.version = version
        self.handlers: list[Handler] = []
        self.options: dict[str, Option[Any]] = {}
        self.defaults: dict[str, Verdict] = {}
        self.sets: dict[str, AddressSet] = {}  # name -> address set (set(); sets.py)
        self.kernel_verdicts: list[KernelVerdict] = []  # queue-free rules (kernel_verdict())
        # feature declarations (checked data, features/*_decl.py): what the features compile
        self.routing_tables: dict[str, RoutingTable] = {}  # name -> table (routing_table())
        self.routing_settings: RoutingSettings = RoutingSettings()  # (routing())
        self.shaping_decls: dict[str, Shaping] = {}  # interface (or option name) -> tree (shaping())
        self.metrics: dict[str, PolicyMetric] = {}  # name -> handle (counter(), gauge(); policy_metrics.py)
        for hook, v in (defaults or {}).items():
            try:
                h = normalize_hook(hook)
                verdict = parse_default(v)
                check_verdict(verdict.kind, h, default_table(h))
            except (PlacementError, ValueError) as e:
                raise PolicyError(f"default for {hook}: {e}", self.file, self.line) from None
            self.defaults[h] = verdict

    def default(self, hook: str) -> Verdict:
        return self.defaults.get(hook, ACCEPT)

    def option(self, name: str, default: Any, type: str | Callable[[str], Any] = "str",
               help: str = "") -> Option[Any]:
        file, line = _caller()
        if name in self.options:
            raise PolicyError(f"option {name!r} is declared twice", file, line)
        if isinstance(type, str) and type not in OPTION_TYPES:
            raise PolicyError(f"option {name!r}: unknown type {type!r} (one of {', '.join(OPTION_TYPES)})", file, line)
        opt: Option[Any] = Option(name, default, type, help, file, line)
        try:
            opt.value = opt.parse(default) if isinstance(default, str) and opt.type != "str" else default
        except ValueError as e:
            raise PolicyError(f"option {name!r}: default {default!r}: {e}", file, line) from None
        self.options[name] = opt
        return opt

    def set(self, name: str, *, kind: str = "ip", timeout: int | None = None, size: int | None = None,
            family: Any = None, entries: Any = (), file: Any = None) -> AddressSet:
        """An address set the kernel matches (``src=banned``, ``src=~banned``) and handlers change
        (``banned.add(pkt.src, timeout=60)``): one ipset per family, made by `run` (sets.py)."""
        f, line = _caller()
        return declare_set(self.sets, name, kind=kind, timeout=timeout, size=size, family=family,
                           entries=entries, file=file, decl_file=f, decl_line=line)

    def kernel_verdict(self, hook: str, verdict: Verdict, *, name: str | None = None, **match: Any) -> KernelVerdict:
        """A rule whose verdict (accept, drop, reject) the kernel gives by itself, before every
        handler at ``hook``: ``policy.kernel_verdict("INPUT", drop(), src=blocked)`` (sets.py)."""
        f, line = _caller()
        return declare_kernel_verdict(self.kernel_verdicts, hook, verdict, match, name, f, line)

    def routing_table(self, name: str, routes: "list[str] | str", *, table_id: int | None = None,
                      masquerade: bool = False, snat: "str | list[str] | None" = None) -> Any:
        """Declare a routing table that ``route(name)`` sends a connection to (nfhooks/routing.py).

        ``routes`` in ``ip route`` words (``"default via 10.0.2.1 dev up2"``); ``masquerade`` or
        ``snat`` pair the uplink with source NAT (a re-routed local packet keeps the source
        address of its first route). Installed at start, removed on exit.
        """
        file, line = _caller()
        return declare_table(self.routing_tables, name, routes, table_id=table_id, masquerade=masquerade, snat=snat,
                             file=file, line=line)

    def routing(self, *, priority: int = 10000, main_first: bool = True, src_valid_mark: bool | None = None,
                rp_filter: "int | str | None" = None, dynamic_routes: int = 3) -> Any:
        """Where nfhooks' ip rules go and the sysctls it may set in its namespace (routing.py)."""
        file, line = _caller()
        self.routing_settings = declare_settings(priority=priority, main_first=main_first,
                                                 src_valid_mark=src_valid_mark, rp_filter=rp_filter,
                                                 dynamic_routes=dynamic_routes, file=file, line=line)
        return self.routing_settings

    def shaping(self, dev: str, classes: dict[str, dict[str, Any]], *, default: str | None = None,
                rate: Any = None) -> Any:
        """Declare shaping classes on ``dev`` that ``shape(name)`` puts a connection in (shaping.py)."""
        file, line = _caller()
        return declare_shaping(self.shaping_decls, dev, classes, default=default, rate=rate, file=file, line=line)

    def counter(self, name: str, help: str, *, labels: "list[str] | tuple[str, ...] | str" = ()) -> PolicyMetric:
        """A counter the handlers move (``.inc()``, ``.labels(...).inc()``), exported by the engine
        as ``nfhooks_policy_<name>_total`` (policy_metrics.py)."""
        file, line = _caller()
        return declare_metric(self.metrics, "counter", name, help, labels, file, line)

    def gauge(self, name: str, help: str, *, labels: "list[str] | tuple[str, ...] | str" = ()) -> PolicyMetric:
        """A gauge the handlers set (``.set(v)``, ``.inc()``, ``.dec()``), exported as ``nfhooks_policy_<name>``."""
        file, line = _caller()
        return declare_metric(self.metrics, "gauge", name, help, labels, file, line)

    def handler(self, hook: str, *, table: str | None = None, name: str | None = None, flow: bool = False,
                **match: Any) -> Callable[[HandlerFunc], HandlerFunc]:
        """Declare ``func`` as the handler for packets at ``hook`` that the match selects.

        ``flow=True``: the decision depends only on the connection (addresses, ports, protocol,
        interfaces); once it accepts, the connection's later packets skip Python (offload.py).
        """

        def decorate(func: HandlerFunc) -> HandlerFunc:
            file = func.__code__.co_filename
            line = func.__code__.co_firstlineno
            try:
                h = normalize_hook(hook)
                src = parse_source(func)
                kinds = verdict_calls(src)
                # NAT and header rewrites must be decided before the nat table / in mangle
                needs_mangle = {"dnat", "snat", "masquerade", "redirect", "mangle", "route", "shape"} & set(kinds)
                t = table or ("mangle" if needs_mangle else default_table(h))
                check_table(h, t)
                unknown = sorted(set(match) - MATCH_KEYS)
                if unknown:
                    import difflib

                    hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(
                        k, MATCH_KEYS | {"proto"}, n=1)) else repr(k) for k in unknown]
                    raise PolicyError(f"handler {func.__name__!r}: unknown match keyword {', '.join(hints)}; "
                                      f"matches are {', '.join(sorted(MATCH_KEYS))}, and table=, name=, "
                                      "flow=", file, line)
                m = Match.build(**match)
                m.check_placement(h, t)
                for kind, kline in kinds.items():
                    try:
                        check_verdict(kind, h, t)
                    except PlacementError as e:
                        raise PolicyError(f"handler {func.__name__!r} returns {kind}: {e}", file, kline) from None
                if flow:
                    try:
                        check_flow(src, h, t, m, kinds)
                    except FlowError as e:
                        raise PolicyError(f"handler {func.__name__!r} {e}", file, e.line or line) from None
            except (PlacementError, MatchError, TypeError) as e:
                raise PolicyError(f"handler {func.__name__!r} at {hook}: {e}", file, line) from None
            hname = name or func.__name__
            if any(x.name == hname for x in self.handlers):
                raise PolicyError(f"two handlers are named {hname!r}; give one name=...", file, line)
            self.handlers.append(Handler(hname, h, t, m, func, file, line, kinds, len(self.handlers), match,
                                         flow=bool(flow), source=src))
            return func

        return decorate

    def prerouting(self, **kw: Any) -> Callable[[HandlerFunc], HandlerFunc]:
        return self.handler("PREROUTING", **kw)

    def input(self, **kw: Any) -> Callable[[HandlerFunc], HandlerFunc]:
        return self.handler("INPUT", **kw)

    def forward(self, **kw: Any) -> Callable[[HandlerFunc], HandlerFunc]:
        return self.handler("FORWARD", **kw)

    def output(self, **kw: Any) -> Callable[[HandlerFunc], HandlerFunc]:
        return self.handler("OUTPUT", **kw)

    def postrouting(self, **kw: Any) -> Callable[[HandlerFunc], HandlerFunc]:
        return self.handler("POSTROUTING", **kw)

    # -- after loading ---------------------------------------------------------------------
    def apply_overrides(self, overrides: dict[str, str]) -> None:
        for key, text in overrides.items():
            opt = self.options.get(key)
            if opt is None:
                known = ", ".join(f"{o.option_name} ({o.type_name})" for o in self.options.values()) or "none"
                raise PolicyError(f"unknown option {key!r} (--set {key}=...). This policy's options: {known}",
                                  self.file)
            try:
                opt.value = opt.parse(text)
            except (ValueError, TypeError) as e:
                raise PolicyError(f"--set {key}={text}: {e} (option {key!r} is of type {opt.type_name})",
                                  opt.file, opt.line) from None
        # Matches built from options are rebuilt so the kernel rule carries the set value.
        for h in self.handlers:
            if any(isinstance(v, Option) for v in h.match_args.values()):
                try:
                    h.match = Match.build(**h.match_args)
                    h.match.check_placement(h.hook, h.table)
                except (MatchError, PlacementError) as e:
                    raise PolicyError(f"handler {h.name!r} with the options set: {e}", h.file, h.line) from None

    def socket(self, family: int = 2, type: int = 1, proto: int = 0) -> "socket.socket":
        """A socket whose packets skip nfhooks' queue rules.

        A handler that opens a connection itself (a lookup, say) would otherwise have its own
        packets queued behind the packet it is deciding -- in the same single-threaded engine:
        a deadlock. The socket's SO_MARK carries nfhooks' "self" bit, which every queue rule
        excludes (the engine serving this policy gives it: :func:`self_marked`, in the thread
        that runs the handlers; a thread the handler starts has a context of its own: start it
        with ``contextvars.copy_context().run`` to keep the mark). Hook defaults still apply.
        """
        import socket as _socket

        s = _socket.socket(family, type, proto)
        mark = _SELF_MARK.get()
        if mark:
            # as bytes: the mark is an unsigned 32-bit value, setsockopt's int is signed
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_MARK, mark.to_bytes(4, sys.byteorder))
        return s

    def decide(self, pkt: Any, ctstate: str | None = None) -> "tuple[Handler | None, Verdict]":
        """What this policy does with ``pkt`` (a fake packet), simulated in Python for tests.

        Handlers at the packet's hook run in table order, then declaration order; the first
        whose match fits (``ctstate`` stands in for conntrack) and returns non-None decides;
        otherwise the hook default. This is the kernel's semantics for a policy whose
        handlers live in one table -- the common case -- without root or a kernel.
        """
        for table in TABLE_ORDER:
            for h in self.handlers:
                if h.hook == pkt.hook and h.table == table and h.match.matches(pkt, ctstate):
                    v = h.func(pkt)
                    if v is not None:
                        return h, v
        return None, self.default(pkt.hook)

    def hooks_used(self) -> list[str]:
        return [h for h in HOOKS if any(x.hook == h for x in self.handlers) or h in self.defaults]


def verdict_calls(func: "Callable[..., Any] | Source") -> dict[str, int]:
    """The verdict factories a handler's source calls, with their file line numbers.

    A best effort that catches the common mistake (reject() at PREROUTING) at load time;
    a verdict the scan cannot see is still checked when the handler returns it. ``func``:
    the handler, or its introspect.Source (parsed once at declaration).
    """
    src = func if isinstance(func, Source) else parse_source(func)
    found: dict[str, int] = {}
    for node in src.walk():
        if (isinstance(node, ast.Return) and isinstance(node.value, ast.Constant)
                and node.value.value is not None):
            v = node.value.value
            hint = f"{v}()" if isinstance(v, str) and v in FACTORIES else "a verdict such as accept() or drop(), or None"
            raise PolicyError(f"handler {src.name!r} returns the constant {v!r}, which is not a verdict; "
                              f"return {hint}", src.file, src.line(node))
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in FACTORIES:
                kind = FACTORIES[name]
                if kind == "mark" and any(k.arg == "connmark" for k in node.keywords):
                    kind = "connmark"
                found.setdefault(kind, src.line(node))
    return found


#: The keywords of Match.build: what a handler decorator accepts besides table/name/flow.
MATCH_KEYS = frozenset({"proto", "src", "dst", "sport", "dport", "iif", "oif", "ctstate", "mark", "family",
                        # kernel state (kmatch.py)
                        "limit", "burst", "limit_over", "hashlimit", "hashlimit_by", "connlimit",
                        "connlimit_mask", "uid", "gid", "connmark"})


def parse_sets(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PolicyError(f"--set {item!r}: expected key=value")
        out[key.strip()] = value
    return out


__all__ = ["Policy", "Option", "Handler", "PolicyError", "parse_sets", "Reject"]
