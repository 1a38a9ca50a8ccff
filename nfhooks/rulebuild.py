"""The rule builders every part of the compiler uses: one iptables rule as data, its parts
(comment, mark match, masked mark write, a Match's iptables matches), chain names.

Pure data and pure functions (no root, no backend). rules.py (the compiler) and every
feature (NAT, flow offload, routing/shaping) build their rules from these, so a rule looks
the same wherever it is made; rules.py re-exports them under the names it always had.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from .hooks import HOOKS, TABLE_ORDER
from .marks import MarkLayout
from .kmatch import hashlimit_expire_ms, hashlimit_name, rate_text
from .match import Addr, Iface, Match

if TYPE_CHECKING:
    from .policy import Handler
    from .verdict import Verdict

__all__ = ["COMMENT", "CHAIN_PREFIX", "FAMILIES", "Opt", "MatchSpec", "Rule", "save_string", "comment", "mark",
           "xmark", "chain_name", "proto_name", "match_specs", "state_specs", "reject_with", "generation_rules", "SideSet", "RuleSet"]

COMMENT = "nfhooks"
CHAIN_PREFIX = "NFH-"
FAMILIES = (4, 6)

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


def comment(text: str) -> MatchSpec:
    """``-m comment --comment TEXT``: how nfhooks recognises its own rules."""
    return MatchSpec("comment", (("comment", text, False),))


def mark(value: int, mask: int, negate: bool = False, module: str = "mark") -> MatchSpec:
    """``-m mark --mark VALUE/MASK`` (``module="connmark"`` for the connection's mark);
    the mask is left out when it is all 32 bits, as iptables-save prints it."""
    text = f"{value:#x}" if mask == 0xFFFFFFFF else f"{value:#x}/{mask:#x}"
    return MatchSpec(module, (("mark", text, negate),))


def xmark(value: int, mask: int) -> tuple[tuple[str, str], ...]:
    """Target options ``--set-xmark VALUE/MASK``: write only the bits of ``mask``."""
    return (("set-xmark", f"{value:#x}/{mask:#x}"),)


def chain_name(hook: str, generation: int = 1) -> str:
    """``NFH-<HOOK>`` for generation 1, ``NFH-<HOOK>-2`` for generation 2 (hot reload)."""
    return CHAIN_PREFIX + hook + ("" if generation == 1 else f"-{generation}")


def proto_name(proto: str | None, family: int) -> str | None:
    """The protocol as iptables names it for ``family`` (icmpv6 is ``ipv6-icmp`` in ip6tables)."""
    if proto == "icmpv6" and family == 6:
        return "ipv6-icmp"
    return proto


def reject_with(kind: str, family: int) -> str:
    """The ``--reject-with`` value of a reject kind (port-unreachable, admin-prohibited,
    host-unreachable) in ``family``: the one mapping both the reject and the default rules use."""
    icmp = "icmp6" if family == 6 else "icmp"
    if kind == "admin-prohibited":
        return f"{icmp}-adm-prohibited" if family == 6 else "icmp-admin-prohibited"
    if kind == "host-unreachable":
        return f"{icmp}-addr-unreachable" if family == 6 else "icmp-host-unreachable"
    return f"{icmp}-port-unreachable"


def match_specs(m: Match, family: int, new_only: bool = False, state: bool = True) -> list[MatchSpec]:
    """The iptables matches of a handler's Match besides addresses, interfaces and protocol
    (ports, conntrack state, mark); ``new_only`` adds ``--ctstate NEW`` unless the match has
    its own ctstate (handlers that decide once per connection: NAT, route, shape); ``state``
    False leaves out the kernel-state matches (state_specs: for a connection decided already)."""
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
    for what, ref in (("src", m.src_set), ("dst", m.dst_set)):  # sets.py: one kernel set per family
        if ref is not None:
            specs.append(MatchSpec("set", (("match-set", f"{ref.kernel_name(family)} {ref.directions(what)}",
                                            ref.negate),)))
    if m.ctstate is not None:
        specs.append(MatchSpec("conntrack", (("ctstate", ",".join(m.ctstate), False),)))
    elif new_only:
        specs.append(MatchSpec("conntrack", (("ctstate", "NEW", False),)))
    if m.mark is not None:
        v, mask, neg = m.mark
        specs.append(mark(v, mask, neg))
    return specs + state_specs(m, family) if state else specs


def state_specs(m: Match, family: int) -> list[MatchSpec]:
    """The kernel-state matches of a Match (kmatch.py): connmark, owner, connlimit, then the
    rate last -- a token is spent by every packet that reaches the rate match, so it must
    follow everything else that can still fail. Option names as iptables-save prints them."""
    specs: list[MatchSpec] = []
    if m.connmark is not None:
        v, mask, neg = m.connmark
        specs.append(mark(v, mask, neg, module="connmark"))
    if m.owner is not None:
        specs.append(MatchSpec("owner", m.owner.opts()))
    if m.connlimit is not None:
        c = m.connlimit
        specs.append(MatchSpec("connlimit", (("connlimit-above", str(c.above), False),
                                             ("connlimit-mask", str(c.mask(family)), False),
                                             ("connlimit-saddr", "", False))))
    r = m.rate
    if r is not None and r.module == "limit":
        burst = () if r.burst == 5 else (("limit-burst", str(r.burst), False),)
        specs.append(MatchSpec("limit", (("limit", rate_text(r), False), *burst)))
    elif r is not None:
        opts: list[Opt] = [("hashlimit-above" if r.over else "hashlimit-upto", rate_text(r), False),
                           ("hashlimit-burst", str(r.burst), False)]
        if r.by:
            opts.append(("hashlimit-mode", ",".join(r.by), False))
        opts.append(("hashlimit-name", hashlimit_name(r, m.describe()), False))
        opts.append(("hashlimit-htable-expire", str(hashlimit_expire_ms(r)), False))
        specs.append(MatchSpec("hashlimit", tuple(opts)))
    return specs


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
    return [Rule(chain, "MARK", xmark(mine, g.mask), matches=(mark(0, g.mask), comment(f"{COMMENT} gen"))),
            Rule(chain, "RETURN", matches=(mark(mine, g.mask, negate=True), comment(f"{COMMENT} gen")))]


@dataclass(frozen=True)
class SideSet:
    """Chains of one (family, table) a feature installs itself at start, through the engine
    backend's ``restore`` rather than ``Backend.install`` (the uplink NAT: python-iptables
    cannot create MASQUERADE/SNAT for both families in one process). Part of what ``check``
    prints; the names are ``NFH-*`` and the jumps tagged ``nfhooks``, so removal is as usual."""

    family: int
    table: str
    chains: tuple[str, ...]
    rules: tuple[Rule, ...]
    jumps: tuple[Rule, ...]  # inserted at the top of their built-in chains
    what: str  # for an error message: "the uplink NAT rules"

    def restore_lines(self) -> list[str]:
        """``ip(6)tables-restore --noflush`` input: the chains, their rules, the jumps inserted."""
        return [f"*{self.table}", *(f":{c} - [0:0]" for c in self.chains), *(r.render() for r in self.rules),
                *("-I" + j.render()[2:] for j in reversed(self.jumps)), "COMMIT"]


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
    #: routing_decl.RouteShapePlan (data: how route/shape verdicts are encoded) when the policy
    #: routes or shapes; the runtime doing pyroute2 I/O is the engine's (features/routeshape.py)
    routeshape: Any = None
    side: list[SideSet] = field(default_factory=list)  # installed by their feature at start (SideSet)

    def chain(self, hook: str) -> str:
        return chain_name(hook, self.generation)

    def tables(self) -> list[tuple[int, str]]:
        return [(f, t) for f in FAMILIES for t in TABLE_ORDER if (f, t) in self.chains]

    def render(self, families: Iterable[int] = FAMILIES) -> str:
        """iptables-save text of our chains and jumps, per family (``# ipv4`` / ``# ipv6``)."""
        chains = {k: list(v) for k, v in self.chains.items()}
        rules = {k: list(v) for k, v in self.rules.items()}
        jumps = {k: list(v) for k, v in self.jumps.items()}
        for s in self.side:  # shown where they run: their jumps first at their hook
            key = (s.family, s.table)
            chains[key] = sorted([*chains.get(key, []), *s.chains])
            rules[key] = [*rules.get(key, []), *s.rules]
            jumps[key] = sorted([*s.jumps, *jumps.get(key, [])], key=lambda r: HOOKS.index(r.chain))
        lines: list[str] = []
        for fam in families:
            lines.append(f"# ip{'6' if fam == 6 else ''}tables")
            for t in (t for t in TABLE_ORDER if (fam, t) in chains):
                lines.append(f"*{t}")
                lines.extend(f":{c} - [0:0]" for c in chains[(fam, t)])
                lines.extend(r.render() for r in jumps[(fam, t)])
                for chain in chains[(fam, t)]:  # iptables-save order: user chains sorted
                    lines.extend(r.render() for r in rules[(fam, t)] if r.chain == chain)
                lines.append("COMMIT")
        return "\n".join(lines) + "\n"
