"""``nfhooks run --workers N``: one policy served by N processes.

Python decides one packet at a time per process; N processes use N cores. Each handler gets
N consecutive queues instead of one, and its queue rule spreads packets over them with
``-j NFQUEUE --queue-balance a:b`` (the kernel hashes source and destination *addresses*,
not ports, symmetrically, so both directions of a connection meet the same worker; with
``--queue-cpu-fanout`` it picks the queue of the CPU the packet is on instead). Worker ``w``
binds queue ``a + w`` of every handler.

Who does what:

* the **main process** owns everything shared: the namespace's ownership lock, the rules
  (installed once every worker has bound its queues, removed before the workers unbind),
  the capability to change them, and the metrics endpoint. It decides no packet.
* a **worker** is forked after the policy is loaded and compiled (no re-import), binds its
  queues, and serves them with the ordinary Dispatcher and QueueSet. It never touches rules.
  One that dies is restarted by the main process, rate-limited, while the rules stay and its
  queues follow the hook's fail mode (supervise.py: Pool, Supervisor).

Metrics: each worker keeps the engine's plain-int counters (metrics.py) in its own registry.
At scrape time the main process asks every worker over a pipe for its exposition text and
sums the samples (counters, histogram buckets; ``*_info`` gauges and ``nfhooks_up`` take the
max). Chosen over prometheus-client's multiprocess mode, which works only for its own
Counter/Gauge objects backed by mmap files -- the per-packet families here are exported by
collectors at scrape time, which multiprocess mode cannot see -- and which would need a
per-run directory to clean up after a crash. Per-worker series stay apart where the labels
differ (every queue series carries its queue number, hence its worker).

Flow offload works with workers: its state is in the kernel (the connmark and the rules the
main process installs), so each worker's Dispatcher only needs its own small FlowOffload (the
mark bits a flow handler's accept carries); the main process exports
``nfhooks_offloaded_*``, which it reads from the offload rules' counters at scrape time (the
workers export none: summed, they would count every rule N times).

NAT verdicts work with workers: the target allocation (index in the ``nat`` mark field, and
the nat rule of a new target) must live in one process, so the main process owns the one real
NatTargets (NatServer: one thread per worker, a lock around the allocation; the rule is added
by NatTargets' own installer) and exports ``nfhooks_nat_targets``. Each worker's Dispatcher
gets a NatClient: a local cache of target -> index; on a miss it sends the target's key over
its own pipe (made before the fork) and blocks for the index (or the error, raised as
NatError). Only a new target's first packet in each worker pays the round trip.

Address sets and kernel verdicts work with workers: the main process starts the features
(features/) with the policy's runtimes before the rules -- the sets are created, stale ones
destroyed -- and stops them after the rules are removed; the kernel-verdict rules are ordinary
rules of the set it installs. A worker's handler calls ``banned.add(...)`` through the runtime
it inherited, whose ipset shell is per process (sets_ipset.IpsetShell); a feature with
``per_worker_collector`` is exported by each worker (its own additions) and by the main process
(the kernel's entry count, which replaces the workers', and the declared entries), summed.

``--audit``: the rule set already accepts (Engine applied Audit.ruleset), each worker's
Dispatcher has its own Audit; the main process sums the overrides, exports the mode once.
``--pcap FILE``: one capture per worker, ``FILE.w<worker>`` (worker_extras.py).

Hot reload (``nfhooks reload`` / SIGHUP to the main process; :class:`Reloader`) is
Engine.reload's with processes: Engine.compile_next first (an error keeps the running policy),
then a new :class:`Generation` -- its workers forked for the other generation's queues, the
features handed over, its rules installed in front --, the old one stops stamping and, once
its queues stayed empty, its rules go and its workers drain and stop.

Routing and shaping work with workers: the main process owns the routing runtime (features
started before the rules, stopped after: ip rules, routes, sysctls, qdiscs) and answers each
worker's on-demand route slot requests over the NAT request pipe; declared tables and classes
are encoded by each worker from the plan (worker_routes.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from .nat import NatTargets
from .supervise import Pool, Serialized, Supervisor
from .worker_balance import MAX_WORKERS, WorkersError, balance, check_supported  # noqa: F401 -- re-exported
from .worker_metrics import Current, Reloads, WorkerMetrics, balance_rule_packets  # noqa: F401 -- re-exported
from .worker_routes import slot_topics
from .worker_nat import NatClient, NatServer  # noqa: F401 -- NatClient re-exported (tests, users)

log = logging.getLogger("nfhooks.workers")


# --------------------------------------------------------------------------- the main process


class Generation:
    """One policy generation as the workers serve it (a hot reload makes the next one): its
    balanced rules, its worker pool, NAT server and supervisor. ``runtimes``: the features'
    runtimes the workers inherit (None: made here, for the features whose runtime the workers
    use, ``per_worker_collector``)."""

    def __init__(self, policy: Any, rs: Any, backend: Any, workers: int, cpu_fanout: bool,
                 runtimes: dict[str, Any] | None = None) -> None:
        from .features.base import EngineEnv, Feature
        from .features.registry import FEATURES

        self.policy, self.rs, self.workers = policy, rs, workers
        self.brs, self.per_worker = balance(rs, workers, cpu_fanout)
        self.env = EngineEnv(policy, self.brs, backend, None, {} if runtimes is None else runtimes)
        if runtimes is None:  # the runtimes the workers use: collectors', and verdict encoders' (routes)
            self.env.runtimes.update({f.name: f.runtime(self.env) for f in FEATURES
                                      if f.per_worker_collector or type(f).encoders is not Feature.encoders})
        #: verdict kind -> encoder, the owner runtimes (an on-demand route's slot: worker_routes.py)
        self.encoders = {k: e for f in FEATURES for k, e in f.encoders(self.env.runtimes.get(f.name)).items()}
        self.pool: Pool | None = None
        self.nat: NatServer | None = None
        self.supervisor: Supervisor | None = None
        self.offload: Any = None  # the main process's FlowOffload: nfhooks_offloaded_* from the rule counters
        self.tag = 0  # which generation since the start (its workers' slots in WorkerMetrics)

    def start(self, pool_args: dict[str, Any], fork_lock: Any = None, extra_fds: list[int] | None = None) -> None:
        """Fork the workers, start the NAT server (after the fork, before any packet is queued),
        wait until every worker has bound its queues. ``stop()`` undoes a part done."""
        from .nat import backend_installer

        brs, backend = self.brs, self.env.backend
        topics = slot_topics(self.encoders)  # on-demand route slots, asked over the same pipe as NAT
        self.pool = Pool(self.policy, brs, self.per_worker, runtimes=self.env.runtimes, fork_lock=fork_lock,
                         extra_fds=extra_fds, asks=bool(topics), **pool_args)
        if self.pool.nat_conns:
            targets = None if "nat" not in brs.layout else NatTargets(
                brs.layout, brs.nat_targets, generation=brs.generation,
                installer=backend_installer(backend, brs.layout, brs.generation))
            self.nat = NatServer(targets, self.pool.nat_conns, fork_lock=self.pool.fork_lock, topics=topics)
            self.nat.start()
        self.pool.wait_ready()
        self.supervisor = Supervisor(self.pool, on_start=self.nat.add if self.nat is not None else (lambda i, c: None),
                                     fail_modes={q: brs.fail_open[h.hook] for q, h in brs.queues.items()})
        if getattr(brs, "flow_generation", 0):
            from .offload import FlowOffload

            self.offload = FlowOffload(brs, self.policy, saved=backend.counter_texts)

    def ranges(self) -> list[tuple[int, int, str, str, bool]]:
        """(first queue, last queue, hook, handler, fail-open) of each balanced rule."""
        return [(first, first + self.workers - 1, h.hook, h.name, self.brs.fail_open[h.hook])
                for first, h in sorted(self.per_worker[0].items())]

    def stop(self) -> None:
        """The workers close their queues to new packets and answer what they hold; then no
        NAT rule is added any more. With every rule still in place."""
        try:
            if self.pool is not None:
                self.pool.stop()
        finally:
            if self.nat is not None:
                self.nat.close()


class Reloader:
    """The main process's generations -- the current one, old ones retiring -- and the hot
    reload that makes the next: Engine.reload's steps, with processes for queues (see the
    module docstring). ``pool_args``: each generation's Pool(options, limits, audit, pcap)."""

    def __init__(self, gen: Generation, backend: Any, compile_next: Callable[..., tuple[Any, Any]] | None,
                 audit: Any, pool_args: dict[str, Any], cpu_fanout: bool, base_fds: list[int]) -> None:
        self.current = gen
        self.retiring: list[tuple[Generation, float, float]] = []  # (generation, since, empty since)
        self.backend, self.compile_next, self.audit = backend, compile_next, audit
        self.pool_args, self.cpu_fanout = pool_args, cpu_fanout
        self.base_fds = base_fds  # the main process's descriptors every worker closes (wake pipe, endpoint)
        self.fork_lock: Any = None  # the first pool's, shared by every later one
        self.metrics: WorkerMetrics | None = None  # the endpoint's, pointed at the current pool
        self.counts = Reloads()
        self.wanted = False  # set by SIGHUP
        self.seq = 0

    def generations(self) -> list[Generation]:
        return [self.current, *(g for g, _, _ in self.retiring)]

    def _fds(self, but: Generation | None = None) -> list[int]:
        return self.base_fds + [fd for g in self.generations() if g is not but and g.pool for fd in g.pool.main_fds()]

    def refresh(self) -> None:
        """What a (re)started worker closes: the other live pools' pipes too (never a stale
        number); which pools the endpoint scrapes."""
        for g in self.generations():
            if g.pool is not None:
                g.pool.extra_fds = self._fds(g)
        if self.metrics is not None:
            self.metrics.pools = [(g.tag, g.pool) for g in self.generations() if g.pool is not None]

    def tick(self) -> None:
        if self.wanted:
            self.wanted = False
            self.reload()
        if self.retiring:
            self.retire()

    def reload(self) -> tuple[bool, str]:
        """Load and compile first (a broken file keeps the running policy), then the next
        generation: its workers bound, its rules installed in front, the old one retiring."""
        from .features.registry import FEATURES
        from .lifecycle import Undo
        from .policy import PolicyError

        if self.retiring:
            self.retire(force=True)
        cur = self.current
        name, g = cur.policy.name, cur.brs.generation
        try:
            if self.compile_next is None:
                raise PolicyError("this engine was started without a policy file to reload")
            policy, rs = self.compile_next(2 if g == 1 else 1, cur.workers, cur.brs.queues)
            check_supported(rs, cur.workers, policy)
            if self.audit is not None:
                self.audit.ruleset(rs)  # as Engine._use does: the default rules accept
            new = Generation(policy, rs, self.backend, cur.workers, self.cpu_fanout)
            new.tag = cur.tag + 1
        except (PolicyError, WorkersError) as e:
            return self._done(False, f"reload failed, policy {name} (generation {g}) keeps running: {e}")
        undo = Undo()  # a refused new generation is taken down again, newest step first
        undo.push(new.stop)
        undo.push(lambda: self.backend.remove_generation(new.brs.generation))
        try:
            for f in FEATURES:  # e.g. address sets handed over (or the reload refused)
                f.reload(cur.env, new.env)
            new.start(self.pool_args, self.fork_lock, self._fds())
            self.backend.install(new.brs)
        except Exception as e:  # noqa: BLE001 -- undo the new half, keep the old
            try:
                undo.unwind()
            except Exception as u:  # noqa: BLE001
                log.error("taking generation %d down again: %s", new.brs.generation, u)
            return self._done(False, f"reload failed installing generation {new.brs.generation}, policy "
                                     f"{name} keeps running: {e}")
        try:
            self.backend.retire_stamps(cur.brs)
        except Exception as e:  # noqa: BLE001 -- both sets stay correct; the old one just keeps stamping
            log.error("could not stop generation %d from stamping new packets: %s", g, e)
        self.retiring.append((cur, time.monotonic(), 0.0))
        self.current = new
        if self.metrics is not None:
            self.metrics.pool, self.metrics.ranges = new.pool, new.ranges()  # worker_up, bypass
        self.refresh()
        return self._done(True, f"reloaded policy {policy.name} {policy.version}".rstrip() + f" as generation "
                                f"{new.brs.generation}: {len(rs.queues)} handler queue(s) x {cur.workers} workers")

    def retire(self, force: bool = False) -> None:
        """Old generations whose queues stayed empty (lifecycle.retire_due): rules removed,
        then their workers stopped (answering what is still queued)."""
        from .engine import Engine
        from .kstats import read_queue_stats
        from .lifecycle import retire_due

        waiting = {n: st.queue_total for n, st in read_queue_stats().items()}
        now, keep = time.monotonic(), []
        for gen, since, empty_since in self.retiring:
            go, empty_since = retire_due(gen.brs.queues, waiting, now, since, empty_since, force,
                                         Engine.RETIRE_GRACE, Engine.RETIRE_TIMEOUT)
            if go:
                try:
                    removed = self.backend.remove_generation(gen.brs.generation)
                except Exception as e:  # noqa: BLE001 -- keep serving; try again on the next tick
                    log.error("could not remove generation %d: %s", gen.brs.generation, e)
                    keep.append((gen, since, empty_since))
                    continue
                if self.metrics is not None and gen.pool is not None:
                    with self.fork_lock:  # as a scrape: no fork meanwhile, no scrape at once
                        self.metrics.last_scrape(gen.tag, gen.pool)
                gen.stop()
                log.info("generation %d retired, its workers stopped: %s", gen.brs.generation,
                         "; ".join(removed) or "nothing installed")
            else:
                keep.append((gen, since, empty_since))
        self.retiring = keep
        self.refresh()

    def stop_all(self) -> None:
        """Every generation's workers drain (Lifecycle.end: before the rules go)."""
        first: BaseException | None = None
        for g in self.generations():
            try:
                g.stop()
            except BaseException as e:  # noqa: BLE001 -- the others must still stop
                first = first or e
        if first is not None:
            raise first

    def _done(self, ok: bool, message: str) -> tuple[bool, str]:
        from .owner import status_path, write_status

        self.seq += 1
        if ok:
            self.counts.ok += 1
        else:
            self.counts.failed += 1
        (log.info if ok else log.error)("%s", message)
        try:  # what `nfhooks reload` waits for
            write_status(status_path(), self.seq, ok, message, policy=self.current.policy.name,
                         generation=self.current.brs.generation)
        except OSError as e:
            log.warning("cannot write the reload status: %s", e)
        return ok, message


