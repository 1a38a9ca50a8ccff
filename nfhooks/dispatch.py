"""The dispatcher: one queued packet in, exactly one verdict out.

A queue per handler, so the queue number already tells which handler's kernel match fired:
each queue gets one callback (``Dispatcher.callback``), built once with its metric children,
default verdict and allowed verdict kinds bound in. Per packet it does: parse headers (struct,
no scapy; on first read for a handler that never names its packet, lazypacket.py), call the
handler inside an error guard (mitmproxy's ``safecall``: anything it raises -- ``SystemExit``
and ``KeyboardInterrupt`` included --, a wrong return type or an impossible verdict becomes
the hook's default, logged with a trimmed traceback, rate-limited, and counted), then hand
the verdict to its **applier**. NetfilterQueue would leave a packet without a verdict if the
callback raised, so nothing may escape the callback.

Appliers are bound once per queue, one per verdict class (``_appliers``): the per-packet path
is a type lookup, not a chain of checks. How each verdict is applied (the mark layout is in
marks.py, the rules that act on it in rules.py):

=========  ===============================================================================
None       set the resume index to this handler's position, NF_REPEAT: the table re-runs,
           the resume rule lets the packet continue right after this handler's queue rule
accept     NF_ACCEPT; from a ``flow=True`` handler: action=flowsave and the handler's number in
           the mark, NF_REPEAT: our rules save the decision in the connmark (offload.py) and
           the rest of the connection is accepted in the kernel
...(connection=True)  accept, drop, reject: action=connverdict, the position and the verdict's
           code in the mark, NF_REPEAT: our rules keep it in the connmark, apply it to this
           packet and, at this hook, to the rest of the connection (connverdict.py)
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
route,     the table's / class's index in the route / class mark field, NF_ACCEPT from mangle:
shape      the ip rule (fwmark) or CLASSIFY rule acts on it, the connmark keeps it for the
           connection (routing.py, shaping.py)
=========  ===============================================================================

Time limits (watchdog.py): a verdict later than ``--handler-budget`` is replaced by the
default; a handler still running at ``--handler-timeout`` is interrupted. Both are counted.
"""

from __future__ import annotations

import logging
import time
import traceback
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import KernelError
from .gso import GsoGuard, GsoRepeat
from .hooks import PLACEMENTS
from .mangle import MangleError, TruncatedPacket, rewrite
from .marks import ACTION_CONNSAVE, MarkLayout
from .metrics import Metrics
from .lazypacket import parse_lazy
from .obs_verdicts import reads_packet, returnable
from .nat import NatError, NatTargets
from .packet import Malformed, parse
from .policy import Handler, Policy
from .rules import RuleSet, reject_action
from .verdict import (NAT_KINDS, ROUTESHAPE_KINDS, Accept, AcceptConnection, Drop, DropConnection, Mangle, Mark,
                      Nat, Reject, RejectConnection, Verdict, placement_kind)
from .vbatch import VerdictBatch
from .watchdog import HandlerTimeout, Watchdog

__all__ = ["Dispatcher", "RateLimitedLog", "trimmed_traceback", "NONE_LABEL", "VERDICT_LABELS",
           "REWRITE_LABELS", "FAIL_VIAS"]

log = logging.getLogger("nfhooks.engine")
NONE_LABEL = "continue"
VERDICT_LABELS = ("accept", "drop", "reject", "mark", "connmark", NONE_LABEL)
#: Labels bound only for handlers that may return them (queued from mangle where they work).
REWRITE_LABELS = (*sorted(NAT_KINDS), "mangle", *sorted(ROUTESHAPE_KINDS))
#: How the hook's default came to replace a handler's verdict (the ``via`` label, the pcap
#: comment): it raised; its verdict could not be applied (not a verdict, not possible here,
#: a NAT/route/mangle error); the packet could not be parsed; --handler-budget; --handler-timeout.
FAIL_VIAS = ("error", "invalid", "malformed", "overrun", "timeout")
_PKG_DIR = __file__.rsplit("/", 1)[0] + "/"

#: An applier: (queued packet, verdict, parsed packet, raw bytes, mark, length, the verdict
#: counters to count it in) -> the verdict given.
Applier = Callable[[Any, Any, Any, bytes, int, int, dict[str, Any]], None]


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


@dataclass
class _Bound:
    """What one queue's callback and appliers share, bound once per queue."""

    handler: Handler
    layout: MarkLayout
    default: Verdict
    allowed: set[str]
    counters: dict[str, Any]  # by verdict label; looked up per packet (pcap.wrap replaces them)
    failed: dict[str, dict[str, Any]]  # via (FAIL_VIAS) -> {default kind: counter}, the handler's name kept
    #: the error path: count, log, apply the default (set by Dispatcher.callback)
    fail: Callable[..., None] = field(repr=False, default=lambda *a: None)


