"""The worker processes of ``nfhooks run --workers N`` and their supervision.

A worker that dies (kill -9, OOM killer, a crash in C code) is restarted by the main process;
the rules stay installed the whole time. While it is down its queues have no listener, so the
kernel applies each hook's fail mode to the share of traffic hashed to them: a fail-closed
queue rule drops it, a fail-open one (``--queue-bypass``) accepts it unfiltered. The other
workers keep deciding their share.

Rate limit (``RestartPolicy``): the first death of a worker is restarted at once; each further
death within ``STABLE_AFTER`` seconds of the previous (re)start doubles the wait, from
``FIRST_DELAY`` up to ``MAX_DELAY`` (0, 1, 2, 4, ... 30 s); a worker that stayed up
``STABLE_AFTER`` seconds starts from 0 again. A restarted worker that fails to bind its
queues counts as one more death. The main process never gives up: a worker that keeps dying
costs one fork per ``MAX_DELAY`` seconds and an error line each time, while every fail-closed
hook stays closed (its rules stay, its dead queues drop) and the live workers keep serving.
Exiting instead would either remove the rules (opening every fail-closed hook) or leave an
engine-less rule set that drops *all* fail-closed traffic, the healthy workers' share too --
and need an operator to recover from what may be a transient cause.

Exported by the main process: ``nfhooks_worker_restarts_total{worker}`` and
``nfhooks_worker_restart_delay_seconds{worker}`` (the wait chosen at the worker's last death).

A restarted worker is forked from the main process, which by then has threads (metrics
endpoint, NAT server). The child uses none of their state: it gets fresh pipes, makes its own
registry, locks and queues. Every worker first closes the main process's descriptors it
inherited -- the main ends of its own and the other workers' pipes, the endpoint's socket --
so that it sees EOF, and stops, when the main process is gone (kill -9 included): its queues
are unbound and the stale rules apply the fail mode until the next start removes them.

What the child cannot close is what another thread of the main process creates *during* the
fork: a scrape's ``iptables-save`` (subprocess's exec-error pipe and stdout pipe, which the main
process reads to EOF) or a NAT rule's xtables lock. A worker holding a copy would make that
read wait, and the scrape hang, until the worker dies. So a fork and those threads' kernel work
never overlap: ``Pool.fork_lock`` is held by the fork, by every metrics scrape (``Serialized``)
and by each NAT allocation (``NatServer``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .errors import KernelError

__all__ = ["CounterCarry", "Pool", "RestartPolicy", "Serialized", "Supervisor", "worker_main", "READY_TIMEOUT", "SCRAPE_TIMEOUT",
           "FIRST_DELAY", "MAX_DELAY", "STABLE_AFTER"]

log = logging.getLogger("nfhooks.workers")
#: seconds a stopping worker may spend answering what its queues still hold (Engine.DRAIN_TIMEOUT)
DRAIN_TIMEOUT = 4.0
READY_TIMEOUT = 20.0
SCRAPE_TIMEOUT = 3.0
FIRST_DELAY = 1.0  # the wait before restarting a worker that died again soon after its restart
MAX_DELAY = 30.0
STABLE_AFTER = 60.0  # a worker up this long is restarted at once when it dies
_MONOTONIC = ("counter", "histogram", "summary")
SampleKey = tuple[str, str, tuple[tuple[str, str], ...]]  # family, sample name, sorted labels


def worker_main(index: int, conn: Any, policy: Any, rs: Any, queues: dict[int, Any], options: Any,
                limits: tuple[float, float | None], nat_conn: Any = None,
                inherited: tuple[int, ...] = (), runtimes: dict[str, Any] | None = None,
                audit: bool = False, pcap: Any = None) -> None:
    """The body of worker ``index`` (a forked child): bind, report ready, serve, answer.
    ``runtimes``: the main process's feature runtimes, inherited; a ``per_worker_collector``
    feature's counts of this process are exported (an address set's add()s, made through a
    per-process ipset shell). ``audit``: run --audit (this worker's own obs_audit.Audit);
    ``pcap``: run --pcap (path, max bytes, files): this worker's own capture (worker_extras)."""
    for fd in inherited:  # the main process's descriptors: never keep another worker's pipe open
        try:
            os.close(fd)
        except OSError:
            pass
    from prometheus_client import generate_latest

    from .engine import Dispatcher
    from .metrics import Metrics
    from .obs_engine import source_hash
    from .offload import FlowOffload
    from .policy import self_marked
    from .policy_metrics import PolicyMetrics
    from .queue import QueueSet
    from .worker_extras import feature_encoders, worker_extras
    from .worker_nat import Asker, NatClient
    from .worker_routes import worker_encoders

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: main decides
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler, until bound
    qs = tap = None
    budget, timeout = limits
    watchdog = None
    try:
        from .watchdog import Watchdog

        watchdog = Watchdog(timeout) if timeout else None  # made here: it targets this process
        metrics = Metrics()
        PolicyMetrics(metrics.registry).bind(policy)  # policy.counter()/gauge(): summed by the main process
        offload = FlowOffload(rs, policy) if getattr(rs, "flow_generation", 0) else None
        asker = Asker(nat_conn) if nat_conn is not None else None  # NAT targets, route slots: worker_routes
        nat = (NatClient(asker, rs.layout, rs.nat_targets, generation=rs.generation)
               if asker is not None and "nat" in rs.layout else None)
        audited, tap = worker_extras(index, rs.generation, metrics.registry, runtimes or {}, audit, pcap)
        disp = Dispatcher(policy=policy, ruleset=rs, metrics=metrics, budget=budget, watchdog=watchdog,
                          offload=offload, nat=nat, audit=audited, tap=tap, encoders=worker_encoders(
                              feature_encoders(runtimes or {}), asker))
        qs = QueueSet(options)
        for num, h in sorted(queues.items()):
            qs.bind(num, disp.callback(h), handler=h, fail_open=rs.fail_open[h.hook])
        qs.export(metrics.registry)
        metrics.set_policy(policy.name or "policy", policy.version,
                           [(n, h.hook, h.name) for n, h in sorted(queues.items())], source_hash(policy))
    except Exception as e:  # noqa: BLE001 -- reported to the main process, which explains it
        conn.send(("error", f"worker {index}: {e}"))
        for done in (qs, tap):
            if done is not None:
                done.close()
        os._exit(2)
    lock = threading.Lock()

    def control() -> None:
        while True:
            try:
                cmd = conn.recv()
            except (EOFError, OSError):
                cmd = "stop"  # the main process is gone: stop serving
            if cmd == "metrics":
                with lock:
                    conn.send(("metrics", generate_latest(metrics.registry).decode()))
            else:
                qs.stop()
                return

    signal.signal(signal.SIGTERM, lambda s, f: qs.stop())
    signal.set_wakeup_fd(qs.wakeup_fd, warn_on_full_buffer=False)
    conn.send(("ready", os.getpid()))
    threading.Thread(target=control, name=f"nfhooks-worker-{index}-control", daemon=True).start()
    if watchdog is not None:
        watchdog.start()
    try:
        with self_marked(rs.layout["self"].mask):  # policy.socket(): the Policy is not written to
            qs.run()
            # asked to stop (or the main process is gone): close the queues to new packets and
            # answer what they hold while the main process keeps every rule (Engine.drain)
            qs.close_intake()
            left = qs.drain(DRAIN_TIMEOUT, qs.waiting)
        if left:
            log.warning("worker %d: %d queued packet(s) not answered within %.0f s are dropped",
                        index, left, DRAIN_TIMEOUT)
    finally:
        if watchdog is not None:
            watchdog.stop()
        qs.close()
        if tap is not None:
            tap.close()  # flushed: every packet answered is in the file
    os._exit(0)


class Pool:
    """The worker processes, started by fork, each with a duplex pipe to the main process
    (control: ready, metrics, stop) and, when the policy has a ``nat`` mark field or ``asks``
    (on-demand route slots), a second one for its requests (``nat_conns``, served by a NatServer).

    Lists are indexed by worker; ``restart(i)`` replaces slot ``i``. ``pids[i]`` is 0 until
    worker ``i`` reported ready; a worker that is not ready is not scraped (its pipe carries
    the ready message first).
    """

    def __init__(self, policy: Any, rs: Any, per_worker: list[dict[int, Any]], options: Any,
                 limits: tuple[float, float | None] = (0.0, None), runtimes: dict[str, Any] | None = None,
                 audit: bool = False, fork_lock: Any = None, extra_fds: list[int] | None = None,
                 pcap: Any = None, asks: bool = False) -> None:
        self.ctx = multiprocessing.get_context("fork")
        self.args = (policy, rs, options, limits)
        self.more = {"runtimes": runtimes, "audit": audit, "pcap": pcap}  # worker_main's keyword arguments
        self.per_worker = per_worker
        n = len(per_worker)
        self.with_nat = "nat" in rs.layout or asks  # the request pipe: NAT targets, ``asks`` other topics
        self.procs: list[Any] = [None] * n
        self.conns: list[Any] = [None] * n
        self.nat_conns: list[Any] = [None] * n if self.with_nat else []
        self.locks = [threading.Lock() for _ in range(n)]
        self.pids = [0] * n
        self.extra_fds: list[int] = list(extra_fds or [])  # more main-process descriptors a worker closes
        self.fork_lock = fork_lock or threading.Lock()  # see the module docstring (one for every pool)
        for i in range(n):
            self.start(i)

    def _inherited(self, i: int) -> tuple[int, ...]:
        """The main process's pipe ends a new worker ``i`` must close: a worker holding one
        (even its own) would never see EOF there when the main process dies. Slot ``i``'s old
        NAT pipe is left out: its NatServer thread closes it, maybe right now."""
        fds = list(self.extra_fds)
        nat = [c for j, c in enumerate(self.nat_conns) if j != i]
        for c in [*self.conns, *nat]:
            try:
                if c is not None and not c.closed:
                    fds.append(c.fileno())
            except OSError:
                continue
        return tuple(fds)

    def main_fds(self) -> list[int]:
        """The main ends of every worker's pipes (a worker of another pool closes them too)."""
        out = []
        for c in [*self.conns, *self.nat_conns]:
            try:
                if c is not None and not c.closed:
                    out.append(c.fileno())
            except OSError:
                continue
        return out

    def start(self, i: int) -> Any:
        """Fork worker ``i`` with fresh pipes; returns its NAT pipe's main end (or None)."""
        policy, rs, options, limits = self.args
        parent, child = self.ctx.Pipe()
        nat_parent, nat_child = self.ctx.Pipe() if self.with_nat else (None, None)
        own = tuple(c.fileno() for c in (parent, nat_parent) if c is not None)  # its own pipes' main ends
        p = self.ctx.Process(target=worker_main, name=f"nfhooks-worker-{i}", daemon=False,
                             args=(i, child, policy, rs, self.per_worker[i], options, limits, nat_child,
                                   self._inherited(i) + own), kwargs=self.more)
        try:
            with self.fork_lock:
                p.start()
        finally:
            child.close()
            if nat_child is not None:
                nat_child.close()
        with self.locks[i]:
            old = self.conns[i]
            self.procs[i], self.conns[i], self.pids[i] = p, parent, 0
        if old is not None:
            old.close()
        if self.with_nat:
            self.nat_conns[i] = nat_parent  # the old one is closed by its NatServer thread (EOF)
        return nat_parent

    def take_ready(self, i: int) -> str | None:
        """Read worker ``i``'s first message if it came: None when ready (or not yet), else why not."""
        conn = self.conns[i]
        try:
            if not conn.poll(0):
                return None
            kind, value = conn.recv()
        except (EOFError, OSError):
            return f"worker {i} exited with {self.procs[i].exitcode} before it was ready"
        if kind != "ready":
            return str(value)
        self.pids[i] = value
        return None

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for i, conn in enumerate(self.conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise KernelError(f"worker {i} did not bind its queues within {timeout:.0f}s")
            why = self.take_ready(i)
            if why is not None:
                raise KernelError(why)

    def scrape(self) -> Iterator[tuple[int, int, str]]:
        """(worker, pid, exposition text) of each ready worker (one that does not answer is skipped)."""
        for i, lock in enumerate(self.locks):
            with lock:
                conn, proc, pid = self.conns[i], self.procs[i], self.pids[i]
                if not pid or not proc.is_alive():
                    continue
                try:
                    conn.send("metrics")
                    if conn.poll(SCRAPE_TIMEOUT):
                        kind, text = conn.recv()
                        if kind == "metrics":
                            yield i, pid, text
                except (OSError, EOFError):
                    continue

    def texts(self) -> Iterator[str]:
        """Each ready worker's exposition text."""
        for _, _, text in self.scrape():
            yield text

    def dead(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if not p.is_alive()]

    def stop(self, grace: float = DRAIN_TIMEOUT + 4.0) -> None:
        for conn, lock in zip(self.conns, self.locks):
            with lock:
                try:
                    conn.send("stop")
                except OSError:
                    pass
        deadline = time.monotonic() + grace
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():  # by its own PID, never by name
                log.warning("worker pid %d did not stop within %.0fs: killing it", p.pid, grace)
                p.kill()
                p.join(5)
        for conn in self.conns:
            conn.close()  # the NAT pipes are closed by their NatServer threads (EOF)


class Serialized:
    """A collector whose whole collection runs under ``lock`` (``Pool.fork_lock``: no worker
    is forked while a scrape runs a program or holds a lock file; see the module docstring)."""

    def __init__(self, inner: Any, lock: Any) -> None:
        self.inner, self.lock = inner, lock

    def collect(self) -> Iterator[Any]:
        with self.lock:
            families = list(self.inner.collect())
        yield from families


class RestartPolicy:
    """How long to wait before restarting a worker that died (see the module docstring)."""

    def __init__(self, first: float = FIRST_DELAY, most: float = MAX_DELAY, stable: float = STABLE_AFTER) -> None:
        self.first, self.most, self.stable = first, most, stable

    def delay(self, streak: int) -> float:
        """The wait before restart number ``streak`` of deaths in a row (1: the first)."""
        return 0.0 if streak <= 1 else min(self.most, self.first * 2 ** (streak - 2))

    def streak(self, previous: int, uptime: float) -> int:
        return 1 if uptime >= self.stable else previous + 1


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit {exitcode}"


class Supervisor:
    """The main process's watch over the pool: restarts dead workers, rate-limited; a collector.

    ``tick()`` runs on the main thread after each wake-up (a worker's sentinel, a ready
    message, or the timeout ``timeout()`` returned). ``on_start(i, nat_conn)`` registers a
    restarted worker's NAT pipe with the NatServer. ``fail_modes`` (queue -> fail-open) lets
    the death be logged with what the kernel now does with its queues.
    """

    def __init__(self, pool: Pool, on_start: Callable[[int, Any], None] = lambda i, c: None,
                 fail_modes: dict[int, bool] | None = None, policy: RestartPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        n = len(pool.procs)
        self.pool = pool
        self.on_start = on_start
        self.fail_modes = fail_modes or {}
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.restarts = [0] * n
        self.delays = [0.0] * n
        self.streaks = [0] * n
        self.started = [clock()] * n  # each worker's last (re)start
        self.due: dict[int, float] = {}  # dead worker -> when to start it again

    def waitables(self) -> list[Any]:
        """What the main loop waits on: live workers' sentinels, starting workers' pipes."""
        out = []
        for i, p in enumerate(self.pool.procs):
            if i in self.due:
                continue
            out.append(p.sentinel)
            if not self.pool.pids[i]:
                out.append(self.pool.conns[i])
        return out

    def timeout(self, most: float = 1.0) -> float:
        now = self.clock()
        return max(0.0, min([most, *(t - now for t in self.due.values())]))

    def tick(self) -> None:
        now = self.clock()
        for i in range(len(self.pool.procs)):
            if i in self.due:
                continue
            if not self.pool.pids[i]:
                why = self.pool.take_ready(i)
                if self.pool.pids[i]:
                    log.warning("worker %d restarted (pid %d, restart %d); its queues %s are decided again",
                                i, self.pool.pids[i], self.restarts[i], self._queues(i))
                elif why is None and now - self.started[i] > READY_TIMEOUT:
                    why = f"worker {i} did not bind its queues within {READY_TIMEOUT:.0f}s"
                if why is not None:
                    log.error("restarting worker %d failed: %s", i, why)
                    self.pool.procs[i].kill()  # by its own PID (it may still be starting)
                    self.pool.procs[i].join(5)
            if not self.pool.procs[i].is_alive():
                self._died(i, now)
        for i, when in sorted(self.due.items()):
            if when <= now:
                self._restart(i)

    def _queues(self, i: int) -> str:
        return ", ".join(map(str, sorted(self.pool.per_worker[i])))

    def _died(self, i: int, now: float) -> None:
        p = self.pool.procs[i]
        self.streaks[i] = self.policy.streak(self.streaks[i], now - self.started[i])
        self.delays[i] = delay = self.policy.delay(self.streaks[i])
        self.due[i] = now + delay
        queues = sorted(self.pool.per_worker[i])
        closed = [str(q) for q in queues if not self.fail_modes.get(q, False)]
        opened = [str(q) for q in queues if self.fail_modes.get(q, False)]
        meanwhile = [f"drops what is queued to its fail-closed queue(s) {', '.join(closed)}"] if closed else []
        if opened:
            meanwhile.append(f"accepts, unfiltered, what goes to its fail-open queue(s) {', '.join(opened)}")
        log.error("worker %d (pid %d) died (%s; %d death(s) in a row): the rules stay; until it is back "
                  "the kernel %s; restarting it %s", i, p.pid, _how(p.exitcode), self.streaks[i],
                  " and ".join(meanwhile), "now" if not delay else f"in {delay:g}s")

    def _restart(self, i: int) -> None:
        del self.due[i]
        self.restarts[i] += 1
        self.started[i] = self.clock()
        try:
            self.on_start(i, self.pool.start(i))
        except Exception as e:  # noqa: BLE001 -- a failed fork must not end supervision
            log.error("restarting worker %d failed: %r", i, e)
            self.streaks[i] += 1
            self.delays[i] = delay = self.policy.delay(self.streaks[i])
            self.due[i] = self.clock() + delay

    def collect(self) -> Iterator[Any]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        restarts = CounterMetricFamily("nfhooks_worker_restarts", "Times the main process started a worker "
                                       "again after it died.", labels=["worker"])
        delay = GaugeMetricFamily("nfhooks_worker_restart_delay_seconds", "The wait chosen at the worker's "
                                  "last death before starting it again (doubles while it keeps dying).",
                                  labels=["worker"])
        for i, n in enumerate(self.restarts):
            restarts.add_metric([str(i)], n)
            delay.add_metric([str(i)], self.delays[i])
        yield restarts
        yield delay


class CounterCarry:
    """Keeps the workers' summed counters monotonic across restarts (for WorkerMetrics).

    A restarted worker counts from 0, so the sum would drop, and Prometheus would read a
    counter reset (and the derived fail-open bypass count would jump up). So the last scrape
    of each worker is kept: while the worker is not scraped (dead, restarting, slow) its last
    values stand in, and once a new PID answers for that slot they are added to ``retired``
    for good. What a worker counted after its last scrape is lost: an undercount, never more.
    """

    def __init__(self) -> None:
        self.last: dict[Any, tuple[int, dict[SampleKey, float]]] = {}  # worker slot -> (pid, last counts)
        self.retired: dict[SampleKey, float] = {}
        self.fams: dict[str, tuple[str, str]] = {}  # family -> (documentation, type)

    def seen(self, i: Any, pid: int, fams: list[Any]) -> None:
        """Worker ``i`` (``pid``) answered a scrape with these families."""
        mono: dict[SampleKey, float] = {}
        for fam in fams:
            if fam.type not in _MONOTONIC:
                continue
            self.fams.setdefault(fam.name, (fam.documentation, fam.type))
            for s in fam.samples:
                if not s.name.endswith("_created"):
                    mono[(fam.name, s.name, tuple(sorted(s.labels.items())))] = s.value
        prev = self.last.get(i)
        if prev is not None and prev[0] != pid:
            for k, v in prev[1].items():
                self.retired[k] = self.retired.get(k, 0.0) + v
        self.last[i] = (pid, mono)

    def extra(self, scraped: set[Any]) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
        """Per family, what to add to this scrape's sums: retired workers' counts and the last
        counts of the workers that did not answer now."""
        out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        parts = [self.retired, *(mono for i, (_, mono) in self.last.items() if i not in scraped)]
        for part in parts:
            for (fam, sname, labels), v in part.items():
                per = out.setdefault(fam, {})
                per[(sname, labels)] = per.get((sname, labels), 0.0) + v
        return out
