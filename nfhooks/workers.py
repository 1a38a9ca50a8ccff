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

``--audit`` works with workers: the rule set already accepts (Engine applied Audit.ruleset),
each worker's Dispatcher gets its own obs_audit.Audit, the main process sums
``nfhooks_audit_overridden_packets_total`` and exports ``nfhooks_audit_mode`` once.

Not supported with workers, refused at start with the reason: routing/shaping (shared state
in the main process that workers would have to ask for), pcap, hot reload (SIGHUP is ignored
with a warning).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from .nat import NatTargets
from .rules import MAX_QUEUE
from .supervise import Pool, Serialized, Supervisor
from .worker_metrics import WorkerMetrics, balance_rule_packets  # noqa: F401 -- re-exported
from .worker_nat import NatClient, NatServer  # noqa: F401 -- NatClient re-exported (tests, users)

log = logging.getLogger("nfhooks.workers")
MAX_WORKERS = 64


class WorkersError(ValueError):
    """The policy or the options cannot be served by several workers (the text says why)."""


def check_supported(rs: Any, workers: int, policy: Any = None) -> None:
    if not 2 <= workers <= MAX_WORKERS:
        raise WorkersError(f"--workers {workers}: give 2..{MAX_WORKERS} (1 is the ordinary engine)")
    if not rs.queues:
        raise WorkersError("the policy has no handlers: there is nothing for --workers to decide")
    why = []
    if getattr(rs, "routeshape", None) is not None:
        why.append("routing/shaping")
    if why:
        raise WorkersError(f"--workers cannot serve a policy with {', '.join(why)} yet; run it "
                           "without --workers")


def balance(rs: Any, workers: int, cpu_fanout: bool = False) -> tuple[Any, list[dict[int, Any]]]:
    """A copy of ``rs`` whose queue rules balance over ``workers`` queues per handler.

    Handler queue ``q`` (``base + index``) becomes queues ``base + index*N .. + N-1``.
    Returns the new rule set (``queues`` maps every new queue to its handler) and, per
    worker, the queues it binds.
    """
    base = min(rs.queues) if rs.queues else 0
    new_num = {q: base + (q - base) * workers for q in rs.queues}
    last = max(new_num.values(), default=base) + workers - 1
    if last > MAX_QUEUE:
        raise WorkersError(f"{len(rs.queues)} handlers x {workers} workers need queues {base}..{last}, "
                           f"beyond {MAX_QUEUE}: lower --queue-base or --workers")
    out = copy.copy(rs)
    out.rules = {}
    for key, rules in rs.rules.items():
        lst = []
        for r in rules:
            opts = dict(r.target_opts)
            if r.target == "NFQUEUE" and "queue-num" in opts:
                first = new_num[int(opts["queue-num"])]
                topts: tuple[tuple[str, str], ...] = (("queue-balance", f"{first}:{first + workers - 1}"),)
                if "queue-bypass" in opts:
                    topts += (("queue-bypass", ""),)
                if cpu_fanout:
                    topts += (("queue-cpu-fanout", ""),)
                r = dataclasses.replace(r, target_opts=topts)
            lst.append(r)
        out.rules[key] = lst
    out.queues = {new_num[q] + w: h for q, h in rs.queues.items() for w in range(workers)}
    per_worker = [{new_num[q] + w: h for q, h in rs.queues.items()} for w in range(workers)]
    return out, per_worker


# --------------------------------------------------------------------------- the main process


