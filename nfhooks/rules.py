"""Compile a policy into the iptables rules nfhooks owns (pure: no root, no python-iptables).

One chain per (family, table, hook), named ``NFH-<HOOK>``, jumped to from the top of the
built-in chain by a rule tagged with the comment ``nfhooks``. Inside a chain, in order:

1. *action rules*: act on packets that come back from the queue (NF_REPEAT) or from an
   earlier table carrying an nfhooks action in the mark -- REJECT (filter only) and
   "save the connmark, then accept";
2. per handler, in declaration order, the *queue rule*: the handler's match compiled to
   iptables matches, plus ``mark 0/(resume|self)`` so a resumed packet skips it and
   nfhooks' own packets never queue; then a *resume rule* that clears the resume index once
   the packet has passed the handler that fell through (returned None). This gives exact
   kernel semantics for fall-through, including matches Python cannot see (conntrack state);
3. the hook's *default* verdict, in the hook's decision table (filter, or mangle where filter
   does not exist), when it is not accept.

NAT: a handler whose source calls dnat/snat/masquerade/redirect is queued from mangle, and
its queue rule gets ``-m conntrack --ctstate NEW`` unless the handler matches a ctstate
itself: the kernel's nat table looks only at a connection's first packet, so later packets
would ask Python for nothing. The verdict writes a target index into the ``nat`` mark field
and accepts; the nat table, later at the same hook, runs ``NFH-<HOOK>`` there, whose rules
``-m mark --mark <index>/<nat mask> -j DNAT ...`` are added by the engine as targets appear
(nat.py; ``nat_rule`` below builds them). The nat bits are left on the packet: each index
belongs to one (family, hook, target), so no other nat rule can match them again.

``render()`` prints the rule set in the exact format of ``iptables-legacy-save``, so
``nfhooks check`` shows precisely what ``nfhooks run`` installs (a kernel test compares them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from .hooks import HOOKS, TABLE_ORDER, decision_table
from .marks import (
    ACTION_CONNSAVE, ACTION_REJECT, ACTION_REJECT_ADMIN, ACTION_REJECT_HOST,
    DEFAULT_MARK_MASK, DEFAULT_NAT_TARGETS, GENERATIONS, MarkLayout, bits_for, core_layout,
)
from .match import Addr, Iface, Match, Ports
from .policy import Handler, Policy, PolicyError
from .verdict import NAT_KINDS, Drop, Nat, Reject, Verdict

COMMENT = "nfhooks"
CHAIN_PREFIX = "NFH-"
CONNSAVE_CHAIN = "NFH-CONNSAVE"
FAMILIES = (4, 6)
MAX_QUEUE = 65535

Opt = tuple[str, str, bool]  # option, value ("" for a flag), negated


@dataclass(frozen=True)
class MatchSpec:
    module: str
    opts: tuple[Opt, ...]


@dataclass(frozen=True)
class Rule:
    """One iptables rule, in the shape both python-iptables and iptables-save use."""

    chain: str
    target: str
    target_opts: tuple[tuple[str, str], ...] = ()
    src: Addr | None = None
    dst: Addr | None = None
    iif: Iface | None = None
    oif: Iface | None = None
    proto: str | None = None
    matches: tuple[MatchSpec, ...] = ()
    goto: bool = False

    def render(self) -> str:
        out = [f"-A {self.chain}"]
        for flag, a in (("-s", self.src), ("-d", self.dst)):
            if a is not None:
                out.append(f"{'! ' if a.negate else ''}{flag} {a.text()}")
        for flag, i in (("-i", self.iif), ("-o", self.oif)):
            if i is not None:
                out.append(f"{'! ' if i.negate else ''}{flag} {i.name}")
        if self.proto:
            out.append(f"-p {self.proto}")
        for m in self.matches:
            out.append(f"-m {m.module}")
            for opt, value, neg in m.opts:
                val = save_string(value) if m.module == "comment" else value
                out.append(f"{'! ' if neg else ''}--{opt}{' ' + val if val else ''}")
        out.append(f"{'-g' if self.goto else '-j'} {self.target}")
        for opt, value in self.target_opts:
            out.append(f"--{opt}{' ' + value if value else ''}")
        return " ".join(out)

    @property
    def comment(self) -> str | None:
        for m in self.matches:
            if m.module == "comment":
                return m.opts[0][1]
        return None


def save_string(value: str) -> str:
    """Quote like iptables' xtables_save_string(), so rendered text equals iptables-save."""
    plain = set("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    if value and all(c in plain for c in value):
        return value
    return '"' + "".join("\\" + c if c in "\"\\'" else c for c in value) + '"'


def _comment(text: str) -> MatchSpec:
    return MatchSpec("comment", (("comment", text, False),))


def _mark(value: int, mask: int, negate: bool = False) -> MatchSpec:
    text = f"{value:#x}" if mask == 0xFFFFFFFF else f"{value:#x}/{mask:#x}"
    return MatchSpec("mark", (("mark", text, negate),))


def _xmark(value: int, mask: int) -> tuple[tuple[str, str], ...]:
    return (("set-xmark", f"{value:#x}/{mask:#x}"),)


def chain_name(hook: str, generation: int = 1) -> str:
    """``NFH-<HOOK>`` for generation 1, ``NFH-<HOOK>-2`` for generation 2 (hot reload)."""
    return CHAIN_PREFIX + hook + ("" if generation == 1 else f"-{generation}")


def generation_rules(chain: str, layout: MarkLayout, generation: int) -> list[Rule]:
    """The first two rules of every chain: stamp an unstamped packet with this generation,
    then return anything stamped by the other one.

    During a hot reload both generations' chains are installed, the new one jumped to first;
    a packet is stamped by the first nfhooks chain it meets and ignored by every chain of the
    other generation at this and every later hook, so no packet is decided by both policies,
    and one the old generation already holds (queued, or repeated from its queue) finishes
    there. ``retire_rules`` then stops the old chains from stamping anything new.
    """
    g = layout["gen"]
    mine = g.encode(generation)
    return [Rule(chain, "MARK", _xmark(mine, g.mask), matches=(_mark(0, g.mask), _comment(f"{COMMENT} gen"))),
            Rule(chain, "RETURN", matches=(_mark(mine, g.mask, negate=True), _comment(f"{COMMENT} gen")))]


@dataclass
class RuleSet:
    """Everything nfhooks will install for one policy, per (family, table)."""

    layout: MarkLayout
    rules: dict[tuple[int, str], list[Rule]] = field(default_factory=dict)
    chains: dict[tuple[int, str], list[str]] = field(default_factory=dict)
    jumps: dict[tuple[int, str], list[Rule]] = field(default_factory=dict)
    queues: dict[int, Handler] = field(default_factory=dict)
    fail_open: dict[str, bool] = field(default_factory=dict)
    defaults: dict[str, Verdict] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)  # handler name -> resume index
    nat_targets: int = 0  # bound on distinct NAT targets (0: the policy does no NAT)
    generation: int = 1  # 1 or 2: chain names and the gen stamp (rules.generation_rules)
    flow_generation: int = 0  # connmark generation of flow offload (offload.py); 0: no flow handlers
    routeshape: Any = None  # routing.RouteShape when the policy routes or shapes (routing.compile_rules)

    def chain(self, hook: str) -> str:
        return chain_name(hook, self.generation)

    def tables(self) -> list[tuple[int, str]]:
        return [(f, t) for f in FAMILIES for t in TABLE_ORDER if (f, t) in self.chains]

    def render(self, families: Iterable[int] = FAMILIES) -> str:
        """iptables-save text of our chains and jumps, per family (``# ipv4`` / ``# ipv6``)."""
        lines: list[str] = []
        for fam in families:
            lines.append(f"# ip{'6' if fam == 6 else ''}tables")
            for f, t in self.tables():
                if f != fam:
                    continue
                lines.append(f"*{t}")
                lines.extend(f":{c} - [0:0]" for c in self.chains[(f, t)])
                lines.extend(r.render() for r in self.jumps[(f, t)])
                for chain in self.chains[(f, t)]:  # iptables-save order: user chains sorted
                    lines.extend(r.render() for r in self.rules[(f, t)] if r.chain == chain)
                lines.append("COMMIT")
        return "\n".join(lines) + "\n"


