"""Flow offload: Python decides a connection once, the kernel applies it to the rest.

A handler declared ``flow=True`` (``@policy.input(proto="tcp", dport=80, flow=True)``) promises
that its decision depends only on what every packet of one direction of a connection shares:
addresses, ports, protocol, interfaces. Then the first packet it accepts is the only one it
needs to see; later packets of that connection skip userspace entirely.

How one connection is offloaded (rules compiled here, called from rules.compile_policy):

1. The flow handler returns ``accept()`` for a packet. The engine sets ``action=flowsave`` and
   the ``resume`` field to the handler's position in the mark, and answers NF_REPEAT: the same
   table re-runs (as for connmark), so the packet is still in the hook where it was queued.
2. A rule at the top of ``NFH-<HOOK>`` sends it (``-g``) to ``NFH-FLOW-<HOOK>``, which writes
   the decision into the **connmark**, always masked (``CONNMARK --set-xmark value/mask``: the
   user's bits and every other field are untouched):

   * if the connmark's ``flowgen`` field is not this engine's flow generation, every earlier
     decision is forgotten: ``flowgen := generation`` and every ``flow:*`` field := 0;
   * the field of this hook and direction (``-m conntrack --ctdir ORIGINAL|REPLY``) := the
     handler's ordinal among the flow handlers of the hook (1..k);
   * action and resume are cleared from the packet mark, and the packet is ACCEPTed.
3. Right before the handler's queue rule, two *offload rules* -- the handler's own kernel
   match plus ``-m conntrack --ctdir D -m connmark --mark <generation|ordinal>/<flowgen|field>``
   -- ACCEPT the later packets of the connection in that direction. They sit at the handler's
   position, so every handler before it (a payload inspector, say) still sees every packet,
   and only the handler that accepted the connection is skipped (the ordinal names it).

The connmark is shared by both directions and all hooks, hence one field per (hook,
direction) -- ``flow:<HOOK>:orig`` / ``flow:<HOOK>:reply``, wide enough for the hook's flow
handlers -- and allocated only for hooks that have flow handlers (marks.py, via ``extra``).

**Generations.** ``flowgen`` (3 bits, values 1..7) changes with every engine start (and must
change with every reload): ``next_flow_generation`` keeps a counter in
``/run/nfhooks/flow-generation-netns-<inode>``. A connection decided by an earlier engine
carries another generation, so its next packet goes to Python again and is re-decided by the
policy loaded now. A connection idle through exactly 7 restarts would match again; that is the
price of 3 bits.

**Drops are not remembered.** A packet dropped at its connection's first hook never creates a
conntrack entry (conntrack confirms an entry only when the first packet leaves the stack
alive), so there is no connmark to write a "drop" into. Only ``accept()`` is offloaded;
``drop()``/``reject()`` from a flow handler are applied per packet as usual, so each retry of a
refused connection (SYN retransmissions: a handful, spaced by backoff) asks Python again.
A fall-through (``None``) is not offloaded either: the packet resumes in the kernel after the
handler, exactly as without ``flow=True``.

**The general form** is a connection verdict (nfhooks/connverdict.py): any handler -- one that
reads the payload included, without ``flow=True`` -- returns ``accept(connection=True)``,
``drop(connection=True)`` or ``reject(connection=True)``; it shares this module's ``flowgen``
generation, and a drop decided on a later packet than the first sticks in the kernel.

**What is refused** (at load time, with file:line): flow handlers in the raw table (no
conntrack yet), with a ``ctstate`` or ``mark`` match (per-packet facts), returning mark,
connmark, NAT or mangle verdicts (a rewrite or mark must be applied to every packet; NAT is
already decided once per connection by the kernel's nat table), returning a connection verdict
(both decide the connection: use that one alone), or reading per-packet fields of ``pkt``
(payload, scapy, tcp_flags, ttl, length, mark, ...).

Metrics: ``nfhooks_offloaded_flows_total{hook,handler}`` (connections the engine handed to the
kernel, counted in Python) and ``nfhooks_offloaded_packets_total{hook,handler}`` (packets that
skipped Python: the offload rules' kernel counters, read at scrape time); ``nfhooks rules``
shows the same counters per rule.
"""

