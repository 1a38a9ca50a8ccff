"""Connection verdicts: Python decides a connection (after reading its payload, if it likes), the
kernel applies the decision to the rest of it.

Any handler may return ``accept(connection=True)``, ``drop(connection=True)`` or
``reject(connection=True)`` (TCP reset, port unreachable otherwise). Unlike ``flow=True``
(offload.py), nothing is promised about the handler: it may read the payload and decide on the
third packet (an HTTP Host, a TLS SNI). The decision is kept in the **connmark**, in a mark
field of its own, and kernel rules act on every later packet of the connection at that hook.

How (rules built here, installed by the offload feature, features/offload.py):

1. The dispatcher writes ``action=connverdict``, the handler's ``resume`` position and the
   verdict's code (accept 1, drop 2, reject 3) into the ``conn:<HOOK>:<table>`` field of the
   *packet* mark and answers NF_REPEAT: the table re-runs.
2. A rule at the top of ``NFH-<HOOK>`` sends it (``-g``) to ``NFH-CONN-<HOOK>``, which forgets
   decisions of another generation (the ``flowgen`` field, shared with flow offload: a restart or
   reload re-decides every connection), copies the code into the connmark (``CONNMARK
   --set-xmark``, masked: the user's bits and every other field stay) where the field is still
   empty -- that rule's counter counts connections, once --, and gives the packet its own
   verdict, clearing nfhooks' bits from the packet mark first.
3. Right after it in ``NFH-<HOOK>``, before every handler's queue rule, one rule per code
   (``-m connmark --mark <generation|code>/<flowgen|field>``) ACCEPTs, DROPs or REJECTs the
   later packets of a decided connection, in **both directions** that cross the hook: none of
   them reaches Python at that hook again. Other hooks (and tables) are not affected.

The rules exist only where a handler's source can return such a verdict
(``offload_decl.connection_kinds``: a call with ``connection=`` not the constant False), and
only for the codes it can return. A connection verdict the scan missed (built by a helper) is
refused when returned: the hook's default applies, and the error names the handler.

**A connection's very first packet** has no confirmed conntrack entry yet: accepted, it
confirms the entry with the connmark (the rest is offloaded); dropped, the entry goes with it,
so ``drop(connection=True)`` on a SYN is an ordinary drop (each retransmission asks Python).
Decide on a later packet (the first data packet) for the drop to stick -- or use a set.

Masking: the field lies inside nfhooks' mark mask, so ``pkt.connmark``/``pkt.mark`` (the user's
bits only) never show it; docs/connection-verdicts.md has the layout. Not in the raw table
(no conntrack there yet); not with ``flow=True`` (offload_decl.check_flow).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from .errors import PolicyError
from .features.offload_decl import connection_kinds
from .hooks import HOOKS
from .marks import ACTION_CONNVERDICT, Field, MarkLayout
from .rulebuild import COMMENT, CHAIN_PREFIX, Rule, chain_name, comment, mark, reject_with, xmark
from .saved import counted_rules

if TYPE_CHECKING:
    from .policy import Handler, Policy
    from .rulebuild import RuleSet

__all__ = ["CODES", "FIELD_BITS", "FIELD_PREFIX", "kinds", "conn_handlers", "field_name", "layout_fields",
           "check", "conn_chain", "head_rules", "save_rules", "add_to_ruleset", "packet_bits", "add_counters"]

#: The connmark field's values: 0 = not decided.
CODES = {"accept": 1, "drop": 2, "reject": 3}
FIELD_BITS = 2
FIELD_PREFIX = "conn:"
SAVE_TAG = f"{COMMENT} conn "  # "nfhooks conn <verdict> <handler>": saves; "nfhooks conn <verdict>": enforces


def kinds(h: "Handler") -> frozenset[str]:
    """The connection verdicts ``h``'s source can return (accept, drop, reject)."""
    if getattr(h, "flow", False):
        return frozenset()  # refused at load (offload_decl.check_flow); never both
    return frozenset(connection_kinds(h.source))


def conn_handlers(handlers: Iterable["Handler"]) -> list["Handler"]:
    return [h for h in handlers if kinds(h)]


def field_name(hook: str, table: str) -> str:
    return f"{FIELD_PREFIX}{hook}:{table}"


def layout_fields(policy: "Policy") -> list[tuple[str, int]]:
    """One 2-bit connmark field per (hook, table) with a handler that returns connection verdicts."""
    out: list[tuple[str, int]] = []
    hs = conn_handlers(policy.handlers)
    for hook in HOOKS:
        for table in sorted({h.table for h in hs if h.hook == hook}):
            out.append((field_name(hook, table), FIELD_BITS))
    return out


def check(policy: "Policy") -> None:
    """Refuse what cannot work, naming the line: the raw table (no conntrack yet)."""
    for h in conn_handlers(policy.handlers):
        if h.table == "raw":
            kind, line = min(connection_kinds(h.source).items(), key=lambda kv: kv[1])
            raise PolicyError(f"handler {h.name!r} returns {kind}(connection=True) in the raw table: conntrack "
                              "has not seen the packet there, so there is no connection to keep the verdict on; "
                              "use mangle or filter", h.file, line)


def conn_chain(hook: str, generation: int) -> str:
    return chain_name(f"CONN-{hook}", generation)


def _verdict(chain: str, kind: str, family: int, match: tuple, note: str) -> list[Rule]:
    """ACCEPT, DROP, or the REJECT pair (TCP reset, port unreachable otherwise)."""
    c = (*match, comment(note))
    if kind == "accept":
        return [Rule(chain, "ACCEPT", matches=c)]
    if kind == "drop":
        return [Rule(chain, "DROP", matches=c)]
    return [Rule(chain, "REJECT", (("reject-with", "tcp-reset"),), proto="tcp", matches=c),
            Rule(chain, "REJECT", (("reject-with", reject_with("port-unreachable", family)),), matches=c)]