def run_workers(policy: Any, rs: Any, workers: int, *, options: Any = None, cpu_fanout: bool = False,
                metrics_addr: str = "off", allow_public: bool = False, budget: float = 0.0,
                timeout: float | None = None, say: Callable[[str], None] = print, backend: Any = None,
                runtimes: dict[str, Any] | None = None, audit: Any = None,
                compile_next: Callable[..., tuple[Any, Any]] | None = None, pcap: Any = None) -> int:
    """Serve ``rs`` with ``workers`` processes until SIGINT/SIGTERM; the exit status.

    ``backend``: where the rules go (a backends.Backend; None: $NFHOOKS_BACKEND, else auto).
    ``runtimes``: the features' runtimes of the policy (Engine.runtimes; None: made here):
    the main process starts the features with them before the rules (an address set is
    created) and stops them after; the workers inherit them. ``audit``: the engine's
    obs_audit.Audit under --audit (``rs`` already has its accepting defaults), else None.
    ``compile_next``: Engine.compile_next, what a hot reload (SIGHUP) loads and compiles
    (None: a reload is refused). Raises WorkersError / KernelError / OwnedElsewhere.
    """
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.process_collector import ProcessCollector

    from .backends import get_backend
    from .exporter import is_loopback, parse_listen_addr
    from .features.registry import FEATURES
    from .integrity import RuleWatch, reinstall
    from .lifecycle import Lifecycle

    check_supported(rs, workers, policy)
    backend = backend or get_backend()
    lc = Lifecycle(backend)  # the engine's transaction (lifecycle.py): the main process owns the rules
    lc.begin()
    gen = Generation(policy, rs, backend, workers, cpu_fanout, runtimes)
    server = None
    stop = threading.Event()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    spec = None if pcap is None else (pcap.path, pcap.max_bytes, pcap.files)
    if pcap is not None:  # the main process records nothing: each worker its own file (worker_extras)
        pcap.close()
        os.unlink(pcap.path)
        say(f"nfhooks: with --workers each worker records to its own file: {pcap.path}.w0 ... (worker_extras.py)")
    rl = Reloader(gen, backend, compile_next, audit, dict(options=options, limits=(budget, timeout),
                  audit=audit is not None, pcap=spec), cpu_fanout, [wake_r, wake_w])

    def on_signal(signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            rl.wanted = True  # the loop reloads (signal-safe: a flag and a byte)
        else:
            stop.set()
        try:
            os.write(wake_w, b"x")
        except OSError:
            pass

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def stop_features() -> None:  # after the rules (not while rules left in place use them)
        for f in reversed(FEATURES):
            f.stop(rl.current.env, owned=lc.owned)

    def shutdown() -> None:
        if server is not None:
            server.shutdown()
            server.server_close()

    def restore_signals() -> None:
        for s, h in old.items():
            signal.signal(s, h)
        os.close(wake_r)
        os.close(wake_w)

    # what the end undoes, the last first: every generation's workers drain, then NAT closes,
    # with every rule in place; then the rules go (or stay, after an error), the features'
    # kernel state (address sets), the endpoint, the signals, the lock
    lc.on_stop(restore_signals)
    lc.on_stop(shutdown)
    lc.on_stop(stop_features, with_rules=True)
    lc.on_stop(rl.stop_all, before_rules=True)
    serving = False
    failed: BaseException | None = None
    try:
        lc.remove_stale()
        for f in FEATURES:  # e.g. the address sets exist before a rule or a worker uses them
            f.start(gen.env)
        gen.start(rl.pool_args)
        pool = gen.pool
        assert pool is not None
        rl.fork_lock = pool.fork_lock  # one lock for every generation's forks and the scrapes
        lc.install(gen.brs)
        where = "off"
        registry = CollectorRegistry()
        if metrics_addr != "off":  # started after the fork: no worker inherits its threads
            host, port = parse_listen_addr(metrics_addr)
            if not allow_public and not is_loopback(host):
                raise WorkersError(f"refusing to serve metrics on non-loopback address {metrics_addr!r} "
                                   "(--public-metrics allows it)")
            ProcessCollector(registry=registry)
            from .obs_audit import AuditCollector
            from .obs_defaults import DefaultRuleCollector, DefaultRuleCounts, Merged
            from .offload import OffloadCollector

            own = [f.collector(lambda name=f.name: rl.current.env.runtimes.get(name)) for f in FEATURES
                   if f.per_worker_collector]
            own += [AuditCollector(lambda: audit), rl.counts]
            rl.metrics = WorkerMetrics(pool, gen.ranges(), saved=backend.counter_texts, own=tuple(c for c in own if c),
                                       nat_targets=lambda: len(rl.current.nat) if rl.current.nat is not None else 0)
            # the default rules' decisions (read here: the main process has the backend), in the
            # packet families the workers' sums export (a family appears once: obs_defaults.Merged)
            registry.register(Merged(rl.metrics, DefaultRuleCollector(DefaultRuleCounts(backend.counter_texts))))
            registry.register(Current(lambda: rl.current.supervisor))
            registry.register(OffloadCollector(lambda: rl.current.offload))  # from the kernel's counters: once
            served = CollectorRegistry()  # every collector above, run under the pool's fork lock
            served.register(Serialized(registry, pool.fork_lock))
            server, _ = start_http_server(port, addr=host, registry=served)
            bound = server.server_address
            where = f"http://{bound[0]}:{bound[1]}/metrics"
            rl.base_fds.append(server.socket.fileno())
        for i, queues in enumerate(gen.per_worker):
            say(f"  worker {i} pid {pool.pids[i]}: queues {', '.join(map(str, sorted(queues)))}")
        say(f"nfhooks ready: policy {policy.name}, {len(rs.queues)} handler(s) x {workers} workers, "
            f"queues {min(gen.brs.queues)}..{max(gen.brs.queues)}, metrics {where}")
        from multiprocessing.connection import wait

        rl.refresh()

        def restore(lost: list[str]) -> None:  # rules removed under us (flush --force): put them back
            rl.retire(force=True)
            reinstall(backend, rl.current.brs, rl.current.nat.nat if rl.current.nat else None)

        watch = RuleWatch(lambda: rl.current.brs, restore, backend.saved_text, registry, lambda: wake_w)
        serving = True
        while not stop.is_set():  # a dead worker is restarted (supervise.py); the rules stay
            sup = rl.current.supervisor
            assert sup is not None
            t = min(sup.timeout(), watch.interval, 0.05 if rl.retiring else watch.interval)
            wait([wake_r, *sup.waitables()], timeout=t)
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            if stop.is_set():
                break
            rl.tick()
            rl.current.supervisor.tick()  # type: ignore[union-attr]
            if watch.due():
                watch.check()
        return 0
    except BaseException as e:
        if serving:  # ended by an error: leave the rules as a kill -9 would
            failed = e
        raise
    finally:
        lc.end(failed, leaving="the --workers main process stopped on an error; leaving its rules in place as a "
                               "kill -9 would (fail-closed hooks drop, fail-open ones pass) until `nfhooks run` "
                               "starts again or `nfhooks flush` removes them")
