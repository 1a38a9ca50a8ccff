"""A policy's own metrics: ``policy.counter()`` and ``policy.gauge()`` (issue 17.4).

A policy declares them at module level; its handlers move them::

    ssh_tries = policy.counter("ssh_attempts", "SSH connection attempts by source", labels=["src"])

    @policy.input(proto="tcp", dport=22)
    def ssh(pkt):
        ssh_tries.labels(pkt.src).inc()
        return accept()

They are exported on the engine's endpoint as ``nfhooks_policy_<name>`` (a counter's samples end
in ``_total``), summed over ``--workers`` (each worker binds them in its own registry; the main
process sums the workers' expositions). The declaration only records what to export (the
Policy is not changed after it loads); the engine creates the prometheus-client objects on its
own registry at start and on each reload (:class:`PolicyMetrics`): a metric declared the same
way again keeps its counts over a reload. Until bound (a policy used in a test, ``decide()``), a
handle counts in a private registry of its own, so handlers run the same either way.

A ``prometheus_client.Counter`` a policy makes itself lands in the library's global registry,
which nfhooks does not serve: :func:`stray_metrics` finds those, and the engine warns at load.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from .errors import PolicyError

__all__ = ["MetricDecl", "PolicyMetric", "PolicyMetrics", "PREFIX", "declare_metric", "stray_metrics"]

log = logging.getLogger("nfhooks.engine")
PREFIX = "nfhooks_policy_"
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RESERVED = ("info", "reloads", "reload_errors")  # nfhooks' own nfhooks_policy_* families
_LIBRARY_OWN = ("process_", "python_")  # what prometheus_client's global registry holds by itself


@dataclass(frozen=True)
class MetricDecl:
    """One declared metric: what the engine creates (``kind`` counter or gauge)."""

    kind: str
    name: str
    help: str
    labels: tuple[str, ...]
    file: str
    line: int


class PolicyMetric:
    """What ``policy.counter()``/``gauge()`` return: the prometheus-client metric the engine
    bound (``inc``, ``dec``, ``set``, ``labels`` as prometheus-client's own)."""

    __slots__ = ("decl", "metric")

    def __init__(self, decl: MetricDecl) -> None:
        self.decl = decl
        self.metric: Any = _make(decl, CollectorRegistry())  # until the engine binds its own

    def labels(self, *values: Any, **kw: Any) -> Any:
        return self.metric.labels(*[str(v) for v in values], **{k: str(v) for k, v in kw.items()})

    def inc(self, amount: float = 1) -> None:
        self.metric.inc(amount)

    def dec(self, amount: float = 1) -> None:
        self.metric.dec(amount)

    def set(self, value: float) -> None:
        self.metric.set(value)

    def __repr__(self) -> str:
        return f"<policy {self.decl.kind} {PREFIX}{self.decl.name}>"


def _make(decl: MetricDecl, registry: Any) -> Any:
    cls = Counter if decl.kind == "counter" else Gauge
    return cls(PREFIX + decl.name, decl.help, list(decl.labels), registry=registry)


def declare_metric(decls: dict[str, PolicyMetric], kind: str, name: str, help: str, labels: Any,
                   file: str, line: int) -> PolicyMetric:
    """Check and record one declaration in ``decls`` (Policy.metrics); its handle."""
    where = f"policy.{kind}({name!r})"
    if not isinstance(name, str) or not _NAME.match(name):
        raise PolicyError(f"{where}: a metric name is letters, digits and _ (not starting with a digit)", file, line)
    base = name[:-6] if kind == "counter" and name.endswith("_total") else name
    if base in _RESERVED:
        raise PolicyError(f"{where}: {PREFIX}{base} is one of nfhooks' own metrics; choose another name", file, line)
    if base in decls:
        raise PolicyError(f"{where}: declared twice", file, line)
    if not isinstance(help, str) or not help.strip():
        raise PolicyError(f"{where}: give a help text (what it counts, for whoever reads the dashboard)", file, line)
    names = (labels,) if isinstance(labels, str) else tuple(labels or ())
    for lab in names:
        if not isinstance(lab, str) or not _NAME.match(lab) or lab.startswith("__"):
            raise PolicyError(f"{where}: bad label name {lab!r}", file, line)
    if len(set(names)) != len(names):
        raise PolicyError(f"{where}: a label is named twice", file, line)
    handle = PolicyMetric(MetricDecl(kind, base, help, names, file, line))
    decls[base] = handle
    return handle


class PolicyMetrics:
    """The engine's side: binds each loaded policy's declarations to metrics on ``registry``,
    keeping a metric declared the same way across reloads, removing the ones no longer declared."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self.live: dict[str, tuple[MetricDecl, Any]] = {}  # name -> (declaration, metric)

    def bind(self, policy: Any) -> None:
        decls: dict[str, PolicyMetric] = getattr(policy, "metrics", {}) or {}
        keep: dict[str, tuple[MetricDecl, Any]] = {}
        for name, handle in decls.items():
            d = handle.decl
            have = self.live.get(name)
            same = have is not None and (have[0].kind, have[0].help, have[0].labels) == (d.kind, d.help, d.labels)
            keep[name] = have if same else (d, None)  # type: ignore[assignment]
        for name, (d, metric) in self.live.items():
            if keep.get(name, (None, None))[1] is not metric:
                self.registry.unregister(metric)
        for name, (d, metric) in list(keep.items()):
            if metric is None:
                keep[name] = (d, _make(d, self.registry))
            decls[name].metric = keep[name][1]
        self.live = keep
        for name in stray_metrics():
            log.warning("policy %s: the metric %s is registered in prometheus_client's global registry, "
                        "which nfhooks does not serve; declare it with policy.counter()/policy.gauge()",
                        getattr(policy, "name", "?"), name)


def stray_metrics(registry: Any = REGISTRY) -> list[str]:
    """Families in prometheus_client's global registry besides the library's own."""
    try:
        fams = list(registry.collect())
    except Exception:  # noqa: BLE001 -- a broken foreign collector: nothing to report
        return []
    return sorted(f.name for f in fams if not f.name.startswith(_LIBRARY_OWN))