from __future__ import annotations

import ast
import fcntl
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .features.offload_decl import (  # noqa: F401 -- re-exported: nfhooks.offload keeps its names
    PER_PACKET_FIELDS, REFUSED_KINDS, FlowError, check_flow, per_packet_reads,
)
from . import connverdict
from .hooks import HOOKS
from .marks import ACTION_FLOWSAVE, MarkLayout, bits_for
from .owner import LOCK_DIR, netns_id
from .rulebuild import COMMENT, MatchSpec, Rule, chain_name, comment, mark, match_specs, proto_name, xmark

if TYPE_CHECKING:
    from .policy import Handler, Policy
    from .rulebuild import RuleSet

__all__ = ["reads_connmark", "connmark_restore_rule", "FLOW_GEN_BITS", "FLOW_GENERATIONS", "GEN_FIELD", "DIRECTIONS", "PER_PACKET_FIELDS", "REFUSED_KINDS",
           "FlowError", "check_flow", "per_packet_reads", "flow_handlers", "field_name", "layout_fields", "ordinals",
           "all_flow_mask", "save_chain", "save_jump", "offload_rules", "save_rules", "add_to_ruleset",
           "next_flow_generation", "FlowOffload", "add_counters", "OffloadCollector"]

FLOW_GEN_BITS = 3
FLOW_GENERATIONS = (1 << FLOW_GEN_BITS) - 1  # 1..7; 0 = never decided
GEN_FIELD = "flowgen"
DIRECTIONS = (("ORIGINAL", "orig"), ("REPLY", "reply"))

def flow_handlers(handlers: Iterable["Handler"]) -> list["Handler"]:
    return [h for h in handlers if getattr(h, "flow", False)]


def field_name(hook: str, direction: str) -> str:
    return f"flow:{hook}:{direction}"


def layout_fields(policy: "Policy") -> list[tuple[str, int]]:
    """The mark fields flow offload and connection verdicts need (``extra`` of
    marks.core_layout); [] without flow handlers or connection verdicts.

    They live in the connmark only (the packet mark never carries the flow fields), but share
    the layout so they never overlap the user's bits or another nfhooks field.
    """
    flows, conns = flow_handlers(policy.handlers), connverdict.layout_fields(policy)
    if not flows and not conns:
        return []
    out = [(GEN_FIELD, FLOW_GEN_BITS)]
    for hook in HOOKS:
        k = sum(1 for h in flows if h.hook == hook)
        if k:
            out += [(field_name(hook, d), bits_for(k)) for _, d in DIRECTIONS]
    return out + conns


def ordinals(policy: "Policy") -> dict[str, int]:
    """handler name -> its number among the flow handlers of its hook (1..k)."""
    out: dict[str, int] = {}
    for hook in HOOKS:
        for i, h in enumerate((h for h in flow_handlers(policy.handlers) if h.hook == hook), 1):
            out[h.name] = i
    return out


def all_flow_mask(layout: MarkLayout) -> int:
    mask = 0
    for name, f in layout.fields.items():
        if name == GEN_FIELD or name.startswith(("flow:", connverdict.FIELD_PREFIX)):
            mask |= f.mask
    return mask


# --------------------------------------------------------------------------- rules


def save_chain(hook: str, generation: int) -> str:
    return chain_name(f"FLOW-{hook}", generation)


def save_jump(chain: str, hook: str, layout: MarkLayout, generation: int) -> Rule:
    """Top of NFH-<HOOK>: a packet a flow handler accepted goes to NFH-FLOW-<HOOK>."""
    act = layout["action"]
    return Rule(chain, save_chain(hook, generation), goto=True, matches=(
        mark(act.encode(ACTION_FLOWSAVE), act.mask), comment(f"{COMMENT} flowsave")))


