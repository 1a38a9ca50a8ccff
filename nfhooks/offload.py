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

**What is refused** (at load time, with file:line): flow handlers in the raw table (no
conntrack yet), with a ``ctstate`` or ``mark`` match (per-packet facts), returning mark,
connmark, NAT or mangle verdicts (a rewrite or mark must be applied to every packet; NAT is
already decided once per connection by the kernel's nat table), or reading per-packet fields
of ``pkt`` (payload, scapy, tcp_flags, ttl, length, mark, ...).

Metrics: ``nfhooks_offloaded_flows_total{hook,handler}`` (connections the engine handed to the
kernel, counted in Python) and ``nfhooks_offloaded_packets_total{hook,handler}`` (packets that
skipped Python: the offload rules' kernel counters, read at scrape time); ``nfhooks rules``
shows the same counters per rule.
"""

from __future__ import annotations

import ast
import inspect
import os
import random
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .hooks import HOOKS
from .marks import ACTION_FLOWSAVE, MarkLayout, bits_for

if TYPE_CHECKING:
    from .match import Match
    from .policy import Handler, Policy
    from .rules import Rule, RuleSet

FLOW_GEN_BITS = 3
FLOW_GENERATIONS = (1 << FLOW_GEN_BITS) - 1  # 1..7; 0 = never decided
GEN_FIELD = "flowgen"
DIRECTIONS = (("ORIGINAL", "orig"), ("REPLY", "reply"))

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


class FlowError(ValueError):
    """flow=True combined with something that cannot work; ``line`` points at the cause."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


# --------------------------------------------------------------------------- load time


def check_flow(func: Any, hook: str, table: str, match: "Match", kinds: dict[str, int]) -> None:
    """Refuse a flow handler that cannot be offloaded (FlowError, with the line to blame)."""
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
    read = per_packet_reads(func)
    if read:
        attr, line = read[0]
        raise FlowError(f"reads pkt.{attr} with flow=True: that differs from packet to packet, and a "
                        "flow handler decides the whole connection from its first packet (use only "
                        "src, dst, sport, dport, proto, version, iif, oif); drop flow=True to see "
                        "every packet", line)


def per_packet_reads(func: Any) -> list[tuple[str, int]]:
    """(attribute, file line) of each per-packet field the handler reads from its argument."""
    try:
        lines, start = inspect.getsourcelines(func)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return []
    fn = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if fn is None or not fn.args.args:
        return []
    arg = fn.args.args[0].arg
    found = []
    for node in ast.walk(fn):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == arg and node.attr in PER_PACKET_FIELDS):
            found.append((node.attr, start + node.lineno - 1))
    return sorted(found, key=lambda x: x[1])


def flow_handlers(handlers: Iterable["Handler"]) -> list["Handler"]:
    return [h for h in handlers if getattr(h, "flow", False)]


def field_name(hook: str, direction: str) -> str:
    return f"flow:{hook}:{direction}"


def layout_fields(policy: "Policy") -> list[tuple[str, int]]:
    """The mark fields flow offload needs (``extra`` of marks.core_layout); [] without flow handlers.

    They live in the connmark only (the packet mark never carries them), but share the layout
    so they never overlap the user's bits or another nfhooks field.
    """
    flows = flow_handlers(policy.handlers)
    if not flows:
        return []
    out = [(GEN_FIELD, FLOW_GEN_BITS)]
    for hook in HOOKS:
        k = sum(1 for h in flows if h.hook == hook)
        if k:
            out += [(field_name(hook, d), bits_for(k)) for _, d in DIRECTIONS]
    return out


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
        if name == GEN_FIELD or name.startswith("flow:"):
            mask |= f.mask
    return mask


# --------------------------------------------------------------------------- rules


def save_chain(hook: str, generation: int) -> str:
    from .rules import chain_name
    return chain_name(f"FLOW-{hook}", generation)


def save_jump(chain: str, hook: str, layout: MarkLayout, generation: int) -> "Rule":
    """Top of NFH-<HOOK>: a packet a flow handler accepted goes to NFH-FLOW-<HOOK>."""
    from .rules import COMMENT, Rule, _comment, _mark
    act = layout["action"]
    return Rule(chain, save_chain(hook, generation), goto=True, matches=(
        _mark(act.encode(ACTION_FLOWSAVE), act.mask), _comment(f"{COMMENT} flowsave")))


def offload_rules(chain: str, h: "Handler", family: int, layout: MarkLayout, guard: int,
                  ordinal: int, flow_generation: int) -> list["Rule"]:
    """Before the flow handler's queue rule: its kernel match + the connmark says 'decided'."""
    from .rules import COMMENT, MatchSpec, Rule, _comment, _mark, _match_specs, proto_name
    g = layout[GEN_FIELD]
    m = h.match
    out = []
    for ctdir, d in DIRECTIONS:
        f = layout[field_name(h.hook, d)]
        value, mask = g.encode(flow_generation) | f.encode(ordinal), g.mask | f.mask
        out.append(Rule(
            chain, "ACCEPT", src=m.src, dst=m.dst, iif=m.iif, oif=m.oif, proto=proto_name(m.proto, family),
            matches=(*_match_specs(m, family, layout), MatchSpec("conntrack", (("ctdir", ctdir, False),)),
                     MatchSpec("connmark", (("mark", f"{value:#x}/{mask:#x}", False),)), _mark(0, guard),
                     _comment(f"{COMMENT} offload {h.name}"))))
    return out


def save_rules(hook: str, handlers: list["Handler"], layout: MarkLayout, positions: dict[str, int],
               ords: dict[str, int], generation: int, flow_generation: int) -> list["Rule"]:
    """NFH-FLOW-<HOOK> in one (family, table): write the decision into the connmark, accept."""
    from .rules import COMMENT, MatchSpec, Rule, _comment, _mark, _xmark
    chain = save_chain(hook, generation)
    g, act, res = layout[GEN_FIELD], layout["action"], layout["resume"]
    mine = g.encode(flow_generation)
    out = [Rule(chain, "CONNMARK", _xmark(mine, all_flow_mask(layout)), matches=(
        MatchSpec("connmark", (("mark", f"{mine:#x}/{g.mask:#x}", True),)),
        _comment(f"{COMMENT} flow generation")))]
    for h in handlers:
        for ctdir, d in DIRECTIONS:
            f = layout[field_name(hook, d)]
            # only where the field is still empty: this rule's counter counts connections, once
            out.append(Rule(chain, "CONNMARK", _xmark(f.encode(ords[h.name]), f.mask), matches=(
                _mark(res.encode(positions[h.name]), res.mask),
                MatchSpec("conntrack", (("ctdir", ctdir, False),)),
                MatchSpec("connmark", (("mark", f"0x0/{f.mask:#x}", False),)),
                _comment(f"{COMMENT} flowsave {h.name}"))))
    out.append(Rule(chain, "MARK", _xmark(0, act.mask | res.mask), matches=(_comment(COMMENT),)))
    out.append(Rule(chain, "ACCEPT", matches=(_comment(COMMENT),)))
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
    from .owner import LOCK_DIR, netns_id
    import fcntl

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
    second; ``saved`` returns both families' text, default: the $NFHOOKS_BACKEND backend's): flows from the ``flowsave`` rules, which fire once per connection and direction
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
        self._lock = threading.Lock()
        self._cache: tuple[float, dict[str, dict[tuple[str, str], int]]] = (-1e9, {})

    def save(self, handler: "Handler") -> tuple[int, int] | None:
        if handler.name not in self.handlers:
            return None
        act, res = self.layout["action"], self.layout["resume"]
        bits = act.encode(ACTION_FLOWSAVE) | res.encode(self.positions[handler.name])
        return bits, ~(act.mask | res.mask) & 0xFFFFFFFF

    def counters(self) -> dict[str, dict[tuple[str, str], int]]:
        """{"offload": packets, "flowsave": flows} per (hook, handler), both families, all tables."""
        with self._lock:
            t, cached = self._cache
            if time.monotonic() - t < 1.0:
                return cached
            out: dict[str, dict[tuple[str, str], int]] = {
                kind: {(h.hook, h.name): 0 for h in self.handlers.values()} for kind in ("offload", "flowsave")}
            saved = self.saved
            if saved is None:
                from .backends import get_backend
                saved = get_backend().counter_texts
            for text in saved():
                add_counters(out, text, self.handlers)
            self._cache = (time.monotonic(), out)
            return out


