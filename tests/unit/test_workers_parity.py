"""The pure parts of ``run --workers`` at parity (issue 18.4): the main process's own samples
folded into the workers' sums, an address set's additions counted per process."""

from __future__ import annotations

import os
from types import SimpleNamespace

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nfhooks.features.sets import SetsRuntime
from nfhooks.sets import AddressSet
from nfhooks.workers import WorkerMetrics


def _worker_text(additions: int, entries: int) -> str:
    return ("# HELP nfhooks_set_additions_total Added.\n# TYPE nfhooks_set_additions_total counter\n"
            f'nfhooks_set_additions_total{{set="banned"}} {additions}\n'
            "# HELP nfhooks_set_entries Entries.\n# TYPE nfhooks_set_entries gauge\n"
            f'nfhooks_set_entries{{set="banned"}} {entries}\n'
            "# HELP nfhooks_audit_mode Audit.\n# TYPE nfhooks_audit_mode gauge\nnfhooks_audit_mode 1\n"
            "# HELP nfhooks_audit_overridden_packets_total Over.\n"
            "# TYPE nfhooks_audit_overridden_packets_total counter\n"
            f'nfhooks_audit_overridden_packets_total{{hook="INPUT",handler="h"}} {additions * 10}\n')


class _Main:
    """What the main process's own collectors give: the kernel's count, the declared entries."""

    def collect(self):
        entries = GaugeMetricFamily("nfhooks_set_entries", "Entries.", labels=["set"])
        entries.add_metric(["banned"], 5)
        added = CounterMetricFamily("nfhooks_set_additions", "Added.", labels=["set"])
        added.add_metric(["banned"], 4)
        mode = GaugeMetricFamily("nfhooks_audit_mode", "Audit.", value=1)
        return iter([entries, added, mode])


def test_main_process_samples_are_added_once_and_kernel_counts_replace_the_workers():
    pool = SimpleNamespace(texts=lambda: iter([_worker_text(2, 99), _worker_text(3, 98)]),
                           procs=[SimpleNamespace(pid=11, is_alive=lambda: True)] * 2)
    reg = CollectorRegistry()
    reg.register(WorkerMetrics(pool, own=(_Main(),)))
    assert reg.get_sample_value("nfhooks_set_additions_total", {"set": "banned"}) == 4 + 2 + 3
    assert reg.get_sample_value("nfhooks_set_entries", {"set": "banned"}) == 5  # not 99 + 98 + 5
    assert reg.get_sample_value("nfhooks_audit_mode") == 1  # not 3
    assert reg.get_sample_value("nfhooks_audit_overridden_packets_total", {"hook": "INPUT", "handler": "h"}) == 50


def test_a_forked_process_counts_its_own_additions_from_zero():
    rt = SetsRuntime({"banned": AddressSet("banned", "ip", (4, 6), None, None)})
    rt.additions["banned"] += 7  # the main process: the declared entries
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker: inherited the runtime
        before = rt.additions["banned"]
        rt.additions["banned"] += 1
        os.write(w, f"{before} {rt.additions['banned']}".encode())
        os._exit(0)
    os.close(w)
    got = os.read(r, 100).decode()
    os.waitpid(pid, 0)
    os.close(r)
    assert got == "0 1"
    assert rt.additions["banned"] == 7  # the main process's count is its own


def test_an_old_generation_goes_once_its_queues_stayed_empty_for_the_grace():
    from nfhooks.lifecycle import retire_due

    args = dict(force=False, grace=0.2, timeout=10.0)
    assert retire_due([5, 6], {5: 1}, 1.0, 0.0, 0.0, **args) == (False, 0.0)  # a packet waits
    assert retire_due([5, 6], {}, 1.0, 0.0, 0.0, **args) == (False, 1.0)  # empty since now
    assert retire_due([5, 6], {}, 1.1, 0.0, 1.0, **args) == (False, 1.0)
    assert retire_due([5, 6], {}, 1.25, 0.0, 1.0, **args) == (True, 1.0)
    assert retire_due([5, 6], {6: 3}, 1.25, 0.0, 1.0, **args) == (False, 0.0)  # not empty again
    assert retire_due([5], {5: 3}, 10.5, 0.0, 0.0, **args)[0]  # after the timeout anyway
    assert retire_due([5], {5: 3}, 0.5, 0.0, 0.0, **{**args, "force": True})[0]
