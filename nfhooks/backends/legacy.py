"""The legacy xtables backend: python-iptables for chains, rules and jumps, and
``ip(6)tables-legacy-restore --noflush`` / ``-save`` for the rest. The only module that imports
python-iptables (``iptc``).

Commits take the xtables lock (``/run/xtables.lock``, the flock the iptables tools take with
``-w``), because python-iptables does not, and a concurrent iptables command would otherwise
overwrite our commit or we theirs.

One table of one family is one atomic commit. A policy spans several, so install order
matters: chains first (all tables), jumps last, one built-in chain per commit in the reverse
of the order packets meet them; removal does the reverse (jumps first), so a packet never
jumps into a half-built chain.

python-iptables is imported lazily: importing it runs system tools and needs root, and
``nfhooks check`` must work without either.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from typing import Any, Iterator, Sequence

from ..errors import KernelError
from ..hooks import TABLE_HOOKS, TABLE_ORDER, TRAVERSAL
from ..rulebuild import CHAIN_PREFIX, COMMENT, FAMILIES, Rule, RuleSet
from .base import Backend, check_queue_support
from .tools import SAVE_TOOLS

__all__ = ["LegacyBackend", "xtables_lock", "PROTO_NUMBERS"]

PROTO_NUMBERS = {"tcp": "6", "udp": "17", "icmp": "1", "ipv6-icmp": "58", "icmpv6": "58", "sctp": "132"}


def _lock_path() -> str:
    return os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")


@contextlib.contextmanager
def xtables_lock(timeout: float = 10.0) -> Iterator[None]:
    """Hold the lock iptables(8) takes, so our commit and theirs never interleave."""
    path = _lock_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise KernelError(f"another program holds the xtables lock {path} for over "
                                      f"{timeout:.0f}s (an iptables command?); try again") from None
                time.sleep(0.02)  # polling a flock with a deadline
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _iptc() -> Any:
    try:
        import iptc  # noqa: PLC0415 -- lazy on purpose (see module docstring)
    except Exception as e:  # noqa: BLE001 -- any failure here means the same thing to the user
        raise KernelError(
            f"python-iptables cannot load the legacy xtables libraries ({e}). Install Debian's "
            "iptables package (make deps) and make sure the kernel has legacy xtables (ip_tables), "
            "or use --backend nft"
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
            if spec.module == "set":  # --match-set NAME DIR: python-iptables wants the words apart
                setattr(m, opt.replace("-", "_"), (["!"] if neg else []) + value.split(" "))
            else:
                setattr(m, opt.replace("-", "_"), ("!" if neg else "") + value)
    t = r.create_target(rule.target, goto=rule.goto)
    for opt, value in rule.target_opts:
        setattr(t, opt.replace("-", "_"), value)
    return r


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


class LegacyBackend(Backend):
    """Legacy xtables (``ip_tables``/``ip6_tables``), what nfhooks always wrote to."""

    name = "legacy"
    restore_tool = "iptables-legacy-restore"

    def check_kernel(self) -> None:
        check_queue_support()
        if not os.path.exists("/proc/net/ip_tables_names") and not _modprobe("ip_tables"):
            raise KernelError("the kernel has no legacy xtables (ip_tables), which python-iptables needs: "
                              "modprobe ip_tables, use a kernel with CONFIG_IP_NF_IPTABLES, or use --backend nft")

    def save_header(self) -> str:
        """None: the legacy output stays byte for byte what nfhooks always printed."""
        return ""

    def can_look(self) -> bool:
        """Only where legacy tables exist already: reading would otherwise load ip_tables."""
        return any(_nonempty(p) for p in ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"))

    def install(self, rs: RuleSet) -> None:
        """Jumps go in at the top of each built-in chain (in front of an older generation's
        during a hot reload), one built-in chain per commit, in the reverse of the order
        packets meet them (``hooks.TRAVERSAL``): by the time a packet can be stamped with this
        generation at one (hook, table), every later one already has this generation's chain."""
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

    def remove(self, only: set[str] | None = None) -> list[str]:
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

    def restore(self, family: int, lines: Sequence[str], what: str) -> None:
        """``ip(6)tables-legacy-restore -w --noflush``: one atomic commit per table, under the
        xtables lock. For what python-iptables cannot do: libxtables registers an extension
        for the family current when it is first loaded, and the NAT targets share one library
        (libxt_NAT.so) that python-iptables cannot register for the second family
        (ldx/python-iptables#316, #325)."""
        tool = "ip6tables-legacy-restore" if family == 6 else "iptables-legacy-restore"
        if not shutil.which(tool):
            raise KernelError(f"{tool} not found: install Debian's iptables package")
        cp = subprocess.run([tool, "-w", "--noflush"], input="\n".join(lines) + "\n", capture_output=True, text=True)
        if cp.returncode:
            raise KernelError(f"{tool} refused {what}: {cp.stderr.strip() or cp.returncode}")

    def saved_text(self, family: int, counters: bool = False) -> str:
        tool = "ip6tables-legacy-save" if family == 6 else "iptables-legacy-save"
        if not shutil.which(tool):
            raise KernelError(f"{tool} not found: install Debian's iptables package")
        args = [tool] + (["-c"] if counters else [])
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout

    def save_command(self, family: int) -> list[str]:
        return [SAVE_TOOLS["legacy"][family]]

    def chain_exists(self, family: int, table: str, chain: str) -> bool:
        with xtables_lock():
            return bool(_table(family, table).is_chain(chain))


def _nonempty(path: str) -> bool:
    try:
        with open(path) as f:
            return bool(f.read().strip())
    except OSError:
        return False


def _modprobe(module: str) -> bool:
    if not shutil.which("modprobe"):
        return False
    return subprocess.run(["modprobe", module], capture_output=True).returncode == 0
