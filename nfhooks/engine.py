"""The engine: one packet in, exactly one verdict out.

A queue per handler, so the queue number already tells which handler's kernel match fired:
the dispatcher is one closure per queue, built once (``Dispatcher.callback``), with its metric
children, default verdict and allowed verdict kinds bound in. Per packet it does: parse
headers (struct, no scapy), call the handler inside an error guard (mitmproxy's ``safecall``:
any exception, wrong return type or impossible verdict becomes the hook's default, logged with
a trimmed traceback, rate-limited, and counted), then apply the verdict. NetfilterQueue would
leave a packet without a verdict if the callback raised, so nothing may escape the callback.

Applying verdicts (the mark layout is in marks.py, the rules that act on it in rules.py):

=========  ===============================================================================
None       set the resume index to this handler's position, NF_REPEAT: the table re-runs,
           the resume rule lets the packet continue right after this handler's queue rule
accept     NF_ACCEPT
drop       NF_DROP
reject     action=reject in the mark; NF_REPEAT when queued from filter (our REJECT rule at
           the top of the chain fires), NF_ACCEPT when queued from mangle (filter, later at
           the same hook, fires)
mark       masked read-modify-write of the user bits (set_mark writes all 32 bits), NF_ACCEPT
connmark   as mark, plus action=connsave, NF_REPEAT: our CONNMARK --save-mark rule copies the
           user bits to the connection, clears the action and accepts
dnat etc.  the target's index in the nat mark field (masked; the rule is installed first if the
           target is new, see nat.py), NF_ACCEPT from mangle: the nat table at the same hook
           applies it, conntrack does the rest of the connection
mangle     the packet rewritten in Python (mangle.py: lengths, checksums), set_payload,
           NF_ACCEPT. A truncated queued copy is never rewritten: accepted as it is, counted
           (nfhooks_truncated_packets) and logged naming the handler
=========  ===============================================================================
"""

from __future__ import annotations

import logging
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from .hooks import PLACEMENTS, TABLE_HOOKS
from .mangle import MangleError, TruncatedPacket, rewrite
from .marks import ACTION_CONNSAVE, DEFAULT_NAT_TARGETS, MarkLayout
from .metrics import Metrics
from .nat import NatError, NatTargets
from .packet import Malformed, parse
from .policy import Handler, Policy
from .rules import RuleSet, compile_policy, reject_action
from .verdict import NAT_KINDS, Accept, Drop, Mangle, Mark, Nat, Reject, Verdict, placement_kind

log = logging.getLogger("nfhooks.engine")
NONE_LABEL = "continue"
VERDICT_LABELS = ("accept", "drop", "reject", "mark", "connmark", NONE_LABEL)
#: Labels bound only for handlers that may return them (queued from mangle where they work).
REWRITE_LABELS = (*sorted(NAT_KINDS), "mangle")


class RateLimitedLog:
    """At most one traceback per handler every ``interval`` seconds; says how many it skipped."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.last: dict[str, float] = {}
        self.skipped: dict[str, int] = {}

    def error(self, key: str, message: str, exc: BaseException | None, policy_file: str) -> None:
        now = time.monotonic()
        if now - self.last.get(key, -1e9) < self.interval:
            self.skipped[key] = self.skipped.get(key, 0) + 1
            return
        self.last[key] = now
        skipped = self.skipped.pop(key, 0)
        more = f" ({skipped} more since the last report)" if skipped else ""
        log.error("%s%s%s", message, more, trimmed_traceback(exc, policy_file) if exc else "")


def trimmed_traceback(exc: BaseException, policy_file: str) -> str:
    """Only the frames in the policy and below it: nfhooks' own frames are noise to its user."""
    tb = traceback.extract_tb(exc.__traceback__)
    keep = [fs for fs in tb if not fs.filename.startswith(_PKG_DIR)] or tb[-1:]
    lines = "".join(traceback.format_list(keep[-5:]))
    return "\n" + lines + "".join(traceback.format_exception_only(type(exc), exc)).rstrip()


_PKG_DIR = __file__.rsplit("/", 1)[0] + "/"


