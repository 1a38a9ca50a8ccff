"""Policy routing and shaping on the real kernel path: what the far side of each uplink sees.

The lab (nfhooks/lab/routeshape.py): client -- router == up1/up2 == far. The far host tells
which uplink a connection took by the source address it sees (each uplink masquerades) and by
the interface its bytes arrived on.
"""

from __future__ import annotations

import sys

import pytest

from nfhooks.lab.routeshape import (
    BALANCED_PORT, BULK_PORT, BULK_RATE, PLAIN_PORT, SHAPING_POLICY, UPLINKS_POLICY, Iperf,
    class_bytes, router_addr, rx_bytes, shaped_run, snapshot, uplink_args,
)

from .conftest import metric, saved


def test_uplink_per_connection_sticky_and_removed_on_exit(rs_lab):
    lab = rs_lab
    before = snapshot(lab)
    servers = {(p, f): lab.tcp_server("far", p, family=f) for p in (PLAIN_PORT, BALANCED_PORT, BULK_PORT)
               for f in (4, 6)}
    eng = lab.start_engine(str(UPLINKS_POLICY), *uplink_args(lab), "--set", f"bulk_ports={BULK_PORT},5202")
    rules = lab.exec("router", "ip", "rule", "list").stdout
    assert "lookup main suppress_prefixlength 0 proto 78" in rules, rules
    assert "lookup 4202 proto 78" in rules and "lookup 4202 proto 78" in lab.exec("router", "ip", "-6", "rule").stdout
    assert f"default via {uplink_args(lab)[5].split('=')[1]} dev up2" in lab.exec(
        "router", "ip", "route", "show", "table", "4202").stdout
    up = {seg: {f: router_addr(lab, seg, f) for f in (4, 6)} for seg in ("up1", "up2")}
    for f in (4, 6):
        svc = lab.addr("far", f)
        # Python's choice per connection, seen by the far host as the uplink's address
        assert lab.tcp_connect("client", svc, PLAIN_PORT) == "ok"
        assert servers[(PLAIN_PORT, f)].wait_peers(1) == [up["up1"][f]]
        assert lab.tcp_connect("client", svc, BULK_PORT) == "ok"
        assert servers[(BULK_PORT, f)].wait_peers(1) == [up["up2"][f]]
        for _ in range(2):
            assert lab.tcp_connect("client", svc, BALANCED_PORT) == "ok"
        assert servers[(BALANCED_PORT, f)].wait_peers(2) == [up["up1"][f], up["up2"][f]]
        # the router's own connection: routed by main (up1) first, re-routed by its mark
        assert lab.tcp_connect("router", svc, BULK_PORT) == "ok"
        assert servers[(BULK_PORT, f)].wait_peers(2)[-1] == up["up2"][f]
    # stickiness: every packet of a 400 KB connection arrives on the far host's up2 side,
    # though only its first packet was asked about (the connmark restores the table)
    isp1, isp2 = rx_bytes(lab, "far", "isp1"), rx_bytes(lab, "far", "isp2")
    with Iperf(lab, "far", lab.addr("far"), 5202):
        sent = lab.exec("client", "iperf3", "-c", lab.addr("far"), "-p", 5202, "-n", "400K", timeout=30)
    assert "sender" in sent.stdout
    assert rx_bytes(lab, "far", "isp2") - isp2 >= 400 * 1024
    assert rx_bytes(lab, "far", "isp1") - isp1 < 20_000
    # one queued packet per forwarded connection: 4 per family + iperf3's control and data
    assert metric(lab, "nfhooks_handler_packets_total", handler="from_lan", verdict="route") == 10
    assert metric(lab, "nfhooks_handler_packets_total", handler="from_router", verdict="route") >= 2
    eng.stop()
    after = snapshot(lab)
    for key in before:
        assert after[key] == before[key], key


def test_route_refused_where_routing_is_decided(rs_lab, tmp_path):
    pol = tmp_path / "late.py"
    pol.write_text("from nfhooks import Policy, route\npolicy = Policy()\n"
                   "policy.routing_table('t', routes=['default dev up2'])\n"
                   "@policy.forward()\ndef late(pkt):\n    return route('t')\n")
    cp = rs_lab.exec("router", sys.executable, "-m", "nfhooks", "run", str(pol), check=False)
    assert cp.returncode != 0
    assert "route cannot work at FORWARD" in cp.stderr + cp.stdout
    assert "It works at: PREROUTING, OUTPUT" in cp.stderr + cp.stdout


