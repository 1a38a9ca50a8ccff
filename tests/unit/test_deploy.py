"""deploy/: the Grafana dashboard and the Prometheus config, alerts and alert tests.

The dashboard and rules may only name series that nfhooks.metrics really exports (a typo
would be an empty panel or an alert that can never fire); promtool checks the PromQL and
runs the alert unit tests when it is installed (Debian package `prometheus`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from nfhooks.metrics import DEFAULT_METRICS_ADDR, Metrics

from tests.dashboard import dashboard_queries

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "nfhooks-dashboard.json"
PROM_DIR = DEPLOY / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"

DS_VAR = "${datasource}"


# ----------------------------------------------------------------- helpers


def _exported_series(tmp_path: Path) -> set[str]:
    """Every series name a running engine exposes, incl. _bucket/_count/_sum/_total."""
    reg = CollectorRegistry()
    proc = tmp_path / "nfnetlink_queue"
    proc.write_text("    4  100     0 2  65531     0     0        1  1\n")
    m = Metrics(reg, proc_path=str(proc))
    m.set_policy("p", "1", [(4, "INPUT", "h")])
    m.bind_verdict("INPUT", "filter", "h", "accept")
    # the queue set's own collector (queue.py): a fail-open queue 4 fed by one rule
    from nfhooks.queue import BoundQueue, OverloadCollector, _Budgeted  # noqa: PLC2701

    bound = {4: BoundQueue(4, "INPUT", "h", True, False, 4096, 1 << 20, _Budgeted(None))}  # type: ignore[arg-type]
    reg.register(OverloadCollector(bound, str(proc), saved=lambda: [
        '[7:420] -A NFH-INPUT -m comment --comment "nfhooks h" -j NFQUEUE --queue-num 4 --queue-bypass']))
    # flow offload's collector (offload.py), for a policy with a flow=True handler and one
    # returning connection verdicts
    from nfhooks.offload import OffloadCollector

    class _Offload:
        def counters(self) -> dict:
            return {"flowsave": {("INPUT", "h"): 1}, "offload": {("INPUT", "h"): 5},
                    "conn": {("INPUT", "h", "accept"): 2}, "connpkts": {("INPUT", "accept"): 9}}

    reg.register(OffloadCollector(lambda: _Offload()))
    # address sets' collector (features/sets.py), for a policy that declares a set
    from nfhooks.features.sets import SetsCollector

    class _Sets:
        sets = {"seen": object()}
        additions = {"seen": 3}

        def count(self, aset: object) -> int:
            return 2

    reg.register(SetsCollector(lambda: _Sets()))
    return {s.name for fam in reg.collect() for s in fam.samples}


_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords).

    A small lexer, enough for dashboards and rules: strings, label matchers, ranges and
    grouping label lists are removed first, then every remaining identifier not called
    like a function is a metric name.
    """
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names: set[str] = set()
    for m in re.finditer(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)(\s*\()?", s):
        ident, call = m.group(1), m.group(2)
        if call or ident.lower() in _KEYWORDS:
            continue
        names.add(ident)
    return names


def _alert_rules(text: str) -> list[dict[str, str]]:
    """The alerting rules of alerts.yml: name, expr, for and annotation keys.

    Not a YAML parser (the project has no YAML dependency): it reads the layout this
    file uses -- `- alert:` items with `expr:` inline or as a block scalar.
    """
    rules = []
    for chunk in re.split(r"^\s*- alert:\s*", text, flags=re.M)[1:]:
        lines = chunk.splitlines()
        rule = {"alert": lines[0].strip()}
        for i, line in enumerate(lines):
            m = re.match(r"^(\s*)(expr|for|summary|description):\s*(.*)$", line)
            if not m:
                continue
            indent, key, value = len(m.group(1)), m.group(2), m.group(3).strip()
            if value in (">-", ">", "|", "|-"):
                block = []
                for nxt in lines[i + 1:]:
                    if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                        break
                    block.append(nxt.strip())
                value = " ".join(b for b in block if b)
            rule[key] = value
        rules.append(rule)
    return rules


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed: apt-get install prometheus")
    return path


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels") or []))
    return out


def _data_panels(dashboard: dict) -> list[dict]:
    return [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]


# ----------------------------------------------------------------- the lexer itself


def test_promql_metric_names_lexer() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, hook) (rate(foo_bucket{hook=~"a|b"}[5m]))) '
            '> 1e-3 or on (hook) absent(up{job="x"}) * bar_total offset 5m')
    assert promql_metric_names(expr) == {"foo_bucket", "up", "bar_total"}
    assert promql_metric_names("topk(10, sum without (x) (rate(a:b_total[1m])))") == {"a:b_total"}


# ----------------------------------------------------------------- dashboard


