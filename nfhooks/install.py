"""Install and remove the rules nfhooks owns, with python-iptables, in this network namespace.

Ownership: every rule nfhooks installs is in a chain named ``NFH-*`` or is a jump tagged with
the comment ``nfhooks`` at the top of a built-in chain; removal deletes exactly those and never
flushes anybody else's chain. Commits take the xtables lock (``/run/xtables.lock``, the flock the
iptables tools take with ``-w``), because python-iptables does not, and a concurrent
iptables command would otherwise overwrite our commit or we theirs.

One table of one family is one atomic commit. A policy spans several, so install order matters:
chains first (all tables), jumps last; removal does the reverse (jumps first), so a packet never
jumps into a half-built chain.

python-iptables is imported lazily: importing it runs system tools and needs root, and
``nfhooks check`` must work without either.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from .hooks import HOOKS, TABLE_HOOKS, TABLE_ORDER, TRAVERSAL
from .rules import CHAIN_PREFIX, COMMENT, FAMILIES, MatchSpec, Rule, RuleSet, chain_name

XTABLES_LOCK = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
PROTO_NUMBERS = {"tcp": "6", "udp": "17", "icmp": "1", "ipv6-icmp": "58", "icmpv6": "58", "sctp": "132"}


class KernelError(RuntimeError):
    """The kernel or the machine cannot do what nfhooks needs; the text says what to do."""


@contextlib.contextmanager
def xtables_lock(timeout: float = 10.0) -> Iterator[None]:
    """Hold the lock iptables(8) takes, so our commit and theirs never interleave."""
    import time

    os.makedirs(os.path.dirname(XTABLES_LOCK), exist_ok=True)
    fd = os.open(XTABLES_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise KernelError(f"another program holds the xtables lock {XTABLES_LOCK} for over "
                                      f"{timeout:.0f}s (an iptables command?); try again") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _iptc() -> Any:
    try:
        import iptc  # noqa: PLC0415 -- lazy on purpose (see module docstring)
    except Exception as e:  # noqa: BLE001 -- any failure here means the same thing to the user
        raise KernelError(
            f"python-iptables cannot load the legacy xtables libraries ({e}). Install Debian's "
            "iptables package (make deps) and make sure the kernel has legacy xtables (ip_tables)"
        ) from None
    return iptc


def _table(family: int, name: str) -> Any:
    iptc = _iptc()
    t = iptc.Table6(name) if family == 6 else iptc.Table(name)
    t.autocommit = False
    t.refresh()
    return t


def _fix_iface_mask6(ip6: Any, field: str, name: str) -> None:
    """python-iptables 1.2.0's Rule6 writes an interface mask of 0x01 per byte, so the kernel
    compares only the lowest bit of each character: ``-i lo`` would also match ``lan``.
    Write the 0xff mask ip6tables itself uses (the name plus its NUL, or the prefix for 'eth+')."""
    n = len(name) - 1 if name.endswith("+") else len(name) + 1
    setattr(ip6, field, b"\xff" * n + b"\x00" * (16 - n))


def _set_match_opt(match: Any, opt: str, value: str, negate: bool) -> None:
    setattr(match, opt.replace("-", "_"), ("!" if negate else "") + value)


def _build_rule(rule: Rule, family: int) -> Any:
    """python-iptables rule from our Rule (option setters take '!value' for negation)."""
    iptc = _iptc()
    r = iptc.Rule6() if family == 6 else iptc.Rule()
    if rule.src is not None:
        r.src = ("!" if rule.src.negate else "") + rule.src.text()
    if rule.dst is not None:
        r.dst = ("!" if rule.dst.negate else "") + rule.dst.text()
    if rule.iif is not None:
        r.in_interface = ("!" if rule.iif.negate else "") + rule.iif.name
        if family == 6:
            _fix_iface_mask6(r.entry.ipv6, "iniface_mask", rule.iif.name)
    if rule.oif is not None:
        r.out_interface = ("!" if rule.oif.negate else "") + rule.oif.name
        if family == 6:
            _fix_iface_mask6(r.entry.ipv6, "outiface_mask", rule.oif.name)
    if rule.proto:
        r.protocol = PROTO_NUMBERS.get(rule.proto, rule.proto)
    for spec in rule.matches:
        m = r.create_match(spec.module)
        for opt, value, neg in spec.opts:
            _set_match_opt(m, opt, value, neg)
    t = r.create_target(rule.target, goto=rule.goto)
    for opt, value in rule.target_opts:
        setattr(t, opt.replace("-", "_"), value)
    return r


def install(rs: RuleSet) -> None:
    """Install ``rs``: chains and their rules first, then the jumps into them.

    Jumps go in at the top of each built-in chain (in front of an older generation's during a
    hot reload), one built-in chain per commit, in the reverse of the order packets meet them
    (``hooks.TRAVERSAL``): by the time a packet can be stamped with this generation at one
    (hook, table), every later one already has this generation's chain.
    """
    with xtables_lock():
        for fam, table in rs.tables():
            t = _table(fam, table)
            for chain in rs.chains[(fam, table)]:
                if t.is_chain(chain):
                    raise KernelError(f"chain {chain} already exists in {table} (IPv{fam}): "
                                      "remove the stale set first (nfhooks flush)")
                c = t.create_chain(chain)
                for rule in (r for r in rs.rules[(fam, table)] if r.chain == chain):
                    c.append_rule(_build_rule(rule, fam))
            t.commit()
            t.refresh()
        iptc = _iptc()
        for hook, table in reversed(TRAVERSAL):
            for fam in FAMILIES:
                jumps = [j for j in rs.jumps.get((fam, table), []) if j.chain == hook]
                if not jumps:
                    continue
                t = _table(fam, table)
                for j in reversed(jumps):
                    iptc.Chain(t, hook).insert_rule(_build_rule(j, fam))
                t.commit()
                t.refresh()


def generation_chains(generation: int) -> set[str]:
    """Names of every chain a generation may own (its hooks' chains and its CONNSAVE)."""
    return {chain_name(h, generation)
            for h in (*HOOKS, "CONNSAVE", "RESTORE", "SAVE", "ROUTE-NAT", *(f"FLOW-{h}" for h in HOOKS))}


def retire_stamps(rs: RuleSet) -> int:
    """Stop ``rs``'s chains from stamping new packets (hot reload, step 2).

    Packets it already stamped still get its verdicts until it is removed; unstamped ones pass
    through its chains untouched, to the new generation. One ``ip(6)tables-legacy-restore
    --noflush`` per family deleting each stamp rule by its exact text (atomic per table; not
    python-iptables, which cannot read the NAT targets in our nat chains, see append_rule).
    Returns the stamp rules removed.
    """
    n = 0
    for fam in FAMILIES:
        lines: list[str] = []
        for f, table in rs.tables():
            if f != fam:
                continue
            stamps = [r for r in rs.rules[(f, table)] if r.comment == f"{COMMENT} gen" and r.target == "MARK"]
            if stamps:
                lines += [f"*{table}", *("-D" + r.render()[2:] for r in stamps), "COMMIT"]
                n += len(stamps)
        if lines:
            restore(fam, lines, "the generation's stamp rule deletions")
    return n


def restore(family: int, lines: Sequence[str], what: str) -> None:
    """Feed iptables-save text to ``ip(6)tables-legacy-restore -w --noflush``: one atomic
    commit per table, other rules untouched, under the xtables lock. For what python-iptables
    cannot do (NAT targets in both families, see append_rule)."""
    tool = "ip6tables-legacy-restore" if family == 6 else "iptables-legacy-restore"
    if not shutil.which(tool):
        raise KernelError(f"{tool} not found: install Debian's iptables package")
    cp = subprocess.run([tool, "-w", "--noflush"], input="\n".join(lines) + "\n", capture_output=True, text=True)
    if cp.returncode:
        raise KernelError(f"{tool} refused {what}: {cp.stderr.strip() or cp.returncode}")


def remove_generation(generation: int) -> list[str]:
    """Remove one generation's jumps and chains, leaving the other's (hot reload, last step)."""
    return remove_all(generation_chains(generation))

def append_rule(family: int, table: str, hook: str, rule: Rule, prelude: Sequence[Rule] = ()) -> None:
    """Append ``rule`` to our chain ``rule.chain`` while the engine runs (NAT targets, nat.py).

    Through ``ip(6)tables-legacy-restore --noflush -w`` fed the rule's iptables-save text, not
    python-iptables: libxtables registers an extension for the family current when it is
    first loaded, and the NAT targets share one library (libxt_NAT.so) that python-iptables
    cannot register for the second family -- a process that created DNAT for IPv4 cannot
    for IPv6 (ldx/python-iptables#316, #325). The restore is one commit of one table, so
    atomic; ``-w`` takes the same xtables lock. If the chain is missing (a handler returned a
    NAT verdict its source did not show, so the policy compiled no chain for it), the chain,
    the chain's ``prelude`` rules (the generation guard), the rule and the jump from ``hook`` go
    in that same commit.
    """
    with xtables_lock():
        exists = _table(family, table).is_chain(rule.chain)
    lines = [f"*{table}"]
    if not exists:
        lines.append(f":{rule.chain} - [0:0]")
        jump = Rule(hook, rule.chain, matches=(MatchSpec("comment", (("comment", COMMENT, False),)),))
        lines.append("-I" + jump.render()[2:])
        lines += [r.render() for r in prelude]
    lines += [rule.render(), "COMMIT"]
    restore(family, lines, f"`{rule.render()}`")


def _comment_of(rule: Any) -> str | None:
    for m in rule.matches:
        if m.name == "comment":
            return (m.comment or "").strip('"')
    return None


def _is_ours(rule: Any, chains: set[str] | None = None) -> bool:
    """A jump into one of ``chains`` (None: any nfhooks chain, or any nfhooks-tagged rule)."""
    if rule.target is not None and rule.target.name.startswith(CHAIN_PREFIX):
        return chains is None or rule.target.name in chains
    if chains is not None:
        return False
    c = _comment_of(rule)
    return c is not None and (c == COMMENT or c.startswith(COMMENT + " "))


def remove_all(only: set[str] | None = None) -> list[str]:
    """Remove every nfhooks rule and chain in this namespace (IPv4 and IPv6, all tables).

    ``only``: remove just these chains and the jumps into them (one generation). Returns what
    was removed, one line per table. Other rules and chains are left alone.
    """
    removed: list[str] = []
    with xtables_lock():
        for fam in FAMILIES:
            for table in TABLE_ORDER:
                t = _table(fam, table)
                ours = [c for c in t.chains if c.name.startswith(CHAIN_PREFIX)
                        and (only is None or c.name in only)]
                n_jumps = 0
                for builtin in TABLE_HOOKS[table]:
                    c = _iptc().Chain(t, builtin)
                    for r in [r for r in c.rules if _is_ours(r, only)]:
                        c.delete_rule(r)
                        n_jumps += 1
                if not ours and not n_jumps:
                    continue
                t.commit()
                t.refresh()
                for c in ours:
                    t.flush_entries(c.name)
                for c in ours:
                    t.delete_chain(c.name)
                t.commit()
                t.refresh()
                removed.append(f"ip{'6' if fam == 6 else ''}tables {table}: {n_jumps} jump(s), "
                               f"{len(ours)} chain(s) {' '.join(sorted(c.name for c in ours))}")
    return removed


@dataclass
class Counted:
    family: int
    table: str
    packets: int
    bytes: int
    text: str  # the rule as iptables-save prints it


_COUNTER = re.compile(r"^\[(\d+):(\d+)\] (.*)$")


def saved_text(family: int, counters: bool = False) -> str:
    """``ip(6)tables-legacy-save`` output of this namespace."""
    tool = "ip6tables-legacy-save" if family == 6 else "iptables-legacy-save"
    if not shutil.which(tool):
        raise KernelError(f"{tool} not found: install Debian's iptables package")
    args = [tool] + (["-c"] if counters else [])
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def installed(counters: bool = False) -> tuple[str, list[Counted]]:
    """Our part of iptables-save, in the format RuleSet.render() prints, and the counters."""
    lines: list[str] = []
    counted: list[Counted] = []
    for fam in FAMILIES:
        lines.append(f"# ip{'6' if fam == 6 else ''}tables")
        table = ""
        body: list[str] = []
        for raw in saved_text(fam, counters).splitlines():
            if raw.startswith("*"):
                table, body = raw[1:], []
                continue
            if raw == "COMMIT":
                if body:
                    lines += [f"*{table}", *body, "COMMIT"]
                continue
            pk = by = 0
            text = raw
            m = _COUNTER.match(raw)
            if m:
                pk, by, text = int(m.group(1)), int(m.group(2)), m.group(3)
            if text.startswith(":" + CHAIN_PREFIX):
                body.append(text.split(" ")[0] + " - [0:0]")
            elif text.startswith("-A ") and (text.split(" ")[1].startswith(CHAIN_PREFIX)
                                              or f"-j {CHAIN_PREFIX}" in text):
                body.append(text)
                counted.append(Counted(fam, table, pk, by, text))
    return "\n".join(lines) + "\n", counted


def check_kernel() -> None:
    """Say clearly what is missing before anything is bound or installed."""
    if not _has_cap_net_admin():
        raise KernelError("nfhooks needs root or CAP_NET_ADMIN to bind NFQUEUE and change iptables rules; "
                          "run it with sudo (or in a namespace/container with --cap-add NET_ADMIN)")
    if not os.path.exists("/proc/net/netfilter/nfnetlink_queue"):
        raise KernelError("the kernel has no NFQUEUE support (/proc/net/netfilter/nfnetlink_queue is missing): "
                          "load nfnetlink_queue (modprobe nfnetlink_queue) or use a kernel with CONFIG_NETFILTER_NETLINK_QUEUE")
    if not os.path.exists("/proc/net/ip_tables_names") and not _modprobe("ip_tables"):
        raise KernelError("the kernel has no legacy xtables (ip_tables), which python-iptables needs: "
                          "modprobe ip_tables, or use a kernel with CONFIG_IP_NF_IPTABLES")


def _has_cap_net_admin() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 12))
    except OSError:
        pass
    return False


def _modprobe(module: str) -> bool:
    if not shutil.which("modprobe"):
        return False
    return subprocess.run(["modprobe", module], capture_output=True).returncode == 0