def _ordered(ks: Iterable[str]) -> list[str]:
    have = set(ks)
    return [k for k in CODES if k in have]


def head_rules(chain: str, hook: str, table: str, family: int, handlers: list["Handler"], layout: MarkLayout,
               gen: Field, generation: int, flow_generation: int) -> list[Rule]:
    """Top of NFH-<HOOK>: a packet just decided goes to NFH-CONN-<HOOK>; a decided connection's
    later packets get its verdict here (one rule per code the chain's handlers can return)."""
    ks = _ordered(k for h in conn_handlers(handlers) for k in kinds(h))
    if not ks:
        return []
    act, f = layout["action"], layout[field_name(hook, table)]
    out = [Rule(chain, conn_chain(hook, generation), goto=True, matches=(
        mark(act.encode(ACTION_CONNVERDICT), act.mask), comment(f"{COMMENT} connverdict")))]
    for k in ks:
        value, mask = gen.encode(flow_generation) | f.encode(CODES[k]), gen.mask | f.mask
        out += _verdict(chain, k, family, (mark(value, mask, module="connmark"),), f"{COMMENT} conn {k}")
    return out


def save_rules(hook: str, table: str, family: int, handlers: list["Handler"], layout: MarkLayout,
               positions: dict[str, int], gen: Field, reset_mask: int, generation: int,
               flow_generation: int) -> list[Rule]:
    """NFH-CONN-<HOOK> in one (family, table): keep the decision in the connmark, apply it."""
    chain = conn_chain(hook, generation)
    act, res, f = layout["action"], layout["resume"], layout[field_name(hook, table)]
    mine = gen.encode(flow_generation)
    out = [Rule(chain, "CONNMARK", xmark(mine, reset_mask), matches=(
        mark(mine, gen.mask, negate=True, module="connmark"), comment(f"{COMMENT} flow generation")))]
    hs = conn_handlers(handlers)
    for h in hs:
        for k in _ordered(kinds(h)):
            code = f.encode(CODES[k])
            # only where the field is still empty: the rule counts connections, once each
            out.append(Rule(chain, "CONNMARK", xmark(code, f.mask), matches=(
                mark(res.encode(positions[h.name]) | code, res.mask | f.mask),
                mark(0, f.mask, module="connmark"), comment(f"{SAVE_TAG}{k} {h.name}"))))
    ks = _ordered(k for h in hs for k in kinds(h))
    for k in ks:  # this packet: its own verdict (the handler's), as Python counted it
        if k != "accept":
            out += _verdict(chain, k, family, (mark(f.encode(CODES[k]), f.mask),), COMMENT)
    out.append(Rule(chain, "MARK", xmark(0, act.mask | res.mask | f.mask), matches=(comment(COMMENT),)))
    out.append(Rule(chain, "ACCEPT", matches=(comment(COMMENT),)))
    return out


def add_to_ruleset(rs: "RuleSet", policy: "Policy", gen: Field, reset_mask: int, flow_generation: int) -> None:
    """Add NFH-CONN-<HOOK> to every (family, table) whose NFH-<HOOK> jumps to it."""
    for (fam, table), rules in rs.rules.items():
        for hook in HOOKS:
            chain = conn_chain(hook, rs.generation)
            if not any(r.target == chain for r in rules):
                continue
            hs = [h for h in conn_handlers(policy.handlers)
                  if h.hook == hook and h.table == table and fam in h.match.families()]
            rs.chains[(fam, table)].append(chain)
            rules.extend(save_rules(hook, table, fam, hs, rs.layout, rs.positions, gen, reset_mask,
                                    rs.generation, flow_generation))


def packet_bits(layout: MarkLayout, h: "Handler", position: int) -> dict[str, tuple[int, int]]:
    """{verdict kind: (bits to set, mask to keep)} of the packet mark the dispatcher writes for
    ``h``'s connection verdicts (action, resume position, code)."""
    act, res, f = layout["action"], layout["resume"], layout[field_name(h.hook, h.table)]
    keep = ~(act.mask | res.mask | f.mask) & 0xFFFFFFFF
    base = act.encode(ACTION_CONNVERDICT) | res.encode(position)
    return {k: (base | f.encode(CODES[k]), keep) for k in _ordered(kinds(h))}


def _hook_of(chain: str) -> str:
    name = chain[len(CHAIN_PREFIX):] if chain.startswith(CHAIN_PREFIX) else chain
    return name.removesuffix("-2")


def add_counters(decided: dict[tuple[str, ...], int], enforced: dict[tuple[str, ...], int], saved: str,
                 handlers: dict[str, "Handler"]) -> None:
    """From ``iptables-save -c`` text: connections decided per (hook, handler, verdict) (the
    save rules' counters) and later packets the kernel decided per (hook, verdict)."""
    tag = f'--comment "{SAVE_TAG}'
    for rule in counted_rules(saved):
        i = rule.text.find(tag)
        if i < 0:
            continue
        words = rule.text[i + len(tag):].split('"', 1)[0].split(" ")
        if words[0] not in CODES:
            continue
        if len(words) == 1:
            key: tuple[str, ...] = (_hook_of(rule.chain), words[0])
            enforced[key] = enforced.get(key, 0) + rule.packets
        elif words[1] in handlers:
            h = handlers[words[1]]
            key = (h.hook, h.name, words[0])
            decided[key] = decided.get(key, 0) + rule.packets
