"""Address sets and kernel verdicts as a feature (the declarations are in nfhooks/sets.py).

Compile: no mark field; ``policy.kernel_verdict()`` rules at the top of nfhooks' chains at
their hook (every table there that can carry the verdict: a kernel accept in mangle would not
keep filter's handlers from seeing the packet), before any queue rule. Set matches in handler
rules are rulebuild.match_specs' (``-m set --match-set nfh-<name>-<family> src``).

Engine: at start, every stale ``nfh-*`` set (a kill -9) is destroyed -- the engine has removed
the stale rules that used them just before -- and the declared sets are created and filled in
one ``ipset restore``, before the rules exist. A reload keeps a set declared again with the
same kind and options, entries included (the declared entries are brought up to date: new
ones added, ones no longer declared removed; handler-added ones stay); it refuses a set whose
kind or options changed (restart to change them: the running rules use it). A set the new
policy drops stays until the old generation is gone (destroyed at the next reload or exit).
Exit destroys our sets after the rules are removed.

The runtime (:class:`SetsRuntime`) is what a bound ``AddressSet`` calls per packet: one
synchronous ``ipset`` interactive command each (sets_ipset.IpsetShell), so ``add()`` returns
with the entry in the kernel: every packet that reaches the set's rule after that is matched
(packets already queued behind the current one were matched before and still reach Python).
``in`` and ``len()`` answer from the kernel (``ipset test``, ``list -t``); ``len()`` counts
timed-out entries until the kernel's garbage collection removes them.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any, Callable, Iterator

from ..errors import KernelError
from ..hooks import PlacementError, check_verdict, decision_table
from ..rulebuild import COMMENT, Rule, comment, match_specs, proto_name, reject_with
from ..sets import AddressSet, SetError, entry_lines
from .. import sets_ipset
from .base import ChainContext, CompileContext, EngineEnv, Feature

__all__ = ["SetsFeature", "SetsRuntime", "SetsCollector"]

log = logging.getLogger("nfhooks.sets")

KERNEL_TABLES = ("raw", "mangle", "filter")  # where DROP/ACCEPT may go (nat refuses DROP)
SHOWN_ENTRIES = 3  # `check` prints this many add lines per set, then a count


class SetsRuntime:
    """The per-engine state behind the bound sets (sets.SetOps): the ipset shell, additions."""

    def __init__(self, sets: dict[str, AddressSet]) -> None:
        self.sets = sets
        self.shell = sets_ipset.IpsetShell()
        self._additions: Counter[str] = Counter()
        self._pid = os.getpid()
        for s in sets.values():
            s.bind(self)

    @property
    def additions(self) -> Counter[str]:
        """This process's additions: a ``--workers`` worker forked with the main process's
        runtime counts from 0 (the main process counts the declared entries, once)."""
        if self._pid != os.getpid():
            self._additions, self._pid = Counter(), os.getpid()
        return self._additions

    def _run(self, line: str) -> str:
        out = self.shell.run(line)
        if out.startswith("ipset v"):
            raise SetError(out.split(": ", 1)[-1])
        return out

    def add(self, aset: AddressSet, family: int, entry: str, timeout: int | None) -> None:
        self._run(f"add {aset.kernel_name(family)} {entry}" + ("" if timeout is None else f" timeout {timeout}"))
        self.additions[aset.name] += 1

    def remove(self, aset: AddressSet, family: int, entry: str) -> None:
        self._run(f"del {aset.kernel_name(family)} {entry}")

    def test(self, aset: AddressSet, family: int, entry: str) -> bool:
        return "NOT in set" not in self._run(f"test {aset.kernel_name(family)} {entry}")

    def count(self, aset: AddressSet) -> int:
        total = 0
        for fam in aset.families:
            for line in self._run(f"list -t {aset.kernel_name(fam)}").splitlines():
                if line.startswith("Number of entries:"):
                    total += int(line.split(":")[1])
        return total

    def close(self) -> None:
        self.shell.close()
        for s in self.sets.values():
            s.bind(None)


class SetsCollector:
    """``nfhooks_set_entries{set}`` (the kernel's count at scrape time) and
    ``nfhooks_set_additions_total{set}`` (declared entries loaded plus every add())."""

    def __init__(self, current: Callable[[], Any]) -> None:
        self.current = current

    @staticmethod
    def _families() -> tuple[Any, Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        return (GaugeMetricFamily("nfhooks_set_entries", "Entries in the address set (both families), "
                                  "read from the kernel at scrape time.", labels=["set"]),
                CounterMetricFamily("nfhooks_set_additions", "Entries added to the address set since the "
                                    "engine started: the declared ones, then every add().", labels=["set"]))

    def describe(self) -> Iterator[Any]:
        return iter(self._families())

    def collect(self) -> Iterator[Any]:
        entries, additions = self._families()
        rt = self.current()
        if rt is not None:
            for name, aset in rt.sets.items():
                try:
                    entries.add_metric([name], rt.count(aset))
                except (KernelError, SetError) as e:
                    log.warning("cannot count set %s: %s", name, e)
                additions.add_metric([name], rt.additions[name])
        yield entries
        yield additions


def _runtime(env: EngineEnv) -> SetsRuntime | None:
    for s in env.policy.sets.values():
        return s.ops if isinstance(s.ops, SetsRuntime) else None
    return None


def _create_lines(sets: dict[str, AddressSet]) -> list[str]:
    lines = []
    for s in sets.values():
        for fam in s.families:
            lines.append(s.create_line(fam))
            lines += entry_lines(s, fam, (e for f, e in s.declared() if f == fam))
    return lines


def _verdict_rules(chain: str, family: int, kv: Any, m: Any) -> list[Rule]:
    """The rule(s) of one kernel verdict: -j ACCEPT / DROP, or REJECT as the defaults do."""
    specs = (*match_specs(m, family), comment(f"{COMMENT} kernel {kv.name}"))
    kw = dict(src=m.src, dst=m.dst, iif=m.iif, oif=m.oif, matches=specs)
    proto = proto_name(m.proto, family)
    kind = kv.verdict.kind
    if kind != "reject":
        return [Rule(chain, kind.upper(), proto=proto, **kw)]
    with_ = kv.verdict.with_
    if with_ in ("admin-prohibited", "host-unreachable", "port-unreachable"):
        return [Rule(chain, "REJECT", (("reject-with", reject_with(with_, family)),), proto=proto, **kw)]
    out = []
    if proto in (None, "tcp"):
        out.append(Rule(chain, "REJECT", (("reject-with", "tcp-reset"),), proto="tcp", **kw))
    if proto != "tcp" and with_ == "auto":
        out.append(Rule(chain, "REJECT", (("reject-with", reject_with("port-unreachable", family)),),
                        proto=proto, **kw))
    return out


class SetsFeature(Feature):
    name = "sets"
    check_order = 3  # after offload: policies without sets print nothing (golden output)
    per_worker_collector = True  # the workers' add()s, summed; entries: the main process's kernel count

    def used(self, ctx: CompileContext) -> bool:
        return bool(ctx.policy.sets or ctx.policy.kernel_verdicts)

    def check(self, ctx: CompileContext) -> None:
        for s in ctx.policy.sets.values():
            s.declared()  # a file named by an Option is read here, with --set applied
        for kv in ctx.policy.kernel_verdicts:
            kv.match()

    def _tables(self, kv: Any) -> list[str]:
        out = []
        for t in (("filter",) if kv.verdict.kind == "reject" else KERNEL_TABLES):  # REJECT: filter only
            try:
                check_verdict(kv.verdict.kind, kv.hook, t)
                out.append(t)
            except PlacementError:
                pass
        return out

    def hook_tables(self, ctx: CompileContext, hook: str) -> set[str]:
        return {decision_table(hook) for kv in ctx.policy.kernel_verdicts if kv.hook == hook}

    def chain_head(self, ctx: CompileContext, chain: ChainContext) -> list[Any]:
        out: list[Rule] = []
        for kv in ctx.policy.kernel_verdicts:
            if kv.hook == chain.hook and chain.table in self._tables(kv):
                m = kv.match()
                if chain.family in m.families():
                    out += _verdict_rules(chain.chain, chain.family, kv, m)
        return out

    def check_lines(self, policy: Any, rs: Any) -> list[str]:
        out = []
        if policy.sets:
            out.append("# address sets (`run` creates them before these rules and destroys them after; "
                       "`nfhooks flush` too), as `ipset -exist restore` input:")
            for s in policy.sets.values():
                for fam in s.families:
                    entries = [e for f, e in s.declared() if f == fam]
                    out.append(f"#   {s.create_line(fam)}")
                    out += [f"#   {line}" for line in entry_lines(s, fam, entries[:SHOWN_ENTRIES])]
                    if len(entries) > SHOWN_ENTRIES:
                        out.append(f"#   ... {len(entries) - SHOWN_ENTRIES} more add lines ({s.source()})")
        for kv in policy.kernel_verdicts:
            out.append(f"# kernel verdict {kv.name}: {kv.verdict.kind} at {kv.hook} for {kv.match().describe()} "
                       "(no queue: Python never sees these packets)")
        return out

    # -- engine -----------------------------------------------------------------------------
    def runtime(self, env: EngineEnv) -> SetsRuntime | None:
        return SetsRuntime(env.policy.sets) if env.policy.sets else None

    def collector(self, current: Callable[[], Any]) -> SetsCollector:
        return SetsCollector(current)

    def start(self, env: EngineEnv) -> None:
        if not env.policy.sets and not sets_ipset.available():
            return
        stale = sets_ipset.destroy_ours()  # their rules were removed by the engine just before
        if stale:
            log.warning("removed stale address sets left by an engine that is gone: %s", "; ".join(stale))
        sets_ipset.restore(_create_lines(env.policy.sets))
        rt = _runtime(env)
        if rt is not None:
            for s in env.policy.sets.values():
                rt.additions[s.name] += len(s.declared())

    def reload(self, old: EngineEnv, new: EngineEnv) -> None:
        before, after = old.policy.sets, new.policy.sets
        for name, s in after.items():
            o = before.get(name)
            if o is not None and ((o.kind, o.families) != (s.kind, s.families) or any(
                    o.options(f) != s.options(f) or not s.fits(f, o.maxelem(f)) for f in s.families)):
                raise KernelError(f"set {name!r} changed its kind, family, timeout or size (or outgrew it): the "
                                  "running rules use it; restart nfhooks to change them (or give the set a new name)")
        lines: list[str] = []
        old_rt, new_rt = _runtime(old), _runtime(new)
        for name, s in after.items():
            o = before.get(name)
            if o is None:
                lines += [f"destroy {s.kernel_name(f)}" for f in s.families
                          if s.kernel_name(f) in sets_ipset.list_ours()]
                for fam in s.families:
                    lines.append(s.create_line(fam))
                    lines += entry_lines(s, fam, (e for f, e in s.declared() if f == fam))
                added = len(s.declared())
            else:
                was, now = set(o.declared()), set(s.declared())
                for fam in s.families:
                    lines += entry_lines(s, fam, sorted(e for f, e in now - was if f == fam))
                    lines += entry_lines(s, fam, sorted(e for f, e in was - now if f == fam), verb="del")
                added = len(now - was)
            if new_rt is not None:
                new_rt.additions[name] = (old_rt.additions[name] if old_rt and o is not None else 0) + added
        sets_ipset.restore(lines)
        keep = {s.kernel_name(f) for d in (before, after) for s in d.values() for f in s.families}
        try:  # sets of generations retired before this reload
            sets_ipset.destroy_ours(keep)
        except KernelError as e:
            log.warning("%s", e)
        if old_rt is not None:  # the new runtime starts its own; a failed install lets the old one start again
            old_rt.shell.close()

    def stop(self, env: EngineEnv, owned: bool) -> None:
        rt = _runtime(env)
        if rt is not None:
            rt.close()
        if not owned or (not env.policy.sets and not sets_ipset.available()):
            return
        try:
            gone = sets_ipset.destroy_ours()
            if gone:
                log.info("removed: %s", "; ".join(gone))
        except KernelError as e:  # never raises: the teardown goes on
            log.error("%s", e)
