"""``nfhooks run --workers 2``: a worker killed with SIGKILL is restarted; the rules never go.

Policy: INPUT drops by default (fail-closed), a handler accepts UDP to PORT. Clients send from
many source addresses (``--queue-balance`` hashes addresses) so both workers' queues are used.
While a worker is down its queues have no listener: a fail-closed queue rule drops what is
hashed to it (a fail-open one would accept it unfiltered); UDP to DROPPED, which no handler
accepts, must never arrive at all.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

from .conftest import metric, nfh_lines, rule_counter

PORT, DROPPED = 7301, 7302
N_SOURCES = 16
POLICY = f'''\
from nfhooks import Policy, accept

policy = Policy("rel-workers-test", defaults={{"INPUT": "drop"}})

@policy.input(proto="udp", dport={PORT})
def udp_ok(pkt):
    return accept()

@policy.input(iif="lo")
def local(pkt):  # the metrics endpoint, scraped over loopback
    return accept()

@policy.input(proto="icmpv6")
def ndp(pkt):  # neighbour discovery: without it IPv6 stops altogether
    return accept()
'''

# One datagram per source address, all sent before any reply is awaited; prints
# "<source> ok|lost" per line (the lab's server echoes). argv: v4 dst, v6 dst, port, timeout, sources.
_SEND_FROM = r"""
import socket, sys, time
dst4, dst6, port, timeout, srcs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5:]
socks = []
for a in srcs:
    v6 = ":" in a
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((a, 0))
    s.sendto(a.encode(), (dst6 if v6 else dst4, port))
    socks.append((a, s))
deadline = time.monotonic() + timeout
for a, s in socks:
    s.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        ok = s.recv(100) == a.encode()
    except OSError:
        ok = False
    print(a, "ok" if ok else "lost")
"""


def add_sources(lab, n: int = N_SOURCES) -> list[str]:
    """`n` extra IPv4 (/32) and IPv6 (/128) addresses on the client, inside its namespace."""
    v4 = lab.addr("client").rsplit(".", 1)[0]
    v6 = lab.addr("client", 6).rsplit(":", 1)[0]
    addrs = [f"{v4}.{i}" for i in range(40, 40 + n)] + [f"{v6}:{i + 0x40:x}" for i in range(n)]
    lab.exec("client", "ip", "-batch", "-",
             input="".join(f"addr add {a}/{128 if ':' in a else 32} dev eth0 nodad\n" for a in addrs))
    return addrs


def send_from(lab, srcs: list[str], port: int = PORT, timeout: float = 1.0) -> dict[str, bool]:
    """Source address -> whether its datagram to the router was answered."""
    cp = lab.exec("client", sys.executable, "-c", _SEND_FROM, lab.addr("router", 4, facing="client"),
                  lab.addr("router", 6, facing="client"), port, timeout, *srcs, timeout=timeout + 20)
    return {a: r == "ok" for a, r in (line.split() for line in cp.stdout.splitlines())}


def workers(eng) -> list[int]:
    """PIDs of the engine's worker processes: children of the PID we started, same command."""
    me = Path(f"/proc/{eng.pid}/cmdline").read_bytes()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == eng.pid and cmd == me:
            out.append(int(d.name))
    return sorted(out)


def worker_pids(lab) -> dict[str, int]:
    """worker index -> pid of the live workers, from the main process's endpoint."""
    text = lab.exec("router", "curl", "-s", "-m", "5", "http://127.0.0.1:9477/metrics").stdout
    return {w: int(pid) for pid, w in
            re.findall(r'^nfhooks_worker_up\{pid="(\d+)",worker="(\d+)"\} 1\.0$', text, re.M)}


