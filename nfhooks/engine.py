"""The engine: a policy compiled, bound to its queues, installed, served, reloaded, stopped.

The per-packet part -- one queued packet in, exactly one verdict out, inside the error guard --
is the dispatcher (dispatch.py; re-exported here). This module owns the lifecycle around it:
ownership of the namespace, stale-set removal, queues bound before rules exist, hot reload by
generations, the rule watch (integrity.py), and a stop that answers what is still queued.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

from .dispatch import (NONE_LABEL, REWRITE_LABELS, VERDICT_LABELS, Dispatcher, RateLimitedLog,
                       trimmed_traceback)
from .hooks import TABLE_HOOKS
from .marks import DEFAULT_NAT_TARGETS
from .metrics import Metrics
from .obs_audit import Audit
from .obs_engine import source_hash, wire_engine_metrics
from .obs_series import StableRegistry
from .policy_metrics import PolicyMetrics
from .features.base import EngineEnv
from .features.registry import FEATURES
from .lifecycle import Lifecycle, Undo, retire_due
from .policy import Policy, self_marked
from .rules import RuleSet, compile_policy
from .watchdog import DEFAULT_BUDGET, DEFAULT_TIMEOUT, Watchdog

__all__ = ["Engine", "Dispatcher", "RateLimitedLog", "trimmed_traceback", "hooks_summary", "NONE_LABEL",
           "VERDICT_LABELS", "REWRITE_LABELS"]

log = logging.getLogger("nfhooks.engine")


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
    front of the old ones (Backend.install: reverse traversal order), the old chains stop
    stamping new packets (Backend.retire_stamps), and once the old generation's queues are
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
                 handler_timeout: float | None = DEFAULT_TIMEOUT, backend: Any = None, audit: bool = False) -> None:
        from .backends import get_backend
        from .marks import DEFAULT_MARK_MASK

        self.backend = backend or get_backend()  # a backends.Backend: where the rules go
        self.metrics = metrics or Metrics()
        self.compile_args: dict[str, Any] = dict(fail=fail or ("open" if audit else None),  # --audit: open
                                                 mark_mask=mark_mask or DEFAULT_MARK_MASK, nat_targets=nat_targets)
        self.queue_base = queue_base
        self.queue_options = queue_options  # a queue.QueueOptions (maxlen, rcvbuf, gso) or None
        self.pcap = pcap  # a pcap.PcapWriter or None; its owner (cli `run`) closes it
        self.loader = loader  # reads the policy again for reload(); None: reload is refused
        self.status_file = status_file
        self.reloads = 0
        self.last_reload = "never reloaded"
        self.retiring: list[tuple[RuleSet, float, float]] = []  # (ruleset, since, empty since)
        self._reload_wanted = False
        #: compile arguments given rather than chosen per compile (features advance them); without
        #: flow_generation, offload.next_flow_generation() picks one per compile
        self.pinned: dict[str, Any] = {} if flow_generation is None else {"flow_generation": flow_generation}
        self.offload: Any = None
        self.collectors: dict[str, Any] = {}  # feature name -> its registered metrics collector
        if handler_budget < 0:
            raise ValueError(f"--handler-budget {handler_budget}: give 0 (off) or a positive number of seconds")
        self.handler_budget = handler_budget
        self.watchdog = Watchdog(handler_timeout) if handler_timeout else None
        self.audit = Audit() if audit else None  # run --audit (obs_audit.py)
        self.policy_metrics = PolicyMetrics(self.metrics.registry)  # policy.counter()/gauge()
        self._use(policy, ruleset or compile_policy(policy, queue_base=queue_base, **self.compile_args,
                                                    **self._flow_args(policy)))
        self.queues: Any = None
        self.failed: BaseException | None = None  # what ended serve(), if not a signal
        self.rule_watch: Any = None  # an integrity.RuleWatch once started
        # start/stop as one transaction (lifecycle.py); what stop() undoes, the last first:
        self.lifecycle = Lifecycle(self.backend)
        self.lifecycle.on_stop(self._unlink_status)
        self.lifecycle.on_stop(self._close_queues)
        self.lifecycle.on_stop(self._stop_features, with_rules=True)  # not while rules that mark packets stay
        self._failpoint = os.environ.get("NFHOOKS_FAILPOINT", "")  # tests: simulate an internal error

    def _use(self, policy: Policy, ruleset: RuleSet) -> None:
        """Make (policy, ruleset) the current generation's: its dispatcher and NAT targets."""
        self.policy, self.ruleset = policy, ruleset
        if self.audit is not None:
            self.audit.ruleset(ruleset)  # the default rules accept (their counters still count)
        self.policy_metrics.bind(policy)
        self.env = EngineEnv(policy, ruleset, self.backend, self.metrics)
        self.runtimes = self.env.runtimes  # each feature's state for this generation (features/), not the RuleSet's
        for f in FEATURES:
            self.runtimes[f.name] = f.runtime(self.env)
        self.nat, self.offload = self.runtimes.get("nat"), self.runtimes.get("offload")
        for f in FEATURES:  # a feature's collector, once, over its current runtime (restored on a failed reload)
            if self.runtimes[f.name] is not None and f.name not in self.collectors:
                c = f.collector(lambda name=f.name: self.runtimes.get(name))
                if c is not None:
                    self.metrics.registry.register(c)
                    self.collectors[f.name] = c
        self._warm_up(policy)
        encoders = {k: e for f in FEATURES for k, e in f.encoders(self.runtimes[f.name]).items()}
        self.dispatcher = Dispatcher(policy, ruleset, self.metrics, nat=self.nat, tap=self.pcap,
                                     offload=self.offload, budget=self.handler_budget,
                                     watchdog=self.watchdog, audit=self.audit, encoders=encoders)

    def _flow_args(self, policy: Policy) -> dict[str, int]:
        """The features' compile arguments for every compile (start, reload): e.g. a new flow
        generation for a policy with flow handlers, so connections decided before are asked
        again (offload.py). ``self.pinned`` holds the values given to the engine (tests)."""
        args: dict[str, int] = {}
        for f in FEATURES:
            args.update(f.compile_args(policy, self.pinned))
        return args

    def _warm_up(self, policy: Policy) -> None:
        """Import scapy now if a handler's source uses it, not inside the first packet's handler
        call: the import takes a noticeable fraction of a second, past --handler-budget."""
        for h in policy.handlers:
            if "scapy" in h.source.text:  # parsed once at declaration (introspect.py)
                import scapy.layers.inet  # noqa: F401, PLC0415
                import scapy.layers.inet6  # noqa: F401, PLC0415
                return

    def _publish(self) -> None:
        queues = {n: h for rs in [self.ruleset, *(r for r, _, _ in self.retiring)] for n, h in rs.queues.items()}
        self.metrics.set_policy(self.policy.name or "policy", self.policy.version,
                                [(n, h.hook, h.name) for n, h in sorted(queues.items())], source_hash(self.policy))

    @property
    def installed(self) -> bool:
        return self.lifecycle.installed

    @property
    def owner(self) -> Any:
        return self.lifecycle.owner  # an owner.Ownership while the namespace is ours

    @property
    def left_installed(self) -> bool:
        """stop() left the rules as a kill -9 would (after an error)."""
        return self.lifecycle.left_installed

    def start(self) -> None:
        """Take the namespace, then one transaction (a failure undoes it all: stop()): remove
        a stale set, bind every queue (before any rule can feed it), start the features, install."""
        from .queue import QueueSet

        self.lifecycle.begin()
        try:
            self.lifecycle.remove_stale()
            self.queues = QueueSet(self.queue_options)
            self._bind(self.ruleset, [])
            # queue series by (hook, handler), not by the number a reload changes (obs_series.py)
            self.queues.export(StableRegistry(self.metrics.registry)).saved = self.backend.counter_texts
            wire_engine_metrics(self)
            self._publish()
            for f in FEATURES:  # ip rules, routes, qdiscs exist before any rule marks a packet
                f.start(self.env)
            self.lifecycle.install(self.ruleset)
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

    def _next_queue_base(self, count: int, running: Any = ()) -> int:
        used = set(self.ruleset.queues) | {n for rs, _, _ in self.retiring for n in rs.queues} | set(running)
        base = self.queue_base
        while any(n in used for n in range(base, base + count)):
            base += 1
        return base

    def reload(self) -> tuple[bool, str]:
        """Load, check and install the policy again; keep the running one on any error."""
        from .policy import PolicyError

        if self.retiring:
            self._retire(force=True)
        old_rs, old_policy, old_nat, old_disp = self.ruleset, self.policy, self.nat, self.dispatcher
        old_env, old_runtimes, old_offload = self.env, self.runtimes, self.offload
        try:
            policy, rs = self.compile_next(2 if old_rs.generation == 1 else 1)
        except PolicyError as e:
            return self._reload_done(False, f"reload failed, policy {old_policy.name} (generation "
                                            f"{old_rs.generation}) keeps running: {e}")
        bound: list[int] = []

        def keep_old() -> None:
            self.policy, self.ruleset, self.nat, self.dispatcher = old_policy, old_rs, old_nat, old_disp
            self.env, self.runtimes, self.offload = old_env, old_runtimes, old_offload
            self.policy_metrics.bind(old_policy)

        undo = Undo()  # a refused new generation is taken down again, newest step first
        undo.push(keep_old)
        undo.push(lambda: [self.queues.unbind(num) for num in bound])
        undo.push(lambda: self.backend.remove_generation(rs.generation))  # its chains, a feature's too
        try:
            self._use(policy, rs)
            self._bind(rs, bound)
            for f in FEATURES:  # e.g. routing hands the running ip rules/qdiscs over, or refuses
                f.reload(old_env, self.env)
            self.backend.install(rs)
        except Exception as e:  # noqa: BLE001 -- kernel refusal: undo the new half, keep the old
            undo.unwind()
            return self._reload_done(False, f"reload failed installing generation {rs.generation}, policy "
                                            f"{old_policy.name} keeps running: {e}")
        try:
            self.backend.retire_stamps(old_rs)
        except Exception as e:  # noqa: BLE001 -- both sets stay correct; the old one just keeps stamping
            log.error("could not stop generation %d from stamping new packets: %s", old_rs.generation, e)
        now = time.monotonic()
        self.retiring.append((old_rs, now, 0.0))
        self._publish()
        return self._reload_done(True, f"reloaded policy {policy.name} {policy.version}".rstrip()
                                       + f" as generation {rs.generation}: {len(rs.queues)} handler queue(s)")

    def compile_next(self, generation: int, width: int = 1, running: Any = ()) -> tuple[Policy, RuleSet]:
        """The policy file loaded again and compiled as ``generation`` (raises PolicyError):
        its queues clear of this engine's and of ``running`` (``width`` per handler: the
        queues --workers balances over). The first step of reload() and of --workers' reload."""
        from .policy import PolicyError

        if self.loader is None:
            raise PolicyError("this engine was started without a policy file to reload")
        policy = self.loader()
        rs = compile_policy(policy, queue_base=self._next_queue_base(len(policy.handlers) * width, running),
                            generation=generation, **self.compile_args, **self._flow_args(policy))
        return policy, rs

    def _reload_done(self, ok: bool, message: str) -> tuple[bool, str]:
        self.reloads += 1
        self.last_reload = message
        (self.metrics.reloaded if ok else self.metrics.reload_failed)()
        (log.info if ok else log.error)("%s", message)
        self._write_status(ok, message)
        return ok, message

    def _retire(self, force: bool = False) -> None:
        """Remove old generations whose queues have stayed empty for RETIRE_GRACE."""
        from .kstats import read_queue_stats

        if not self.retiring:
            return
        waiting = {n: st.queue_total for n, st in read_queue_stats().items()}
        now = time.monotonic()
        keep = []
        for rs, since, empty_since in self.retiring:
            go, empty_since = retire_due(rs.queues, waiting, now, since, empty_since, force,
                                         self.RETIRE_GRACE, self.RETIRE_TIMEOUT)
            if go:
                try:
                    removed = self.backend.remove_generation(rs.generation)
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
        if self._reload_wanted:
            self._reload_wanted = False
            if self._failpoint == "sighup":  # NFHOOKS_FAILPOINT=sighup: an internal error ends serve()
                raise RuntimeError("failpoint 'sighup' (NFHOOKS_FAILPOINT): a simulated internal error")
            self.reload()
        if self.retiring:
            self._retire()
        if self.rule_watch is not None and self.rule_watch.due():
            self.rule_watch.check()

    def _tick(self) -> float:
        return 0.05 if self.retiring else (self.rule_watch.interval if self.rule_watch else 5.0)

    def _watch_rules(self) -> None:
        """Check, periodically and at each scrape, that our rules are still there (integrity.py)."""
        from .integrity import RuleWatch

        if self.rule_watch is None:
            self.rule_watch = RuleWatch(lambda: self.ruleset, self._restore_rules, self.backend.saved_text,
                                        self.metrics.registry,
                                        lambda: self.queues.wakeup_fd if self.queues is not None else None)

    def _restore_rules(self, lost: list[str]) -> None:
        from .integrity import reinstall

        if self.retiring:
            self._retire(force=True)
        reinstall(self.backend, self.ruleset, self.nat)

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
            # policy.socket() marks with the "self" bit while handlers run here (the Policy is not
            # written to); the bit is the mark mask's first field, the same for every generation
            with self_marked(self.ruleset.layout["self"].mask):
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
        self.lifecycle.remove()
        self.retiring = []
        return left

    def stop(self) -> None:
        """Undo what start() did (lifecycle.py: rules, features, queues, status, lock). After
        an error ended serve() (``self.failed``), the rules stay, as after a kill -9: fail-closed
        hooks keep dropping (their queue rules have no listener), fail-open ones let traffic
        through, until the next start removes the stale set or ``nfhooks flush`` does."""
        if self.rule_watch is not None:
            self.rule_watch.enabled = False
        closed = sorted(h for h, o in self.ruleset.fail_open.items() if not o and
                        any(x.hook == h for x in self.ruleset.queues.values()))
        why = f"{type(self.failed).__name__}: {self.failed}" if self.failed is not None else ""
        if not self.lifecycle.end(self.failed, leaving=(
                f"the engine stopped on an error ({why}); leaving its rules in place as a kill -9 "
                f"would: fail-closed hooks ({', '.join(closed) or 'none'}) drop what they would queue, "
                "fail-open hooks let it through, until `nfhooks run` starts again or `nfhooks flush` removes them")):
            self.retiring = []

    def _stop_features(self) -> None:
        for f in reversed(FEATURES):  # never raises: the teardown goes on
            f.stop(self.env, owned=self.owner is not None)

    def _close_queues(self) -> None:
        if self.queues is not None:
            self.queues.close()
            self.queues = None

    def _unlink_status(self) -> None:
        if self.status_file:
            with contextlib.suppress(OSError):
                os.unlink(self.status_file)


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
