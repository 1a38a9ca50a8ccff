"""Routing and shaping under ``nfhooks run --workers 2``, on the real kernel path.

The main process owns the routing runtime (ip rules, routes, sysctls, qdiscs: set up before
the rules, removed after); the workers encode declared tables and classes themselves and ask
the main process for an on-demand route's table slot (worker_routes.py). The lab is
tests/kernel/test_route_shape.py's: client -- router == up1/up2 == far.
"""

from __future__ import annotations

import os
import sys

import pytest

from nfhooks.lab.routeshape import (
    BULK_PORT, PLAIN_PORT, SHAPING_POLICY, UPLINKS_POLICY, class_bytes, router_addr, rx_bytes,
    snapshot, uplink_args,
)

from .conftest import metric

WORKERS = ("--workers", "2", "--queue-base", "30")


@pytest.mark.timeout(180)
def test_declared_uplinks_and_shaping_classes_with_workers(rs_lab):
    lab = rs_lab
    before = snapshot(lab)
    servers = {(p, f): lab.tcp_server("far", p, family=f) for p in (PLAIN_PORT, BULK_PORT) for f in (4, 6)}
    eng = lab.start_engine(str(UPLINKS_POLICY), *uplink_args(lab), "--set", f"bulk_ports={BULK_PORT}", *WORKERS)
    assert "lookup 4202 proto 78" in lab.exec("router", "ip", "rule", "list").stdout
    for f in (4, 6):
        svc = lab.addr("far", f)
        assert lab.tcp_connect("client", svc, PLAIN_PORT) == "ok"
        assert servers[(PLAIN_PORT, f)].wait_peers(1) == [router_addr(lab, "up1", f)]
        assert lab.tcp_connect("client", svc, BULK_PORT) == "ok"
        assert servers[(BULK_PORT, f)].wait_peers(1) == [router_addr(lab, "up2", f)]
    assert metric(lab, "nfhooks_handler_packets_total", handler="from_lan", verdict="route") == 4
    assert metric(lab, "nfhooks_handler_errors_total") == 0
    assert eng.stop() == 0
    assert snapshot(lab) == before  # ip rules, routes, NAT chains gone

    eng = lab.start_engine(str(SHAPING_POLICY), "--set", "dev=up1", "--set", f"bulk_ports={BULK_PORT}", *WORKERS)
    assert "qdisc htb 4e46: root" in lab.exec("router", "tc", "qdisc", "show", "dev", "up1").stdout
    bulk, fast = class_bytes(lab, "up1", "4e46:11"), class_bytes(lab, "up1", "4e46:12")
    for f in (4, 6):  # each connection's class decided by a worker, carried by the connmark
        assert lab.tcp_connect("client", lab.addr("far", f), BULK_PORT) == "ok"
        assert lab.tcp_connect("client", lab.addr("far", f), PLAIN_PORT) == "ok"
        assert servers[(BULK_PORT, f)].wait_peers(2) and servers[(PLAIN_PORT, f)].wait_peers(2)
    lab.wait_for(lambda: class_bytes(lab, "up1", "4e46:11") > bulk, timeout=5, what="bytes in the bulk class")
    assert class_bytes(lab, "up1", "4e46:12") > fast
    assert metric(lab, "nfhooks_handler_packets_total", handler="classify", verdict="shape") == 4
    assert eng.stop() == 0
    assert snapshot(lab) == before  # the qdisc tree removed


HOPS = '''
import os
from nfhooks import Policy, route

policy = Policy()
gw = policy.option("gw", default="10.0.12.2", type="address")
log = policy.option("log", default="/dev/null")
policy.routing(dynamic_routes=2, src_valid_mark=True, rp_filter="loose")


@policy.output(proto="tcp", dport=5201)
def by_hop(pkt):
    with open(log.value, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    return route(via=str(gw.value), dev="up2")
'''


PINNED = ("import os, socket, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); "
          "socket.create_connection((sys.argv[2], int(sys.argv[3])), 3)")  # a connection from one CPU


@pytest.mark.timeout(180)
def test_on_demand_route_asked_by_two_workers_gets_one_slot(rs_lab, tmp_path):
    """Connections sent from each CPU land on each worker (--queue-cpu-fanout: the queue of the
    CPU the packet is on); both ask for the same next hop: one table, one route, and the
    second reserved slot stays empty."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs: one worker's queue per CPU (--queue-cpu-fanout)")
    lab = rs_lab
    before = snapshot(lab)
    lab.tcp_server("far", BULK_PORT)
    pol = tmp_path / "hops.py"
    pol.write_text(HOPS)
    pol.chmod(0o644)
    decided = tmp_path / "decided"
    decided.touch()
    decided.chmod(0o666)
    gw2 = str(__import__("ipaddress").ip_network(lab.networks["up2"][4])[2])
    eng = lab.start_engine(str(pol), "--set", f"gw={gw2}", "--set", f"log={decided}", *WORKERS,
                           "--queue-cpu-fanout")

    def from_both_cpus() -> set[str]:
        decided.write_text("")
        isp2 = rx_bytes(lab, "far", "isp2")
        pids: set[str] = set()
        for n in range(1, 9):
            cp = lab.exec("router", sys.executable, "-c", PINNED, n % 2, lab.addr("far"), BULK_PORT,
                          check=False, timeout=20)
            assert cp.returncode == 0, cp.stderr
            pids = set(decided.read_text().split())
            if len(pids) == 2 and n >= 4:
                break
        assert len(pids) == 2, f"every connection was decided by one worker: {pids}"
        assert rx_bytes(lab, "far", "isp2") - isp2 > 100  # they left by up2: the route took effect
        tables = {t: lab.exec("router", "ip", "route", "show", "table", t, check=False).stdout for t in (4201, 4202)}
        assert tables[4201].count("proto 78") == 1 and f"default via {gw2} dev up2" in tables[4201], tables
        assert tables[4202] == "", tables  # not a second slot for the same next hop
        assert metric(lab, "nfhooks_handler_errors_total") == 0
        return pids

    first = from_both_cpus()
    # a hot reload hands the routing runtime (and its slots) to the new generation's workers
    r = lab.exec("router", sys.executable, "-m", "nfhooks", "reload", check=False, timeout=60)
    assert r.returncode == 0, r.stderr + eng.log()[-2000:]
    assert not from_both_cpus() & first  # decided by the new generation's two workers
    assert eng.stop() == 0
    assert snapshot(lab) == before
