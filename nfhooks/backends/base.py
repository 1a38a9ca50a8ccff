"""What the engine needs from the kernel's rule store, whichever one holds the rules.

A backend writes the iptables-save text ``rules.RuleSet`` compiles into one rule store
(legacy xtables or nf_tables) of this network namespace and reads it back. Everything that is
the same for every store lives here, over four primitives a backend implements: ``install``,
``remove``, ``restore`` (raw save text with ``--noflush``) and ``saved_text``.

Ownership, as everywhere in nfhooks: ours are the chains named ``NFH-*`` and the jumps tagged
``nfhooks`` at the top of built-in chains; removal never flushes anybody else's chain.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Sequence

from ..errors import KernelError
from ..hooks import HOOKS
from ..rulebuild import COMMENT, FAMILIES, Rule, RuleSet, chain_name
from ..saved import Counted, installed_text

__all__ = ["Backend", "generation_chains", "stamp_deletions", "check_queue_support"]


def generation_chains(generation: int) -> set[str]:
    """Names of every chain a generation may own (its hooks' chains and its CONNSAVE)."""
    return {chain_name(h, generation)
            for h in (*HOOKS, "CONNSAVE", "RESTORE", "SAVE", "ROUTE-NAT", *(f"FLOW-{h}" for h in HOOKS),
                      *(f"CONN-{h}" for h in HOOKS))}  # connverdict.conn_chain


def stamp_deletions(rs: RuleSet, family: int) -> tuple[list[str], int]:
    """Save-text lines deleting ``rs``'s generation stamp rules of one family, and their count."""
    lines: list[str] = []
    n = 0
    for f, table in rs.tables():
        if f != family:
            continue
        stamps = [r for r in rs.rules[(f, table)] if r.comment == f"{COMMENT} gen" and r.target == "MARK"]
        if stamps:
            lines += [f"*{table}", *("-D" + r.render()[2:] for r in stamps), "COMMIT"]
            n += len(stamps)
    return lines, n


def check_queue_support() -> None:
    """Root/CAP_NET_ADMIN and NFQUEUE: what every backend needs, said before anything is bound."""
    if not _has_cap_net_admin():
        raise KernelError("nfhooks needs root or CAP_NET_ADMIN to bind NFQUEUE and change iptables rules; "
                          "run it with sudo (or in a namespace/container with --cap-add NET_ADMIN)")
    if not os.path.exists("/proc/net/netfilter/nfnetlink_queue"):
        raise KernelError("the kernel has no NFQUEUE support (/proc/net/netfilter/nfnetlink_queue is missing): "
                          "load nfnetlink_queue (modprobe nfnetlink_queue) or use a kernel with CONFIG_NETFILTER_NETLINK_QUEUE")


def _has_cap_net_admin() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 12))
    except OSError:
        pass
    return False


class Backend(ABC):
    """One rule store of this namespace. Stateless: every call reads or writes the kernel."""

    name: str = ""
    #: the restore program, for `nfhooks check`'s header and error messages
    restore_tool: str = ""

    @abstractmethod
    def check_kernel(self) -> None:
        """Say clearly what is missing before anything is bound or installed."""

    @abstractmethod
    def install(self, rs: RuleSet) -> None:
        """Install a generation: chains and their rules, then the jumps in front of an older
        generation's, so no packet is stamped by it before every later hook has its chain."""

    @abstractmethod
    def remove(self, only: set[str] | None = None) -> list[str]:
        """Remove all of ours (``only`` None) or these chains and the jumps into them; one line
        per table saying what went."""

    @abstractmethod
    def restore(self, family: int, lines: Sequence[str], what: str) -> None:
        """Feed save text with ``--noflush``: others' rules untouched. ``what`` names it in errors."""

    @abstractmethod
    def saved_text(self, family: int, counters: bool = False) -> str:
        """The family's save text of this namespace (``[packets:bytes]`` prefixes with counters)."""

    @abstractmethod
    def save_command(self, family: int) -> list[str]:
        """argv a human or a test runs to look at what this backend holds."""

    @abstractmethod
    def chain_exists(self, family: int, table: str, chain: str) -> bool:
        """Whether ``chain`` exists in ``table`` now."""

    def save_header(self) -> str:
        """The comment line saying which tool the rule text is for (`nfhooks check`, `rules --save`)."""
        return f"# backend {self.name} ({self.restore_tool})\n"

    def has_ours(self) -> bool:
        """Any nfhooks chain or jump in this store (a stale set, maybe another backend's)?"""
        if not self.can_look():
            return False
        text, _ = self.installed()
        return any(line.startswith("*") for line in text.splitlines())

    def can_look(self) -> bool:
        """Whether looking is possible without creating anything (no module loaded, no table made)."""
        return True

    def remove_generation(self, generation: int) -> list[str]:
        """One generation's jumps and chains, leaving the other's (hot reload, last step)."""
        return self.remove(generation_chains(generation))

    def retire_stamps(self, rs: RuleSet) -> int:
        """Stop ``rs``'s chains from stamping new packets (hot reload, step 2): one restore per
        family deleting each stamp rule by its exact text. Packets it stamped already still
        get its verdicts until it is removed. Returns the stamp rules removed."""
        n = 0
        for fam in FAMILIES:
            lines, k = stamp_deletions(rs, fam)
            if lines:
                self.restore(fam, lines, "the generation's stamp rule deletions")
                n += k
        return n

    def append_rule(self, family: int, table: str, hook: str, rule: Rule, prelude: Sequence[Rule] = ()) -> None:
        """Append ``rule`` to our chain ``rule.chain`` while the engine runs (NAT targets, nat.py).

        One restore of one table, so atomic. If the chain is missing (a handler returned a NAT
        verdict its source did not show, so the policy compiled no chain for it), the chain, its
        ``prelude`` rules (the generation guard), the rule and the jump from ``hook`` go in that
        same commit."""
        from ..rulebuild import MatchSpec

        lines = [f"*{table}"]
        if not self.chain_exists(family, table, rule.chain):
            lines.append(f":{rule.chain} - [0:0]")
            jump = Rule(hook, rule.chain, matches=(MatchSpec("comment", (("comment", COMMENT, False),)),))
            lines.append("-I" + jump.render()[2:])
            lines += [r.render() for r in prelude]
        lines += [rule.render(), "COMMIT"]
        self.restore(family, lines, f"`{rule.render()}`")

    def installed(self, counters: bool = False) -> tuple[str, list[Counted]]:
        """Our part of the save text, in the format RuleSet.render() prints, and the counters."""
        return installed_text({fam: self.saved_text(fam, counters) for fam in FAMILIES})

    def counter_texts(self) -> list[str]:
        """Both families' save text with counters; a family that fails is left out (a failing
        metrics scrape would hide every other metric)."""
        texts = []
        for fam in FAMILIES:
            try:
                texts.append(self.saved_text(fam, counters=True))
            except Exception:  # noqa: BLE001 -- see above
                continue
        return texts
