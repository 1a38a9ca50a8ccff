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
accept     NF_ACCEPT; from a ``flow=True`` handler: action=flowsave and the handler's number in
           the mark, NF_REPEAT: our rules save the decision in the connmark (offload.py) and
           the rest of the connection is accepted in the kernel
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

The ``Engine`` below owns the lifecycle and hot reload (generations; see its docstring).
"""

from __future__ import annotations

import contextlib
import logging
import os
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
from .watchdog import DEFAULT_BUDGET, DEFAULT_TIMEOUT, HandlerTimeout, Watchdog
from . import routing
from .routing import RouteShapeError
from .verdict import NAT_KINDS, ROUTESHAPE_KINDS, Accept, Drop, Mangle, Mark, Nat, Reject, Verdict, placement_kind

log = logging.getLogger("nfhooks.engine")
NONE_LABEL = "continue"
VERDICT_LABELS = ("accept", "drop", "reject", "mark", "connmark", NONE_LABEL)
#: Labels bound only for handlers that may return them (queued from mangle where they work).
REWRITE_LABELS = (*sorted(NAT_KINDS), "mangle", *sorted(ROUTESHAPE_KINDS))


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
    tap: Any = None  # a pcap.PcapWriter (--pcap): records each packet with its verdict
    offload: Any = None  # an offload.FlowOffload when the policy has flow handlers
    budget: float = 0.0  # --handler-budget seconds: a later verdict is replaced by the default
    watchdog: Watchdog | None = None  # --handler-timeout: interrupts a hung handler (watchdog.py)

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
        watch = self.watchdog.current if self.watchdog is not None else [0.0]
        budget = self.budget
        overruns = m.handler_overruns(hook, name)
        perf = time.perf_counter
        # flow=True (offload.py): an accept also saves the decision in the connmark (NF_REPEAT)
        flow_save = self.offload.save(handler) if self.offload is not None else None
        flow_bits, flow_clear = flow_save if flow_save else (0, 0)
        # accept is the common verdict: given straight away where it is allowed and not a flow save
        fast_accept = "accept" in allowed and flow_save is None

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
                nbytes = pkt.length  # the packet's own length: the copy may be headers only
                try:
                    watch[0] = t0
                    v = func(pkt)
                    watch[0] = 0.0
                except HandlerTimeout as e:
                    overruns.inc()
                    fail(nfpkt, mark, nbytes, f"{e} (interrupted)", None)
                    return
                except BaseException as e:  # noqa: BLE001 -- the guard: SystemExit, KeyboardInterrupt
                    # and every other exception a handler raises give the default; the engine's
                    # own signals never raise (they set a flag and wake the loop: serve())
                    watch[0] = 0.0
                    fail(nfpkt, mark, nbytes, f"raised {type(e).__name__}: {e}", e)
                    return
                if budget and perf() - t0 > budget:
                    overruns.inc()
                    errlog.error(f"overrun:{name}", f"{handler.where}: handler {name!r} at {hook} took "
                                 f"{(perf() - t0) * 1e3:.1f} ms, past --handler-budget {budget * 1e3:g} ms; "
                                 f"applied the {hook} default ({default.kind})", None, pfile)
                    apply(nfpkt, default, mark, nbytes, default_counters)
                    return
                if type(v) is Accept and fast_accept:  # no checks, no apply(): see docs/performance.md
                    counters["accept"].count(nbytes)
                    nfpkt.accept()
                elif v is None:
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
                elif v.kind in ROUTESHAPE_KINDS:  # route/shape: a mark field, acted on by routing.py's rules
                    rshape = self.ruleset.routeshape
                    try:
                        if rshape is None:
                            raise RouteShapeError(f"returned {v}, but the policy declares no routing table or "
                                                  "shaping (policy.routing_table / policy.shaping)")
                        bits = rshape.bits(pkt, v)
                    except RouteShapeError as e:
                        fail(nfpkt, mark, nbytes, str(e), None)
                        return
                    counters[v.kind].count(nbytes)
                    nfpkt.set_mark((mark & rshape.clear_mask(v.kind)) | bits)
                    nfpkt.accept()  # ACCEPT, not REPEAT: at OUTPUT only nf_reinject's ACCEPT re-routes
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
                elif flow_save is not None and type(v) is Accept:
                    counters["accept"].count(nbytes)
                    nfpkt.set_mark((mark & flow_clear) | flow_bits)
                    nfpkt.repeat()
                else:
                    apply(nfpkt, v, mark, nbytes, counters)
            except BaseException as e:  # noqa: BLE001 -- last resort: never leave a packet undecided
                log.error("internal error deciding a packet at %s: %s", hook, e, exc_info=e)
                try:
                    nfpkt.accept() if type(default) is Accept else nfpkt.drop()
                except BaseException:  # noqa: BLE001 -- verdict already given
                    pass
            finally:
                histogram.observe(perf() - t0)

        if self.tap is not None:  # --pcap: wraps the counters above; without it nothing changes
            return self.tap.wrap(on_packet, counters, default_counters, hook, table, name)
        return on_packet


class Engine:
    """A policy compiled, bound to its queues, installed, and served until stopped.

    Built from explicit arguments only; tests build their own with a fresh registry.
    Lifecycle: take ownership of the namespace, remove a stale set, bind the queues, then
    install the rules (so bypass never hides a missing engine), serve; on the way out remove
    the rules before unbinding.

    Hot reload (``reload()``, on SIGHUP or ``nfhooks reload``): the new policy is loaded and
    compiled first -- an error leaves the running one untouched, logged and counted. Then it
    becomes the next *generation* (1 and 2 alternate: chain names, queue numbers and the
    ``gen`` mark field differ): its queues are bound, its chains installed and jumped to in
    front of the old ones (install.install: reverse traversal order), the old chains stop
    stamping new packets (install.retire_stamps), and once the old generation's queues are
    empty it is removed and unbound. Every packet is stamped by the first nfhooks chain it
    meets and decided by that generation only (rules.generation_rules): none by both, none by
    neither.
    """

    RETIRE_GRACE = 0.2  # seconds the old queues must stay empty before the old set goes
    RETIRE_TIMEOUT = 10.0  # then it goes anyway (a packet still queued there is dropped)
    DRAIN_TIMEOUT = 5.0  # seconds a stop may spend answering what is still queued

    def __init__(self, policy: Policy, *, metrics: Metrics | None = None, queue_base: int = 0,
                 fail: str | None = None, mark_mask: int | None = None,
                 ruleset: RuleSet | None = None, nat_targets: int = DEFAULT_NAT_TARGETS,
                 pcap: Any = None, loader: Callable[[], Policy] | None = None,
                 status_file: str | None = None, flow_generation: int | None = None,
                 queue_options: Any = None, handler_budget: float = DEFAULT_BUDGET,
                 handler_timeout: float | None = DEFAULT_TIMEOUT) -> None:
        from .marks import DEFAULT_MARK_MASK

        self.metrics = metrics or Metrics()
        self.compile_args: dict[str, Any] = dict(fail=fail, mark_mask=mark_mask or DEFAULT_MARK_MASK,
                                                 nat_targets=nat_targets)
        self.queue_base = queue_base
        self.queue_options = queue_options  # a queue.QueueOptions (maxlen, rcvbuf, gso) or None
        self.pcap = pcap  # a pcap.PcapWriter or None; its owner (cli `run`) closes it
        self.loader = loader  # reads the policy again for reload(); None: reload is refused
        self.status_file = status_file
        self.reloads = 0
        self.last_reload = "never reloaded"
        self.retiring: list[tuple[RuleSet, float, float]] = []  # (ruleset, since, empty since)
        self._reload_wanted = False
        self.flow_generation = flow_generation  # None: offload.next_flow_generation() per compile
        self.offload: Any = None
        if handler_budget < 0:
            raise ValueError(f"--handler-budget {handler_budget}: give 0 (off) or a positive number of seconds")
        self.handler_budget = handler_budget
        self.watchdog = Watchdog(handler_timeout) if handler_timeout else None
        self._use(policy, ruleset or compile_policy(policy, queue_base=queue_base, **self.compile_args,
                                                    **self._flow_args(policy)))
        self.queues: Any = None
        self.owner: Any = None
        self.installed = False
        self.failed: BaseException | None = None  # what ended serve(), if not a signal
        self.left_installed = False  # stop() left the rules as a kill -9 would (after an error)
        self.rule_watch: Any = None  # an integrity.RuleWatch once started
        self._failpoint = os.environ.get("NFHOOKS_FAILPOINT", "")  # tests: simulate an internal error

    def _use(self, policy: Policy, ruleset: RuleSet) -> None:
        """Make (policy, ruleset) the current generation's: its dispatcher and NAT targets."""
        self.policy, self.ruleset = policy, ruleset
        policy.self_mark = ruleset.layout["self"].mask
        self.nat = (NatTargets(ruleset.layout, ruleset.nat_targets, on_change=self.metrics.set_nat_targets,
                               generation=ruleset.generation)
                    if "nat" in ruleset.layout else None)
        from .offload import FlowOffload, OffloadCollector
        self.offload = FlowOffload(ruleset, policy) if ruleset.flow_generation else None
        if self.offload is not None and not getattr(self, "_offload_metrics", None):
            self._offload_metrics = OffloadCollector(lambda: self.dispatcher.offload)  # restored on a failed reload
            self.metrics.registry.register(self._offload_metrics)
        self._warm_up(policy)
        self.dispatcher = Dispatcher(policy, ruleset, self.metrics, nat=self.nat, tap=self.pcap,
                                     offload=self.offload, budget=self.handler_budget,
                                     watchdog=self.watchdog)

    def _flow_args(self, policy: Policy) -> dict[str, int]:
        """A new flow generation for every compile (start, reload) of a policy with flow handlers:
        connections decided before are asked again (offload.py)."""
        from .offload import FLOW_GENERATIONS, flow_handlers, next_flow_generation
        if not flow_handlers(policy.handlers):
            return {}
        if self.flow_generation is not None:  # given (tests): the next one on each reload
            gen, self.flow_generation = self.flow_generation, self.flow_generation % FLOW_GENERATIONS + 1
            return {"flow_generation": gen}
        return {"flow_generation": next_flow_generation()}

    def _warm_up(self, policy: Policy) -> None:
        """Import scapy now if a handler's source uses it, not inside the first packet's handler
        call: the import takes a noticeable fraction of a second, past --handler-budget."""
        import inspect

        for h in policy.handlers:
            try:
                src = inspect.getsource(h.func)
            except (OSError, TypeError):
                continue
            if "scapy" in src:
                import scapy.layers.inet  # noqa: F401, PLC0415
                import scapy.layers.inet6  # noqa: F401, PLC0415
                return

    def _publish(self) -> None:
        queues = {n: h for rs in [self.ruleset, *(r for r, _, _ in self.retiring)] for n, h in rs.queues.items()}
        self.metrics.set_policy(self.policy.name or "policy", self.policy.version,
                                [(n, h.hook, h.name) for n, h in sorted(queues.items())])

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
            self.queues = QueueSet(self.queue_options)
            self._bind(self.ruleset, [])
            self.queues.export(self.metrics.registry)
            self._publish()
            routing.start(self.ruleset)  # ip rules, routes, qdiscs exist before any rule marks a packet
            install(self.ruleset)
            self.installed = True
            self._watch_rules()
            self._write_status(True, f"policy {self.policy.name} started (generation {self.ruleset.generation})")
        except BaseException:
            self.stop()
            raise

    def _bind(self, rs: RuleSet, bound: list[int]) -> None:
        """Bind ``rs``'s queues to the current dispatcher's callbacks; ``bound`` collects the
        numbers as they are bound (a reload unbinds them again if a later step fails)."""
        for num, h in rs.queues.items():
            self.queues.bind(num, self.dispatcher.callback(h), handler=h, fail_open=rs.fail_open[h.hook])
            bound.append(num)

    # -- hot reload ------------------------------------------------------------------------

    def request_reload(self) -> None:
        """Signal-safe: only sets a flag; the loop reloads between packets."""
        self._reload_wanted = True

    def _next_queue_base(self, count: int) -> int:
        used = set(self.ruleset.queues) | {n for rs, _, _ in self.retiring for n in rs.queues}
        base = self.queue_base
        while any(n in used for n in range(base, base + count)):
            base += 1
        return base

    def reload(self) -> tuple[bool, str]:
        """Load, check and install the policy again; keep the running one on any error."""
        from .install import install, remove_generation, retire_stamps
        from .policy import PolicyError

        if self.retiring:
            self._retire(force=True)
        old_rs, old_policy, old_nat, old_disp = self.ruleset, self.policy, self.nat, self.dispatcher
        try:
            if self.loader is None:
                raise PolicyError("this engine was started without a policy file to reload")
            policy = self.loader()
            gen = 2 if old_rs.generation == 1 else 1
            rs = compile_policy(policy, queue_base=self._next_queue_base(len(policy.handlers)),
                                generation=gen, **self.compile_args, **self._flow_args(policy))
        except PolicyError as e:
            return self._reload_done(False, f"reload failed, policy {old_policy.name} (generation "
                                            f"{old_rs.generation}) keeps running: {e}")
        bound: list[int] = []
        try:
            self._use(policy, rs)
            self._bind(rs, bound)
            routing.reload(old_rs, rs)  # hands the running ip rules/qdiscs over, or refuses
            install(rs)
        except Exception as e:  # noqa: BLE001 -- kernel refusal: undo the new half, keep the old
            try:
                remove_generation(rs.generation)
            finally:
                for num in bound:
                    self.queues.unbind(num)
                self.policy, self.ruleset, self.nat, self.dispatcher = old_policy, old_rs, old_nat, old_disp
            return self._reload_done(False, f"reload failed installing generation {rs.generation}, policy "
                                            f"{old_policy.name} keeps running: {e}")
        try:
            retire_stamps(old_rs)
        except Exception as e:  # noqa: BLE001 -- both sets stay correct; the old one just keeps stamping
            log.error("could not stop generation %d from stamping new packets: %s", old_rs.generation, e)
        now = time.monotonic()
        self.retiring.append((old_rs, now, 0.0))
        self._publish()
        return self._reload_done(True, f"reloaded policy {policy.name} {policy.version}".rstrip()
                                       + f" as generation {rs.generation}: {len(rs.queues)} handler queue(s)")

    def _reload_done(self, ok: bool, message: str) -> tuple[bool, str]:
        self.reloads += 1
        self.last_reload = message
        (self.metrics.reloaded if ok else self.metrics.reload_failed)()
        (log.info if ok else log.error)("%s", message)
        self._write_status(ok, message)
        return ok, message

    def _retire(self, force: bool = False) -> None:
        """Remove old generations whose queues have stayed empty for RETIRE_GRACE."""
        from .install import remove_generation
        from .metrics import DEFAULT_PROC_PATH, parse_queue_stats

        if not self.retiring:
            return
        try:
            with open(DEFAULT_PROC_PATH) as f:
                waiting = {s.queue_number: s.queue_total for s in parse_queue_stats(f.read())}
        except OSError:
            waiting = {}
        now = time.monotonic()
        keep = []
        for rs, since, empty_since in self.retiring:
            empty = all(waiting.get(n, 0) == 0 for n in rs.queues)
            if empty and not empty_since:
                empty_since = now
            elif not empty:
                empty_since = 0.0
            if force or now - since > self.RETIRE_TIMEOUT or (empty_since and now - empty_since >= self.RETIRE_GRACE):
                try:
                    removed = remove_generation(rs.generation)
                except Exception as e:  # noqa: BLE001 -- keep serving; try again on the next tick
                    log.error("could not remove generation %d: %s", rs.generation, e)
                    keep.append((rs, since, empty_since))
                    continue
                for num in rs.queues:
                    self.queues.unbind(num)
                log.info("generation %d retired: %s", rs.generation, "; ".join(removed) or "nothing installed")
            else:
                keep.append((rs, since, empty_since))
        self.retiring = keep
        if not keep:
            self._publish()

    def _write_status(self, ok: bool, message: str) -> None:
        """What `nfhooks reload` waits for (owner.write_status)."""
        from .owner import write_status

        if not self.status_file:
            return
        try:
            write_status(self.status_file, self.reloads, ok, message, policy=self.policy.name,
                         generation=self.ruleset.generation)
        except OSError as e:
            log.warning("cannot write %s: %s", self.status_file, e)

    # -- the loop ----------------------------------------------------------------------------

    def _on_wake(self) -> None:
        if self._failpoint == "loop":  # NFHOOKS_FAILPOINT=loop: an internal error ends serve()
            raise RuntimeError("failpoint 'loop' (NFHOOKS_FAILPOINT): a simulated internal error")
        if self._reload_wanted:
            self._reload_wanted = False
            self.reload()
        if self.retiring:
            self._retire()
        if self.rule_watch is not None and self.rule_watch.due():
            self.rule_watch.check()

    def _tick(self) -> float:
        return 0.05 if self.retiring else (self.rule_watch.interval if self.rule_watch else 5.0)

    def _watch_rules(self) -> None:
        """Check, periodically and at each scrape, that our rules are still there (integrity.py)."""
        from .install import saved_text
        from .integrity import RuleWatch

        if self.rule_watch is None:
            self.rule_watch = RuleWatch(lambda: self.ruleset, self._restore_rules, saved_text,
                                        self.metrics.registry,
                                        lambda: self.queues.wakeup_fd if self.queues is not None else None)

    def _restore_rules(self, lost: list[str]) -> None:
        from .install import install, remove_generation

        if self.retiring:
            self._retire(force=True)
        remove_generation(self.ruleset.generation)
        install(self.ruleset)
        if self.nat is not None:
            self.nat.reinstall()

    def serve(self) -> None:
        """Run until SIGINT/SIGTERM; SIGHUP reloads. Signals only wake the loop (see queue.py).

        Asked to stop (a signal), it stops taking new packets, answers those still queued
        (``drain``), then removes the rules. Ended by an error instead, it leaves the rules
        as a kill -9 would (see stop()), so no fail-closed hook is opened by a failure."""
        assert self.queues is not None
        q = self.queues

        def on_signal(signum: int, frame: Any) -> None:
            if signum == signal.SIGHUP:
                self.request_reload()
            elif q.stopping:
                q.hurry()  # a second SIGINT/SIGTERM: do not wait for the queues to drain
            else:
                q.stopping = True

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        old_fd = signal.set_wakeup_fd(q.wakeup_fd, warn_on_full_buffer=False)
        if self.watchdog is not None:
            self.watchdog.start()
        try:
            try:
                q.run(on_wake=self._on_wake, tick=self._tick)
            except BaseException as e:
                self.failed = e
                raise
            self.drain()
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)

    def drain(self) -> int:
        """Stop without losing what waits in the queues: close them to new packets (the
        kernel then applies each hook's fail mode, as without an engine), answer what is
        queued with every rule still in place (bounded by DRAIN_TIMEOUT; a second signal cuts
        it short), then remove the rules. Returns the packets left unanswered (dropped when
        the queues are unbound), which the log names."""
        from .install import remove_all

        if self.queues is None or not self.installed:
            return 0
        if self.rule_watch is not None:
            self.rule_watch.enabled = False
        t0 = time.monotonic()
        self.queues.close_intake()
        left = self.queues.drain(self.DRAIN_TIMEOUT, self.queues.waiting)
        took = time.monotonic() - t0
        if left:
            log.warning("stopping: %d queued packet(s) not answered within %.1f s are dropped", left, took)
        else:
            log.info("stopping: every queued packet answered (%.2f s)", took)
        removed = remove_all()
        if removed:
            log.info("removed: %s", "; ".join(removed))
        self.installed = False
        self.retiring = []
        return left

    def stop(self) -> None:
        """Remove what start() set up. After an error ended serve() (``self.failed``), the
        rules stay, as after a kill -9: fail-closed hooks keep dropping (their queue rules
        have no listener), fail-open ones let traffic through, until the next start removes
        the stale set or ``nfhooks flush`` does."""
        from .install import remove_all

        if self.rule_watch is not None:
            self.rule_watch.enabled = False
        if self.failed is not None and self.installed:
            closed = sorted(h for h, o in self.ruleset.fail_open.items() if not o and
                            any(x.hook == h for x in self.ruleset.queues.values()))
            log.error("the engine stopped on an error (%s: %s); leaving its rules in place as a kill -9 "
                      "would: fail-closed hooks (%s) drop what they would queue, fail-open hooks let it "
                      "through, until `nfhooks run` starts again or `nfhooks flush` removes them",
                      type(self.failed).__name__, self.failed, ", ".join(closed) or "none")
            self.installed = False
            self.left_installed = True
        try:
            if not self.left_installed and (self.installed or self.owner is not None):
                removed = remove_all()
                if removed:
                    log.info("removed: %s", "; ".join(removed))
                self.installed = False
                self.retiring = []
        finally:
            if not self.left_installed:  # after the rules that mark packets
                routing.stop(self.ruleset, owned=self.owner is not None)
            if self.queues is not None:
                self.queues.close()
                self.queues = None
            if self.status_file:
                with contextlib.suppress(OSError):
                    os.unlink(self.status_file)
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