@dataclass
class Dispatcher:
    """Builds the per-queue callbacks; owns nothing global (everything comes in as arguments)."""

    policy: Policy
    ruleset: RuleSet
    metrics: Metrics
    errlog: RateLimitedLog = field(default_factory=RateLimitedLog)
    nat: NatTargets | None = None  # None: the policy has no nat mark field

    def callback(self, handler: Handler) -> Callable[[Any], None]:
        hook, table, func, name = handler.hook, handler.table, handler.func, handler.name
        layout: MarkLayout = self.ruleset.layout
        res_f, act_f = layout["resume"], layout["action"]
        res_clear, act_clear = ~res_f.mask & 0xFFFFFFFF, ~act_f.mask & 0xFFFFFFFF
        resume_bits = res_f.encode(self.ruleset.positions[name])
        connsave_bits = act_f.encode(ACTION_CONNSAVE)
        user = layout.user_mask
        repeat_for_reject = table == "filter"
        default = self.policy.default(hook)
        allowed = {k for k, p in PLACEMENTS.items() if hook in p.hooks and table in p.queue_tables}
        m = self.metrics
        counters = {v: m.bind_verdict(hook, table, name, v) for v in VERDICT_LABELS}
        counters.update({v: m.bind_verdict(hook, table, name, v) for v in REWRITE_LABELS if v in allowed})
        nat = self.nat
        nat_clear = ~layout["nat"].mask & 0xFFFFFFFF if "nat" in layout else 0xFFFFFFFF
        truncated = m.truncated(hook)
        default_counters = {v: m.bind_verdict(hook, table, "", v) for v in ("accept", "drop", "reject")}
        histogram = m.decision_histogram(hook)
        errors = m.handler_errors(hook, name)
        malformed = m.malformed(hook)
        errlog, pfile = self.errlog, handler.file
        perf = time.perf_counter

        def apply(nfpkt: Any, v: Verdict, mark: int, nbytes: int, ctr: dict[str, Any]) -> None:
            t = type(v)
            if t is Accept:
                ctr["accept"].count(nbytes)
                nfpkt.accept()
            elif t is Drop:
                ctr["drop"].count(nbytes)
                nfpkt.drop()
            elif t is Reject:
                ctr["reject"].count(nbytes)
                nfpkt.set_mark((mark & act_clear) | act_f.encode(reject_action(v, False)))  # type: ignore[arg-type]
                nfpkt.repeat() if repeat_for_reject else nfpkt.accept()
            elif t is Mark:
                new = (mark & ~(v.mask & user)) | (v.value & v.mask & user)  # type: ignore[attr-defined]
                if v.connmark:  # type: ignore[attr-defined]
                    ctr["connmark"].count(nbytes)
                    nfpkt.set_mark((new & act_clear) | connsave_bits)
                    nfpkt.repeat()
                else:
                    ctr["mark"].count(nbytes)
                    nfpkt.set_mark(new)
                    nfpkt.accept()
            else:  # pragma: no cover - guarded by the caller
                raise TypeError(v)

        def fail(nfpkt: Any, mark: int, nbytes: int, message: str, exc: BaseException | None) -> None:
            errors.inc()
            errlog.error(name, f"{handler.where}: handler {name!r} at {hook}: {message}; "
                               f"applied the {hook} default ({default.kind})", exc, pfile)
            apply(nfpkt, default, mark, nbytes, default_counters)

        def on_packet(nfpkt: Any) -> None:
            t0 = perf()
            mark = nfpkt.mark
            nbytes = 0
            try:
                raw = nfpkt.get_payload()
                nbytes = len(raw)
                try:
                    pkt = parse(raw, hook, mark, nfpkt.indev, nfpkt.outdev)
                except Malformed as e:
                    malformed.inc()
                    errlog.error(f"malformed:{hook}", f"malformed packet at {hook}: {e}; applied the default", None, pfile)
                    apply(nfpkt, default, mark, nbytes, default_counters)
                    return
                try:
                    v = func(pkt)
                except Exception as e:  # noqa: BLE001 -- the guard: every packet gets a verdict
                    fail(nfpkt, mark, nbytes, f"raised {type(e).__name__}: {e}", e)
                    return
                if v is None:
                    counters[NONE_LABEL].count(nbytes)
                    nfpkt.set_mark((mark & res_clear) | resume_bits)
                    nfpkt.repeat()
                elif not isinstance(v, Verdict):
                    fail(nfpkt, mark, nbytes, f"returned {type(v).__name__} {v!r:.60}, not a verdict or None "
                                              "(use accept(), drop(), reject(), mark() ...)", None)
                elif placement_kind(v) not in allowed:
                    p = PLACEMENTS[placement_kind(v)]
                    fail(nfpkt, mark, nbytes, f"returned {placement_kind(v)}, which cannot work from the "
                                              f"{table} table at {hook}: {p.why}", None)
                elif type(v) is Mark and v.value & v.mask & ~user:  # type: ignore[attr-defined]
                    fail(nfpkt, mark, nbytes, f"mark {v.value:#x} touches nfhooks' bits "  # type: ignore[attr-defined]
                                              f"{layout.mask:#x}; use bits of {user:#x}", None)
                elif isinstance(v, Nat):
                    if nat is None:
                        fail(nfpkt, mark, nbytes, f"returned {v}, but no handler's source calls a NAT "
                                                  "verdict, so nfhooks reserved no nat mark bits; call "
                                                  "dnat()/snat()/masquerade()/redirect() in the handler", None)
                        return
                    try:
                        bits = nat.mark_bits(pkt, v)
                    except NatError as e:
                        fail(nfpkt, mark, nbytes, str(e), None)
                        return
                    counters[v.kind].count(nbytes)
                    nfpkt.set_mark((mark & nat_clear) | bits)
                    nfpkt.accept()
                elif type(v) is Mangle:
                    try:
                        new = rewrite(raw, v, pkt)  # type: ignore[arg-type]
                    except TruncatedPacket as e:
                        truncated.inc()
                        errlog.error(f"truncated:{name}", f"{handler.where}: handler {name!r} at {hook} "
                                                          f"returned mangle: {e}; accepted unchanged", None, pfile)
                        counters["accept"].count(nbytes)
                        nfpkt.accept()
                        return
                    except MangleError as e:
                        fail(nfpkt, mark, nbytes, f"returned {v.kind}: {e}", None)
                        return
                    counters["mangle"].count(nbytes)
                    if new is not raw:
                        nfpkt.set_payload(new)
                    nfpkt.accept()
                else:
                    apply(nfpkt, v, mark, nbytes, counters)
            except Exception as e:  # noqa: BLE001 -- last resort: never leave a packet undecided
                log.exception("internal error deciding a packet at %s: %s", hook, e)
                try:
                    nfpkt.accept() if type(default) is Accept else nfpkt.drop()
                except Exception:  # noqa: BLE001 -- verdict already given
                    pass
            finally:
                histogram.observe(perf() - t0)

        return on_packet


