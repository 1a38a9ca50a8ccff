"""A Policy is not changed by the engine that runs it, and policy.socket() still skips the
queues: the self mark comes from the serving engine (policy.self_marked), in one process and
in every --workers worker."""

from __future__ import annotations

import json
import sys

from .conftest import POLICIES, TEST_POLICIES, metric

#: Run in the router namespace: an in-process engine started, reloaded (a generation of its
#: own policy object) and stopped; every Policy's attributes compared with what it loaded with.
_ENGINE = r"""
import json, sys
from prometheus_client import CollectorRegistry
from nfhooks import load_policy
from nfhooks.engine import Engine
from nfhooks.metrics import Metrics

path = sys.argv[1]
loaded = []

def loader():
    p = load_policy(path)
    loaded.append((p, dict(vars(p))))
    return p

eng = Engine(loader(), metrics=Metrics(CollectorRegistry()), loader=loader, queue_base=40)
changed = {}
try:
    eng.start()
    changed["start"] = [k for k, v in vars(loaded[0][0]).items() if loaded[0][1].get(k, object()) is not v]
    ok, msg = eng.reload()
    changed["reload"] = [k for p, before in loaded for k, v in vars(p).items() if before.get(k, object()) is not v]
    ours = eng.backend.has_ours()
finally:
    eng.stop()
changed["stop"] = [k for p, before in loaded for k, v in vars(p).items() if before.get(k, object()) is not v]
print(json.dumps({"ok": ok, "msg": msg, "installed": ours, "policies": len(loaded), "changed": changed}))
"""


def test_start_reload_stop_leave_every_policy_as_it_loaded(nfh_lab):
    lab = nfh_lab
    out = lab.exec("router", sys.executable, "-c", _ENGINE, str(POLICIES / "nat.py"), timeout=60).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["ok"], got["msg"]
    assert got["installed"] and got["policies"] == 2
    assert got["changed"] == {"start": [], "reload": [], "stop": []}


def test_a_workers_handler_lookup_skips_the_queues(nfh_lab):
    """self_lookup.py's OUTPUT handler connects out while deciding; without the self mark in
    the worker, its own SYN would queue behind the packet it decides (and time out)."""
    lab = nfh_lab
    svc = lab.tcp_server("server", 8081)
    target = lab.tcp_server("server", 8082)
    lab.start_engine(str(TEST_POLICIES / "self_lookup.py"), "--workers", "2", "--queue-base", "50",
                     "--set", f"lookup={lab.addr('server')}:8081")
    assert lab.tcp_connect("router", lab.addr("server"), 8082, timeout=5) == "ok"
    assert target.wait_peers(1) and svc.wait_peers(1)  # the handler's own lookup got through
    assert metric(lab, "nfhooks_handler_packets_total", handler="ask_first", verdict="accept") == 1
