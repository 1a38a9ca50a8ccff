"""Issue 17 on the real kernel path: default-rule decisions counted (17.1), failures under
the handler's own name (17.2), policy metrics (17.4), --audit and the policy's hash (17.7).
Real rules, real NFQUEUE, real traffic from the lab's client to the router."""

from __future__ import annotations

import hashlib
import re
import sys


from .conftest import TEST_POLICIES, metric, save

POLICY = TEST_POLICIES / "obs_rollout.py"
DEFAULT_DROP = dict(hook="INPUT", table="filter", verdict="drop", via="default_rule")


def default_rule_packets(lab) -> int:
    """What the kernel counted on the router's INPUT default rules (both families)."""
    total = 0
    for fam in (4, 6):
        for line in save(lab, "router", fam, "-c").splitlines():
            if '--comment "nfhooks default"' in line and line.split("] ", 1)[-1].startswith("-A NFH-INPUT"):
                total += int(line.split("]")[0].strip("[").split(":")[0])
    return total


def metrics_text(lab) -> str:
    return lab.exec("router", "curl", "-s", "-m", "2", "http://127.0.0.1:9477/metrics").stdout


def settled_default_count(lab) -> tuple[int, float, int]:
    """(kernel before, metric, kernel after) once the metric lies between two kernel reads
    (the scrape reads the counters at most once a second; stray traffic may add in between)."""
    def read():
        k1 = default_rule_packets(lab)
        m = metric(lab, "nfhooks_packets_total", **DEFAULT_DROP)
        k2 = default_rule_packets(lab)
        return (k1, m, k2) if k1 <= m <= k2 else None
    return lab.wait_for(read, timeout=10, what="the default-rule metric to match the kernel's counter")


def test_default_rule_drops_are_counted_as_the_kernel_counts_them(nfh_lab):
    lab = nfh_lab
    lab.tcp_server("router", 7001)
    silent = lab.tcp_server("router", 7003)  # listening: only the policy can lose the SYNs
    lab.start_engine(str(POLICY))
    k0, m0, _ = settled_default_count(lab)
    n = 3
    for _ in range(n):  # no handler matches port 7003: the INPUT default rule drops them in the kernel
        assert lab.tcp_connect("client", lab.addr("router"), 7003, timeout=0.5) == "timeout"
    assert silent.log_peers() == []  # what the sender lost
    k1, m1, _ = settled_default_count(lab)
    assert m1 - m0 >= n  # each SYN (and its retransmissions) counted
    # told apart from handler decisions: the handlers' own series carry no via
    assert metric(lab, "nfhooks_handler_packets_total", hook="INPUT", handler="(default)", verdict="drop",
                  via="default_rule") >= n
    assert lab.tcp_connect("client", lab.addr("router"), 7001) == "ok"
    assert metric(lab, "nfhooks_handler_packets_total", hook="INPUT", handler="web", verdict="accept") >= 1
    text = metrics_text(lab)
    assert not re.search(r'nfhooks_handler_packets_total\{[^}]*handler="web"[^}]*via=', text)


def test_a_failing_handler_keeps_its_name_and_says_how(nfh_lab):
    lab = nfh_lab
    lab.tcp_server("router", 7002)
    lab.start_engine(str(POLICY))
    assert lab.tcp_connect("client", lab.addr("router"), 7002, timeout=0.5) == "timeout"  # default: drop
    lab.wait_for(lambda: metric(lab, "nfhooks_handler_packets_total", hook="INPUT", handler="broken",
                                verdict="drop", via="error") >= 1, what="the error counted under 'broken'")
    assert metric(lab, "nfhooks_handler_errors_total", hook="INPUT", handler="broken") >= 1
    text = metrics_text(lab)
    assert not re.search(r'handler="\(default\)"[^}]*via="error"', text)  # not hidden under (default)
    # only the verdicts the handler's source can give: blocked returns drop() only
    blocked = re.findall(r'nfhooks_handler_packets_total\{[^}]*handler="blocked"[^}]*\}', text)
    assert blocked and all('verdict="drop"' in s for s in blocked), blocked
    assert "_created" not in text  # issue 17.3


