"""Routing and shaping compiled into rules (pure: no kernel): the ``route``/``class`` mark
fields, NFH-RESTORE / NFH-SAVE (connmark restore and save), CLASSIFY, the uplink NAT chain.

The design is in nfhooks/routing.py; the declarations are routing_decl.py, the kernel side
(ip rules, routes, sysctls, qdiscs) routing_runtime.py.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from ..hooks import HOOKS
from ..marks import MarkLayout, bits_for
from ..match import Iface
from ..rulebuild import COMMENT, FAMILIES, Rule, SideSet, chain_name, comment, mark
from ..shaping import classify_rules, tree_commands
from .routing_decl import (
    RESTORE_CHAIN, ROUTE_NAT_CHAIN, SAVE_CHAIN, RouteShapePlan, check_references, class_names, route_slots,
)

if TYPE_CHECKING:
    from ..policy import Policy
    from ..rulebuild import RuleSet

__all__ = ["mark_fields", "per_connection", "compile_rules", "nat_rules", "add_chains", "describe"]

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
    restore_chain, save_chain = chain_name(RESTORE_CHAIN, rs.generation), chain_name(SAVE_CHAIN, rs.generation)
    nat_chain = chain_name(ROUTE_NAT_CHAIN, rs.generation)
    layout = rs.layout
    fields = [layout[n] for n in ("route", "class") if n in layout]
    if not fields:
        return
    check_references(policy)
    rs.routeshape = RouteShapePlan.build(policy, layout)  # data: the engine makes the runtime from it
    both = sum(f.mask for f in fields)
    tag = comment(f"{COMMENT} route-shape")

    for fam in FAMILIES:
        key = (fam, "mangle")
        rules = [Rule(restore_chain, "CONNMARK", (("restore-mark", ""), ("nfmask", f"{both:#x}"),
                                                  ("ctmask", f"{both:#x}")),
                      matches=(mark(0, both, True, "connmark"), tag))]
        rules += [Rule(save_chain, "CONNMARK", (("save-mark", ""), ("nfmask", f"{f.mask:#x}"),
                                                ("ctmask", f"{f.mask:#x}")),
                       matches=(mark(0, f.mask, True), tag)) for f in fields]
        if "class" in layout:
            rules += classify_rules(save_chain, policy, layout["class"], tag)
        jumps = [Rule(h, c, matches=(comment(COMMENT),))
                 for h, c in (("PREROUTING", restore_chain), ("OUTPUT", restore_chain), ("POSTROUTING", save_chain))]
        add_chains(rs, key, [restore_chain, save_chain], rules, jumps)
        if "route" in layout:
            nat = nat_rules(policy, layout, fam, nat_chain)
            if nat:  # installed by routing_runtime.install_nat at start, not by Backend.install
                rs.side.append(SideSet(fam, "nat", (nat_chain,), tuple(nat),
                                       (Rule("POSTROUTING", nat_chain, matches=(comment(COMMENT),)),),
                                       "the uplink NAT rules"))


def describe(policy: "Policy", plan: RouteShapePlan) -> list[str]:
    """What `run` will set up besides iptables, as the equivalent ip/tc commands (`check`)."""
    out: list[str] = []
    settings = policy.routing_settings
    p = settings.priority
    if plan.route_field is not None:
        f = plan.route_field
        if settings.main_first:
            out.append(f"ip rule add priority {p} lookup main suppress_prefixlength 0")
        for idx in range(1, plan.slots + 1):
            out.append(f"ip rule add priority {p + idx} fwmark {f.encode(idx):#x}/{f.mask:#x} "
                       f"lookup {plan.table_id(idx)}   # and ip -6 rule")
        for t in policy.routing_tables.values():
            for r in t.routes:
                out.append(f"ip {'-6 ' if r.family == 6 else ''}route add {r.text} table {t.table_id}"
                           f"   # table {t.name!r}")
    classes = {n: i for i, n in enumerate(plan.classes, 1)}
    for decl in policy.shaping_decls.values():
        out += [" ".join(cmd) for cmd in tree_commands(decl, classes)]
    return out


def nat_rules(policy: "Policy", layout: MarkLayout, family: int, chain: str = "NFH-" + ROUTE_NAT_CHAIN) -> list[Rule]:
    """Source NAT paired with each uplink table: the table's mark, out of its interfaces."""
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
        matches = (mark(f.encode(t.index), f.mask), comment(f"{COMMENT} route {t.name}"))
        for dev in (t.devs or [None]):
            out.append(Rule(chain, target, opts, oif=Iface(dev) if dev else None, matches=matches))
    return out


def add_chains(rs: "RuleSet", key: tuple[int, str], chains: list[str], rules: list[Rule], jumps: list[Rule]) -> None:
    """Our chains into ``rs``; our jumps go first at their hook (they must run before
    nfhooks' per-hook chain: restore before any handler, save before the hook's verdicts)."""
    rs.rules.setdefault(key, []).extend(rules)
    rs.chains.setdefault(key, []).extend(chains)
    merged = jumps + rs.jumps.get(key, [])
    rs.jumps[key] = sorted(merged, key=lambda r: HOOKS.index(r.chain))  # stable: ours first per hook