def run_workers(policy: Any, rs: Any, workers: int, *, options: Any = None, cpu_fanout: bool = False,
                metrics_addr: str = "off", allow_public: bool = False, budget: float = 0.0,
                timeout: float | None = None, say: Callable[[str], None] = print, backend: Any = None,
                runtimes: dict[str, Any] | None = None, audit: Any = None) -> int:
    """Serve ``rs`` with ``workers`` processes until SIGINT/SIGTERM; the exit status.

    ``backend``: where the rules go (a backends.Backend; None: $NFHOOKS_BACKEND, else auto).
    ``runtimes``: the features' runtimes of the policy (Engine.runtimes; None: made here):
    the main process starts the features with them before the rules (an address set is
    created) and stops them after; the workers inherit them. ``audit``: the engine's
    obs_audit.Audit under --audit (``rs`` already has its accepting defaults), else None.
    Raises WorkersError / KernelError / OwnedElsewhere for the caller to print.
    """
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.process_collector import ProcessCollector

    from .backends import get_backend
    from .exporter import is_loopback, parse_listen_addr
    from .features.base import EngineEnv
    from .features.registry import FEATURES
    from .integrity import RuleWatch, reinstall
    from .lifecycle import Lifecycle
    from .nat import backend_installer

    check_supported(rs, workers, policy)
    brs, per_worker = balance(rs, workers, cpu_fanout)
    backend = backend or get_backend()
    lc = Lifecycle(backend)  # the engine's transaction (lifecycle.py): the main process owns the rules
    lc.begin()
    pool: Pool | None = None
    nat: NatServer | None = None
    server = None
    stop = threading.Event()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)

    hups = [0]

    def on_signal(signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            from .owner import status_path, write_status

            hups[0] += 1
            msg = "reload failed: hot reload is not supported with --workers yet; restart the engine"
            log.warning(msg)
            try:
                write_status(status_path(), hups[0], False, msg)  # `nfhooks reload` reports it
            except OSError:
                pass
            return
        stop.set()
        try:
            os.write(wake_w, b"x")
        except OSError:
            pass

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def stop_pool() -> None:  # each worker closes its queues to new packets and answers what they hold
        if pool is not None:
            pool.stop()

    def close_nat() -> None:  # no nat rule added while or after the rules are removed
        if nat is not None:
            nat.close()

    def shutdown() -> None:
        if server is not None:
            server.shutdown()
            server.server_close()

    def restore_signals() -> None:
        for s, h in old.items():
            signal.signal(s, h)
        os.close(wake_r)
        os.close(wake_w)

    # what the end undoes, the last first: the workers drain, then NAT closes, with every rule in
    # place; then the rules go (or stay, after an error), the endpoint, the signals, the lock
    lc.on_stop(restore_signals)
    lc.on_stop(shutdown)
    lc.on_stop(close_nat, before_rules=True)
    lc.on_stop(stop_pool, before_rules=True)
    env = EngineEnv(policy, brs, backend, None, {} if runtimes is None else runtimes)
    if runtimes is None:
        env.runtimes.update({f.name: f.runtime(env) for f in FEATURES if f.per_worker_collector})

    def stop_features() -> None:  # after the rules (not while rules left in place use them)
        for f in reversed(FEATURES):
            f.stop(env, owned=lc.owned)

    lc.on_stop(stop_features, with_rules=True)
    serving = False
    failed: BaseException | None = None
    try:
        lc.remove_stale()
        for f in FEATURES:  # e.g. the address sets exist before a rule or a worker uses them
            f.start(env)
        pool = Pool(policy, brs, per_worker, options, (budget, timeout), runtimes=env.runtimes,
                    audit=audit is not None)
        if pool.nat_conns:  # started after the fork, before any packet is queued
            targets = NatTargets(brs.layout, brs.nat_targets, generation=brs.generation,
                                 installer=backend_installer(backend, brs.layout, brs.generation))
            nat = NatServer(targets, pool.nat_conns, fork_lock=pool.fork_lock)
            nat.start()
        pool.wait_ready()
        supervisor = Supervisor(pool, on_start=nat.add if nat is not None else (lambda i, conn: None),
                                fail_modes={q: brs.fail_open[h.hook] for q, h in brs.queues.items()})
        lc.install(brs)
        where = "off"
        if metrics_addr != "off":  # started after the fork: no worker inherits its threads
            host, port = parse_listen_addr(metrics_addr)
            if not allow_public and not is_loopback(host):
                raise WorkersError(f"refusing to serve metrics on non-loopback address {metrics_addr!r} "
                                   "(--public-metrics allows it)")
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            ranges = [(first, first + workers - 1, h.hook, h.name, brs.fail_open[h.hook])
                      for first, h in sorted(per_worker[0].items())]
            nat_count = nat.__len__ if nat is not None else (lambda: 0)
            from .obs_defaults import DefaultRuleCollector, DefaultRuleCounts, Merged

            # the default rules' decisions (read here: the main process has the backend), in the
            # packet families the workers' sums export (a family appears once: obs_defaults.Merged)
            from .obs_audit import AuditCollector

            own = [f.collector(lambda name=f.name: env.runtimes.get(name)) for f in FEATURES
                   if f.per_worker_collector and env.runtimes.get(f.name) is not None]
            own.append(AuditCollector(lambda: audit))
            registry.register(Merged(WorkerMetrics(pool, ranges, saved=backend.counter_texts, nat_targets=nat_count,
                                                   own=tuple(c for c in own if c is not None)),
                                     DefaultRuleCollector(DefaultRuleCounts(backend.counter_texts))))
            registry.register(supervisor)
            if getattr(brs, "flow_generation", 0):  # from the kernel's rule counters: once, here
                from .offload import FlowOffload, OffloadCollector

                offload = FlowOffload(brs, policy, saved=backend.counter_texts)
                registry.register(OffloadCollector(lambda: offload))
            served = CollectorRegistry()  # every collector above, run under the pool's fork lock
            served.register(Serialized(registry, pool.fork_lock))
            server, _ = start_http_server(port, addr=host, registry=served)
            bound = server.server_address
            where = f"http://{bound[0]}:{bound[1]}/metrics"
        for i, queues in enumerate(per_worker):
            say(f"  worker {i} pid {pool.pids[i]}: queues {', '.join(map(str, sorted(queues)))}")
        say(f"nfhooks ready: policy {policy.name}, {len(rs.queues)} handler(s) x {workers} workers, "
            f"queues {min(brs.queues)}..{max(brs.queues)}, metrics {where}")
        from multiprocessing.connection import wait

        pool.extra_fds = [wake_r, wake_w] + ([server.socket.fileno()] if server is not None else [])
        watch = RuleWatch(lambda: brs, lambda lost: reinstall(backend, brs, nat.nat if nat else None), backend.saved_text,
                          registry if metrics_addr != "off" else CollectorRegistry(), lambda: wake_w)
        serving = True
        while not stop.is_set():  # a dead worker is restarted (supervise.py); the rules stay
            t = supervisor.timeout()
            wait([wake_r, *supervisor.waitables()], timeout=watch.interval if t is None else min(t, watch.interval))
            if not stop.is_set():
                supervisor.tick()
                if watch.due():
                    watch.check()  # rules removed under us (flush --force): put them back
        return 0
    except BaseException as e:
        if serving:  # ended by an error: leave the rules as a kill -9 would
            failed = e
        raise
    finally:
        lc.end(failed, leaving="the --workers main process stopped on an error; leaving its rules in place as a "
                               "kill -9 would (fail-closed hooks drop, fail-open ones pass) until `nfhooks run` "
                               "starts again or `nfhooks flush` removes them")
