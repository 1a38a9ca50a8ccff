"""Overload metrics of the bound queues, computed at scrape time.

What the kernel does when packets come faster than the handlers decide (queue.py's module
docstring), made visible: packets received, ENOBUFS overruns, and the fail-open accepts the
kernel counts nowhere (:func:`bypassed`, derived from the queue rule's counter).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from .kstats import DEFAULT_PROC_PATH, read_queue_stats
from .saved import counted_rules

__all__ = ["OverloadCollector", "bypassed", "no_counters", "rule_packets"]



_QUEUE_TARGET = re.compile(r"-j NFQUEUE --queue-num (\d+)(?: |$)")


def rule_packets(texts: Iterable[str]) -> dict[int, int]:
    """Packets each queue's rules sent to it: iptables-save -c text of our chains, summed
    per ``--queue-num`` over rules (a handler has one rule per address family)."""
    out: dict[int, int] = {}
    for text in texts:
        for rule in counted_rules(text):
            m = _QUEUE_TARGET.search(rule.text) if rule.chain.startswith("NFH-") else None
            if m:
                q = int(m.group(1))
                out[q] = out.get(q, 0) + rule.packets
    return out


def no_counters() -> list[str]:
    """The default ``saved`` of the collectors below: no rule counters until the engine
    injects its backend's ``counter_texts`` (this layer never picks a rule backend)."""
    return []


def bypassed(rule: int, queue_dropped: int, user_dropped: int, waiting: int, received: int) -> int:
    """Packets a queue rule sent to the queue that the kernel accepted without asking us.

    From net/netfilter/nfnetlink_queue.c (``__nfqnl_enqueue_packet``): a packet the rule
    queues either (a) finds the queue full: fail-closed counts ``queue_dropped``, fail-open
    accepts it *before* taking an id (``id_sequence`` unchanged, counted nowhere); or
    (b) takes the next id and is unicast to our socket; if the socket buffer is full,
    fail-closed counts ``user_dropped``, fail-open accepts it (counted nowhere); or (c) waits
    in the queue (``queue_total``) until we read it and give the verdict (``received``).
    So ``rule = queue_dropped + user_dropped + fail-open accepts + waiting + received``
    (plus, rarely, packets the kernel drops uncounted: a dying unconfirmed conntrack entry,
    no memory for the message). Without NFQA_CFG_F_GSO, one GSO packet the rule counted
    once may be queued as several segments, which makes this an undercount.
    """
    return max(0, rule - queue_dropped - user_dropped - waiting - received)


class OverloadCollector:
    """Per-queue overload metrics, computed at scrape time (no per-packet cost beyond the
    two counters in queue.py's ``_Budgeted``).

    * ``nfhooks_queue_received_packets_total``: packet messages read from the queue (each
      gets exactly one verdict before the next is read);
    * ``nfhooks_queue_enobufs_total``: socket receive buffer overruns reported to us;
    * ``nfhooks_queue_bypassed_packets_total``: fail-open queues only, packets the kernel
      accepted without asking nfhooks because the queue or socket was full (derived, see
      :func:`bypassed`; exported as a high-water mark so it never goes down);
    * ``nfhooks_queue_config_info``: 1 per queue, labelled with its fail mode, GSO and sizes.

    Read order for the derived value: rule counters first, then the kernel's queue table,
    then ``received``; every packet counted by the rule is by then in one of the other
    terms or accepted, so a race can only undercount (never report a bypass that was not).
    """

    def __init__(self, bound: Mapping[int, Any], proc_path: str = DEFAULT_PROC_PATH,
                 saved: Callable[[], list[str]] = no_counters) -> None:
        self.bound = bound
        self.proc_path = proc_path
        self.saved = saved
        self.created = time.time()

    @staticmethod
    def _families() -> tuple[Any, Any, Any, Any]:
        labels = ["queue", "hook", "handler"]
        return (
            CounterMetricFamily("nfhooks_queue_received_packets",
                                "Packets read from the queue; each got one verdict before the next.",
                                labels=labels),
            CounterMetricFamily("nfhooks_queue_enobufs",
                                "recv() reported ENOBUFS: the queue's socket receive buffer overran.",
                                labels=labels),
            CounterMetricFamily("nfhooks_queue_bypassed_packets",
                                "Fail-open queues: packets the kernel accepted without asking nfhooks "
                                "(queue or socket full); derived from the rule counter and the "
                                "queue's statistics. A lower bound on queues bound without GSO "
                                "(gso=\"off\" in nfhooks_queue_config_info): the kernel may queue "
                                "one GSO packet the rule counted once as several segments.",
                                labels=labels),
            GaugeMetricFamily("nfhooks_queue_config_info",
                              "How each queue is bound (always 1).",
                              labels=[*labels, "fail_mode", "gso", "maxlen", "rcvbuf"]),
        )

    def describe(self) -> Iterator[Any]:
        return iter(self._families())

    def collect(self) -> Iterator[Any]:
        bound = dict(self.bound)
        if not bound:
            return
        received, enobufs, bypass, info = self._families()
        open_queues = [b for b in bound.values() if b.fail_open]
        rules: dict[int, int] = rule_packets(self.saved()) if open_queues else {}
        stats = read_queue_stats(self.proc_path) if open_queues else {}
        for num, b in sorted(bound.items()):
            labels = [str(num), b.hook, b.handler or "(default)"]
            n = b.counter.received
            received.add_metric(labels, n, created=self.created)
            enobufs.add_metric(labels, b.counter.enobufs, created=self.created)
            info.add_metric([*labels, "open" if b.fail_open else "closed", "on" if b.gso else "off",
                             str(b.maxlen), str(b.rcvbuf)], 1)
            st = stats.get(num)
            if b.fail_open and st is not None and num in rules:
                # derivable only where one rule feeds exactly this queue (not --queue-balance)
                value = bypassed(rules[num], st.queue_dropped, st.user_dropped, st.queue_total, n)
                b.bypassed_high = max(b.bypassed_high, value)
                bypass.add_metric(labels, b.bypassed_high, created=self.created)
        yield received
        yield enobufs
        if open_queues:
            yield bypass
        yield info
