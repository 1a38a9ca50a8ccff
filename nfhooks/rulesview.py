"""``nfhooks rules``: the installed rules read like ``iptables -L -v`` (pure: counted rules in,
rich tables out).

Per family, hook and table one table, titled with the hook's default the way iptables prints a
chain's policy (``default DROP: 12 packets, 720 bytes``), one row per handler with its packet
and byte counters, what the rule does (``queue 5``, ``accept (offloaded)``, a NAT target) and
the handler's own match. The rules only the machinery needs -- generation stamps, resume
marks, reject dispatch, connmark save, flow save, route/shape marks, the jumps into our
chains -- are folded into one line unless ``verbose``: they are how nfhooks works, not what the
policy says. The rules are told apart by the comment nfhooks tags each with (rules.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .hooks import HOOKS, TRAVERSAL, decision_table
from .rulebuild import CHAIN_PREFIX
from .saved import Counted

__all__ = ["PLUMBING", "Row", "Section", "classify", "human", "sections", "view"]

#: comment word -> what the plumbing rule is for (folded away unless -v)
PLUMBING = {
    "gen": "generation stamp",
    "resume": "resume mark",
    "reject": "reject dispatch",
    "connmark": "connmark save",
    "flowsave": "flow save",
    "flow": "flow save",
    "route-shape": "route/shape mark",
    "conn": "connection verdict save",
    "connverdict": "connection verdict save",
}

_COMMENT = re.compile(r' -m comment --comment ("[^"]*"|\S+)')
_GUARD = re.compile(r" -m mark --mark 0x0/0x[0-9a-f]+$")  # mark(0, resume|self): not the handler's
_MARK = re.compile(r" -m mark --mark \S+")
_OFFLOAD_DIR = re.compile(r" -m conntrack --ctdir \w+ -m connmark --mark \S+")
_GEN_SUFFIX = re.compile(r"-(\d+)$")


@dataclass
class Row:
    """One line of the view: a handler's rule, the hook's default, or plumbing (``kind``)."""

    kind: str  # "handler", "default", or a PLUMBING value
    handler: str
    action: str
    match: str
    packets: int
    bytes: int
    rule: str  # the rule's matches as saved, nfhooks' own mark matches included (for -v)


@dataclass
class Section:
    """The rules of one (family, hook, table): NFH-<HOOK> and the side chains it feeds."""

    family: int
    hook: str
    table: str
    generations: set[int] = field(default_factory=set)
    rows: list[Row] = field(default_factory=list)
    chains: set[str] = field(default_factory=set)


def human(n: int) -> str:
    """Counters as ``iptables -L -v`` prints them: exact up to 99999, then K, M, G, T."""
    for unit in ("", "K", "M", "G", "T"):
        if n < 100000:
            return f"{n}{unit}"
        n //= 1000
    return f"{n}P"


def _comment(text: str) -> tuple[str, str, str]:
    """(matches, comment words after "nfhooks", target) of a saved rule without "-A CHAIN"."""
    text = " " + text
    m = _COMMENT.search(text)
    if not m:
        return text.strip(), "", ""
    words = m.group(1).strip('"').split(" ", 1)
    return text[:m.start()].strip(), (words[1] if len(words) > 1 else ""), text[m.end():].strip()


def _target(target: str) -> str:
    """``-j NFQUEUE --queue-num 5 --queue-bypass`` -> ``queue 5 bypass``; others as saved."""
    t = re.sub(r"^-[jg] ", "", target)
    if t.startswith("NFQUEUE"):
        num = re.search(r"--queue-num (\d+)", t)
        bal = re.search(r"--queue-balance (\S+)", t)
        where = num.group(1) if num else (bal.group(1) if bal else "?")
        return f"queue {where}" + (" bypass" if "--queue-bypass" in t else "")
    return t


def classify(c: Counted) -> Row:
    """The Row of one counted rule."""
    text = c.text.split(" ", 2)[2] if c.text.count(" ") >= 2 else ""
    before, words, target = _comment(text)
    match = _GUARD.sub("", before).strip()
    first, _, rest = words.partition(" ")
    action = _target(target)
    if target.startswith("-j NFQUEUE") and words:
        return Row("handler", words, action, match, c.packets, c.bytes, before)
    if first == "default":
        return Row("default", "(default)", action, match, c.packets, c.bytes, before)
    if first == "offload" and rest:
        return Row("handler", rest, "accept (offloaded)", _OFFLOAD_DIR.sub("", match).strip(),
                   c.packets, c.bytes, before)
    if first == "conn" and rest in ("accept", "drop", "reject"):  # a decided connection's packets (connverdict.py)
        return Row("handler", "(connections)", f"{rest} (decided)", "", c.packets, c.bytes, before)
    if first in ("nat", "route") and rest:  # the mark that selects the target is nfhooks' own
        return Row("handler", f"{first} {rest}", action, _MARK.sub("", " " + match).strip(), c.packets, c.bytes,
                   before)
    if first:
        kind = PLUMBING.get(first, first)
    elif not c.chain.startswith(CHAIN_PREFIX):
        kind = "jump"
    else:  # the body of a side chain, tagged plain "nfhooks": named by the chain it is in
        kind = ("connmark save" if "CONNSAVE" in c.chain else "flow save" if "FLOW-" in c.chain
                else "connection verdict save" if "CONN-" in c.chain else "side chain")
    return Row(kind, f"({kind})", action, match, c.packets, c.bytes, before)


def _chain_hook(chain: str) -> tuple[str | None, int]:
    """(hook, generation) of one of our chains: NFH-INPUT-2 -> INPUT, 2; NFH-FLOW-INPUT -> INPUT, 0
    (0: a side chain, which carries no generation of its own); NFH-CONNSAVE -> None, 0."""
    name = chain[len(CHAIN_PREFIX):]
    gen = 1
    m = _GEN_SUFFIX.search(name)
    if m:
        name, gen = name[:m.start()], int(m.group(1))
    if name in HOOKS:
        return name, gen
    return next((h for h in HOOKS if name.endswith("-" + h)), None), 0


def _order(s: Section) -> tuple[int, int, int]:
    place = (s.hook, s.table)
    return (s.family, HOOKS.index(s.hook) if s.hook in HOOKS else len(HOOKS),
            TRAVERSAL.index(place) if place in TRAVERSAL else len(TRAVERSAL))


def sections(counted: Iterable[Counted]) -> list[Section]:
    """Group the rules by (family, hook, table); a side chain goes where it is jumped to from."""
    rules = list(counted)
    entry: dict[tuple[int, str, str], str] = {}  # (family, table, side chain) -> hook
    for c in rules:
        if not c.chain.startswith(CHAIN_PREFIX):  # a jump from a built-in chain
            m = re.search(r" -[jg] (\S+)", c.text)
            if m:
                entry[(c.family, c.table, m.group(1))] = c.chain
    out: dict[tuple[int, str, str], Section] = {}
    for c in rules:
        if c.chain.startswith(CHAIN_PREFIX):
            hook, gen = _chain_hook(c.chain)
            hook = hook or entry.get((c.family, c.table, c.chain)) or c.chain
        else:
            hook, gen = c.chain, 0
        s = out.setdefault((c.family, hook, c.table), Section(c.family, hook, c.table))
        if gen:
            s.generations.add(gen)
        s.chains.add(c.chain)
        s.rows.append(classify(c))
    return sorted(out.values(), key=_order)


def _title(s: Section) -> str:
    fam = "IPv6" if s.family == 6 else "IPv4"
    gens = f", generation {'+'.join(map(str, sorted(s.generations)))}" if s.generations - {1} else ""
    head = f"Chain {s.hook}, table {s.table}, {fam}{gens}"
    defaults = [r for r in s.rows if r.kind == "default"]
    if defaults:
        verdict = defaults[-1].action.split(" ")[0]
        pk, by = sum(r.packets for r in defaults), sum(r.bytes for r in defaults)
        return f"{head} (default {verdict}: {human(pk)} packets, {human(by)} bytes)"
    if s.hook in HOOKS and s.table == decision_table(s.hook):
        return f"{head} (default ACCEPT, no rule)"
    return head


def _table(s: Section, verbose: bool) -> Group:
    """The section's title (its default, like iptables' chain policy), rows and folded count."""
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("pkts", justify="right", no_wrap=True)
    t.add_column("bytes", justify="right", no_wrap=True)
    t.add_column("handler", no_wrap=True)
    t.add_column("action", overflow="fold")
    t.add_column("match", overflow="fold")
    folded: dict[str, int] = {}
    merged: dict[tuple[str, str, str], Row] = {}  # offload rules: both directions on one line
    for r in s.rows:
        if r.kind == "default":
            if verbose:
                t.add_row(human(r.packets), human(r.bytes), r.handler, r.action, r.rule)
            continue
        if r.kind != "handler":
            if verbose:
                t.add_row(human(r.packets), human(r.bytes), r.handler, r.action, r.rule, style="dim")
            else:
                folded[r.kind] = folded.get(r.kind, 0) + 1
            continue
        if verbose:
            t.add_row(human(r.packets), human(r.bytes), r.handler, r.action, r.rule)
            continue
        key = (r.handler, r.action, r.match)
        if key in merged:
            merged[key].packets += r.packets
            merged[key].bytes += r.bytes
            continue
        merged[key] = Row(**vars(r))
    for r in merged.values():
        t.add_row(human(r.packets), human(r.bytes), r.handler, r.action, r.match or "(all)")
    parts: list[RenderableType] = [Text(_title(s), style="bold")]
    if t.rows:
        parts.append(t)
    if folded:
        parts.append(Text(f"  + {sum(folded.values())} plumbing rules ("
                          + ", ".join(f"{n}\u00d7 {k}" for k, n in folded.items()) + "): -v shows them",
                          style="dim"))
    return Group(*parts, Text(""))


def view(counted: Sequence[Counted], verbose: bool = False) -> Group:
    """The tables of ``nfhooks rules`` (``verbose``: every rule, plumbing included)."""
    parts: list[RenderableType] = []
    quiet = 0
    for s in sections(counted):
        if verbose or any(r.kind in ("handler", "default") for r in s.rows):
            parts.append(_table(s, verbose))
        else:
            quiet += len(s.rows)
    if quiet:
        parts.append(Text(f"+ {quiet} plumbing rules in chains without handler rules "
                          "(generation stamps, jumps, connmark save): -v shows them", style="dim"))
    return Group(*parts)
