"""supervise.Supervisor without a kernel: a fake pool and a fake clock drive the restart
rate limit (at once, then doubling up to MAX_DELAY while a worker keeps dying; reset after
STABLE_AFTER of uptime), failed restarts, and the exported counter."""

from __future__ import annotations

import pytest

from nfhooks.supervise import MAX_DELAY, STABLE_AFTER, RestartPolicy, Supervisor


class FakeProc:
    def __init__(self, pid: int) -> None:
        self.pid, self.alive, self.exitcode, self.sentinel = pid, True, None, object()

    def is_alive(self) -> bool:
        return self.alive

    def kill(self) -> None:
        self.alive, self.exitcode = False, -9

    def join(self, timeout: float | None = None) -> None:
        pass


class FakePool:
    """Workers 0..n-1; ``start(i)`` forks a new FakeProc, ready at once unless told otherwise."""

    def __init__(self, n: int = 2) -> None:
        self.next_pid = 100
        self.procs: list[FakeProc] = []
        self.conns = [object()] * n
        self.pids = [0] * n
        self.per_worker = [{10 + i: None, 12 + i: None} for i in range(n)]
        self.first_message: list[str | None] = [None] * n  # None: "ready"; text: an error
        self.fork_error: Exception | None = None
        self.started: list[int] = []
        for i in range(n):
            self.procs.append(FakeProc(self._pid()))
            self.pids[i] = self.procs[i].pid

    def _pid(self) -> int:
        self.next_pid += 1
        return self.next_pid

    def start(self, i: int) -> str:
        if self.fork_error is not None:
            raise self.fork_error
        self.started.append(i)
        self.procs[i] = FakeProc(self._pid())
        self.pids[i] = 0
        return f"nat-conn-{i}"

    def take_ready(self, i: int) -> str | None:
        if self.first_message[i] is not None:
            return self.first_message[i]
        self.pids[i] = self.procs[i].pid
        return None

    def die(self, i: int, code: int = -9) -> None:
        self.procs[i].alive, self.procs[i].exitcode = False, code


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(n: int = 2, fail_open: bool = False):
    pool, clock, started = FakePool(n), Clock(), []
    sup = Supervisor(pool, on_start=lambda i, c: started.append((i, c)),
                     fail_modes={q: fail_open for w in pool.per_worker for q in w}, clock=clock)
    return pool, clock, sup, started


def test_first_death_is_restarted_at_once_and_registered_with_the_nat_server(caplog):
    pool, clock, sup, started = make()
    old = pool.procs[1].pid
    sup.tick()
    assert pool.started == [] and sup.restarts == [0, 0]  # all alive: nothing to do
    pool.die(1)
    sup.tick()
    assert pool.started == [1] and started == [(1, "nat-conn-1")] and sup.restarts == [0, 1]
    assert pool.procs[1].pid != old and pool.pids[1] == 0  # forked, not ready yet
    assert f"worker 1 (pid {old}) died (killed by SIGKILL; 1 death(s) in a row)" in caplog.text
    assert "fail-closed queue(s) 11, 13" in caplog.text and "restarting it now" in caplog.text
    sup.tick()
    assert pool.pids[1] == pool.procs[1].pid  # its ready message was read
    assert "worker 1 restarted" in caplog.text


def test_a_worker_that_keeps_dying_waits_longer_each_time_up_to_the_cap():
    pool, clock, sup, _ = make()
    seen = []
    for _ in range(9):
        pool.die(0)
        sup.tick()
        seen.append(sup.delays[0])
        if sup.delays[0]:
            assert 0 in sup.due and pool.started.count(0) == len(seen) - 1  # waiting, not restarted
            assert sup.timeout() == min(1.0, sup.delays[0])  # the main loop wakes up in time
            assert pool.procs[0].sentinel not in sup.waitables()  # a dead sentinel would spin the loop
            clock.t += sup.delays[0] - 0.01
            sup.tick()
            assert pool.started.count(0) == len(seen) - 1
            clock.t += 0.01
            sup.tick()
        assert pool.started.count(0) == len(seen)
        sup.tick()  # ready
        clock.t += 5  # up for 5 s, then dies again
    assert seen == [0, 1, 2, 4, 8, 16, MAX_DELAY, MAX_DELAY, MAX_DELAY]
    assert sup.restarts == [9, 0]
    # a worker that stayed up long enough is restarted at once again
    clock.t += STABLE_AFTER
    pool.die(0)
    sup.tick()
    assert sup.delays[0] == 0 and sup.streaks[0] == 1 and sup.restarts[0] == 10


def test_a_restart_that_fails_to_bind_counts_as_one_more_death(caplog):
    pool, clock, sup, _ = make()
    pool.die(1)
    pool.first_message[1] = "worker 1: cannot bind queue 11: busy"
    sup.tick()  # restarted at once; the new one reports an error
    sup.tick()
    assert "restarting worker 1 failed: worker 1: cannot bind queue 11" in caplog.text
    assert not pool.procs[1].is_alive()  # killed (by its own PID) and reaped
    assert sup.streaks[1] == 2 and sup.delays[1] == 1 and 1 in sup.due


def test_a_restart_that_does_not_get_ready_in_time_is_killed_and_retried():
    pool, clock, sup, _ = make()
    pool.die(0)
    sup.tick()
    pool.first_message[0] = None
    pool.take_ready = lambda i: None  # type: ignore[method-assign]  -- silent: never ready
    clock.t += 21
    sup.tick()
    assert sup.streaks[0] == 2 and 0 in sup.due


