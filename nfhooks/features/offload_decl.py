"""Flow handlers checked when the policy loads: what ``flow=True`` refuses, with the line to
blame (the design is in nfhooks/offload.py); and which connection verdicts
(``accept(connection=True)``...: nfhooks/connverdict.py) a handler's source can return. Pure:
reads the handler's parsed source."""

from __future__ import annotations

import ast
from typing import TYPE_CHECKING, Any

from ..introspect import Source, parse

if TYPE_CHECKING:
    from ..match import Match

__all__ = ["PER_PACKET_FIELDS", "REFUSED_KINDS", "CONNECTION_FACTORIES", "FlowError", "check_flow",
           "per_packet_reads", "connection_kinds"]

#: Packet-view attributes that differ from packet to packet of one connection: a flow handler
#: that reads them would decide the whole connection from its first packet's value.
PER_PACKET_FIELDS = frozenset({
    "payload", "scapy", "tcp_flags", "flags", "ttl", "length", "mark", "truncated", "fragment",
    "icmp_type", "icmp_code",
})
#: Verdicts whose effect must be applied to every packet (or that the kernel already applies
#: once per connection): refused with flow=True.
REFUSED_KINDS = {
    "mark": "a packet mark is set on each packet by its verdict; packets that skip Python would "
            "carry none",
    "connmark": "connmark() writes user bits of the connmark per decision; combine it with a "
                "non-flow handler (or match -m connmark in your own rules)",
    "mangle": "a rewrite must be applied to every packet; packets that skip Python would pass "
              "unchanged",
    "dnat": "NAT is already decided once per connection (the kernel's nat table sees only the "
            "first packet); flow=True adds nothing",
    "snat": "NAT is already decided once per connection; flow=True adds nothing",
    "masquerade": "NAT is already decided once per connection; flow=True adds nothing",
    "redirect": "NAT is already decided once per connection; flow=True adds nothing",
}


#: The verdict factories that take ``connection=True``, by the verdict kind they make.
CONNECTION_FACTORIES = {"accept": "accept", "drop": "drop", "reject": "reject"}


class FlowError(ValueError):
    """flow=True combined with something that cannot work; ``line`` points at the cause."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


def check_flow(func: Any, hook: str, table: str, match: "Match", kinds: dict[str, int]) -> None:
    """Refuse a flow handler that cannot be offloaded (FlowError, with the line to blame).
    ``func``: the handler's introspect.Source (or the function)."""
    if table == "raw":
        raise FlowError("flow=True cannot work in the raw table: conntrack has not seen the packet "
                        "yet, so there is no connection to remember the verdict on; use mangle or filter")
    if match.ctstate is not None:
        raise FlowError("flow=True with a ctstate match: conntrack state changes from packet to "
                        "packet (NEW, then ESTABLISHED), but a flow handler is asked once per "
                        "connection. Drop the ctstate match or flow=True")
    if match.mark is not None:
        raise FlowError("flow=True with a mark match: the packet mark is per packet, but a flow "
                        "handler is asked once per connection. Drop the mark match or flow=True")
    for kind, kline in sorted(kinds.items(), key=lambda kv: kv[1]):
        if kind in REFUSED_KINDS:
            raise FlowError(f"returns {kind} with flow=True: {REFUSED_KINDS[kind]}", kline)
    conn = connection_kinds(func)
    if conn:
        kind, cline = min(conn.items(), key=lambda kv: kv[1])
        raise FlowError(f"returns {kind}(connection=True) with flow=True: both keep the decision on the "
                        "connection; drop flow=True (a connection verdict may read the payload)", cline)
    read = per_packet_reads(func)
    if read:
        attr, line = read[0]
        raise FlowError(f"reads pkt.{attr} with flow=True: that differs from packet to packet, and a "
                        "flow handler decides the whole connection from its first packet (use only "
                        "src, dst, sport, dport, proto, version, iif, oif); drop flow=True to see "
                        "every packet", line)


def per_packet_reads(src: "Source | Any") -> list[tuple[str, int]]:
    """(attribute, file line) of each per-packet field the handler reads from its argument
    (``src``: the handler's introspect.Source, or the function itself)."""
    if not isinstance(src, Source):
        src = parse(src)
    fn = src.function()
    if fn is None or not fn.args.args:
        return []
    arg = fn.args.args[0].arg
    found = []
    for node in ast.walk(fn):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == arg and node.attr in PER_PACKET_FIELDS):
            found.append((node.attr, src.line(node)))
    return sorted(found, key=lambda x: x[1])


def connection_kinds(src: "Source | Any") -> dict[str, int]:
    """{verdict kind: file line} of each ``accept/drop/reject(..., connection=X)`` call in the
    handler's source whose ``X`` is not the constant False (a variable may be True: counted).
    What the compiler reserves connmark bits and kernel rules for (nfhooks/connverdict.py)."""
    if not isinstance(src, Source):
        src = parse(src)
    found: dict[str, int] = {}
    for node in src.walk():
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if name not in CONNECTION_FACTORIES:
            continue
        kw = next((k.value for k in node.keywords if k.arg == "connection"), None)
        if kw is None or (isinstance(kw, ast.Constant) and not kw.value):
            continue
        found.setdefault(CONNECTION_FACTORIES[name], src.line(node))
    return found
