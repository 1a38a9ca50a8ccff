"""The one reader of ``iptables-save [-c]`` text: nfhooks' part of it, and rule counters.

Both backends print the same text (``iptables-legacy-save`` and ``iptables-nft-save`` share
the iptables-save syntax), so everything that reads rules back -- ``nfhooks rules``, the
stale-set check, the queue bypass and offload metrics, the ``--workers`` balance counters --
parses it here. Pure: text in, values out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

from .hooks import TABLE_ORDER
from .rulebuild import CHAIN_PREFIX, FAMILIES

__all__ = ["Counted", "counted_rules", "installed_text", "is_ours_line"]

_COUNTER = re.compile(r"^\[(\d+):(\d+)\] (.*)$")


@dataclass
class Counted:
    family: int
    table: str
    packets: int
    bytes: int
    text: str  # the rule as iptables-save prints it (without the counters)
    chain: str = ""


def counted_rules(text: str, family: int = 4) -> Iterator[Counted]:
    """Every ``-A`` rule of ``text`` with its counters (0 when saved without ``-c``)."""
    table = ""
    for raw in text.splitlines():
        if raw.startswith("*"):
            table = raw[1:].strip()
            continue
        pk = by = 0
        line = raw
        m = _COUNTER.match(raw)
        if m:
            pk, by, line = int(m.group(1)), int(m.group(2)), m.group(3)
        if line.startswith("-A "):
            yield Counted(family, table, pk, by, line, line.split(" ", 2)[1])


def is_ours_line(rule: str) -> bool:
    """A ``-A`` line in one of our chains, or a jump/goto into one."""
    parts = rule.split(" ")
    return len(parts) > 1 and (parts[1].startswith(CHAIN_PREFIX) or f"-j {CHAIN_PREFIX}" in rule
                               or f"-g {CHAIN_PREFIX}" in rule)


def _table_key(table: str) -> int:
    return TABLE_ORDER.index(table) if table in TABLE_ORDER else len(TABLE_ORDER)


def installed_text(texts: Mapping[int, str] | Iterable[tuple[int, str]]) -> tuple[str, list[Counted]]:
    """Our part of each family's save text, in the format ``RuleSet.render()`` prints, and
    the counters of our rules.

    Normalised to the legacy order, whatever order the backend printed: tables in
    ``TABLE_ORDER``; per table our chain declarations sorted, the jumps from built-in chains
    (in the order saved), then our chains' rules, chains sorted, each chain's in order.
    """
    items = dict(texts.items() if isinstance(texts, Mapping) else texts)
    lines: list[str] = []
    counted: list[Counted] = []
    for fam in FAMILIES:
        lines.append(f"# ip{'6' if fam == 6 else ''}tables")
        text = items.get(fam, "")
        chains: dict[str, set[str]] = {}
        rules: dict[str, list[Counted]] = {}
        table = ""
        for raw in text.splitlines():
            if raw.startswith("*"):
                table = raw[1:].strip()
                chains.setdefault(table, set())
                rules.setdefault(table, [])
            elif raw.startswith(":" + CHAIN_PREFIX):
                chains[table].add(raw[1:].split(" ")[0])
        for c in counted_rules(text, fam):
            if is_ours_line(c.text):
                rules[c.table].append(c)
        for table in sorted(chains, key=_table_key):
            ours = sorted(chains[table])
            jumps = [c for c in rules[table] if not c.chain.startswith(CHAIN_PREFIX)]
            body = [c for ch in ours for c in rules[table] if c.chain == ch]
            if not ours and not jumps:
                continue
            lines += [f"*{table}", *(f":{ch} - [0:0]" for ch in ours), *(c.text for c in jumps),
                      *(c.text for c in body), "COMMIT"]
            counted += [*jumps, *body]
    return "\n".join(lines) + "\n", counted
