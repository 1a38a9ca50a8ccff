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

Not supported with workers, refused at start with the reason: routing/shaping (shared state
in the main process that workers would have to ask for), pcap, hot reload (SIGHUP is ignored
with a warning).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .install import KernelError
from .nat import Key, NatError, NatTargets
from .rules import MAX_QUEUE

log = logging.getLogger("nfhooks.workers")
READY_TIMEOUT = 20.0
SCRAPE_TIMEOUT = 3.0
NAT_TIMEOUT = 10.0  # a worker waits this long for the main process to allocate a NAT target
MAX_WORKERS = 64


class WorkersError(ValueError):
    """The policy or the options cannot be served by several workers (the text says why)."""


def check_supported(rs: Any, workers: int) -> None:
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


# --------------------------------------------------------------------------- NAT targets


class NatClient(NatTargets):
    """A worker's NatTargets: the index from a local cache, or asked of the main process.

    ``mark_bits`` (what the Dispatcher calls) checks the key here (a wrong-family target
    raises at once, as in the single engine); a key seen before costs a dict lookup; a new
    one is sent as ``(seq, key)`` over ``conn`` and the reply ``(seq, "index", n)`` or
    ``(seq, "error", text)`` awaited (replies with another ``seq``, late answers to a
    request that timed out, are skipped). Errors are cached too: indices are never freed,
    so a target past the bound or refused by the kernel stays so.
    """

    def __init__(self, conn: Any, layout: Any, limit: int, generation: int = 1,
                 timeout: float = NAT_TIMEOUT) -> None:
        super().__init__(layout, limit, installer=self._no_install, generation=generation)
        self.conn = conn
        self.timeout = timeout
        self.seq = 0
        self.lock = threading.Lock()

    def _no_install(self, family: int, table: str, hook: str, rule: Any) -> None:
        raise NatError("a worker installs no rule: the main process does")  # never reached

    def index_for(self, k: Key) -> int:
        idx = self.index.get(k)
        if idx is not None:
            return idx
        if k in self.failed:
            raise NatError(self.failed[k])
        with self.lock:
            self.seq += 1
            seq = self.seq
            try:
                self.conn.send((seq, k))
                deadline = time.monotonic() + self.timeout
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self.conn.poll(left):
                        raise NatError(f"the main process did not allocate NAT target {k[2]} within "
                                       f"{self.timeout:.0f}s")
                    rseq, kind, value = self.conn.recv()
                    if rseq == seq:
                        break
            except (OSError, EOFError) as e:
                raise NatError(f"cannot ask the main process for NAT target {k[2]}: {e!r}") from None
        if kind == "index":
            self.index[k] = value
            return value
        self.failed[k] = value
        raise NatError(value)


class NatServer:
    """The main process's side: the one real NatTargets, serving every worker's pipe.

    One daemon thread per worker pipe; a lock around the allocation (two workers asking for
    the same new target get the same index and one rule). A thread ends when its worker's
    end of the pipe closes (the worker exited) or the pipe is closed here. ``close()`` (before
    the rules are removed) makes every later request an error, so no nat rule is added while
    or after the engine removes its rules.
    """

    def __init__(self, nat: NatTargets, conns: list[Any]) -> None:
        self.nat = nat
        self.conns = conns
        self.lock = threading.Lock()
        self.closed = False
        self.threads: list[threading.Thread] = []

    def close(self) -> None:
        with self.lock:
            self.closed = True

    def __len__(self) -> int:
        with self.lock:
            return len(self.nat)

    def answer(self, k: Key) -> tuple[str, Any]:
        with self.lock:
            if self.closed:
                return "error", f"NAT target {k[2]}: the engine is stopping"
            try:
                return "index", self.nat.index_for(k)
            except NatError as e:
                return "error", str(e)
            except Exception as e:  # noqa: BLE001 -- a worker must get an answer, never hang
                return "error", f"allocating NAT target {k[2]} failed: {e!r}"

    def serve(self, conn: Any) -> None:
        while True:
            try:
                seq, k = conn.recv()
            except (EOFError, OSError, ValueError, TypeError):
                return
            kind, value = self.answer(k)
            try:
                conn.send((seq, kind, value))
            except OSError:
                return

    def start(self) -> None:
        for i, conn in enumerate(self.conns):
            t = threading.Thread(target=self.serve, args=(conn,), name=f"nfhooks-nat-{i}", daemon=True)
            t.start()
            self.threads.append(t)


