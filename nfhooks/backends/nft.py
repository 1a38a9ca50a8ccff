"""The nf_tables backend: every rule in nf_tables, through ``iptables-nft-restore --noflush``
and ``iptables-nft-save`` (Debian's iptables package, xtables-nft-multi), so nothing is created
in legacy xtables. It needs no ``ip_tables`` module, only nf_tables and nft_compat (the
xtables matches and targets nfhooks' rules use, NFQUEUE included, run through nft_compat:
this works on kernels without nft_queue or flowtables). Pure text in, one subprocess out.

Atomicity, as measured with iptables 1.8.9: ``iptables-nft-restore`` commits each ``*table
... COMMIT`` block of its input as one nf_tables transaction (a later block that fails leaves
the earlier ones committed), not the whole input. So one call per family carries a whole
step -- a generation's chains, rules and jumps at install; a reload's stamp switch; a removal
-- which saves the per-table commits and the xtables lock of the legacy path, and makes each
table's part of a step atomic. What it does not make atomic, and why the generation stamp
(rules.generation_rules) is still needed: the tables of one family are still separate
transactions, so jumps go in one (hook, table) per block, in the reverse of the order packets
meet them, as on legacy; the two families are two calls; and packets already queued or
repeated (NF_REPEAT) by the old generation come back into the table after the switch and
must still be decided by the generation that queued them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Sequence

from ..errors import KernelError
from ..hooks import TABLE_ORDER, TRAVERSAL
from ..rulebuild import CHAIN_PREFIX, COMMENT, RuleSet
from .base import Backend, check_queue_support
from .tools import SAVE_TOOLS

__all__ = ["NftBackend", "install_lines", "removal_lines", "existing_chains"]

_TARGET = re.compile(r" (?:-j|-g) (\S+)")


def install_lines(rs: RuleSet, family: int) -> list[str]:
    """Restore text installing ``rs``'s part of one family: a block per table with its chains
    and rules, then one block per (hook, table) inserting the jumps, in reverse traversal
    order (see the module docstring)."""
    lines: list[str] = []
    for fam, table in rs.tables():
        if fam != family:
            continue
        chains = rs.chains[(fam, table)]
        lines += [f"*{table}", *(f":{c} - [0:0]" for c in chains)]
        lines += [r.render() for c in chains for r in rs.rules[(fam, table)] if r.chain == c]
        lines.append("COMMIT")
    for hook, table in reversed(TRAVERSAL):
        jumps = [j for j in rs.jumps.get((family, table), []) if j.chain == hook]
        if jumps:
            lines += [f"*{table}", *("-I" + j.render()[2:] for j in reversed(jumps)), "COMMIT"]
    return lines


def _ours_jump(rule: str, only: set[str] | None) -> bool:
    """A rule of a built-in chain that is ours: a jump into one of ``only`` (None: into any of
    our chains, or any rule tagged ``nfhooks``)."""
    m = _TARGET.search(rule)
    if m and m.group(1).startswith(CHAIN_PREFIX):
        return only is None or m.group(1) in only
    if only is not None:
        return False
    return f"--comment {COMMENT} " in rule + " " or f'--comment "{COMMENT} ' in rule


def removal_lines(saved: str, family: int,
                  only: set[str] | None = None) -> tuple[list[str], list[str], list[str]]:
    """From one family's save text: restore text removing our jumps and chains (``only``:
    just these chains and the jumps into them), one block per table (jumps deleted, then our
    chains flushed, then deleted); one line per table saying what goes; and the cleanup text
    deleting the built-in chains that removal leaves empty with policy ACCEPT.

    iptables-nft creates a built-in chain (an nf_tables base chain, a hook registration) only
    when a rule needs it, so our jump may have created it; empty and accepting, it is the same
    as no chain to every packet. The cleanup is a separate restore that may fail (another tool
    added a rule meanwhile) without undoing the removal."""
    tables: dict[str, tuple[list[str], list[str]]] = {}  # table -> (our chains, our jumps)
    policies: dict[tuple[str, str], str] = {}  # (table, built-in chain) -> policy
    others: set[tuple[str, str]] = set()  # built-in chains with rules that stay
    table = ""
    for raw in saved.splitlines():
        line = raw.split("] ", 1)[1] if raw.startswith("[") and "] " in raw else raw
        if line.startswith("*"):
            table = line[1:].strip()
            tables.setdefault(table, ([], []))
        elif line.startswith(":" + CHAIN_PREFIX):
            name = line[1:].split(" ")[0]
            if only is None or name in only:
                tables[table][0].append(name)
        elif line.startswith(":"):
            parts = line[1:].split(" ")
            policies[(table, parts[0])] = parts[1] if len(parts) > 1 else ""
        elif line.startswith("-A ") and not line.split(" ")[1].startswith(CHAIN_PREFIX):
            if _ours_jump(line, only):
                tables[table][1].append(line)
            else:
                others.add((table, line.split(" ")[1]))
    lines: list[str] = []
    summary: list[str] = []
    cleanup: list[str] = []
    for table, (chains, jumps) in sorted(tables.items(), key=lambda kv: _table_key(kv[0])):
        if not chains and not jumps:
            continue
        lines += [f"*{table}", *("-D" + j[2:] for j in jumps), *(f"-F {c}" for c in chains),
                  *(f"-X {c}" for c in chains), "COMMIT"]
        summary.append(f"ip{'6' if family == 6 else ''}tables {table}: {len(jumps)} jump(s), "
                       f"{len(chains)} chain(s) {' '.join(sorted(chains))}")
        emptied = sorted({j.split(" ")[1] for j in jumps} - {c for t, c in others if t == table})
        emptied = [c for c in emptied if policies.get((table, c)) == "ACCEPT"]
        if emptied:
            cleanup += [f"*{table}", *(f"-X {c}" for c in emptied), "COMMIT"]
    return lines, summary, cleanup


def _table_key(table: str) -> int:
    return TABLE_ORDER.index(table) if table in TABLE_ORDER else len(TABLE_ORDER)


def existing_chains(saved: str) -> set[tuple[str, str]]:
    """``{(table, chain)}`` of every user chain in save text."""
    out: set[tuple[str, str]] = set()
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            out.add((table, line[1:].split(" ")[0]))
    return out


def _need(tool: str) -> str:
    """``tool``, or the KernelError that says which package brings it."""
    if not shutil.which(tool):
        raise KernelError(f"{tool} not found: install Debian's iptables package (xtables-nft-multi)")
    return tool


class NftBackend(Backend):
    """nf_tables through the iptables-nft tools."""

    name = "nft"
    restore_tool = "iptables-nft-restore"

    def check_kernel(self) -> None:
        check_queue_support()
        for fam in (4, 6):
            tool = "ip6tables-nft-save" if fam == 6 else "iptables-nft-save"
            cp = subprocess.run([_need(tool)], capture_output=True, text=True)
            if cp.returncode:
                raise KernelError(f"{tool} failed ({cp.stderr.strip() or cp.returncode}): the kernel needs "
                                  "nf_tables and nft_compat for --backend nft (CONFIG_NF_TABLES, "
                                  "CONFIG_NFT_COMPAT), or use --backend legacy")
            _need("ip6tables-nft-restore" if fam == 6 else "iptables-nft-restore")

    def install(self, rs: RuleSet) -> None:
        """One restore per family (see the module docstring); a chain of ``rs`` that exists
        already is refused first, since a ``--noflush`` restore would silently flush it."""
        for fam in (4, 6):
            lines = install_lines(rs, fam)
            if not lines:
                continue
            have = existing_chains(self.saved_text(fam))
            for f, table in rs.tables():
                for chain in rs.chains[(f, table)] if f == fam else ():
                    if (table, chain) in have:
                        raise KernelError(f"chain {chain} already exists in {table} (IPv{fam}): "
                                          "remove the stale set first (nfhooks flush)")
            self.restore(fam, lines, f"generation {rs.generation}'s rules")

    def remove(self, only: set[str] | None = None) -> list[str]:
        removed: list[str] = []
        for fam in (4, 6):
            lines, summary, cleanup = removal_lines(self.saved_text(fam), fam, only)
            if lines:
                self.restore(fam, lines, "the removal of nfhooks' rules")
                removed += summary
            if cleanup:
                try:
                    self.restore(fam, cleanup, "the deletion of built-in chains left empty")
                except KernelError:
                    pass  # not ours any more (a rule was added meanwhile): it stays
        return removed

    def restore(self, family: int, lines: Sequence[str], what: str) -> None:
        tool = "ip6tables-nft-restore" if family == 6 else "iptables-nft-restore"
        cp = subprocess.run([_need(tool), "-w", "--noflush"], input="\n".join(lines) + "\n", capture_output=True, text=True)
        if cp.returncode:
            raise KernelError(f"{tool} refused {what}: {cp.stderr.strip() or cp.returncode}")

    def saved_text(self, family: int, counters: bool = False) -> str:
        tool = "ip6tables-nft-save" if family == 6 else "iptables-nft-save"
        return subprocess.run([_need(tool), *(["-c"] if counters else [])], capture_output=True, text=True,
                              check=True).stdout

    def save_command(self, family: int) -> list[str]:
        return [SAVE_TOOLS["nft"][family]]

    def chain_exists(self, family: int, table: str, chain: str) -> bool:
        return (table, chain) in existing_chains(self.saved_text(family))