def offload_rules(chain: str, h: "Handler", family: int, layout: MarkLayout, guard: int,
                  ordinal: int, flow_generation: int) -> list[Rule]:
    """Before the flow handler's queue rule: its kernel match + the connmark says 'decided'."""
    g = layout[GEN_FIELD]
    m = h.match
    out = []
    for ctdir, d in DIRECTIONS:
        f = layout[field_name(h.hook, d)]
        value, mask = g.encode(flow_generation) | f.encode(ordinal), g.mask | f.mask
        out.append(Rule(
            chain, "ACCEPT", src=m.src, dst=m.dst, iif=m.iif, oif=m.oif, proto=proto_name(m.proto, family),
            matches=(*match_specs(m, family, state=False), MatchSpec("conntrack", (("ctdir", ctdir, False),)),
                     MatchSpec("connmark", (("mark", f"{value:#x}/{mask:#x}", False),)), mark(0, guard),
                     comment(f"{COMMENT} offload {h.name}"))))
    return out


def reads_connmark(h: "Handler") -> bool:
    """Whether the handler's source reads ``.connmark`` (pkt.connmark): then its packets get the
    connection's user bits restored into their mark before they are queued."""
    return any(isinstance(n, ast.Attribute) and n.attr == "connmark" and isinstance(n.ctx, ast.Load)
               for n in h.source.walk())


def connmark_restore_rule(chain: str, h: "Handler", family: int, layout: MarkLayout, guard: int) -> Rule:
    """Before the queue rule of a handler that reads pkt.connmark: ``CONNMARK --restore-mark``
    of the user bits only (NetfilterQueue 1.1.0 does not pass the conntrack mark up, so the
    packet mark carries it): the packets this handler sees have ``pkt.mark == pkt.connmark``.
    The handler's match without its kernel-state parts (no token spent here), and never on a
    resumed or nfhooks' own packet."""
    m, user = h.match, layout.user_mask
    return Rule(chain, "CONNMARK", (("restore-mark", ""), ("nfmask", f"{user:#x}"), ("ctmask", f"{user:#x}")),
                src=m.src, dst=m.dst, iif=m.iif, oif=m.oif, proto=proto_name(m.proto, family),
                matches=(*match_specs(m, family, state=False), mark(0, guard),
                         comment(f"{COMMENT} restore {h.name}")))


def save_rules(hook: str, handlers: list["Handler"], layout: MarkLayout, positions: dict[str, int],
               ords: dict[str, int], generation: int, flow_generation: int) -> list[Rule]:
    """NFH-FLOW-<HOOK> in one (family, table): write the decision into the connmark, accept."""
    chain = save_chain(hook, generation)
    g, act, res = layout[GEN_FIELD], layout["action"], layout["resume"]
    mine = g.encode(flow_generation)
    out = [Rule(chain, "CONNMARK", xmark(mine, all_flow_mask(layout)), matches=(
        MatchSpec("connmark", (("mark", f"{mine:#x}/{g.mask:#x}", True),)),
        comment(f"{COMMENT} flow generation")))]
    for h in handlers:
        for ctdir, d in DIRECTIONS:
            f = layout[field_name(hook, d)]
            # only where the field is still empty: this rule's counter counts connections, once
            out.append(Rule(chain, "CONNMARK", xmark(f.encode(ords[h.name]), f.mask), matches=(
                mark(res.encode(positions[h.name]), res.mask),
                MatchSpec("conntrack", (("ctdir", ctdir, False),)),
                MatchSpec("connmark", (("mark", f"0x0/{f.mask:#x}", False),)),
                comment(f"{COMMENT} flowsave {h.name}"))))
    out.append(Rule(chain, "MARK", xmark(0, act.mask | res.mask), matches=(comment(COMMENT),)))
    out.append(Rule(chain, "ACCEPT", matches=(comment(COMMENT),)))
    return out