def test_shaping_refuses_a_foreign_qdisc_and_a_missing_interface(rs_lab):
    lab = rs_lab
    lab.exec("router", "tc", "qdisc", "add", "dev", "up2", "root", "handle", "1:", "htb")
    before = snapshot(lab)
    run = [sys.executable, "-m", "nfhooks", "run", str(SHAPING_POLICY)]
    cp = lab.exec("router", *run, "--set", "dev=up2", check=False, timeout=30)
    assert cp.returncode != 0
    assert "up2 already has a root qdisc htb 1: that nfhooks did not make" in cp.stderr + cp.stdout
    assert snapshot(lab) == before  # nothing left behind, the user's qdisc untouched
    cp = lab.exec("router", *run, "--set", "dev=nope0", check=False, timeout=30)
    assert cp.returncode != 0 and "is there an interface 'nope0'" in cp.stderr + cp.stdout
    assert snapshot(lab) == before


ALL_BULK = '''
from nfhooks import Policy
policy = Policy()
policy.shaping("up1", classes={"bulk": dict(rate="5mbit", ceil="5mbit", prio=2),
                               "interactive": dict(rate="50mbit", prio=0)}, default="bulk")
'''


def test_shaped_bulk_rate_and_interactive_latency(rs_lab, tmp_path):
    lab = rs_lab
    before = snapshot(lab)
    far = lab.addr("far")
    eng = lab.start_engine(str(SHAPING_POLICY), "--set", "dev=up1")
    assert "qdisc htb 4e46: root" in lab.exec("router", "tc", "qdisc", "show", "dev", "up1").stdout
    rate, fast = shaped_run(lab, "client", "far", far, "up1")
    assert abs(rate - BULK_RATE) <= 0.15 * BULK_RATE, f"bulk class measured {rate / 1e6:.2f} Mbit/s"
    assert fast.received == fast.sent == 10
    assert class_bytes(lab, "up1", "4e46:11") >= rate / 8 * 3  # the flow went through the bulk class
    assert class_bytes(lab, "up1", "4e46:12") > 0  # and the pings through the interactive one
    rate6, fast6 = shaped_run(lab, "client", "far", lab.addr("far", 6), "up1", seconds=3)  # IPv6 alike
    assert abs(rate6 - BULK_RATE) <= 0.15 * BULK_RATE, f"IPv6 bulk class measured {rate6 / 1e6:.2f} Mbit/s"
    assert fast6.received == fast6.sent and fast6.avg_ms < 20, fast6
    eng.stop()
    assert snapshot(lab) == before
    # the same link with the ping stuck in the bulk class: it waits behind the bulk queue
    pol = tmp_path / "all_bulk.py"
    pol.write_text(ALL_BULK)
    eng = lab.start_engine(str(pol))
    rate2, slow = shaped_run(lab, "client", "far", far, "up1")
    eng.stop()
    print(f"bulk {rate / 1e6:.2f} Mbit/s (IPv6 {rate6 / 1e6:.2f}, ping {fast6.avg_ms:.2f} ms); ping avg {fast.avg_ms:.2f} ms (interactive) vs "
          f"{slow.avg_ms:.2f} ms (behind the bulk queue, flow {rate2 / 1e6:.2f} Mbit/s)")
    assert fast.avg_ms < 20, fast
    assert slow.avg_ms > max(50.0, 5 * fast.avg_ms), (fast, slow)
    assert snapshot(lab) == before


NEXT_HOP = '''
from nfhooks import Policy, route

policy = Policy()
gw = policy.option("gw", default="10.0.12.2", type="address")
policy.routing(dynamic_routes=1, src_valid_mark=True, rp_filter="loose")


@policy.output(proto="tcp", dport=5201)
def by_hop(pkt):
    return route(via=str(gw.value), dev="up2")
'''


def _table(lab, tid: int) -> str:
    """A routing table's routes ('' when it has none: the kernel then says it does not exist)."""
    return lab.exec("router", "ip", "route", "show", "table", tid, check=False).stdout


