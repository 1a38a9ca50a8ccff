"""deploy/ verified against a real Prometheus scraping a real engine while traffic flows.

Debian's ``prometheus`` runs in the lab router's network namespace, next to the engine
(``nfhooks run`` serves 127.0.0.1:9477 there; 127.0.0.1 inside a namespace is not the
host's). Its configuration is generated from the shipped files, with the same expressions
and shorter timing only:

* ``deploy/prometheus/prometheus.yml``: ``scrape_interval`` and ``evaluation_interval`` 1s
  instead of 5s (``scrape_timeout`` 1s, so it stays within the interval); the target is
  the shipped one, 127.0.0.1:9477, the engine's default metrics address.
* ``deploy/prometheus/alerts.yml``: every ``for:`` becomes ``0s`` (an alert fires at the
  first evaluation its expression returns something). The expressions, range windows
  (``[5m]``, ``[15m]``) included, are the shipped ones byte for byte: with 1s scrapes a
  5m window has samples after two scrapes, and a longer window only makes a fault stay
  visible longer, which these tests do not depend on.

Then every PromQL expression of the Grafana dashboard (``dashboard_queries``: Grafana's
variables substituted) runs through the query API and must return data: a panel that
would be empty is a failing test. Alerts return nothing while all is well, which is checked
first; then each alert's fault is caused for real -- a handler that raises, a UDP flood past
a slow handler's queue, handlers slower than 10 ms, the engine stopped -- and the test
waits until Prometheus reports that alert firing.

Everything happens inside the lab's namespaces; every process is the lab's and is ended by
PID when the lab closes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from nfhooks.lab import LabCommandError
from nfhooks.metrics import DEFAULT_METRICS_ADDR

from tests.dashboard import dashboard_queries

from .conftest import ROOT, TEST_POLICIES, metric

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "nfhooks-dashboard.json"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
POLICY = TEST_POLICIES / "observed.py"
DASHBOARD_POLICY = TEST_POLICIES / "observed_conn.py"  # observed.py + a connection verdict

PROM_ADDR = "127.0.0.1:9090"  # inside the router's namespace: never the host's port
ENGINE_ARGS = ("--metrics-addr", DEFAULT_METRICS_ADDR)
#: observed_conn.py needs 17 mark bits, one more than the default mask has
DASHBOARD_ARGS = (*ENGINE_ARGS, "--mark-mask", "0xffffff00")
POLL = 0.25  # API polling interval: also keeps the loopback traffic (INPUT decisions) low

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus not installed (Debian package `prometheus`: apt-get install prometheus)",
)


# --------------------------------------------------------------------------- configuration


def _sub(pattern: str, repl: str, text: str, what: str, *, required: bool = True) -> str:
    new, n = re.subn(pattern, repl, text, flags=re.M)
    if required and not n:
        raise AssertionError(f"{what}: pattern {pattern!r} not found; update this test's "
                             "substitutions to the new layout of deploy/prometheus")
    return new


def fast_config() -> str:
    """deploy/prometheus/prometheus.yml with 1s scrape and evaluation intervals."""
    text = PROM_CONFIG.read_text()
    text = _sub(r"^(\s*)scrape_interval:\s*\S+\s*$", r"\1scrape_interval: 1s", text, "prometheus.yml")
    text = _sub(r"^(\s*)evaluation_interval:\s*\S+\s*$", r"\1evaluation_interval: 1s", text,
                "prometheus.yml")
    text = _sub(r"^(\s*)scrape_timeout:\s*\S+\s*$", r"\1scrape_timeout: 1s", text,
                "prometheus.yml", required=False)
    assert re.search(r"^rule_files:\s*\n\s*- alerts\.yml\s*$", text, re.M), text
    assert f'"{DEFAULT_METRICS_ADDR}"' in text, text
    return text


def fast_alerts() -> str:
    """deploy/prometheus/alerts.yml with every `for:` 0s; expressions untouched."""
    return _sub(r"^(\s*)for:\s*\S+\s*$", r"\1for: 0s", ALERTS.read_text(), "alerts.yml")


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert:\s*(\S+)\s*$", ALERTS.read_text(), re.M)


# --------------------------------------------------------------------------- prometheus


def _ts(rfc3339: str) -> float:
    """Prometheus' RFC 3339 timestamps (nanoseconds, Z) as Unix seconds."""
    m = re.fullmatch(r"(.*?T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", rfc3339)
    assert m, rfc3339
    base = datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    return base.timestamp() + float("0." + (m.group(2) or "0"))