def proto_name(proto: str | None, family: int) -> str | None:
    if proto == "icmpv6" and family == 6:
        return "ipv6-icmp"
    return proto


def _match_specs(m: Match, family: int, layout: MarkLayout, new_only: bool = False) -> list[MatchSpec]:
    specs: list[MatchSpec] = []
    simple: list[Opt] = []
    multi: list[MatchSpec] = []
    for name, ports in (("sport", m.sport), ("dport", m.dport)):
        if ports is None:
            continue
        if ports.simple:
            simple.append((name, ports.text(), ports.negate))
        else:
            multi.append(MatchSpec("multiport", ((name + "s", ports.text(), ports.negate),)))
    if simple:
        specs.append(MatchSpec(m.proto or "tcp", tuple(simple)))
    specs.extend(multi)
    if m.ctstate is not None:
        specs.append(MatchSpec("conntrack", (("ctstate", ",".join(m.ctstate), False),)))
    elif new_only:
        specs.append(MatchSpec("conntrack", (("ctstate", "NEW", False),)))
    if m.mark is not None:
        v, mask, neg = m.mark
        specs.append(_mark(v, mask, neg))
    return specs


def _check_user_mark(h: Handler, layout: MarkLayout) -> None:
    if h.match.mark is not None and h.match.mark[1] & layout.mask:
        raise PolicyError(
            f"handler {h.name!r} matches mark bits {h.match.mark[1] & layout.mask:#x} that belong to "
            f"nfhooks (--mark-mask {layout.mask:#x}); match only bits in {layout.user_mask:#x}, or move "
            "nfhooks' bits with --mark-mask", h.file, h.line)