def per_queue(lab, handler: str = "udp_ok") -> dict[str, float]:
    """queue -> packets the workers received there, for one handler's queues."""
    text = lab.exec("router", "curl", "-s", "-m", "5", "http://127.0.0.1:9477/metrics").stdout
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("nfhooks_queue_received_packets_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if labels["handler"] == handler:
                out[labels["queue"]] = out.get(labels["queue"], 0) + float(line.rsplit(" ", 1)[1])
    return out


def servers(lab, port: int) -> list:
    """UDP echo servers on the router, one per family."""
    return [lab.udp_server("router", port, 4, bind="0.0.0.0"), lab.udp_server("router", port, 6, bind="::")]


def policy_file(lab) -> str:
    p = lab.tmpdir / "rel_workers_policy.py"
    p.write_text(POLICY)
    p.chmod(0o644)
    return str(p)


def victim_worker(lab) -> tuple[str, str]:
    """(the worker to kill, the other): not the one whose queue carries the loopback scrape
    (127.0.0.1 hashes to one queue of the `local` handler), so the endpoint stays reachable."""
    q = per_queue(lab, "local")
    assert len(q) == 2 and sorted(v > 0 for v in q.values()) == [False, True], q
    first, _ = sorted(q, key=int)  # worker 0 binds the first queue of every handler
    return ("1", "0") if q[first] > 0 else ("0", "1")


def our_rules(lab) -> list[str]:
    return [line for line in nfh_lines(lab) if line.startswith("-A ")]


@pytest.mark.timeout(120)
def test_kill9_of_one_worker_restarts_it_and_keeps_the_rules(nfh_lab):
    lab = nfh_lab
    srcs = add_sources(lab)
    servers(lab, PORT)
    dropped = servers(lab, DROPPED)
    eng = lab.start_engine(policy_file(lab), "--workers", "2", "--queue-base", "40")
    rules = our_rules(lab)
    assert any("--queue-balance 40:41" in r for r in rules), rules
    assert all(send_from(lab, srcs).values())  # both workers decide
    first = per_queue(lab)
    assert len(first) == 2 and all(v > 0 for v in first.values()), first  # both queues carried traffic

    pids = workers(eng)
    assert len(pids) == 2, pids
    by_index = worker_pids(lab)
    assert sorted(by_index.values()) == pids
    w, other = victim_worker(lab)
    victim = by_index[w]
    os.kill(victim, signal.SIGKILL)  # a child of the engine we started, by its PID
    new = lab.wait_for(lambda: (p if len(p := workers(eng)) == 2 and victim not in p else None),
                       timeout=20, what=f"worker {w} restarted (a new child PID)")
    assert by_index[other] in new  # the other worker was not touched
    assert eng.running(), eng.log()[-3000:]
    assert our_rules(lab) == rules  # the same rules the whole time
    lab.wait_for(lambda: w in worker_pids(lab), timeout=20, what=f"worker {w} ready again")

    assert all(send_from(lab, srcs).values())  # decided again, through both queues
    after = per_queue(lab)
    assert all(after[q] > first[q] for q in first), (first, after)  # both queues decided again
    # the summed counters did not go back with the restarted worker's: exactly the new packets
    assert sum(after.values()) == sum(first.values()) + len(srcs), (first, after)
    assert metric(lab, "nfhooks_worker_restarts_total", worker=w) == 1
    assert metric(lab, "nfhooks_worker_restarts_total", worker=other) == 0
    assert not any(send_from(lab, srcs[:4] + srcs[-4:], DROPPED, timeout=0.5).values())
    assert all(not s.datagrams() for s in dropped)  # nothing the policy drops ever arrived
    assert f"worker {w} restarted" in eng.log(), eng.log()
    assert eng.stop() == 0
    assert nfh_lines(lab) == []
    print(f"worker {w} pid {victim} killed, restarted as {set(new) - set(pids)}; {len(rules)} rules kept")




def restarts(lab, w: str) -> float:
    return metric(lab, "nfhooks_worker_restarts_total", worker=w)


def rule_packets(lab, comment: str) -> int:
    return rule_counter(lab, comment, family=4) + rule_counter(lab, comment, family=6)


# supervise.RestartPolicy: at once, then doubling while the worker keeps dying within a minute
DELAYS = [0.0, 1.0, 2.0, 4.0, 8.0, 16.0]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["--fail-closed", "--fail-open"])
def test_a_worker_that_keeps_dying_is_restarted_with_backoff_in_its_fail_mode(nfh_lab, mode):
    lab = nfh_lab
    srcs = add_sources(lab)
    servers(lab, PORT)
    dropped = servers(lab, DROPPED)
    eng = lab.start_engine(policy_file(lab), "--workers", "2", "--queue-base", "40", mode)
    rules = our_rules(lab)
    assert any("--queue-bypass" in r for r in rules) == (mode == "--fail-open"), rules
    assert all(send_from(lab, srcs).values())
    w, other = victim_worker(lab)
    keep = worker_pids(lab)[other]
    live_queue = sorted(per_queue(lab), key=int)[int(other)]  # the other worker's udp_ok queue
    probe, kills = None, 0
    for k, delay in enumerate(DELAYS, 1):
        if k > 4 and probe is not None:
            break
        kills = k
        pid = lab.wait_for(lambda: worker_pids(lab).get(w), timeout=30, what=f"worker {w} ready")
        os.kill(pid, signal.SIGKILL)  # a child of the engine we started, by its PID
        line = lab.wait_for(lambda: re.search(rf"worker {w} \(pid {pid}\) died .*", eng.log()), timeout=10,
                            what=f"death {k} of worker {w} logged").group(0)
        assert f"{k} death(s) in a row" in line, line
        assert line.endswith("restarting it now" if not delay else f"restarting it in {delay:g}s"), line
        assert metric(lab, "nfhooks_worker_restart_delay_seconds", worker=w) == delay
        assert our_rules(lab) == rules  # never removed, not even while the worker is down
        if delay >= 4 and probe is None and restarts(lab, w) == k - 1:
            before = (per_queue(lab)[live_queue], rule_packets(lab, "udp_ok"))
            answered = send_from(lab, srcs)
            after = (per_queue(lab)[live_queue], rule_packets(lab, "udp_ok"))
            if restarts(lab, w) == k - 1:  # no new worker existed during the probe: it saw the gap
                probe = answered, after[0] - before[0], after[1] - before[1]
        lab.wait_for(lambda: restarts(lab, w) == k and worker_pids(lab).get(w) not in (None, pid),
                     timeout=delay + 30, what=f"restart {k} of worker {w}")
        assert worker_pids(lab)[other] == keep  # the other worker was never touched
    assert probe is not None, "no probe fit into a restart delay of 4 s or more"
    answered, decided, queued = probe
    assert queued == len(srcs)  # every datagram met its queue rule ...
    assert 0 < decided < len(srcs)  # ... the live worker decided its share only
    if mode == "--fail-closed":  # the dead worker's share was dropped by the kernel
        assert sum(answered.values()) == decided, answered
    else:  # bypassed: accepted without a decision
        assert all(answered.values()), answered
    assert all(send_from(lab, srcs).values())  # decided by both workers again
    assert restarts(lab, w) == kills and restarts(lab, other) == 0
    assert not any(send_from(lab, srcs[:4] + srcs[-4:], DROPPED, timeout=0.5).values())
    assert all(not s.datagrams() for s in dropped)  # nothing the policy drops ever arrived
    assert eng.stop() == 0
    assert nfh_lines(lab) == []
    print(f"{mode}: worker {w} killed {kills} times, delays {DELAYS[:kills]}; while down {decided} of "
          f"{len(srcs)} datagrams decided, {sum(answered.values())} answered")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("restart", [(), ("0", "1")], ids=["as-started", "both-restarted"])