class Dispatcher:
    """Builds the per-queue callbacks; owns nothing global (everything comes in as arguments)."""

    def __init__(self, policy: Policy, ruleset: RuleSet, metrics: Metrics, errlog: RateLimitedLog | None = None,
                 nat: NatTargets | None = None, tap: Any = None, offload: Any = None, budget: float = 0.0,
                 watchdog: Watchdog | None = None, audit: Any = None, encoders: dict[str, Any] | None = None) -> None:
        self.policy = policy
        self.ruleset = ruleset
        self.metrics = metrics
        self.errlog = errlog or RateLimitedLog()
        self.nat = nat  # None: the policy has no nat mark field
        self.tap = tap  # a pcap.PcapWriter (--pcap): records each packet with its verdict
        self.offload = offload  # an offload.FlowOffload when the policy has flow handlers
        self.budget = budget  # --handler-budget seconds: a later verdict is replaced by the default
        self.watchdog = watchdog  # --handler-timeout: interrupts a hung handler (watchdog.py)
        self.audit = audit  # run --audit: an obs_audit.Audit, every packet accepted (wraps the callback)
        #: verdict kind -> a feature runtime's per-packet encoder (Feature.encoders: route, shape)
        self.encoders = dict(encoders or {})

    def callback(self, handler: Handler) -> Callable[[Any], None]:
        hook, table, func, name = handler.hook, handler.table, handler.func, handler.name
        layout: MarkLayout = self.ruleset.layout
        res_f = layout["resume"]
        res_clear = ~res_f.mask & 0xFFFFFFFF
        user_bits = layout.user_mask  # pkt.mark shows the user's bits only, never nfhooks' own
        resume_bits = res_f.encode(self.ruleset.positions[name])
        default = self.policy.default(hook)
        allowed = {k for k, p in PLACEMENTS.items() if hook in p.hooks and table in p.queue_tables}
        m = self.metrics
        # series only for what the handler can return (obs_verdicts); the rest appear when used
        kinds = returnable(handler)
        # a handler that never names its packet gets one parsed on first read (lazypacket.py),
        # and no GSO view (gso.py): it cannot read a payload. Not for rewrites, which read it.
        blind = not reads_packet(handler) and kinds is not None and not kinds & {"mangle", *NAT_KINDS}
        parse_pkt = parse_lazy if blind else parse
        counters = {v: m.bind_verdict(hook, table, name, v) if kinds is None or v in kinds
                    else m.lazy_verdict(hook, table, name, v)
                    for v in (*VERDICT_LABELS, *(r for r in REWRITE_LABELS if r in allowed))}
        failed = {via: {default.kind: m.lazy_verdict(hook, table, name, default.kind, via)} for via in FAIL_VIAS}
        failed_error, failed_invalid = failed["error"], failed["invalid"]
        failed_malformed, failed_overrun, failed_timeout = failed["malformed"], failed["overrun"], failed["timeout"]
        histogram = m.decision_histogram(hook)
        # FastHistogram.observe inlined (one call less per packet): its bucket list and bounds
        h_counts, h_bounds = histogram.counts, histogram.bounds
        errors = m.handler_errors(hook, name)
        malformed = m.malformed(hook)
        errlog, pfile = self.errlog, handler.file
        watching = self.watchdog is not None
        watch = self.watchdog.current if watching else [0.0]
        budget = self.budget
        overruns = m.handler_overruns(hook, name)
        perf = time.perf_counter
        b = _Bound(handler, layout, default, allowed, counters, failed)
        appliers = self._appliers(b)
        apply_default = appliers[type(default)]
        # accept is the common verdict: given straight away where it is allowed and not a flow save
        flow_save = self.offload.save(handler) if self.offload is not None else None
        fast_accept = "accept" in allowed and flow_save is None

        # plain accepts held for one batch verdict per pass once queue.py arms it (vbatch.py);
        # every other verdict settles them first, so packets leave in the order they came.
        # Not under --audit, whose wrapper hands on_packet a stand-in for the packet (--pcap's
        # passes the packet itself and records it before the callback returns: batched too).
        batch = VerdictBatch()
        batch_accept, settle = batch.accept, batch.settle

        def fail(nfpkt: Any, mark: int, nbytes: int, message: str, exc: BaseException | None,
                 ctr: dict[str, Any] = failed_invalid) -> None:
            settle()
            errors.inc()
            errlog.error(name, f"{handler.where}: handler {name!r} at {hook}: {message}; "
                               f"applied the {hook} default ({default.kind})", exc, pfile)
            apply_default(nfpkt, default, None, b"", mark, nbytes, ctr)

        b.fail = fail
        not_a_verdict = appliers[None]
        gso = GsoGuard(name)  # inert unless queue.py binds this queue GSO, guarded (gso.py)

        #: the fast paths' counters, bound after --pcap's wrap below replaced the dict's entries
        accept_count: Callable[[int], None] = counters["accept"].count
        continue_count: Callable[[int], None] = counters[NONE_LABEL].count

        def on_packet(nfpkt: Any) -> None:
            t0 = perf()
            mark = nfpkt.mark
            nbytes = 0
            try:
                raw = nfpkt.get_payload()
                try:
                    pkt = parse_pkt(raw, hook, mark & user_bits, nfpkt.indev, nfpkt.outdev)
                except Malformed as e:
                    nbytes = len(raw)
                    malformed.inc()
                    errlog.error(f"malformed:{hook}", f"malformed packet at {hook}: {e}; applied the default", None, pfile)
                    settle()
                    apply_default(nfpkt, default, None, raw, mark, nbytes, failed_malformed)
                    return
                nbytes = pkt.length  # the packet's own length: the copy may be headers only
                try:
                    if watching:
                        watch[0] = t0
                        v = gso.call(func, pkt, nfpkt) if not blind and gso.active else func(pkt)
                        watch[0] = 0.0
                    else:
                        v = gso.call(func, pkt, nfpkt) if not blind and gso.active else func(pkt)
                except GsoRepeat:  # a payload read on a packet taken whole: queued again, segmented
                    watch[0] = 0.0
                    settle()
                    nfpkt.repeat()
                    return
                except HandlerTimeout as e:
                    overruns.inc()
                    fail(nfpkt, mark, nbytes, f"{e} (interrupted)", None, failed_timeout)
                    return
                except BaseException as e:  # noqa: BLE001 -- the guard: SystemExit, KeyboardInterrupt
                    # and every other exception a handler raises give the default; the engine's
                    # own signals never raise (they set a flag and wake the loop: Engine.serve)
                    watch[0] = 0.0
                    fail(nfpkt, mark, nbytes, f"raised {type(e).__name__}: {e}", e, failed_error)
                    return
                if budget and perf() - t0 > budget:
                    overruns.inc()
                    errlog.error(f"overrun:{name}", f"{handler.where}: handler {name!r} at {hook} took "
                                 f"{(perf() - t0) * 1e3:.1f} ms, past --handler-budget {budget * 1e3:g} ms; "
                                 f"applied the {hook} default ({default.kind})", None, pfile)
                    settle()
                    apply_default(nfpkt, default, pkt, raw, mark, nbytes, failed_overrun)
                    return
                if type(v) is Accept and fast_accept:  # no checks, no applier: see docs/performance.md
                    accept_count(nbytes)
                    batch_accept(nfpkt)
                elif v is None:
                    settle()
                    continue_count(nbytes)
                    nfpkt.set_mark((mark & res_clear) | resume_bits)
                    nfpkt.repeat()
                else:
                    settle()
                    appliers.get(type(v), not_a_verdict)(nfpkt, v, pkt, raw, mark, nbytes, counters)
            except BaseException as e:  # noqa: BLE001 -- last resort: never leave a packet undecided
                log.error("internal error deciding a packet at %s: %s", hook, e, exc_info=e)
                try:
                    settle()
                    nfpkt.accept() if type(default) is Accept else nfpkt.drop()
                except BaseException:  # noqa: BLE001 -- verdict already given
                    pass
            finally:
                dt = perf() - t0
                h_counts[bisect_left(h_bounds, dt)] += 1  # FastHistogram.observe(dt), inlined
                histogram.sum += dt

        if self.audit is not None:  # --audit: the verdicts above are computed, every packet accepted
            on_packet = self.audit.wrap(on_packet, handler, res_f.mask)
        if self.tap is not None:  # --pcap: wraps the counters above; without it nothing changes
            on_packet = self.tap.wrap(on_packet, counters, failed, b.handler.hook, table, name,
                                      note=" audit=accepted" if self.audit is not None else "")
            accept_count, continue_count = counters["accept"].count, counters[NONE_LABEL].count
        on_packet.gso = gso  # type: ignore[attr-defined] -- for queue.py's bind
        if self.audit is None:
            on_packet.batch = batch  # type: ignore[attr-defined] -- queue.py arms it
        return on_packet

    # -- appliers: one per verdict class, bound once per queue ----------------------------

    def _appliers(self, b: _Bound) -> dict[Any, Any]:
        """Verdict class -> applier ``(nfpkt, v, pkt, raw, mark, nbytes, counters)``.

        Every applier checks what its verdict needs (allowed here, the bits it touches) and
        calls ``b.fail`` otherwise; the key ``None`` handles anything that is not a verdict
        (or a Verdict subclass of the policy's own, checked by isinstance there)."""
        layout, allowed, hook, table = b.layout, b.allowed, b.handler.hook, b.handler.table
        act_f = layout["action"]
        act_clear = ~act_f.mask & 0xFFFFFFFF
        connsave_bits = act_f.encode(ACTION_CONNSAVE)
        user = layout.user_mask
        repeat_for_reject = table == "filter"
        flow_save = self.offload.save(b.handler) if self.offload is not None else None
        flow_bits, flow_clear = flow_save if flow_save else (0, 0)

        def refused(nfpkt: Any, v: Verdict, mark: int, nbytes: int) -> bool:
            kind = placement_kind(v)
            if kind in allowed:
                return False
            b.fail(nfpkt, mark, nbytes, f"returned {kind}, which cannot work from the {table} table at "
                                        f"{hook}: {PLACEMENTS[kind].why}", None)
            return True

        def accept(nfpkt: Any, v: Accept, pkt: Any, raw: bytes, mark: int, nbytes: int, ctr: dict) -> None:
            if ctr is b.counters and refused(nfpkt, v, mark, nbytes):
                return
            ctr["accept"].count(nbytes)
            if flow_save is not None and ctr is b.counters:
                nfpkt.set_mark((mark & flow_clear) | flow_bits)
                nfpkt.repeat()
            else:
                nfpkt.accept()

        def drop(nfpkt: Any, v: Drop, pkt: Any, raw: bytes, mark: int, nbytes: int, ctr: dict) -> None:
            if ctr is b.counters and refused(nfpkt, v, mark, nbytes):
                return
            ctr["drop"].count(nbytes)
            nfpkt.drop()

        def reject(nfpkt: Any, v: Reject, pkt: Any, raw: bytes, mark: int, nbytes: int, ctr: dict) -> None:
            if ctr is b.counters and refused(nfpkt, v, mark, nbytes):
                return
            ctr["reject"].count(nbytes)
            nfpkt.set_mark((mark & act_clear) | act_f.encode(reject_action(v, False)))
            nfpkt.repeat() if repeat_for_reject else nfpkt.accept()

        def set_mark(nfpkt: Any, v: Mark, pkt: Any, raw: bytes, mark: int, nbytes: int, ctr: dict) -> None:
            if refused(nfpkt, v, mark, nbytes):
                return
            if v.value & v.mask & ~user:
                b.fail(nfpkt, mark, nbytes, f"mark {v.value:#x} touches nfhooks' bits {layout.mask:#x}; "
                                            f"use bits of {user:#x}", None)
                return
            new = (mark & ~(v.mask & user)) | (v.value & v.mask & user)
            if v.connmark:
                ctr["connmark"].count(nbytes)
                nfpkt.set_mark((new & act_clear) | connsave_bits)
                nfpkt.repeat()
            else:
                ctr["mark"].count(nbytes)
                nfpkt.set_mark(new)
                nfpkt.accept()

        out: dict[Any, Any] = {Accept: accept, Drop: drop, Reject: reject, Mark: set_mark}
        nat_apply = self._nat_applier(b, refused)
        for cls in _subclasses(Nat):
            out[cls] = nat_apply
        rs_apply = self._routeshape_applier(b, refused)
        for cls in _subclasses(Verdict):
            if getattr(cls, "kind", None) in ROUTESHAPE_KINDS:
                out[cls] = rs_apply
        out[Mangle] = self._mangle_applier(b, refused)
        conn_apply = self._connection_applier(b, refused)
        for cls in (AcceptConnection, DropConnection, RejectConnection):
            out[cls] = conn_apply

        def other(nfpkt: Any, v: Any, pkt: Any, raw: bytes, mark: int, nbytes: int, ctr: dict) -> None:
            for cls, ap in out.items():  # a subclass of a verdict class (rare: a policy's own)
                if cls is not None and isinstance(v, cls):
                    ap(nfpkt, v, pkt, raw, mark, nbytes, ctr)
                    return
            b.fail(nfpkt, mark, nbytes, f"returned {type(v).__name__} {v!r:.60}, not a verdict or None "
                                        "(use accept(), drop(), reject(), mark() ...)", None)

        out[None] = other
        return out

    def _nat_applier(self, b: _Bound, refused: Callable[..., bool]) -> Applier:
        nat = self.nat
        layout = b.layout
        nat_clear = ~layout["nat"].mask & 0xFFFFFFFF if "nat" in layout else 0xFFFFFFFF

        def apply(nfpkt: Any, v: Nat, pkt: Any, raw: bytes, mark: int, nbytes: int, ctr: dict) -> None:
            if refused(nfpkt, v, mark, nbytes):
                return
            if nat is None:
                b.fail(nfpkt, mark, nbytes, f"returned {v}, but no handler's source calls a NAT verdict, so "
                                            "nfhooks reserved no nat mark bits; call dnat()/snat()/"
                                            "masquerade()/redirect() in the handler", None)
                return
            try:
                bits = nat.mark_bits(pkt, v)
            except NatError as e:
                b.fail(nfpkt, mark, nbytes, str(e), None)
                return
            c = ctr[v.kind]
            c.count(nbytes)
            note = getattr(c, "note", None)  # --pcap: the comment names the target (NAT packets are rare)
            if note is not None:
                note(v.target_text())
            nfpkt.set_mark((mark & nat_clear) | bits)
            nfpkt.accept()

        return apply  # type: ignore[return-value]

    def _routeshape_applier(self, b: _Bound, refused: Callable[..., bool]) -> Applier:
        encoders = self.encoders  # a feature runtime per kind (Feature.encoders), the same for all queues

        def apply(nfpkt: Any, v: Any, pkt: Any, raw: bytes, mark: int, nbytes: int, ctr: dict) -> None:
            if refused(nfpkt, v, mark, nbytes):
                return
            enc = encoders.get(v.kind)
            try:
                if enc is None:
                    raise KernelError(f"returned {v}, but the policy declares no routing table or "
                                      "shaping (policy.routing_table / policy.shaping)")
                bits = enc.bits(pkt, v)
            except KernelError as e:  # routing_decl.RouteShapeError and its kin
                b.fail(nfpkt, mark, nbytes, str(e), None)
                return
            ctr[v.kind].count(nbytes)
            nfpkt.set_mark((mark & enc.clear_mask(v.kind)) | bits)
            nfpkt.accept()  # ACCEPT, not REPEAT: at OUTPUT only nf_reinject's ACCEPT re-routes

        return apply  # type: ignore[return-value]

    def _connection_applier(self, b: _Bound, refused: Callable[..., bool]) -> Applier:
        """accept/drop/reject(connection=True): action=connverdict, the handler's position and
        the verdict's code in the mark, NF_REPEAT: our rules keep it in the connmark and apply
        it, to this packet and the rest of the connection (connverdict.py)."""
        conn = self.offload.connection(b.handler) if self.offload is not None else None

        def apply(nfpkt: Any, v: Verdict, pkt: Any, raw: bytes, mark: int, nbytes: int, ctr: dict) -> None:
            if refused(nfpkt, v, mark, nbytes):
                return
            bits = conn.get(v.kind) if conn else None
            if bits is None:
                b.fail(nfpkt, mark, nbytes, f"returned {v}, but its source calls no {v.kind}(connection=...), so "
                                            "nfhooks installed no connection rule for it; call "
                                            f"{v.kind}(connection=True) in the handler itself", None)
                return
            ctr[v.kind].count(nbytes)
            nfpkt.set_mark((mark & bits[1]) | bits[0])
            nfpkt.repeat()

        return apply  # type: ignore[return-value]

    def _mangle_applier(self, b: _Bound, refused: Callable[..., bool]) -> Applier:
        truncated = self.metrics.truncated(b.handler.hook)
        h, errlog = b.handler, self.errlog

        def apply(nfpkt: Any, v: Mangle, pkt: Any, raw: bytes, mark: int, nbytes: int, ctr: dict) -> None:
            if refused(nfpkt, v, mark, nbytes):
                return
            try:
                new = rewrite(raw, v, pkt)
            except TruncatedPacket as e:
                truncated.inc()
                errlog.error(f"truncated:{h.name}", f"{h.where}: handler {h.name!r} at {h.hook} returned "
                                                    f"mangle: {e}; accepted unchanged", None, h.file)
                ctr["accept"].count(nbytes)
                nfpkt.accept()
                return
            except MangleError as e:
                b.fail(nfpkt, mark, nbytes, f"returned {v.kind}: {e}", None)
                return
            ctr["mangle"].count(nbytes)
            if new is not raw:
                nfpkt.set_payload(new)
            nfpkt.accept()

        return apply  # type: ignore[return-value]


def _subclasses(cls: type) -> list[type]:
    out, todo = [], [cls]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return out