# --------------------------------------------------------------------------- a worker


def _worker(index: int, conn: Any, policy: Any, rs: Any, queues: dict[int, Any], options: Any,
            limits: tuple[float, float | None], nat_conn: Any = None) -> None:
    """The body of worker ``index`` (a forked child): bind, report ready, serve, answer."""
    from prometheus_client import generate_latest

    from .engine import Dispatcher
    from .metrics import Metrics
    from .offload import FlowOffload
    from .queue import QueueSet

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: main decides
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    qs = None
    budget, timeout = limits
    watchdog = None
    try:
        from .watchdog import Watchdog

        watchdog = Watchdog(timeout) if timeout else None  # made here: it targets this process
        metrics = Metrics()
        offload = FlowOffload(rs, policy) if getattr(rs, "flow_generation", 0) else None
        nat = (NatClient(nat_conn, rs.layout, rs.nat_targets, generation=rs.generation)
               if nat_conn is not None else None)
        disp = Dispatcher(policy=policy, ruleset=rs, metrics=metrics, budget=budget, watchdog=watchdog,
                          offload=offload, nat=nat)
        qs = QueueSet(options)
        for num, h in sorted(queues.items()):
            qs.bind(num, disp.callback(h), handler=h, fail_open=rs.fail_open[h.hook])
        qs.export(metrics.registry)
        metrics.set_policy(policy.name or "policy", policy.version,
                           [(n, h.hook, h.name) for n, h in sorted(queues.items())])
    except Exception as e:  # noqa: BLE001 -- reported to the main process, which explains it
        conn.send(("error", f"worker {index}: {e}"))
        if qs is not None:
            qs.close()
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
        qs.run()
    finally:
        if watchdog is not None:
            watchdog.stop()
        qs.close()
    os._exit(0)


