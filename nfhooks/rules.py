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
(nat.py, whose ``nat_rule`` builds them). The nat bits are left on the packet: each index
belongs to one (family, hook, target), so no other nat rule can match them again.

The features (NAT, flow offload, routing and shaping: nfhooks/features/) add their mark
fields and rules through the Feature interface, in the fixed order of features/registry.py;
this module names none of them.

``render()`` prints the rule set in the exact format of ``iptables-legacy-save``, so
``nfhooks check`` shows precisely what ``nfhooks run`` installs (a kernel test compares them).
"""

from __future__ import annotations

from typing import Sequence

from .features.base import ChainContext, CompileContext, Feature
from .features.registry import FEATURES
from .hooks import HOOKS, TABLE_ORDER, decision_table
from .marks import (
    ACTION_CONNSAVE, ACTION_REJECT, ACTION_REJECT_ADMIN, ACTION_REJECT_HOST,
    DEFAULT_MARK_MASK, DEFAULT_NAT_TARGETS, GENERATIONS, MarkLayout, core_layout,
)
from .nat import does_nat, nat_rule  # noqa: F401 -- re-exported: rules.nat_rule / does_nat as before
from .policy import Handler, Policy, PolicyError
from .rulebuild import (  # noqa: F401 -- the builders and RuleSet live there; re-exported under their old names
    CHAIN_PREFIX, COMMENT, FAMILIES, MatchSpec, Opt, Rule, RuleSet, chain_name, comment, generation_rules, mark,
    match_specs, proto_name, reject_with, save_string, state_specs, xmark,
)
from .verdict import Drop, Reject, Verdict

CONNSAVE_CHAIN = "NFH-CONNSAVE"
MAX_QUEUE = 65535

__all__ = ["CHAIN_PREFIX", "COMMENT", "CONNSAVE_CHAIN", "FAMILIES", "MAX_QUEUE", "MatchSpec", "Opt", "Rule", "RuleSet",
           "chain_name", "comment", "compile_policy", "does_nat", "generation_rules", "mark", "match_specs",
           "nat_rule", "proto_name", "reject_action", "reject_with", "save_string", "xmark"]


def _check_user_mark(h: Handler, layout: MarkLayout) -> None:
    cm = h.match.connmark
    if cm is not None and cm[1] & layout.mask:
        raise PolicyError(f"handler {h.name!r} matches connmark bits {cm[1] & layout.mask:#x} that belong to "
                          f"nfhooks (--mark-mask {layout.mask:#x}); match bits of {layout.user_mask:#x}",
                          h.file, h.line)
    if h.match.mark is not None and h.match.mark[1] & layout.mask:
        raise PolicyError(
            f"handler {h.name!r} matches mark bits {h.match.mark[1] & layout.mask:#x} that belong to "
            f"nfhooks (--mark-mask {layout.mask:#x}); match only bits in {layout.user_mask:#x}, or move "
            "nfhooks' bits with --mark-mask", h.file, h.line)


def _reject_rules(chain: str, family: int, layout: MarkLayout) -> list[Rule]:
    act = layout["action"]
    unreach = {ACTION_REJECT: "port-unreachable", ACTION_REJECT_ADMIN: "admin-prohibited",
               ACTION_REJECT_HOST: "host-unreachable"}
    out = [Rule(chain, "REJECT", (("reject-with", "tcp-reset"),), proto="tcp",
                matches=(mark(act.encode(ACTION_REJECT), act.mask), comment(f"{COMMENT} reject")))]
    for code, kind in unreach.items():
        out.append(Rule(chain, "REJECT", (("reject-with", reject_with(kind, family)),),
                        matches=(mark(act.encode(code), act.mask), comment(f"{COMMENT} reject"))))
    return out


def reject_action(v: Reject, is_tcp: bool) -> int:
    """The action code for a reject verdict (tcp-reset needs TCP; auto picks by protocol)."""
    if v.with_ == "admin-prohibited":
        return ACTION_REJECT_ADMIN
    if v.with_ == "host-unreachable":
        return ACTION_REJECT_HOST
    return ACTION_REJECT  # auto / tcp-reset / port-unreachable: the rule pair picks by protocol


def _default_rules(chain: str, family: int, verdict: Verdict) -> list[Rule]:
    c = (comment(f"{COMMENT} default"),)
    if isinstance(verdict, Drop):
        return [Rule(chain, "DROP", matches=c)]
    if isinstance(verdict, Reject):
        if verdict.with_ in ("admin-prohibited", "host-unreachable"):
            return [Rule(chain, "REJECT", (("reject-with", reject_with(verdict.with_, family)),), matches=c)]
        return [Rule(chain, "REJECT", (("reject-with", "tcp-reset"),), proto="tcp", matches=c),
                Rule(chain, "REJECT", (("reject-with", reject_with("port-unreachable", family)),), matches=c)]
    return []


def compile_policy(policy: Policy, *, queue_base: int = 0, fail: str | None = None,
                   mark_mask: int = DEFAULT_MARK_MASK, nat_targets: int = DEFAULT_NAT_TARGETS,
                   generation: int = 1, flow_generation: int = 1,
                   features: Sequence[Feature] = FEATURES) -> RuleSet:
    """Build the RuleSet. ``fail``: 'open', 'closed' or None (per hook: open iff default accept).

    ``nat_targets`` bounds the distinct NAT targets (it sizes the ``nat`` mark field, which
    exists only when some handler calls a NAT verdict). ``generation`` (1 or 2) names the
    chains and stamps packets, so a hot reload can install the next set beside this one.
    ``features`` (features/registry.py) add their mark fields and rules, in that order.
    """
    if generation not in GENERATIONS:
        raise ValueError(f"generation must be one of {GENERATIONS}, not {generation}")
    ctx = CompileContext(policy, nat_targets, generation, flow_generation)
    per_chain: dict[tuple[str, str], list[Handler]] = {}
    for h in policy.handlers:
        per_chain.setdefault((h.table, h.hook), []).append(h)
    longest = max((len(v) for v in per_chain.values()), default=1)
    extra: list[tuple[str, int]] = []
    for f in features:
        f.check(ctx)
        extra += f.mark_fields(ctx)
    try:
        layout = core_layout(longest, mark_mask, extra)
    except ValueError as e:
        raise PolicyError(str(e) + "".join(f.layout_hint(ctx) for f in features), policy.file) from None
    if queue_base < 0 or queue_base + len(policy.handlers) - 1 > MAX_QUEUE:
        raise PolicyError(f"queues {queue_base}..{queue_base + len(policy.handlers) - 1} do not fit 0..{MAX_QUEUE}",
                          policy.file)
    rs = RuleSet(layout, generation=generation)
    for f in features:
        f.configure(rs, ctx)
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
        for f in features:
            tables |= f.hook_tables(ctx, hook)
        for fam in FAMILIES:
            for table in (t for t in TABLE_ORDER if t in tables):
                chain = chain_name(hook, generation)
                handlers = [h for h in per_chain.get((table, hook), []) if fam in h.match.families()]
                cc = ChainContext(chain, hook, table, fam, handlers, layout, guard)
                rules: list[Rule] = []
                if table == "filter":
                    rules += _reject_rules(chain, fam, layout)
                if table in ("filter", "mangle") and handlers:
                    rules.append(Rule(chain, connsave, goto=True, matches=(
                        mark(act.encode(ACTION_CONNSAVE), act.mask), comment(f"{COMMENT} connmark"))))
                for f in features:
                    rules += f.chain_head(ctx, cc)
                for pos, h in enumerate(per_chain.get((table, hook), []), 1):
                    rs.positions[h.name] = pos
                    if fam not in h.match.families():
                        continue
                    m = h.match
                    q = queue_base + h.index
                    topts: tuple[tuple[str, str], ...] = (("queue-num", str(q)),)
                    if rs.fail_open[hook]:
                        topts += (("queue-bypass", ""),)
                    for f in features:
                        rules += f.before_queue(ctx, cc, h)
                    new_only = any(f.new_only(h) for f in features)
                    rules.append(Rule(
                        chain, "NFQUEUE", topts, src=m.src, dst=m.dst, iif=m.iif, oif=m.oif,
                        proto=proto_name(m.proto, fam),
                        # the kernel-state matches (a rate spends a token) after the guard: a
                        # resumed packet or one of nfhooks' own spends none
                        matches=(*match_specs(m, fam, new_only, state=False), mark(0, guard),
                                 *state_specs(m, fam), comment(f"{COMMENT} {h.name}")),
                    ))
                    res = layout["resume"]
                    rules.append(Rule(chain, "MARK", xmark(0, res.mask), matches=(
                        mark(res.encode(pos), res.mask), comment(f"{COMMENT} resume"))))
                if table == dtable:
                    rules += _default_rules(chain, fam, default)
                if not rules and not any(f.keeps_empty_chain(ctx, fam, table, hook) for f in features):
                    continue
                key = (fam, table)
                rs.rules.setdefault(key, []).extend(generation_rules(chain, layout, generation) + rules)
                rs.chains.setdefault(key, []).append(chain)
                rs.jumps.setdefault(key, []).append(Rule(hook, chain, matches=(comment(COMMENT),)))
    for key, rules in rs.rules.items():
        if any(r.target == connsave for r in rules):
            rs.chains[key].append(connsave)
            user = layout.user_mask
            rules.extend([
                Rule(connsave, "CONNMARK",
                     (("save-mark", ""), ("nfmask", f"{user:#x}"), ("ctmask", f"{user:#x}")),
                     matches=(comment(COMMENT),)),
                Rule(connsave, "MARK", xmark(0, act.mask), matches=(comment(COMMENT),)),
                Rule(connsave, "ACCEPT", matches=(comment(COMMENT),)),
            ])
    for f in features:
        f.add_rules(ctx, rs)
    for key in rs.chains:
        rs.chains[key].sort()
    return rs
