"""The main process's metrics of ``nfhooks run --workers``: the workers' samples summed (see
workers.py's module docstring), its own folded in, the fail-open bypass per balanced rule."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from .supervise import CounterCarry, Pool

__all__ = ["Current", "Reloads", "WorkerMetrics", "balance_rule_packets"]

_MAX_COMBINED = ("nfhooks_up", "nfhooks_audit_mode")
#: the main process's own value replaces the workers' (read once from the kernel, not N times)
_MAIN_ONLY = ("nfhooks_nat_targets", "nfhooks_set_entries")


_BALANCE_TARGET = re.compile(r"-j NFQUEUE --queue-balance (\d+):(\d+)(?: |$)")


def balance_rule_packets(texts: list[str]) -> dict[tuple[int, int], int]:
    """Packets each ``--queue-balance a:b`` rule of ours sent, summed over address families."""
    from .saved import counted_rules

    out: dict[tuple[int, int], int] = {}
    for text in texts:
        for rule in counted_rules(text):
            m = _BALANCE_TARGET.search(rule.text) if rule.chain.startswith("NFH-") else None
            if m:
                key = (int(m.group(1)), int(m.group(2)))
                out[key] = out.get(key, 0) + rule.packets
    return out


class WorkerMetrics:
    """Collector of the main process: the workers' samples, summed (see the module docstring),
    counters carried over a worker's restart (supervise.CounterCarry).

    Also the fail-open accepts the kernel counts nowhere (queue.bypassed), per balanced rule:
    its counter minus, over its queues, what the kernel dropped, what waits, and what the
    workers received -- read in that order, so a race only undercounts.
    """

    def __init__(self, pool: Pool, ranges: list[tuple[int, int, str, str, bool]] = (),  # type: ignore[assignment]
                 proc_path: str | None = None, saved: Callable[[], list[str]] | None = None,
                 nat_targets: Callable[[], int] = lambda: 0, own: tuple[Any, ...] = ()) -> None:
        from .kstats import DEFAULT_PROC_PATH
        from .overload import no_counters

        self.pool = pool
        self.nat_targets = nat_targets  # the main process's NatServer (0: the policy does no NAT)
        self.ranges = list(ranges)  # (first queue, last queue, hook, handler, fail-open)
        self.proc_path = proc_path or DEFAULT_PROC_PATH
        self.saved = saved or no_counters
        self._high: dict[tuple[int, int], int] = {}
        self.carry = CounterCarry()  # counters stay monotonic when a worker is restarted
        #: the main process's collectors whose samples are added to the workers' (an address
        #: set's declared entries and kernel count, nfhooks_audit_mode)
        self.own = own
        self.pools: list[tuple[int, Any]] = []  # (generation tag, pool) of each live one; []: ``pool``

    def _bypass_inputs(self) -> tuple[dict[tuple[int, int], int], dict[int, Any]]:
        from .kstats import read_queue_stats

        if not any(r[4] for r in self.ranges):
            return {}, {}
        rules = balance_rule_packets(self.saved())
        return rules, read_queue_stats(self.proc_path)

    def _answers(self) -> Iterator[tuple[Any, int, str]]:
        """(slot, pid, text) of every live generation's ready workers; a slot is (generation
        tag, worker), so an old generation's last counts stand in for good once it is gone."""
        for tag, pool in self.pools or [(0, self.pool)]:
            scrape = getattr(pool, "scrape", None)  # a pool without it (a test's fake): no carry
            answers = scrape() if scrape is not None else ((i, 0, t) for i, t in enumerate(pool.texts()))
            for i, pid, text in answers:
                yield (tag, i), pid, text

    @staticmethod
    def _parsed(text: str) -> list[Any]:
        from prometheus_client.parser import text_string_to_metric_families

        return [fam for fam in text_string_to_metric_families(text)  # per process: the main process's
                if not fam.name.startswith(("process_", "python_")) and fam.name not in _MAIN_ONLY]

    def last_scrape(self, tag: int, pool: Any) -> None:
        """A generation about to stop (hot reload): its workers' counts, kept (CounterCarry)."""
        for i, pid, text in pool.scrape():
            self.carry.seen((tag, i), pid, self._parsed(text))

    def collect(self) -> Iterator[Any]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
        from .overload import bypassed

        rules, stats = self._bypass_inputs()  # before the workers' counters (see above)
        fams: dict[str, tuple[str, str]] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        scraped = set()
        for i, pid, text in self._answers():
            parsed = self._parsed(text)
            self.carry.seen(i, pid, parsed)
            scraped.add(i)
            for fam in parsed:
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
        own = [fam for c in self.own for fam in c.collect()]
        for fam in own:
            if not fam.samples:  # e.g. no address set in the current generation
                continue
            fams.setdefault(fam.name, (fam.documentation, fam.type))
            per = values.setdefault(fam.name, {})
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                use_max = fam.type == "gauge" and fam.name in _MAX_COMBINED
                per[key] = max(per.get(key, s.value), s.value) if use_max else per.get(key, 0.0) + s.value
        for name, more in self.carry.extra(scraped).items():  # restarted workers' earlier counts
            fams.setdefault(name, self.carry.fams[name])
            per = values.setdefault(name, {})
            for key, v in more.items():
                per[key] = per.get(key, 0.0) + v
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


class Current:
    """A collector over whatever ``get()`` returns now (the current generation's supervisor)."""

    def __init__(self, get: Callable[[], Any]) -> None:
        self.get = get

    def collect(self) -> Any:
        c = self.get()
        return iter(()) if c is None else c.collect()


class Reloads:
    """The main process's reload counters (the workers export theirs as 0: summed)."""

    def __init__(self) -> None:
        self.ok = self.failed = 0

    def collect(self) -> Any:
        from prometheus_client.metrics_core import CounterMetricFamily

        yield CounterMetricFamily("nfhooks_policy_reloads", "Policy reloads that succeeded.", value=self.ok)
        yield CounterMetricFamily("nfhooks_policy_reload_errors", "Policy reloads that failed (the previous "
                                  "policy stays in force).", value=self.failed)