class Pool:
    """The worker processes, started by fork, each with a duplex pipe to the main process
    (control: ready, metrics, stop) and, when the policy has a ``nat`` mark field, a second
    one for its NAT target requests (``nat_conns``, served by a NatServer)."""

    def __init__(self, policy: Any, rs: Any, per_worker: list[dict[int, Any]], options: Any,
                 limits: tuple[float, float | None] = (0.0, None)) -> None:
        ctx = multiprocessing.get_context("fork")
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.nat_conns: list[Any] = []
        self.locks: list[threading.Lock] = []
        self.pids: list[int] = []
        with_nat = "nat" in rs.layout
        for i, queues in enumerate(per_worker):
            parent, child = ctx.Pipe()
            nat_parent, nat_child = ctx.Pipe() if with_nat else (None, None)
            p = ctx.Process(target=_worker, args=(i, child, policy, rs, queues, options, limits, nat_child),
                            name=f"nfhooks-worker-{i}", daemon=False)
            p.start()
            child.close()
            if nat_child is not None:
                nat_child.close()
                self.nat_conns.append(nat_parent)
            self.procs.append(p)
            self.conns.append(parent)
            self.locks.append(threading.Lock())

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for i, conn in enumerate(self.conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise KernelError(f"worker {i} did not bind its queues within {timeout:.0f}s")
            try:
                kind, value = conn.recv()
            except EOFError:
                raise KernelError(f"worker {i} exited with {self.procs[i].exitcode} before it was ready") from None
            if kind != "ready":
                raise KernelError(str(value))
            self.pids.append(value)

    def texts(self) -> Iterator[str]:
        """Each live worker's exposition text (a worker that does not answer is skipped)."""
        for conn, lock, proc in zip(self.conns, self.locks, self.procs):
            if not proc.is_alive():
                continue
            with lock:
                try:
                    conn.send("metrics")
                    if conn.poll(SCRAPE_TIMEOUT):
                        kind, text = conn.recv()
                        if kind == "metrics":
                            yield text
                except (OSError, EOFError):
                    continue

    def dead(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if not p.is_alive()]

    def stop(self, grace: float = 5.0) -> None:
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
        for conn in self.conns + self.nat_conns:
            conn.close()


# --------------------------------------------------------------------------- one endpoint

_MAX_COMBINED = ("nfhooks_up",)
_MAIN_ONLY = ("nfhooks_nat_targets",)  # the main process's own value replaces the workers'


_BALANCE_RULE = re.compile(r"^\[(\d+):\d+\] -A NFH-\S+ .*-j NFQUEUE --queue-balance (\d+):(\d+)(?: |$)")


def balance_rule_packets(texts: list[str]) -> dict[tuple[int, int], int]:
    """Packets each ``--queue-balance a:b`` rule of ours sent, summed over address families."""
    out: dict[tuple[int, int], int] = {}
    for text in texts:
        for line in text.splitlines():
            m = _BALANCE_RULE.match(line)
            if m:
                key = (int(m.group(2)), int(m.group(3)))
                out[key] = out.get(key, 0) + int(m.group(1))
    return out


class WorkerMetrics:
    """Collector of the main process: the workers' samples, summed (see the module docstring).

    Also the fail-open accepts the kernel counts nowhere (queue.bypassed), per balanced rule:
    its counter minus, over its queues, what the kernel dropped, what waits, and what the
    workers received -- read in that order, so a race only undercounts.
    """

    def __init__(self, pool: Pool, ranges: list[tuple[int, int, str, str, bool]] = (),  # type: ignore[assignment]
                 proc_path: str | None = None, saved: Callable[[], list[str]] | None = None,
                 nat_targets: Callable[[], int] = lambda: 0) -> None:
        from .queue import PROC_QUEUES, _saved_with_counters

        self.pool = pool
        self.nat_targets = nat_targets  # the main process's NatServer (0: the policy does no NAT)
        self.ranges = list(ranges)  # (first queue, last queue, hook, handler, fail-open)
        self.proc_path = proc_path or PROC_QUEUES
        self.saved = saved or _saved_with_counters
        self._high: dict[tuple[int, int], int] = {}

    def _bypass_inputs(self) -> tuple[dict[tuple[int, int], int], dict[int, Any]]:
        from .metrics import parse_queue_stats

        if not any(r[4] for r in self.ranges):
            return {}, {}
        rules = balance_rule_packets(self.saved())
        try:
            with open(self.proc_path, encoding="ascii", errors="replace") as f:
                stats = {st.queue_number: st for st in parse_queue_stats(f.read())}
        except OSError:
            stats = {}
        return rules, stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
        from prometheus_client.parser import text_string_to_metric_families

        from .queue import bypassed

        rules, stats = self._bypass_inputs()  # before the workers' counters (see above)
        fams: dict[str, tuple[str, str]] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for text in self.pool.texts():
            for fam in text_string_to_metric_families(text):
                if fam.name.startswith(("process_", "python_")) or fam.name in _MAIN_ONLY:
                    continue  # per process; the main process exports its own
                fams.setdefault(fam.name, (fam.documentation, fam.type))
                per = values.setdefault(fam.name, {})
                use_max = fam.type == "gauge" and (fam.name.endswith("_info") or fam.name in _MAX_COMBINED)
                for s in fam.samples:
                    key = (s.name, tuple(sorted(s.labels.items())))
                    if key not in per:
                        per[key] = s.value
                    elif s.name.endswith("_created"):
                        per[key] = min(per[key], s.value)
                    elif use_max:
                        per[key] = max(per[key], s.value)
                    else:
                        per[key] += s.value
        for name, (doc, typ) in fams.items():
            m = Metric(name, doc, typ)
            for (sname, labels), v in values[name].items():
                m.add_sample(sname, dict(labels), v)
            yield m
        received = {dict(labels).get("queue"): v for (sname, labels), v in
                    values.get("nfhooks_queue_received_packets", {}).items()
                    if sname == "nfhooks_queue_received_packets_total"}
        bypass = CounterMetricFamily("nfhooks_queue_bypassed_packets",
                                     "Fail-open queues: packets the kernel accepted without asking nfhooks "
                                     "(queue or socket full); derived from the rule counter and the "
                                     "queues' statistics.", labels=["queue", "hook", "handler"])
        for first, last, hook, handler, fail_open in self.ranges:
            nums = range(first, last + 1)
            if not fail_open or (first, last) not in rules or not all(n in stats for n in nums):
                continue
            value = bypassed(rules[(first, last)], sum(stats[n].queue_dropped for n in nums),
                             sum(stats[n].user_dropped for n in nums), sum(stats[n].queue_total for n in nums),
                             int(sum(received.get(str(n), 0) for n in nums)))
            self._high[(first, last)] = high = max(self._high.get((first, last), 0), value)
            bypass.add_metric([f"{first}:{last}", hook, handler], high)
        if bypass.samples:
            yield bypass
        yield GaugeMetricFamily("nfhooks_nat_targets", "NAT targets the loaded policy installed.",
                                value=self.nat_targets())
        up = GaugeMetricFamily("nfhooks_worker_up", "1 for each worker process that is alive.",
                               labels=["worker", "pid"])
        for i, p in enumerate(self.pool.procs):
            up.add_metric([str(i), str(p.pid)], 1 if p.is_alive() else 0)
        yield up


# --------------------------------------------------------------------------- the main process


def run_workers(policy: Any, rs: Any, workers: int, *, options: Any = None, cpu_fanout: bool = False,
                metrics_addr: str = "off", allow_public: bool = False, budget: float = 0.0,
                timeout: float | None = None, say: Callable[[str], None] = print) -> int:
    """Serve ``rs`` with ``workers`` processes until SIGINT/SIGTERM; the exit status.

    Raises WorkersError / KernelError / OwnedElsewhere for the caller to print.
    """
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.process_collector import ProcessCollector

    from .install import check_kernel, install, installed, remove_all
    from .metrics import _is_loopback, parse_listen_addr
    from .owner import Ownership

    check_supported(rs, workers)
    brs, per_worker = balance(rs, workers, cpu_fanout)
    policy.self_mark = brs.layout["self"].mask
    check_kernel()
    owner = Ownership.acquire()
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
    try:
        _, stale = installed()
        if stale:
            log.warning("removing a stale nfhooks rule set left by an engine that is gone: %s",
                        "; ".join(remove_all()))
        pool = Pool(policy, brs, per_worker, options, (budget, timeout))
        if pool.nat_conns:  # started after the fork, before any packet is queued
            nat = NatServer(NatTargets(brs.layout, brs.nat_targets, generation=brs.generation), pool.nat_conns)
            nat.start()
        pool.wait_ready()
        install(brs)
        where = "off"
        if metrics_addr != "off":  # started after the fork: no worker inherits its threads
            host, port = parse_listen_addr(metrics_addr)
            if not allow_public and not _is_loopback(host):
                raise WorkersError(f"refusing to serve metrics on non-loopback address {metrics_addr!r} "
                                   "(--public-metrics allows it)")
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            ranges = [(first, first + workers - 1, h.hook, h.name, brs.fail_open[h.hook])
                      for first, h in sorted(per_worker[0].items())]
            nat_count = nat.__len__ if nat is not None else (lambda: 0)
            registry.register(WorkerMetrics(pool, ranges, nat_targets=nat_count))
            if getattr(brs, "flow_generation", 0):  # from the kernel's rule counters: once, here
                from .offload import FlowOffload, OffloadCollector

                offload = FlowOffload(brs, policy)
                registry.register(OffloadCollector(lambda: offload))
            server, _ = start_http_server(port, addr=host, registry=registry)
            bound = server.server_address
            where = f"http://{bound[0]}:{bound[1]}/metrics"
        for i, queues in enumerate(per_worker):
            say(f"  worker {i} pid {pool.pids[i]}: queues {', '.join(map(str, sorted(queues)))}")
        say(f"nfhooks ready: policy {policy.name}, {len(rs.queues)} handler(s) x {workers} workers, "
            f"queues {min(brs.queues)}..{max(brs.queues)}, metrics {where}")
        from multiprocessing.connection import wait

        while not stop.is_set():
            wait([wake_r, *(p.sentinel for p in pool.procs)], timeout=1.0)
            dead = pool.dead()
            if dead and not stop.is_set():
                codes = ", ".join(f"worker {i} (pid {pool.procs[i].pid}) exit {pool.procs[i].exitcode}"
                                  for i in dead)
                log.error("%s: stopping every worker and removing the rules", codes)
                return 1
        return 0
    finally:
        if nat is not None:
            nat.close()  # no nat rule added while or after the rules are removed
        try:
            removed = remove_all()
            if removed:
                log.info("removed: %s", "; ".join(removed))
        finally:
            if pool is not None:
                pool.stop()
            if server is not None:
                server.shutdown()
                server.server_close()
            for s, h in old.items():
                signal.signal(s, h)
            os.close(wake_r)
            os.close(wake_w)
            owner.release()