def test_a_failed_fork_is_retried_with_backoff_and_never_ends_supervision(caplog):
    pool, clock, sup, _ = make()
    pool.fork_error = OSError(11, "Resource temporarily unavailable")
    pool.die(0)
    sup.tick()
    assert "restarting worker 0 failed" in caplog.text and sup.restarts[0] == 1 and sup.due[0] == clock.t + 1
    pool.fork_error = None
    clock.t += 1
    sup.tick()
    assert pool.started == [0] and sup.restarts[0] == 2


def test_fail_open_queues_are_named_in_the_death_message(caplog):
    pool, clock, sup, _ = make(fail_open=True)
    pool.die(0, code=1)
    sup.tick()
    assert "(exit 1;" in caplog.text and "accepts, unfiltered, what goes to its fail-open queue(s) 10, 12" in caplog.text
    assert "fail-closed" not in caplog.text


def test_exported_restart_counter_and_delay():
    pool, clock, sup, _ = make()
    pool.die(1)
    sup.tick()
    sup.tick()
    pool.die(1)
    sup.tick()
    fams = {f.name: f for f in sup.collect()}
    assert {(s.name, s.labels["worker"], s.value) for s in fams["nfhooks_worker_restarts"].samples} == {
        ("nfhooks_worker_restarts_total", "0", 0), ("nfhooks_worker_restarts_total", "1", 1)}
    assert {s.labels["worker"]: s.value for s in fams["nfhooks_worker_restart_delay_seconds"].samples} == {
        "0": 0, "1": 1}


@pytest.mark.parametrize("streak,delay", [(1, 0), (2, 1), (3, 2), (6, 16), (7, 30), (50, 30)])
def test_restart_policy(streak, delay):
    assert RestartPolicy().delay(streak) == delay


def test_counter_carry_keeps_summed_counters_monotonic_across_a_restart():
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from nfhooks.supervise import CounterCarry

    def fams(received: int, waiting: int) -> list:
        """A worker's exposition text, parsed as WorkerMetrics parses it."""
        reg = CollectorRegistry()
        Counter("rx", "received", ["queue"], registry=reg).labels("11").inc(received)
        Gauge("wait", "waiting", ["queue"], registry=reg).labels("11").set(waiting)
        return list(text_string_to_metric_families(generate_latest(reg).decode()))

    carry = CounterCarry()
    carry.seen(1, 101, fams(40, 3))
    assert carry.extra({1}) == {}  # scraped now: nothing to add
    assert carry.extra(set()) == {"rx": {("rx_total", (("queue", "11"),)): 40}}  # down: its last count
    carry.seen(1, 202, fams(2, 0))  # restarted, counting from 0 again
    assert carry.retired == {("rx", "rx_total", (("queue", "11"),)): 40}  # gauges and _created not carried
    assert carry.extra({1}) == {"rx": {("rx_total", (("queue", "11"),)): 40}}
    carry.seen(1, 202, fams(7, 0))  # the same process again: not retired twice
    assert carry.retired[("rx", "rx_total", (("queue", "11"),))] == 40


def test_a_restarted_workers_nat_pipe_is_served_and_the_dead_ones_closed():
    """The NatServer serves the pipe of a restarted worker (Supervisor's on_start) and closes
    the dead worker's when it sees EOF; the target allocated before is the same index."""
    from multiprocessing import Pipe

    from nfhooks import masquerade
    from nfhooks.fake import fake_packet
    from nfhooks.marks import core_layout
    from nfhooks.nat import NatTargets
    from nfhooks.workers import NatClient, NatServer

    rules: list[str] = []
    layout = core_layout(1, extra=[("nat", 6)])
    server_end, worker_end = Pipe()
    server = NatServer(NatTargets(layout, 4, lambda fam, t, h, rule: rules.append(rule.render())), [server_end])
    server.start()
    syn = fake_packet(hook="POSTROUTING", dport=80)
    first = NatClient(worker_end, layout, 4).mark_bits(syn, masquerade())
    worker_end.close()  # the worker died
    server.threads[0].join(5)
    assert not server.threads[0].is_alive() and server_end.closed  # its thread ended, pipe closed
    new_server_end, new_worker_end = Pipe()
    server.add(0, new_server_end)  # what run_workers' on_start does for the restarted worker
    assert NatClient(new_worker_end, layout, 4).mark_bits(syn, masquerade()) == first
    assert len(rules) == 1  # asked again by the new worker: the same target, no second rule
    new_worker_end.close()
    server.threads[1].join(5)
    assert new_server_end.closed


def test_a_scrape_and_a_nat_allocation_run_under_the_pools_fork_lock():
    """No worker may be forked while another thread of the main process runs a program or
    holds a lock file: the worker would inherit those descriptors (see supervise.py)."""
    import threading

    from nfhooks.supervise import Serialized
    from nfhooks.worker_nat import NatServer

    lock = threading.Lock()
    seen = []

    class Inner:
        def collect(self):
            seen.append(("scrape", lock.locked()))
            yield "family"

    assert list(Serialized(Inner(), lock).collect()) == ["family"]

    class Targets:
        def index_for(self, k):
            seen.append(("nat", lock.locked()))
            return 3

        def __len__(self):
            return 0

    server = NatServer(Targets(), [], fork_lock=lock)
    assert server.answer(("dnat", 4, "10.0.0.1:80")) == ("index", 3)
    assert seen == [("scrape", True), ("nat", True)]
    assert not lock.locked()