def test_dashboard_is_importable(dashboard: dict) -> None:
    assert dashboard["title"] and dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in _panels(dashboard["panels"]):
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]


def test_dashboard_variables(dashboard: dict) -> None:
    vars_ = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = vars_["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    hook = vars_["hook"]
    assert hook["type"] == "query" and hook["multi"] is True
    assert hook["definition"] == "label_values(nfhooks_packets_total, hook)"
    assert hook["datasource"]["uid"] == DS_VAR
    for v in vars_.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == DS_VAR, v["name"]


def test_every_panel_and_target_uses_the_datasource_variable(dashboard: dict) -> None:
    panels = _data_panels(dashboard)
    assert panels
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": DS_VAR}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": DS_VAR}, p["title"]
            assert t["expr"].strip(), p["title"]


def test_dashboard_has_the_operator_panels(dashboard: dict) -> None:
    exprs = " ".join(t["expr"] for p in _data_panels(dashboard) for t in p["targets"])
    for needed in (
        "nfhooks_packets_total", 'verdict=~"drop|reject"', "nfhooks_decision_seconds_bucket",
        "histogram_quantile(0.5", "histogram_quantile(0.99", "nfhooks_queue_waiting_packets",
        "nfhooks_queue_kernel_dropped_packets_total", "nfhooks_queue_user_dropped_packets_total",
        "nfhooks_handler_errors_total", "topk(", "nfhooks_handler_packets_total",
        "nfhooks_malformed_packets_total", "nfhooks_queue_bypassed_packets_total",
        "nfhooks_handler_overruns_total", "nfhooks_queue_enobufs_total",
        "nfhooks_offloaded_flows_total", "nfhooks_offloaded_packets_total",
        "nfhooks_connection_verdicts_total", "nfhooks_connection_verdict_packets_total",
        "sum by (hook, verdict, via)",  # a default-rule or error verdict (via label) is told apart
    ):
        assert needed in exprs, needed


#: Grafana unit per kind of panel: every panel of one kind says it the same way
_UNITS = {"packets/s": "pps", "bytes/s": "Bps", "seconds": "s", "count": "short"}


def _kind(p: dict) -> str:
    exprs = " ".join(t["expr"] for t in p["targets"])
    if "histogram_quantile" in exprs:
        return "seconds"
    if "nfhooks_bytes_total" in exprs:
        return "bytes/s"
    if re.search(r"rate\((nfhooks_(packets|handler_packets|handler_errors|handler_overruns|malformed_packets"
                 r"|truncated_packets|offloaded_packets|connection_verdict_packets|queue_\w+_packets)"
                 r"_total)", exprs):
        return "packets/s"
    return "count"


def test_one_unit_per_kind_of_panel(dashboard: dict) -> None:
    for p in _data_panels(dashboard):
        if p["title"] in ("Engine up", "Policy loaded"):
            continue  # a state and a name, not a number
        unit = p["fieldConfig"]["defaults"].get("unit")
        assert unit == _UNITS[_kind(p)], (p["title"], unit, _kind(p))


def test_legends_hide_series_that_stay_at_zero(dashboard: dict) -> None:
    """Grafana's own form of the old graph panel's hideZero/hideEmpty (its migration writes
    these overrides): a series that is all 0 (or all null) is kept off the legend."""
    series = [p for p in _data_panels(dashboard) if p["type"] == "timeseries"]
    assert len(series) >= 13
    for p in series:
        hidden = {o["matcher"]["options"]["reducer"] for o in p["fieldConfig"]["overrides"]
                  if o["matcher"]["id"] == "byValue"
                  and {"id": "custom.hideFrom", "value": {"tooltip": True, "viz": False, "legend": True}}
                  in o["properties"]}
        assert hidden == {"allIsZero", "allIsNull"}, p["title"]


def test_panels_do_not_overlap(dashboard: dict) -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in _panels(dashboard["panels"]):
        if p.get("repeat"):
            continue  # its copies fill the row: checked as the whole row below
        g = p["gridPos"]
        for y in range(g["y"], g["y"] + g["h"]):
            for x in range(g["x"], g["x"] + g["w"]):
                assert (x, y) not in cells, (p["title"], cells[(x, y)])
                cells[(x, y)] = p["title"]


def test_rates_use_rate_interval_and_hook_filter(dashboard: dict) -> None:
    for p in _data_panels(dashboard):
        for t in p["targets"]:
            expr = t["expr"]
            for rng in re.findall(r"\brate\([^()\[]*\[([^\]]+)\]", expr):
                assert rng == "$__rate_interval", (p["title"], expr)
            for rng in re.findall(r"\[([^\]]+)\]", expr):
                assert rng.startswith("$__"), f"hard-coded range in {p['title']}: {expr}"
            if re.search(r"nfhooks_(packets|bytes|handler|decision|malformed|truncated|queue)", expr):
                assert 'hook=~"$hook"' in expr, (p["title"], expr)