class Prometheus:
    """A Prometheus server in the router's namespace and its HTTP API, queried from there."""

    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self.dir = lab.tmpdir / "prometheus"
        self.dir.mkdir()
        (self.dir / "prometheus.yml").write_text(fast_config())
        (self.dir / "alerts.yml").write_text(fast_alerts())
        self.log_path = self.dir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = lab.popen(
                "router", shutil.which("prometheus"),
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address={PROM_ADDR}",
                stdout=log, stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def get(self, path: str, **params: str) -> dict[str, Any] | None:
        """GET an API path from inside the router; None if Prometheus did not answer."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        args = ["curl", "-s", "-m", "5", "-G"]
        for key, value in params.items():
            args += ["--data-urlencode", f"{key}={value}"]
        cp = self.lab.exec("router", *args, f"http://{PROM_ADDR}{path}", check=False, timeout=15)
        if cp.returncode:
            return None
        try:
            return json.loads(cp.stdout)
        except ValueError:
            return None

    def wait_ready(self, timeout: float = 20) -> None:
        def ready() -> bool:
            cp = self.lab.exec("router", "curl", "-s", "-m", "2", "-o", "/dev/null", "-w",
                               "%{http_code}", f"http://{PROM_ADDR}/-/ready", check=False)
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            return cp.stdout.strip() == "200"

        self.lab.wait_for(ready, timeout=timeout, interval=POLL, what="prometheus /-/ready")

    def query(self, expr: str) -> dict[str, Any] | None:
        return self.get("/api/v1/query", query=expr)

    def result(self, expr: str) -> list[dict[str, Any]]:
        r = self.query(expr)
        return r["data"]["result"] if r and r.get("status") == "success" else []

    def alerts(self) -> list[dict[str, Any]]:
        r = self.get("/api/v1/alerts")
        return r["data"]["alerts"] if r and r.get("status") == "success" else []

    def rules(self) -> list[dict[str, Any]]:
        r = self.get("/api/v1/rules")
        assert r and r["status"] == "success", r
        return [rule for g in r["data"]["groups"] for rule in g["rules"]]

    def firing(self, name: str) -> list[dict[str, str]]:
        """Label sets of the `name` alerts now firing."""
        return [a["labels"] for a in self.alerts()
                if a["labels"].get("alertname") == name and a["state"] == "firing"]

    def wait_firing(self, name: str, timeout: float, why: str = "") -> list[dict[str, str]]:
        try:
            return self.lab.wait_for(lambda: self.firing(name), timeout=timeout, interval=POLL,
                                     what=f"alert {name} firing in prometheus")
        except TimeoutError as e:
            raise AssertionError(f"{e}; active alerts: {self.alerts()}; {why}") from None

    def wait_evaluated_after(self, t: float, timeout: float = 10) -> list[dict[str, Any]]:
        """Every alerting rule, once each was evaluated after Unix time `t`."""
        def done() -> list[dict[str, Any]]:
            rules = self.rules()
            return rules if all(_ts(r["lastEvaluation"]) > t for r in rules) else []

        return self.lab.wait_for(done, timeout=timeout, interval=POLL,
                                 what=f"a rule evaluation after {t}")

    def wait_scraped(self, timeout: float = 20) -> float:
        """Prometheus' time of a sample of up{job="nfhooks"} == 1 (the engine is scraped)."""
        res = self.lab.wait_for(lambda: self.result('up{job="nfhooks"} == 1'), timeout=timeout,
                                interval=POLL, what="a successful scrape of nfhooks")
        return float(res[0]["value"][0])


def servers(lab: Any) -> None:
    """The listeners some_traffic() connects to."""
    lab.tcp_server("router", 7001)
    lab.tcp_server("router", 7003)
    lab.tcp_server("server", 8080)


def _watched(lab: Any, policy: Path, args: tuple[str, ...]) -> tuple[Any, Any, Prometheus]:
    servers(lab)
    engine = lab.start_engine(str(policy), *args)
    prom = Prometheus(lab)
    prom.wait_ready()
    return lab, engine, prom


@pytest.fixture
def observed(nfh_lab):
    """The router runs tests/kernel/policies/observed.py, watched by Prometheus."""
    return _watched(nfh_lab, POLICY, ENGINE_ARGS)


@pytest.fixture
def observed_conn(nfh_lab):
    """observed.py plus a connection verdict (observed_conn.py): every dashboard panel's data."""
    return _watched(nfh_lab, DASHBOARD_POLICY, DASHBOARD_ARGS)


def some_traffic(lab: Any, conn_verdict: bool = False) -> None:
    """Healthy traffic through the engine: INPUT, FORWARD, a drop and a ping; with
    `conn_verdict`, a connection observed_conn.py's `inspected` decides with a connection verdict."""
    assert lab.tcp_connect("client", lab.addr("router"), 7001) == "ok"
    if conn_verdict:
        assert lab.tcp_connect("client", lab.addr("router"), 7003) == "ok"
    assert lab.tcp_connect("client", lab.addr("server"), 8080) == "ok"
    assert lab.ping("client", lab.addr("router"))


def assert_all_quiet(prom: Prometheus) -> None:
    """The engine is scraped and every rule was evaluated since: no alert is active."""
    since = prom.wait_scraped()
    rules = prom.wait_evaluated_after(since)
    assert {r["name"] for r in rules} == set(alert_names())
    unhealthy = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not unhealthy, unhealthy
    active = [(a["labels"]["alertname"], a["state"], a["labels"]) for a in prom.alerts()]
    assert not active, f"alerts active while all is well: {active}"


# --------------------------------------------------------------------------- the dashboard


@pytest.mark.timeout(60)
def test_every_dashboard_query_returns_data(observed_conn):
    lab, engine, prom = observed_conn
    assert lab.tcp_connect("client", lab.addr("router"), 7002, timeout=0.5) == "timeout"
    queries = dashboard_queries(DASHBOARD)
    assert len(queries) >= 10

    def empty_queries() -> list[str]:
        some_traffic(lab, conn_verdict=True)  # traffic keeps flowing while we poll
        bad = []
        for q in queries:
            r = prom.query(q)
            if r is None or r.get("status") != "success":
                bad.append(f"{q}\n    -> error: {r and (r.get('errorType'), r.get('error'))}")
            elif not r["data"]["result"]:
                bad.append(f"{q}\n    -> no data")
        return bad

    deadline = time.monotonic() + 25
    while (bad := empty_queries()) and time.monotonic() < deadline:
        time.sleep(POLL)
    assert not bad, ("dashboard queries without data (a panel would be empty):\n  "
                     + "\n  ".join(bad))

    # real traffic, not just series at 0: the packet rate panel shows packets moving
    moving = prom.result('sum(rate(nfhooks_packets_total{job="nfhooks"}[1m])) > 0')
    assert moving, "the packet rate is 0 although traffic flows"
    # a connection verdict at work: connections decided, their later packets accepted by the
    # kernel (a rate needs two scrapes with connections between them: traffic while polling)
    def moving_series(expr: str) -> list[dict[str, str]]:
        some_traffic(lab, conn_verdict=True)
        return [r["metric"] for r in prom.result(f"sum by (hook, verdict) ({expr}) > 0")]

    assert lab.wait_for(lambda: moving_series(
        'rate(nfhooks_connection_verdicts_total{job="nfhooks", handler="inspected"}[1m])'),
        timeout=15, interval=POLL, what="connections decided by 'inspected'") == [
        {"hook": "INPUT", "verdict": "accept"}]
    assert lab.wait_for(lambda: moving_series(
        'rate(nfhooks_connection_verdict_packets_total{job="nfhooks"}[1m])'),
        timeout=15, interval=POLL, what="packets of decided connections") == [
        {"hook": "INPUT", "verdict": "accept"}]
    # the dashboard's variables: label_values(metric, label) has values to offer
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    for v in variables:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", v["definition"])
        assert m, v["definition"]
        r = prom.get(f"/api/v1/label/{m.group(2)}/values", **{"match[]": m.group(1)})
        assert r and r["status"] == "success" and r["data"], (v["definition"], r)

    assert_all_quiet(prom)
    assert engine.running()


# --------------------------------------------------------------------------- the alerts


@pytest.mark.timeout(60)
def test_handler_errors_alert_fires(observed):
    lab, engine, prom = observed
    some_traffic(lab)
    assert_all_quiet(prom)
    # the handler raises: the SYN gets the INPUT default (drop), the error is counted
    assert lab.tcp_connect("client", lab.addr("router"), 7009, timeout=0.5) == "timeout"
    labels = prom.wait_firing("NfhooksHandlerErrors", timeout=15,
                              why=f"engine log:\n{engine.log()[-1500:]}")
    assert [(a["hook"], a["handler"], a["severity"]) for a in labels] == [("INPUT", "broken", "warning")]
    assert labels[0]["instance"] == DEFAULT_METRICS_ADDR


_FLOOD = r"""
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 40999))  # one fixed 5-tuple: one flow, one queue
sent = 0
for _ in range(n):
    try:
        s.sendto(b"flood" * 8, (host, port))
        sent += 1
    except OSError:  # ENOBUFS: the client's own queue is full for a moment
        pass
print(sent)
"""


@pytest.mark.timeout(90)
def test_kernel_queue_drops_alert_fires(observed):
    """A flood faster than the slow handler fills its queue (4096 packets): the kernel
    drops the rest (queue_dropped), nfhooks exports it, Prometheus alerts."""
    lab, engine, prom = observed
    some_traffic(lab)
    assert_all_quiet(prom)
    before = metric(lab, "nfhooks_queue_kernel_dropped_packets_total", handler="flood")
    sent = int(lab.exec("client", sys.executable, "-c", _FLOOD, lab.addr("router"), 9999, 30000,
                        timeout=30).stdout)
    assert sent > 10000, sent

    def dropped() -> float:
        try:
            return metric(lab, "nfhooks_queue_kernel_dropped_packets_total", handler="flood") - before
        except (LabCommandError, subprocess.TimeoutExpired):
            return 0.0  # still draining the queue: the scrape's packets wait behind the flood

    n = lab.wait_for(dropped, timeout=30, interval=POLL, what="kernel queue drops at 'flood'")
    labels = prom.wait_firing("NfhooksKernelQueueDrops", timeout=20,
                              why=f"the kernel dropped {n} packets")
    assert [(a["hook"], a["handler"], a["severity"]) for a in labels] == [("INPUT", "flood", "critical")]
    assert "queue" not in labels[0]  # by handler: a reload moves a handler to another queue


@pytest.mark.timeout(60)
def test_slow_decisions_alert_fires(observed):
    """Handlers slower than 10 ms for more than 1% of the INPUT decisions: p99 > 10 ms."""
    lab, engine, prom = observed
    some_traffic(lab)
    assert_all_quiet(prom)
    slow = ("import socket, sys\n"
            "for _ in range(60):\n"
            "    s = socket.socket(); s.settimeout(2)\n"
            "    try: s.connect((sys.argv[1], 7010))\n"
            "    except OSError: pass\n"   # refused: nobody listens; the SYN took 20 ms to decide
            "    s.close()\n")
    lab.exec("client", sys.executable, "-c", slow, lab.addr("router"), timeout=30)
    labels = prom.wait_firing("NfhooksSlowDecisions", timeout=15)
    assert [(a["hook"], a["severity"]) for a in labels] == [("INPUT", "warning")]


@pytest.mark.timeout(60)
def test_down_alert_fires_when_the_engine_stops(observed):
    lab, engine, prom = observed
    some_traffic(lab)
    assert_all_quiet(prom)
    assert engine.stop() == 0
    labels = prom.wait_firing("NfhooksDown", timeout=15)
    assert [(a["job"], a["instance"], a["severity"]) for a in labels] == [
        ("nfhooks", DEFAULT_METRICS_ADDR, "critical")]
    assert prom.result('up{job="nfhooks"} == 0')


@pytest.mark.timeout(60)
def test_reload_failed_alert_fires(nfh_lab, tmp_path):
    """A broken policy file reloaded: the old policy keeps running, Prometheus alerts."""
    lab = nfh_lab
    servers(lab)
    pol = tmp_path / "observed.py"
    pol.write_text(POLICY.read_text())
    pol.chmod(0o644)
    engine = lab.start_engine(str(pol), *ENGINE_ARGS)
    prom = Prometheus(lab)
    prom.wait_ready()
    some_traffic(lab)
    assert_all_quiet(prom)
    pol.write_text(POLICY.read_text() + "\n\n@policy.input(proto='tcp', dport=1)\ndef broken(:\n")
    r = lab.exec("router", sys.executable, "-m", "nfhooks", "reload", check=False, timeout=30)
    assert r.returncode == 1 and "reload failed" in r.stderr, r.stderr
    some_traffic(lab)  # the old policy still decides
    labels = prom.wait_firing("NfhooksPolicyReloadFailed", timeout=15)
    assert [(a["instance"], a["severity"]) for a in labels] == [(DEFAULT_METRICS_ADDR, "warning")]
    assert engine.running()


@pytest.mark.timeout(90)
def test_fail_open_bypass_alert_fires(nfh_lab):
    """The same flood into a fail-open queue: the kernel accepts what does not fit, nfhooks
    derives how many, Prometheus alerts that packets went through unfiltered."""
    lab = nfh_lab
    servers(lab)
    engine = lab.start_engine(str(POLICY), *ENGINE_ARGS, "--fail-open")
    prom = Prometheus(lab)
    prom.wait_ready()
    some_traffic(lab)
    assert_all_quiet(prom)
    sent = int(lab.exec("client", sys.executable, "-c", _FLOOD, lab.addr("router"), 9999, 30000,
                        timeout=30).stdout)
    assert sent > 10000, sent

    def bypassed() -> float:
        try:
            return metric(lab, "nfhooks_queue_bypassed_packets_total", handler="flood")
        except (LabCommandError, subprocess.TimeoutExpired):
            return 0.0

    n = lab.wait_for(bypassed, timeout=30, interval=POLL, what="fail-open accepts derived at 'flood'")
    labels = prom.wait_firing("NfhooksFailOpenBypass", timeout=20, why=f"{n} packets bypassed")
    assert [(a["hook"], a["handler"], a["severity"]) for a in labels] == [("INPUT", "flood", "critical")]
    assert metric(lab, "nfhooks_queue_kernel_dropped_packets_total", handler="flood") == 0
    assert engine.running()