def test_workers_stop_when_the_main_process_dies(nfh_lab, restart):
    """No worker may hold the main end of a pipe (its own, or -- forked later -- another's):
    it would never see EOF, and a kill -9 of the main process would leave it serving the
    queues, holding the namespace's lock, forever."""
    lab = nfh_lab
    servers(lab, PORT)
    eng = lab.start_engine(policy_file(lab), "--workers", "2", "--queue-base", "40")
    for w in restart:  # both: the second one restarted is forked after the first
        pid = worker_pids(lab)[w]
        os.kill(pid, signal.SIGKILL)
        lab.wait_for(lambda: restarts(lab, w) == 1 and worker_pids(lab).get(w) not in (None, pid),
                     timeout=20, what=f"worker {w} restarted")
    pids = workers(eng)
    assert len(pids) == 2, pids
    eng.kill9()  # the main process we started
    lab.wait_for(lambda: not any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in pids),
                 timeout=20, what=f"the orphaned workers {pids} exited")
    # no listener any more: the crashed engine's rules stay and the fail-closed hook drops
    assert our_rules(lab)
    lab.wait_for(lambda: not any(line.split()[0] in ("40", "41") for line in
                                 lab.exec("router", "cat", "/proc/net/netfilter/nfnetlink_queue")
                                 .stdout.splitlines() if line.split()),
                 timeout=10, what="queues 40 and 41 unbound")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.timeout(180)
def test_the_endpoint_answers_every_scrape_while_a_worker_is_restarted(nfh_lab):
    """A worker forked while a scrape runs ``iptables-save`` inherited the scrape's pipes, and
    the scrape waited on them until that worker died: the endpoint hung for good (CI, 2026-12-01).
    Scrapes run back to back while one worker is killed and restarted, again and again; every
    one of them must be answered."""
    import subprocess
    import threading
    import time

    lab = nfh_lab
    servers(lab, PORT)
    lab.start_engine(policy_file(lab), "--workers", "2", "--queue-base", "40", "--fail-open")
    w, _ = victim_worker(lab)
    done, failed, count = threading.Event(), [], [0]

    def scrape() -> None:
        while not done.is_set():
            try:
                cp = lab.exec("router", "curl", "-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
                              "http://127.0.0.1:9477/metrics", timeout=15, check=False)
                ok = cp.returncode == 0 and cp.stdout == "200"
            except subprocess.TimeoutExpired:
                ok = False
            count[0] += 1
            if not ok:
                failed.append(time.monotonic())

    scrapers = [threading.Thread(target=scrape, daemon=True) for _ in range(2)]
    for t in scrapers:
        t.start()
    try:
        for k in range(1, 6):  # restarted at once, then after 1, 2 and 4 s
            pid = lab.wait_for(lambda: worker_pids(lab).get(w), timeout=30, what=f"worker {w} ready")
            os.kill(pid, signal.SIGKILL)  # a child of the engine we started, by its PID
            lab.wait_for(lambda: metric(lab, "nfhooks_worker_restarts_total", worker=w) == k
                         and worker_pids(lab).get(w) not in (None, pid), timeout=40, what=f"restart {k}")
    finally:
        done.set()
        for t in scrapers:
            t.join(30)
    assert not failed, f"{len(failed)} of {count[0]} scrapes went unanswered"
    assert count[0] > 20, count
    print(f"{count[0]} scrapes during 5 restarts of worker {w}, all answered")