def test_dashboard_queries_substitutes_variables(dashboard: dict) -> None:
    queries = dashboard_queries(DASHBOARD)
    targets = [t for p in _data_panels(dashboard) for t in p["targets"]]
    assert len(queries) == len(targets)
    for q in queries:
        assert "$" not in q and "[[" not in q, q
    assert any('hook=~".*"' in q and "[1m]" in q for q in queries)


def test_dashboard_queries_keeps_matchers_valid(tmp_path: Path) -> None:
    dash = {"panels": [
        {"type": "row", "panels": [
            {"type": "timeseries", "targets": [
                {"expr": 'sum(rate(a_total{hook="$hook", x!="${inst}"}[$__rate_interval]))'},
                {"expr": 'b{hook=~"${hook:regex}"} offset $__interval', "hide": False},
                {"expr": "hidden_one", "hide": True},
            ]},
        ]},
        {"type": "stat", "targets": [{"expr": 'c{h=~"[[hook]]"}'}, {"refId": "no expr"}]},
    ]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"dashboard": dash}))  # the API's wrapped export form
    assert dashboard_queries(path) == [
        'sum(rate(a_total{hook=~".*", x!~".*"}[1m]))',
        'b{hook=~".*"} offset 1m',
        'c{h=~".*"}',
    ]


def test_dashboard_names_only_exported_series(dashboard: dict, tmp_path: Path) -> None:
    exported = _exported_series(tmp_path) | {"up"}
    for q in dashboard_queries(DASHBOARD):
        names = promql_metric_names(q)
        assert names, q
        assert names <= exported, f"{q} names {names - exported}"
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            m = re.match(r"label_values\((\w+)", v["definition"])
            assert m and m.group(1) in exported, v["definition"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query (as recording rules: same parser)."""
    promtool = _promtool()
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, q in enumerate(dashboard_queries(DASHBOARD)):
        lines += [f"      - record: dashboard:q{i}", f"        expr: {json.dumps(q)}"]
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    r = _run([promtool, "check", "rules", str(rules)], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------- prometheus


def test_prometheus_config_scrapes_the_default_address() -> None:
    text = PROM_CONFIG.read_text()
    assert re.search(r"^\s*- job_name: nfhooks\s*$", text, re.M)
    assert f'"{DEFAULT_METRICS_ADDR}"' in text
    assert re.search(r"^\s*scrape_interval: 5s\s*$", text, re.M)
    assert re.search(r"^rule_files:\s*\n\s*- alerts\.yml\s*$", text, re.M)


def test_alert_rules_shape(tmp_path: Path) -> None:
    rules = {r["alert"]: r for r in _alert_rules(ALERTS.read_text())}
    for name in ("NfhooksDown", "NfhooksKernelQueueDrops", "NfhooksHandlerErrors",
                 "NfhooksSlowDecisions"):
        assert name in rules, name
    assert rules["NfhooksDown"]["for"] == "30s"
    assert 'up{job="nfhooks"} == 0' in rules["NfhooksDown"]["expr"]
    assert 'absent(up{job="nfhooks"})' in rules["NfhooksDown"]["expr"]
    assert rules["NfhooksSlowDecisions"]["for"] == "5m"
    assert "0.99" in rules["NfhooksSlowDecisions"]["expr"]
    assert "> 0.01" in rules["NfhooksSlowDecisions"]["expr"]
    exported = _exported_series(tmp_path) | {"up"}
    for r in rules.values():
        assert r.get("summary") and r.get("description"), r["alert"]
        names = promql_metric_names(r["expr"])
        assert names and names <= exported, f"{r['alert']} names {names - exported}"


def test_every_alert_has_unit_tests() -> None:
    """Each alert has a test group that fires it and a group where it stays quiet."""
    alerts = {r["alert"] for r in _alert_rules(ALERTS.read_text())}
    groups = re.split(r"^  - name:", ALERTS_TEST.read_text(), flags=re.M)[1:]
    for name in alerts:
        fires = quiet = False
        for group in groups:
            blocks = re.findall(
                rf"alertname: {name}\n\s*exp_alerts:(.*?)(?=\n\s*- eval_time|\Z)", group, re.S)
            if not blocks:
                continue
            fires |= any("exp_labels" in b for b in blocks)
            quiet |= all(b.strip().startswith("[]") for b in blocks)
        assert fires, f"no test input fires {name}"
        assert quiet, f"no test input keeps {name} quiet"


def test_promtool_check_rules() -> None:
    r = _run([_promtool(), "check", "rules", str(ALERTS)], PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules() -> None:
    r = _run([_promtool(), "test", "rules", str(ALERTS_TEST)], PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_check_config() -> None:
    r = _run([_promtool(), "check", "config", str(PROM_CONFIG)], PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
