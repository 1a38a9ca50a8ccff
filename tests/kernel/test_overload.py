"""Overload: a UDP flood (iperf3, one fixed 5-tuple) into a queue whose handler is far slower
than the flood. The engine must survive it, give every packet it read exactly one verdict,
make the kernel's drops (fail-closed) or its uncounted fail-open accepts visible in the
metrics -- with numbers that add up to the queue rule's own counter -- and answer a fresh
packet promptly once the flood is over."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from .conftest import metric, rule_counter

PORT = 5201  # iperf3's: its TCP control connection is not queued, its UDP data is
PROBE = 9001  # same handler, same queue: the probe waits behind whatever is left

_POLICY = f"""
import time
from nfhooks import Policy, accept
policy = Policy()

@policy.input(proto="udp", dport=[{PORT}, {PROBE}])
def slow(pkt):
    time.sleep(0.001)  # ~1000 packets/s at best: the flood is ~15 times that
    return accept()
"""


def _scrape(lab) -> str:
    return lab.exec("router", "curl", "-s", "-m", "5", "http://127.0.0.1:9477/metrics").stdout


def _queue_nums(lab) -> set[int]:
    """Our queues: the numbers --workers labels its queue series with; the single engine labels
    them by hook and handler only (they survive a reload: obs_series.py), so there the kernel's
    table of the router's namespace, where only this engine binds queues, says which."""
    text = _scrape(lab)
    assert re.search(r"^nfhooks_queue_config_info\{", text, re.M), "no nfhooks_queue_config_info in the metrics"
    nums = {int(q) for q in re.findall(r'^nfhooks_queue_config_info\{[^}]*queue="(\d+)"', text, re.M)}
    if not nums:
        table = lab.exec("router", "cat", "/proc/net/netfilter/nfnetlink_queue").stdout
        nums = {int(line.split()[0]) for line in table.splitlines() if line.strip()}
    assert nums, "no queue bound"
    return nums


def _kernel_queues(lab, nums: set[int]) -> dict[str, int]:
    """The kernel's statistics of our queues, summed (one queue, or one per worker)."""
    total = {"waiting": 0, "queue_dropped": 0, "user_dropped": 0, "id_sequence": 0}
    seen = set()
    for line in lab.exec("router", "cat", "/proc/net/netfilter/nfnetlink_queue").stdout.splitlines():
        f = line.split()
        if f and int(f[0]) in nums:
            seen.add(int(f[0]))
            for key, col in (("waiting", 2), ("queue_dropped", 5), ("user_dropped", 6), ("id_sequence", 7)):
                total[key] += int(f[col])
    assert seen == nums, f"queues {nums - seen} are not bound"
    return total


def _flood(lab) -> dict:
    """iperf3 -u from the client to the router for 2 s at ~15k packets/s, one 5-tuple."""
    router = lab.addr("router")
    server = lab.popen("router", "iperf3", "-s", "-1", "-B", router, "-p", str(PORT),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.wait_for(lambda: f"{router}:{PORT}" in lab.exec("router", "ss", "-ltnH").stdout,
                 what="iperf3 server listening")
    cp = lab.exec("client", "iperf3", "-c", router, "-p", str(PORT), "-u", "-b", "8M", "-l", "64",
                  "-t", "2", "--cport", "40999", "-J", timeout=40, check=False)
    report = json.loads(cp.stdout or "{}")
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr[-2000:]
    server.wait(20)
    return report


CASES = {
    # name: (engine options, what overflows)
    "fail-closed": (["--fail-closed", "--queue-maxlen", "64"], "queue"),
    "fail-open": (["--fail-open", "--queue-maxlen", "64"], "queue"),
    "fail-closed-rcvbuf": (["--fail-closed", "--queue-maxlen", "100000", "--queue-rcvbuf", "4096"], "socket"),
    "fail-open-rcvbuf": (["--fail-open", "--queue-maxlen", "100000", "--queue-rcvbuf", "4096"], "socket"),
    # two worker processes: one 5-tuple hashes to one of them; the main process derives the
    # fail-open accepts of the balanced rule over both queues
    "workers-fail-open": (["--workers", "2", "--fail-open", "--queue-maxlen", "64"], "queue"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_flood_into_a_slow_handler(nfh_lab, tmp_path, case):
    lab = nfh_lab
    opts, overflow = CASES[case]
    fail_open = "--fail-open" in opts
    pol = tmp_path / "slow.py"
    pol.write_text(_POLICY)
    eng = lab.start_engine(str(pol), *opts)
    nums = _queue_nums(lab)

    report = _flood(lab)
    sent = report["end"]["sum"]["packets"]
    assert sent > 10000, report["end"]["sum"]  # the flood really was far beyond ~1000/s

    # 1. the engine survived and drained everything it was given
    assert eng.running(), eng.log()[-3000:]
    lab.wait_for(lambda: _kernel_queues(lab, nums)["waiting"] == 0, timeout=30, what="the queue to drain")

    # 2. every packet the engine read got exactly one verdict
    received = metric(lab, "nfhooks_queue_received_packets_total", handler="slow")
    # every verdict at INPUT: the handler's own, and the default given in its place when a
    # sleep overran --handler-budget on this busy machine (the only queue at INPUT is slow's)
    decided = metric(lab, "nfhooks_packets_total", hook="INPUT")
    assert received == decided > 0
    k = _kernel_queues(lab, nums)
    # every id the kernel handed out reached us, except those lost to a full socket
    # (counted by the kernel fail-closed, accepted uncounted fail-open)
    rule = rule_counter(lab, "slow")
    dropped = metric(lab, "nfhooks_queue_kernel_dropped_packets_total", handler="slow")
    user_dropped = metric(lab, "nfhooks_queue_user_dropped_packets_total", handler="slow")
    bypassed = metric(lab, "nfhooks_queue_bypassed_packets_total", handler="slow")
    enobufs = metric(lab, "nfhooks_queue_enobufs_total", handler="slow")
    assert (dropped, user_dropped) == (k["queue_dropped"], k["user_dropped"])

    # 3. the overload is visible, and the books balance against the kernel's rule counter
    if fail_open:
        assert dropped == user_dropped == 0  # fail-open: the kernel dropped nothing
        assert bypassed > 0
        assert rule == received + bypassed, (rule, received, bypassed)
    else:
        assert bypassed == 0  # not exported for fail-closed queues
        assert rule == received + dropped + user_dropped, (rule, received, dropped, user_dropped)
        assert k["id_sequence"] == received + user_dropped
    if overflow == "queue":
        assert (bypassed if fail_open else dropped) > 0
        assert user_dropped == 0 and enobufs == 0
    else:
        assert enobufs > 0  # recv() said ENOBUFS; the engine counted it and read on
        assert fail_open or user_dropped > 0

    # 4. recovery: a fresh packet on the same queue is decided at once
    lab.udp_server("router", PROBE)
    t0 = time.monotonic()
    assert lab.udp_send("client", lab.addr("router"), PROBE, b"probe", timeout=2) == b"probe"
    elapsed = time.monotonic() - t0
    assert metric(lab, "nfhooks_queue_received_packets_total", handler="slow") == received + 1
    assert eng.running()
    print(f"{case}: iperf3 sent {sent}, rule {rule}, decided {received:.0f}, kernel dropped "
          f"{dropped:.0f}, socket dropped {user_dropped:.0f}, ENOBUFS {enobufs:.0f}, fail-open "
          f"accepted {bypassed:.0f}, budget overruns "
          f"{metric(lab, 'nfhooks_handler_overruns_total', handler='slow'):.0f}, "
          f"probe answered in {elapsed * 1000:.0f} ms")