def _reject_rules(chain: str, family: int, layout: MarkLayout) -> list[Rule]:
    act = layout["action"]
    icmp = "icmp6" if family == 6 else "icmp"
    unreach = {ACTION_REJECT: f"{icmp}-port-unreachable",
               ACTION_REJECT_ADMIN: f"{icmp}-adm-prohibited" if family == 6 else "icmp-admin-prohibited",
               ACTION_REJECT_HOST: f"{icmp}-addr-unreachable" if family == 6 else "icmp-host-unreachable"}
    out = [Rule(chain, "REJECT", (("reject-with", "tcp-reset"),), proto="tcp",
                matches=(_mark(act.encode(ACTION_REJECT), act.mask), _comment(f"{COMMENT} reject")))]
    for code, with_ in unreach.items():
        out.append(Rule(chain, "REJECT", (("reject-with", with_),),
                        matches=(_mark(act.encode(code), act.mask), _comment(f"{COMMENT} reject"))))
    return out


def reject_action(v: Reject, is_tcp: bool) -> int:
    """The action code for a reject verdict (tcp-reset needs TCP; auto picks by protocol)."""
    if v.with_ == "admin-prohibited":
        return ACTION_REJECT_ADMIN
    if v.with_ == "host-unreachable":
        return ACTION_REJECT_HOST
    return ACTION_REJECT  # auto / tcp-reset / port-unreachable: the rule pair picks by protocol


def _default_rules(chain: str, family: int, verdict: Verdict) -> list[Rule]:
    c = (_comment(f"{COMMENT} default"),)
    if isinstance(verdict, Drop):
        return [Rule(chain, "DROP", matches=c)]
    if isinstance(verdict, Reject):
        icmp = "icmp6" if family == 6 else "icmp"
        with_ = {"admin-prohibited": "icmp6-adm-prohibited" if family == 6 else "icmp-admin-prohibited",
                 "host-unreachable": f"{icmp}-addr-unreachable" if family == 6 else "icmp-host-unreachable"}
        if verdict.with_ in with_:
            return [Rule(chain, "REJECT", (("reject-with", with_[verdict.with_]),), matches=c)]
        return [Rule(chain, "REJECT", (("reject-with", "tcp-reset"),), proto="tcp", matches=c),
                Rule(chain, "REJECT", (("reject-with", f"{icmp}-port-unreachable"),), matches=c)]
    return []


