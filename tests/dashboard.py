"""The PromQL of a Grafana dashboard, runnable against a real Prometheus outside Grafana.

Used by the tests that check every panel's query returns data (tests/kernel/test_prometheus.py,
tests/unit/test_deploy.py) and by tools/render_dashboard.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

__all__ = ["dashboard_queries", "substitute"]

#: What each Grafana interval variable becomes when a query is run outside Grafana.
_INTERVAL_VARS: Final = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1m",
}
_VAR_RE: Final = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]")
_MATCHER_RE: Final = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def substitute(expr: str) -> str:
    """Replace Grafana variables: intervals by "1m", every other variable by ".*".

    A label matcher whose value names a variable becomes a regex matcher (``=`` -> ``=~``,
    ``!=`` -> ``!~``) so that the substituted ``.*`` keeps its meaning.
    """

    def var_value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return _INTERVAL_VARS.get(name, ".*")

    def matcher(m: re.Match[str]) -> str:
        label, op, value = m.groups()
        if not _VAR_RE.search(value):
            return m.group(0)
        op = {"=": "=~", "!=": "!~"}.get(op, op)
        return f'{label}{op}"{_VAR_RE.sub(var_value, value)}"'

    expr = _MATCHER_RE.sub(matcher, expr)
    return _VAR_RE.sub(var_value, expr)


def _panels(panels: Iterable[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or ())  # collapsed rows nest their panels


def dashboard_queries(path: str | Path) -> list[str]:
    """Every PromQL expression of a Grafana dashboard, runnable against Prometheus as is.

    Grafana variables are substituted (``$__rate_interval`` -> ``1m``, ``$hook``/``${hook}``
    -> ``.*`` with the matcher made a regex one), so a test can run each query against a
    real Prometheus and check it returns data.
    """
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    dashboard = dashboard.get("dashboard", dashboard)  # API export wraps it
    queries: list[str] = []
    for panel in _panels(dashboard.get("panels") or ()):
        for target in panel.get("targets") or ():
            expr = target.get("expr")
            if expr and not target.get("hide"):
                queries.append(substitute(expr))
    return queries
