"""``nfhooks run --audit``: every verdict computed, counted and captured, every packet accepted.

For rollouts (like Cilium's policy audit mode): an operator runs a new policy and sees what it
would drop -- in ``nfhooks_packets_total``, ``top``, the dashboard, a ``--pcap`` capture -- before
it drops anything. Nothing of this exists without ``--audit``: the Dispatcher wraps a queue's
callback at bind time (:meth:`Audit.wrap`), so the normal per-packet path has no extra branch.

What changes under ``--audit``:

* each queued packet goes to the ordinary callback through an :class:`AuditPacket`, which gives
  the kernel NF_ACCEPT with the packet unchanged whatever the verdict (no drop, no reject, no
  mark, NAT, rewrite, route or offload). A fall-through (``None``) still continues to the next
  handler (its resume mark and NF_REPEAT pass), so later handlers' verdicts are computed too;
* the hooks' default rules accept (``Audit.ruleset``; their counters still count, exported as
  the verdict the default would have given) and the queues fail open;
* ``nfhooks_audit_mode`` is 1 (0 without ``--audit``), and
  ``nfhooks_audit_overridden_packets_total{hook,handler}`` counts the packets accepted that the
  verdict would have changed. The verdict labels everywhere else are what would have been given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["Audit", "AuditCollector", "AuditPacket"]

DEFAULT_COMMENT = "nfhooks default"  # rules.py: the comment of each hook's default rules


class AuditPacket:
    """A queued packet whose verdict is always NF_ACCEPT, unchanged; notes when that overrode
    the verdict. A fall-through keeps working: a mark change of the resume bits alone, then
    NF_REPEAT, is passed on."""

    __slots__ = ("pkt", "mark", "indev", "outdev", "new_mark", "changed", "resume_mask")

    def __init__(self, pkt: Any, resume_mask: int) -> None:
        self.pkt = pkt
        self.mark, self.indev, self.outdev = pkt.mark, pkt.indev, pkt.outdev
        self.resume_mask = resume_mask
        self.new_mark: int | None = None
        self.changed = False

    def get_payload(self) -> bytes:
        return self.pkt.get_payload()

    def set_mark(self, mark: int) -> None:
        self.new_mark = mark

    def set_payload(self, data: bytes) -> None:
        self.changed = True

    def accept(self) -> None:
        if self.new_mark is not None and self.new_mark != self.mark:
            self.changed = True
        self.pkt.accept()

    def drop(self) -> None:
        self.changed = True
        self.pkt.accept()

    def repeat(self) -> None:
        m = self.new_mark
        if m is not None and not (m ^ self.mark) & ~self.resume_mask & 0xFFFFFFFF:
            self.pkt.set_mark(m)  # a fall-through: on to the next handler
            self.pkt.repeat()
        else:
            self.changed = True  # reject, connmark save, flow save: all act in our later rules
            self.pkt.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pkt, name)


class Audit:
    """The --audit mode of one engine: wraps each queue's callback, makes the default rules
    accept, counts what it overrode."""

    def __init__(self) -> None:
        self.overridden: dict[tuple[str, str], list[int]] = {}  # (hook, handler) -> [packets]

    def wrap(self, on_packet: Callable[[Any], None], handler: Any, resume_mask: int) -> Callable[[Any], None]:
        n = self.overridden.setdefault((handler.hook, handler.name), [0])

        def on_packet_audited(nfpkt: Any) -> None:
            ap = AuditPacket(nfpkt, resume_mask)
            on_packet(ap)
            if ap.changed:
                n[0] += 1

        return on_packet_audited

    @staticmethod
    def ruleset(rs: Any) -> Any:
        """``rs`` with its default rules accepting (in place; the comment stays, so their
        counters are still read as the default's decisions: obs_defaults)."""
        for key, rules in rs.rules.items():
            rs.rules[key] = [dataclasses.replace(r, target="ACCEPT", target_opts=())
                             if r.comment == DEFAULT_COMMENT and r.target != "ACCEPT" else r for r in rules]
        return rs


class AuditCollector:
    """``nfhooks_audit_mode`` and, under --audit, ``nfhooks_audit_overridden_packets_total``."""

    def __init__(self, audit: Callable[[], Audit | None]) -> None:
        self.audit = audit

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, CounterMetricFamily]:
        return (GaugeMetricFamily("nfhooks_audit_mode", "1 under run --audit: every packet is accepted; the "
                                  "verdicts counted are what the policy would have given."),
                CounterMetricFamily("nfhooks_audit_overridden_packets", "run --audit: packets accepted "
                                    "unchanged that the verdict would have dropped, rejected, marked, "
                                    "NATed, rewritten, routed or offloaded.", labels=["hook", "handler"]))

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        mode, over = self._families()
        audit = self.audit()
        mode.add_metric([], 1 if audit is not None else 0)
        yield mode
        if audit is not None:
            for (hook, handler), n in sorted(audit.overridden.items()):
                over.add_metric([hook, handler], n[0])
            yield over
