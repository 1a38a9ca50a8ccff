"""The engine's observability wiring (issue 17), kept out of engine.py: what a scrape of a
running engine reads besides the per-packet counters.

* ``nfhooks_up``: 1 while the engine decides packets (queues bound, rules installed, not
  stopping). The endpoint is served before ``start`` and during the drain of a stop, so a
  scrape does see the 0 (it used to be set to 0 only as the server shut down: never seen);
* the default rules' decisions (obs_defaults) in the packet families;
* the queue statistics by (hook, handler), surviving a reload (obs_series);
* ``nfhooks_audit_mode`` (obs_audit);
* ``nfhooks_policy_info``'s ``hash``: :func:`source_hash`.
"""

from __future__ import annotations

import hashlib
import linecache
import logging
from typing import Any

from .obs_audit import AuditCollector
from .obs_defaults import DefaultRuleCounts
from .obs_series import StableQueues

__all__ = ["source_hash", "wire_engine_metrics"]

log = logging.getLogger("nfhooks.engine")


def source_hash(policy: Any) -> str:
    """First 12 hex digits of the sha256 of the source text the loader compiled ("" for a
    policy not loaded from a file). The loader keeps that text in linecache under the policy's
    file name, with no mtime (loader.load_policy: tracebacks show it, never the file as it is
    on disk now)."""
    entry = linecache.cache.get(getattr(policy, "file", "") or "")
    if not entry or len(entry) < 4 or entry[1] is not None:  # mtime None: the loader's entry, not a file's
        return ""
    return hashlib.sha256("".join(entry[2]).encode()).hexdigest()[:12]


def wire_engine_metrics(engine: Any) -> None:
    """Once, in Engine.start (queues bound, rules not yet installed)."""
    m = engine.metrics
    m.up_when = lambda: bool(engine.installed and engine.queues is not None and not engine.queues.stopping)
    audit = engine.audit is not None
    m.packet_stats.kernel_defaults = DefaultRuleCounts(
        engine.backend.counter_texts,
        would=(lambda hook: engine.ruleset.defaults[hook].kind if hook in engine.ruleset.defaults else "accept")
        if audit else None)
    m.registry.unregister(m.queue_stats)
    m.registry.register(StableQueues(m.queue_stats))
    m.registry.register(AuditCollector(lambda: engine.audit))
    if audit:
        log.warning("audit mode (--audit): every packet is accepted; the verdicts counted, logged and "
                    "captured are what policy %s would have given (nfhooks_audit_mode 1)", engine.policy.name)