def test_next_hop_route_on_demand_and_stale_state_after_a_crash(rs_lab, tmp_path):
    lab = rs_lab
    before = snapshot(lab)
    srv = lab.tcp_server("far", BULK_PORT)
    pol = tmp_path / "hop.py"
    pol.write_text(NEXT_HOP)
    gw2 = str(__import__("ipaddress").ip_network(lab.networks["up2"][4])[2])
    sysctls = ("ipv4/conf/all/src_valid_mark", "ipv4/conf/all/rp_filter", "ipv4/conf/default/rp_filter")

    def values():
        return [lab.exec("router", "cat", f"/proc/sys/net/{k}").stdout.strip() for k in sysctls]

    old = values()
    assert old == ["0", "0", "0"]  # what the lab sets
    eng = lab.start_engine(str(pol), "--set", f"gw={gw2}")
    assert values() == ["1", "2", "2"]  # asked for by policy.routing(...), in the router's namespace only
    eng.stop()
    assert values() == old
    eng = lab.start_engine(str(pol), "--set", f"gw={gw2}")
    assert _table(lab, 4201) == ""  # made on first use
    isp2 = rx_bytes(lab, "far", "isp2")
    assert lab.tcp_connect("router", lab.addr("far"), BULK_PORT) == "ok"
    # no NAT paired: the source is still up1's address, but the packets came in by up2
    assert srv.wait_peers(1) == [router_addr(lab, "up1")]
    assert rx_bytes(lab, "far", "isp2") - isp2 > 100
    assert f"default via {gw2} dev up2 proto 78" in _table(lab, 4201)
    # a crash leaves the rules, routes and chains; the next start removes them first
    eng.kill9()
    assert "proto 78" in lab.exec("router", "ip", "rule").stdout
    eng = lab.start_engine(str(pol), "--set", f"gw={gw2}")
    assert "removed stale routing state" in eng.log()
    assert _table(lab, 4201) == ""
    eng.stop()
    assert snapshot(lab) == before


@pytest.mark.parametrize("policy,args", [(UPLINKS_POLICY, "uplinks"), (SHAPING_POLICY, ["--set", "dev=up1"])])
def test_installed_rules_are_what_check_renders(rs_lab, policy, args):
    from nfhooks import load_policy
    from nfhooks.policy import parse_sets
    from nfhooks.rules import compile_policy

    lab = rs_lab
    args = uplink_args(lab) if args == "uplinks" else args
    lab.start_engine(str(policy), *args)
    from nfhooks.backends import get_backend

    want = get_backend().save_header() + compile_policy(load_policy(policy, parse_sets(args[1::2]))).render()
    got = lab.exec("router", sys.executable, "-m", "nfhooks", "rules", "--save", timeout=30).stdout
    assert _tables(got) == _tables(want)
    assert "NFH-ROUTE-NAT" in got if policy == UPLINKS_POLICY else "CLASSIFY --set-class 4e46:0011" in got


def _tables(save: str) -> dict[tuple[str, str], list[str]]:
    """iptables-save text per (family, table): the kernel lists tables in the order they were
    first used in the namespace, which is not what the rules are about."""
    out: dict[tuple[str, str], list[str]] = {}
    fam = table = ""
    for line in save.splitlines():
        if line.startswith("# backend "):  # the nft backend's header line (rules --save, check)
            out[("header", "")] = [line]
        elif line.startswith("# ip"):
            fam = line
        elif line.startswith("*"):
            table = line[1:]
            out[(fam, table)] = []
        elif line != "COMMIT":
            out[(fam, table)].append(line)
    return out


def test_hot_reload_keeps_routing_and_leaves_one_generation(rs_lab):
    """A reload that keeps the tables hands the ip rules over to the new generation; after
    two reloads the uplinks still steer, one generation's chains remain, and exit removes all."""
    lab = rs_lab
    before = snapshot(lab)
    servers = {p: lab.tcp_server("far", p) for p in (PLAIN_PORT, BULK_PORT)}
    eng = lab.start_engine(str(UPLINKS_POLICY), *uplink_args(lab), "--set", f"bulk_ports={BULK_PORT},5202")
    up2 = router_addr(lab, "up2", 4)

    def chains():
        return sorted(line.split()[0] for line in saved(lab).splitlines()
                      if line.startswith(":NFH-"))

    first = chains()
    for n in (1, 2):
        r = lab.exec("router", sys.executable, "-m", "nfhooks", "reload", check=False, timeout=60)
        assert r.returncode == 0, r.stderr + eng.log()[-2000:]
        lab.wait_for(lambda: len(chains()) == len(first), timeout=15, what="the old generation retired")
        assert lab.tcp_connect("client", lab.addr("far"), BULK_PORT) == "ok"
        assert servers[BULK_PORT].wait_peers(n)[-1] == up2
    assert [c.replace("-2 ", " ") for c in chains()] == [c.replace("-2 ", " ") for c in first]
    assert eng.stop() == 0
    assert snapshot(lab) == before