def add_to_ruleset(rs: "RuleSet", policy: "Policy", flow_generation: int) -> None:
    """Add NFH-FLOW-<HOOK> to every (family, table) whose NFH-<HOOK> jumps to it."""
    positions, ords = rs.positions, ordinals(policy)
    for (fam, table), rules in rs.rules.items():
        for hook in HOOKS:
            chain = save_chain(hook, rs.generation)
            if not any(r.target == chain for r in rules):
                continue
            hs = [h for h in flow_handlers(policy.handlers)
                  if h.hook == hook and h.table == table and fam in h.match.families()]
            rs.chains[(fam, table)].append(chain)
            rules.extend(save_rules(hook, hs, rs.layout, positions, ords, rs.generation, flow_generation))


# --------------------------------------------------------------------------- engine side


def next_flow_generation(run_dir: str | None = None) -> int:
    """The flow generation for an engine starting (or reloading) now: 1..7, never the last one.

    A counter in ``<run_dir>/flow-generation-netns-<inode>`` (``/run`` is shared by every
    namespace, hence the inode), under an flock. Without it (first start since boot, or /run
    not writable) a random generation: /run is a tmpfs, so after a reboot there is no
    conntrack entry left from before anyway.
    """
    d = run_dir or LOCK_DIR
    try:
        os.makedirs(d, exist_ok=True)
        fd = os.open(os.path.join(d, f"flow-generation-netns-{netns_id()}"), os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:
        return random.randint(1, FLOW_GENERATIONS)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            prev = int(os.pread(fd, 16, 0).decode().strip() or "0")
        except ValueError:
            prev = 0
        gen = prev % FLOW_GENERATIONS + 1 if 1 <= prev <= FLOW_GENERATIONS else random.randint(1, FLOW_GENERATIONS)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{gen}\n".encode(), 0)
        return gen
    finally:
        os.close(fd)


class FlowOffload:
    """What the engine needs per flow handler, and the counts behind the offload metrics.

    ``save(handler)`` gives (bits to set, mask to clear) for the dispatcher: the mark a flow
    handler's accept carries back into the table. Both metrics come from kernel rule counters
    at scrape time (the backend's ``iptables-save -c`` in the engine's namespace, cached for a
    second; ``saved`` returns both families' text: the engine passes its backend's ``counter_texts``;
    None, as in a worker, which exports no offload metrics: no counters): flows from the ``flowsave`` rules, which fire once per connection and direction
    (only while the connmark field is empty: packets of a connection already queued when its
    first verdict came back are accepted and saved again, but not counted twice), packets
    from the ``offload`` rules (a GSO/GRO aggregate counts once there, as in ``nfhooks rules``).
    """

    def __init__(self, rs: "RuleSet", policy: "Policy", saved: Callable[[], list[str]] | None = None) -> None:
        self.saved = saved
        self.layout = rs.layout
        self.positions = dict(rs.positions)
        self.generation = rs.flow_generation
        self.handlers = {h.name: h for h in flow_handlers(policy.handlers)}
        self.conn_handlers = {h.name: h for h in connverdict.conn_handlers(policy.handlers)}
        self._lock = threading.Lock()
        self._cache: tuple[float, dict[str, dict[tuple[str, ...], int]]] = (-1e9, {})

    def save(self, handler: "Handler") -> tuple[int, int] | None:
        if handler.name not in self.handlers:
            return None
        act, res = self.layout["action"], self.layout["resume"]
        bits = act.encode(ACTION_FLOWSAVE) | res.encode(self.positions[handler.name])
        return bits, ~(act.mask | res.mask) & 0xFFFFFFFF

    def connection(self, handler: "Handler") -> dict[str, tuple[int, int]] | None:
        """{verdict kind: (bits, mask to keep)} of ``handler``'s connection verdicts
        (connverdict.packet_bits); None when its source returns none (no rules for it)."""
        if handler.name not in self.conn_handlers:
            return None
        return connverdict.packet_bits(self.layout, handler, self.positions[handler.name])

    def counters(self) -> dict[str, dict[tuple[str, ...], int]]:
        """{"offload": packets, "flowsave": flows} per (hook, handler), both families, all tables;
        {"conn": connections} per (hook, handler, verdict), {"connpkts": packets} per (hook, verdict)."""
        with self._lock:
            t, cached = self._cache
            if time.monotonic() - t < 1.0:
                return cached
            out: dict[str, dict[tuple[str, ...], int]] = {
                kind: {(h.hook, h.name): 0 for h in self.handlers.values()} for kind in ("offload", "flowsave")}
            hs = self.conn_handlers.values()
            out["conn"] = {(h.hook, h.name, k): 0 for h in hs for k in connverdict.kinds(h)}
            out["connpkts"] = {(h.hook, k): 0 for h in hs for k in connverdict.kinds(h)}
            for text in (self.saved() if self.saved is not None else ()):
                add_counters(out, text, self.handlers)
                connverdict.add_counters(out["conn"], out["connpkts"], text, self.conn_handlers)
            self._cache = (time.monotonic(), out)
            return out


def add_counters(out: dict[str, dict[tuple[str, ...], int]], saved: str, handlers: dict[str, "Handler"]) -> None:
    """Add the packet counters of ``nfhooks offload|flowsave <handler>`` rules in
    ``iptables-save -c`` text to ``out[kind][(hook, handler)]``."""
    from .saved import counted_rules  # TODO(issue 14): top level once saved.py imports rulebuild, not rules

    for rule in counted_rules(saved):
        for kind in ("offload", "flowsave"):
            tag = f'--comment "nfhooks {kind} '
            i = rule.text.find(tag)
            if i < 0:
                continue
            h = handlers.get(rule.text[i + len(tag):].split('"', 1)[0])
            if h is not None:
                key = (h.hook, h.name)
                out[kind][key] = out[kind].get(key, 0) + rule.packets


class OffloadCollector:
    """``nfhooks_offloaded_flows_total`` and ``nfhooks_offloaded_packets_total`` {hook, handler},
    ``nfhooks_connection_verdicts_total`` {hook, handler, verdict} and
    ``nfhooks_connection_verdict_packets_total`` {hook, verdict}, for the engine's current
    FlowOffload (``current()``; None: nothing to export). Like the kernel counters they come
    from, they restart at 0 with a new rule set (restart, reload)."""

    def __init__(self, current: Any) -> None:
        self.current = current

    @staticmethod
    def _families() -> tuple[Any, Any, Any, Any]:
        from prometheus_client.core import CounterMetricFamily
        return (CounterMetricFamily("nfhooks_offloaded_flows",
                                    "Connections (per direction) a flow handler accepted and handed to "
                                    "the kernel: their later packets skip Python.", labels=["hook", "handler"]),
                CounterMetricFamily("nfhooks_offloaded_packets",
                                    "Packets accepted by nfhooks' offload rules in the kernel (never "
                                    "queued), from the rules' counters.", labels=["hook", "handler"]),
                CounterMetricFamily("nfhooks_connection_verdicts",
                                    "Connections a handler decided with a connection verdict "
                                    "(accept/drop/reject(connection=True)), from the kernel's save rules.",
                                    labels=["hook", "handler", "verdict"]),
                CounterMetricFamily("nfhooks_connection_verdict_packets",
                                    "Later packets of such connections the kernel accepted, dropped or "
                                    "rejected by itself (never queued), from the rules' counters.",
                                    labels=["hook", "verdict"]))

    def describe(self) -> Iterator[Any]:
        return iter(self._families())

    def collect(self) -> Iterator[Any]:
        flows, packets, conns, conn_packets = self._families()
        off = self.current()
        if off is not None:
            c = off.counters()
            for (hook, name), n in c["flowsave"].items():
                flows.add_metric([hook, name], n)
            for (hook, name), n in c["offload"].items():
                packets.add_metric([hook, name], n)
            for (hook, name, verdict), n in c.get("conn", {}).items():
                conns.add_metric([hook, name, verdict], n)
            for (hook, verdict), n in c.get("connpkts", {}).items():
                conn_packets.add_metric([hook, verdict], n)
        yield flows
        yield packets
        yield conns
        yield conn_packets
