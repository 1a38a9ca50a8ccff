"""Flow offload under ``nfhooks run --workers``: the decision lives in the kernel (connmark and
the offload rules the main process installs), so each worker's dispatcher only marks a flow
handler's accept; the main process exports ``nfhooks_offloaded_*`` from the rule counters.

Traffic as in test_offload.py: clients in the client namespace push SIZE bytes per phase to a
sink on the router (INPUT), which answers each phase with the byte count.
"""

from __future__ import annotations

import sys

import pytest

from .conftest import metric, rule_counter
from .test_offload import SINK, SIZE, phases_done, start_client

PORT = 7101
POLICY = f'''\
from nfhooks import Policy, accept

policy = Policy("workers-offload-test")

@policy.input(proto="tcp", dport={PORT}, flow=True)
def flow_web(pkt):
    return accept()
'''


@pytest.mark.timeout(120)
def test_flow_offload_with_two_workers(nfh_lab, tmp_path):
    lab = nfh_lab
    pol = tmp_path / "workers_flow.py"
    pol.write_text(POLICY)
    pol.chmod(0o644)
    ready = lab.tmpdir / f"sink-{PORT}.ready"
    lab.popen("router", sys.executable, "-c", SINK, lab.addr("router"), PORT, SIZE, ready)
    lab.wait_for(ready.exists, what=f"sink on port {PORT}")
    eng = lab.start_engine(str(pol), "--workers", "2", "--queue-base", "20")
    saved = lab.exec("router", "iptables-legacy-save").stdout
    assert "--queue-balance 20:21" in saved and '"nfhooks offload flow_web"' in saved, saved

    n_conns, phases = 2, 2  # 2 connections x 2 phases x 2 MB
    clients = [start_client(lab, PORT, phases, f"wflow{i}") for i in range(n_conns)]
    for _, go, _ in clients:
        go(2)
    for proc, _, out in clients:
        assert proc.wait(60) == 0
        assert phases_done(out) == [f"phase{i} {SIZE}" for i in range(1, phases + 1)], out
    assert eng.running(), eng.log()[-3000:]

    # Python (summed over both workers) decided each connection's first packet only
    decided = metric(lab, "nfhooks_handler_packets_total", handler="flow_web", verdict="accept")
    assert decided == n_conns, decided
    assert rule_counter(lab, "flow_web") == n_conns  # the queue rule saw no more than that
    skipped = rule_counter(lab, "offload flow_web")
    assert skipped >= 20 * n_conns, skipped  # the rest went through the kernel's offload rule
    # the main process's endpoint shows the offloaded flows once (not once per worker)
    assert metric(lab, "nfhooks_offloaded_flows_total", handler="flow_web", hook="INPUT") == n_conns
    lab.wait_for(lambda: metric(lab, "nfhooks_offloaded_packets_total", handler="flow_web") >= skipped,
                 timeout=5, what="the offload rule counters exported")
    assert metric(lab, "nfhooks_worker_up") == 2
    print(f"workers + flow offload: {decided:.0f} packets decided in Python, {skipped} offloaded, "
          f"{n_conns * phases * SIZE} bytes sent")