def does_nat(h: Handler) -> bool:
    """The handler's source calls a NAT verdict factory (policy.verdict_calls found it)."""
    return not NAT_KINDS.isdisjoint(h.verdict_kinds)


def nat_rule(hook: str, index: int, verdict: Nat, layout: MarkLayout, proto: str | None = None,
             generation: int = 1) -> Rule:
    """The rule in the nat table's ``NFH-<hook>`` that applies target ``index``.

    ``proto`` (tcp/udp/sctp/dccp) is needed when the target names ports: iptables refuses a
    port mapping on a rule that does not say which transport header holds the port.
    """
    f = layout["nat"]
    return Rule(chain_name(hook, generation), verdict.target, verdict.target_opts(),
                proto=proto if verdict.ports else None,
                matches=(_mark(f.encode(index), f.mask), _comment(f"{COMMENT} nat {index}")))


def compile_policy(policy: Policy, *, queue_base: int = 0, fail: str | None = None,
                   mark_mask: int = DEFAULT_MARK_MASK, nat_targets: int = DEFAULT_NAT_TARGETS,
                   generation: int = 1, flow_generation: int = 1) -> RuleSet:
    """Build the RuleSet. ``fail``: 'open', 'closed' or None (per hook: open iff default accept).

    ``nat_targets`` bounds the distinct NAT targets (it sizes the ``nat`` mark field, which
    exists only when some handler calls a NAT verdict). ``generation`` (1 or 2) names the
    chains and stamps packets, so a hot reload can install the next set beside this one.
    """
    if generation not in GENERATIONS:
        raise ValueError(f"generation must be one of {GENERATIONS}, not {generation}")
    per_chain: dict[tuple[str, str], list[Handler]] = {}
    for h in policy.handlers:
        per_chain.setdefault((h.table, h.hook), []).append(h)
    longest = max((len(v) for v in per_chain.values()), default=1)
    nat_handlers = [h for h in policy.handlers if does_nat(h)]
    if nat_handlers and not 0 < nat_targets < 1 << 16:
        raise PolicyError(f"--nat-targets {nat_targets}: give 1..65535 distinct NAT targets", policy.file)
    extra = [("nat", bits_for(nat_targets))] if nat_handlers else []
    from . import offload  # flow offload: fields only when the policy has flow handlers
    flow_fields = offload.layout_fields(policy)
    extra += flow_fields
    from . import routing  # route / class fields: only when the policy routes or shapes
    extra += routing.mark_fields(policy)
    if flow_fields and not 0 < flow_generation <= offload.FLOW_GENERATIONS:
        raise ValueError(f"flow_generation must be 1..{offload.FLOW_GENERATIONS}, not {flow_generation}")
    flow_ords = offload.ordinals(policy)
    try:
        layout = core_layout(longest, mark_mask, extra)
    except ValueError as e:
        hint = f" (the nat field holds --nat-targets {nat_targets}; a smaller bound takes fewer bits)" \
            if nat_handlers else ""
        raise PolicyError(str(e) + hint, policy.file) from None
    if queue_base < 0 or queue_base + len(policy.handlers) - 1 > MAX_QUEUE:
        raise PolicyError(f"queues {queue_base}..{queue_base + len(policy.handlers) - 1} do not fit 0..{MAX_QUEUE}",
                          policy.file)
    rs = RuleSet(layout, nat_targets=nat_targets if nat_handlers else 0, generation=generation,
                 flow_generation=flow_generation if flow_fields else 0)
    connsave = chain_name("CONNSAVE", generation)
    for h in policy.handlers:
        _check_user_mark(h, layout)
        rs.queues[queue_base + h.index] = h
    guard = layout["resume"].mask | layout["self"].mask
    act = layout["action"]
    for hook in HOOKS:
        default = policy.default(hook)
        rs.defaults[hook] = default
        rs.fail_open[hook] = (fail == "open") if fail else not isinstance(default, (Drop, Reject))
        dtable = decision_table(hook)
        tables = {t for (t, hk) in per_chain if hk == hook}
        if tables or hook in policy.defaults:
            tables.add(dtable)
        if any(h.hook == hook for h in nat_handlers):
            tables.add("nat")
        for fam in FAMILIES:
            for table in (t for t in TABLE_ORDER if t in tables):
                chain = chain_name(hook, generation)
                handlers = [h for h in per_chain.get((table, hook), []) if fam in h.match.families()]
                rules: list[Rule] = []
                if table == "filter":
                    rules += _reject_rules(chain, fam, layout)
                if table in ("filter", "mangle") and handlers:
                    rules.append(Rule(chain, connsave, goto=True, matches=(
                        _mark(act.encode(ACTION_CONNSAVE), act.mask), _comment(f"{COMMENT} connmark"))))
                if offload.flow_handlers(handlers):
                    rules.append(offload.save_jump(chain, hook, layout, generation))
                for pos, h in enumerate(per_chain.get((table, hook), []), 1):
                    rs.positions[h.name] = pos
                    if fam not in h.match.families():
                        continue
                    m = h.match
                    q = queue_base + h.index
                    topts: tuple[tuple[str, str], ...] = (("queue-num", str(q)),)
                    if rs.fail_open[hook]:
                        topts += (("queue-bypass", ""),)
                    if h.name in flow_ords:
                        rules += offload.offload_rules(chain, h, fam, layout, guard, flow_ords[h.name], flow_generation)
                    rules.append(Rule(
                        chain, "NFQUEUE", topts, src=m.src, dst=m.dst, iif=m.iif, oif=m.oif,
                        proto=proto_name(m.proto, fam),
                        matches=(*_match_specs(m, fam, layout, does_nat(h) or routing.per_connection(h)), _mark(0, guard),
                                 _comment(f"{COMMENT} {h.name}")),
                    ))
                    res = layout["resume"]
                    rules.append(Rule(chain, "MARK", _xmark(0, res.mask), matches=(
                        _mark(res.encode(pos), res.mask), _comment(f"{COMMENT} resume"))))
                if table == dtable:
                    rules += _default_rules(chain, fam, default)
                if table == "nat" and any(fam in h.match.families() for h in nat_handlers if h.hook == hook):
                    pass  # the engine appends NAT targets as they appear (an empty chain now)
                elif not rules:
                    continue
                key = (fam, table)
                rs.rules.setdefault(key, []).extend(generation_rules(chain, layout, generation) + rules)
                rs.chains.setdefault(key, []).append(chain)
                rs.jumps.setdefault(key, []).append(Rule(hook, chain, matches=(_comment(COMMENT),)))
    for key, rules in rs.rules.items():
        if any(r.target == connsave for r in rules):
            rs.chains[key].append(connsave)
            user = layout.user_mask
            rules.extend([
                Rule(connsave, "CONNMARK",
                     (("save-mark", ""), ("nfmask", f"{user:#x}"), ("ctmask", f"{user:#x}")),
                     matches=(_comment(COMMENT),)),
                Rule(connsave, "MARK", _xmark(0, act.mask), matches=(_comment(COMMENT),)),
                Rule(connsave, "ACCEPT", matches=(_comment(COMMENT),)),
            ])
    if flow_fields:
        offload.add_to_ruleset(rs, policy, flow_generation)
    routing.compile_rules(rs, policy)  # connmark restore/save, CLASSIFY, uplink NAT (routing.py)
    for key in rs.chains:
        rs.chains[key].sort()
    return rs