def add_counters(out: dict[str, dict[tuple[str, str], int]], saved: str, handlers: dict[str, "Handler"]) -> None:
    """Add the packet counters of ``nfhooks offload|flowsave <handler>`` rules in
    ``iptables-save -c`` text to ``out[kind][(hook, handler)]``."""
    from .saved import counted_rules

    for rule in counted_rules(saved):
        for kind in out:
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
    for the engine's current FlowOffload (``current()``; None: nothing to export). Like the
    kernel counters they come from, they restart at 0 with a new rule set (restart, reload)."""

    def __init__(self, current: Any) -> None:
        self.current = current

    @staticmethod
    def _families() -> tuple[Any, Any]:
        from prometheus_client.core import CounterMetricFamily
        return (CounterMetricFamily("nfhooks_offloaded_flows",
                                    "Connections (per direction) a flow handler accepted and handed to "
                                    "the kernel: their later packets skip Python.", labels=["hook", "handler"]),
                CounterMetricFamily("nfhooks_offloaded_packets",
                                    "Packets accepted by nfhooks' offload rules in the kernel (never "
                                    "queued), from the rules' counters.", labels=["hook", "handler"]))

    def describe(self) -> Iterator[Any]:
        return iter(self._families())

    def collect(self) -> Iterator[Any]:
        flows, packets = self._families()
        off = self.current()
        if off is not None:
            c = off.counters()
            for (hook, name), n in c["flowsave"].items():
                flows.add_metric([hook, name], n)
            for (hook, name), n in c["offload"].items():
                packets.add_metric([hook, name], n)
        yield flows
        yield packets