def test_policy_metrics_and_info_on_the_engine_endpoint(nfh_lab):
    lab = nfh_lab
    lab.tcp_server("router", 7001)
    lab.start_engine(str(POLICY))
    for _ in range(2):
        assert lab.tcp_connect("client", lab.addr("router"), 7001) == "ok"
    lab.wait_for(lambda: metric(lab, "nfhooks_policy_web_connections_total", family="4") == 2,
                 what="the policy's own counter")
    assert metric(lab, "nfhooks_policy_last_web_port") == 7001
    digest = hashlib.sha256(POLICY.read_text().encode()).hexdigest()[:12]
    assert metric(lab, "nfhooks_policy_info", policy="obs-rollout", version="7", hash=digest) == 1
    assert metric(lab, "nfhooks_up") == 1 and metric(lab, "nfhooks_audit_mode") == 0


def test_policy_metrics_and_default_rule_under_workers(nfh_lab):
    lab = nfh_lab
    lab.tcp_server("router", 7001)
    lab.tcp_server("router", 7003)
    lab.start_engine(str(POLICY), "--workers", "2")
    n = 4
    for _ in range(n):  # new source ports: the balance spreads them, the sum is what counts
        assert lab.tcp_connect("client", lab.addr("router"), 7001) == "ok"
    lab.wait_for(lambda: metric(lab, "nfhooks_policy_web_connections_total", family="4") == n,
                 what="the workers' policy counters, summed")
    before = metric(lab, "nfhooks_packets_total", **DEFAULT_DROP)
    assert lab.tcp_connect("client", lab.addr("router"), 7003, timeout=0.5) == "timeout"
    settled_default_count(lab)  # the main process reads the default rules
    assert metric(lab, "nfhooks_packets_total", **DEFAULT_DROP) > before


def test_audit_accepts_everything_and_counts_what_would_have_been(nfh_lab, tmp_path):
    lab = nfh_lab
    servers = {p: lab.tcp_server("router", p) for p in (7001, 7002, 7003, 7004)}
    pcap = tmp_path / "audit.pcapng"
    eng = lab.start_engine(str(POLICY), "--audit", "--pcap", str(pcap))
    assert "audit mode" in eng.log()
    for port in (7002, 7003, 7004):  # would be: error -> drop, default rule drop, handler drop
        assert lab.tcp_connect("client", lab.addr("router"), port) == "ok", port
        assert servers[port].wait_peers(1)
    assert metric(lab, "nfhooks_audit_mode") == 1
    lab.wait_for(lambda: metric(lab, "nfhooks_packets_total", **DEFAULT_DROP) >= 1, what="the would-be default drop")
    assert metric(lab, "nfhooks_handler_packets_total", handler="blocked", verdict="drop") >= 1
    assert metric(lab, "nfhooks_handler_packets_total", handler="broken", verdict="drop", via="error") >= 1
    assert metric(lab, "nfhooks_audit_overridden_packets_total", hook="INPUT", handler="blocked") >= 1
    eng.stop()
    from nfhooks.pcap import read_packets

    comments = [c for _, _, c in read_packets(pcap)]
    assert any("handler=blocked verdict=drop audit=accepted" in c for c in comments), comments[:5]
    assert any("handler=broken verdict=drop via=error audit=accepted" in c for c in comments), comments[:5]


def series(text: str, prefix: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line.startswith(prefix)}


def test_queue_series_survive_a_reload_and_keep_counting(nfh_lab):
    lab = nfh_lab
    lab.tcp_server("router", 7001)
    eng = lab.start_engine(str(POLICY))
    assert lab.tcp_connect("client", lab.addr("router"), 7001) == "ok"
    received = dict(hook="INPUT", handler="web")
    lab.wait_for(lambda: metric(lab, "nfhooks_queue_received_packets_total", **received) >= 1, what="web's queue")
    before = series(metrics_text(lab), "nfhooks_queue_")
    assert before and not any("queue=" in s for s in before)
    r = lab.exec("router", sys.executable, "-m", "nfhooks", "reload", check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    eng.wait_log("retired", timeout=15)  # generation 1's queues unbound: their numbers gone
    assert series(metrics_text(lab), "nfhooks_queue_") == before  # the same series, none renewed
    assert metric(lab, "nfhooks_queue_received_packets_total", **received) >= 1  # carried, not reset
    assert lab.tcp_connect("client", lab.addr("router"), 7001) == "ok"
    lab.wait_for(lambda: metric(lab, "nfhooks_queue_received_packets_total", **received) >= 2,
                 what="generation 2's web queue adding to the same series")