class Engine:
    """A policy compiled, bound to its queues, installed, and served until stopped.

    Built from explicit arguments only; tests build their own with a fresh registry.
    Lifecycle: take ownership of the namespace, remove a stale set, bind the queues, then
    install the rules (so bypass never hides a missing engine), serve; on the way out remove
    the rules before unbinding.
    """

    def __init__(self, policy: Policy, *, metrics: Metrics | None = None, queue_base: int = 0,
                 fail: str | None = None, mark_mask: int | None = None,
                 ruleset: RuleSet | None = None, nat_targets: int = DEFAULT_NAT_TARGETS) -> None:
        from .marks import DEFAULT_MARK_MASK

        self.policy = policy
        self.metrics = metrics or Metrics()
        self.ruleset = ruleset or compile_policy(policy, queue_base=queue_base, fail=fail,
                                                 mark_mask=mark_mask or DEFAULT_MARK_MASK,
                                                 nat_targets=nat_targets)
        policy.self_mark = self.ruleset.layout["self"].mask
        self.nat = (NatTargets(self.ruleset.layout, self.ruleset.nat_targets,
                               on_change=self.metrics.set_nat_targets)
                    if "nat" in self.ruleset.layout else None)
        self.dispatcher = Dispatcher(policy, self.ruleset, self.metrics, nat=self.nat)
        self.queues: Any = None
        self.owner: Any = None
        self.installed = False

    def start(self) -> None:
        from .install import check_kernel, install, installed, remove_all
        from .owner import Ownership
        from .queue import QueueSet

        check_kernel()
        self.owner = Ownership.acquire()
        try:
            _, stale = installed()
            if stale:
                log.warning("removing a stale nfhooks rule set left by an engine that is gone: %s",
                            "; ".join(remove_all()))
            self.queues = QueueSet()
            for num, h in self.ruleset.queues.items():
                self.queues.bind(num, self.dispatcher.callback(h))
            self.metrics.set_policy(self.policy.name or "policy", self.policy.version,
                                    [(n, h.hook, h.name) for n, h in self.ruleset.queues.items()])
            install(self.ruleset)
            self.installed = True
        except BaseException:
            self.stop()
            raise

    def serve(self) -> None:
        """Run until SIGINT/SIGTERM; signals only wake the loop (see queue.py)."""
        assert self.queues is not None
        q = self.queues

        def on_signal(signum: int, frame: Any) -> None:
            q.stopping = True

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        old_fd = signal.set_wakeup_fd(q.wakeup_fd, warn_on_full_buffer=False)
        try:
            q.run()
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)

    def stop(self) -> None:
        from .install import remove_all

        try:
            if self.installed or self.owner is not None:
                removed = remove_all()
                if removed:
                    log.info("removed: %s", "; ".join(removed))
                self.installed = False
        finally:
            if self.queues is not None:
                self.queues.close()
                self.queues = None
            if self.owner is not None:
                self.owner.release()
                self.owner = None


def hooks_summary(rs: RuleSet) -> list[str]:
    """One line per hook: handlers, default, fail mode -- what `check` and `run` print."""
    lines = []
    for hook in TABLE_HOOKS["mangle"]:
        hs = [h for h in rs.queues.values() if h.hook == hook]
        default = rs.defaults[hook]
        mode = "fail-open" if rs.fail_open[hook] else "fail-closed"
        names = ", ".join(f"{h.name}[{h.table} q{n}]" for n, h in rs.queues.items() if h.hook == hook)
        if hs or default.kind != "accept":
            lines.append(f"{hook:<12} default {default.kind:<7} {mode:<11} {names or '(no handlers)'}")
    return lines


def _stderr_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format="nfhooks: %(levelname)s %(message)s")
