"""nfhooks.metrics: counters, histogram, kernel queue stats, the /metrics server, naming.

No root needed: the kernel's queue stats file is replaced by a temp file.
"""

from __future__ import annotations

import random
import re
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from nfhooks.metrics import (
    DECISION_BUCKETS,
    DEFAULT_HANDLER_LABEL,
    DEFAULT_METRICS_ADDR,
    FastHistogram,
    Metrics,
    QueueStat,
    VerdictCounter,
    package_version,
    parse_listen_addr,
    parse_queue_stats,
)

# What the kernel prints (net/netfilter/nfnetlink_queue.c, seq_show: "%5u %6u %5u %1u %5u
# %5u %5u %8u %2d"): queue 0 held by another program, ours at 8 and 9 with a backlog,
# kernel drops and socket overruns, and a 32-bit portid (a second socket of a process).
PROC_SAMPLE = """\
    0   1021     0 2  65531     0     0        17  1
    8  48213    12 2  65531   340    25    901772  1
    9  48213     0 2   1500     0     0        44  1
   65535 2147483650 1 1  0     1     2 4294967295  1
"""

OURS = [(8, "INPUT", "ssh_guard"), (9, "FORWARD", ""), (10, "OUTPUT", "egress")]


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry, tmp_path: Path) -> Metrics:
    return Metrics(registry, proc_path=str(tmp_path / "nfnetlink_queue"))


def _families(registry: CollectorRegistry) -> dict[str, object]:
    return {f.name: f for f in registry.collect()}


# ----------------------------------------------------------------- verdict counters


def test_verdict_counter_moves_packets_bytes_and_handler(metrics: Metrics, registry: CollectorRegistry) -> None:
    v = metrics.bind_verdict("INPUT", "filter", "ssh_guard", "drop")
    v.count(60)
    v.count(1500)
    get = registry.get_sample_value
    assert get("nfhooks_packets_total", {"hook": "INPUT", "table": "filter", "verdict": "drop"}) == 2
    assert get("nfhooks_bytes_total", {"hook": "INPUT", "table": "filter", "verdict": "drop"}) == 1560
    assert get("nfhooks_handler_packets_total",
               {"hook": "INPUT", "handler": "ssh_guard", "verdict": "drop"}) == 2


def test_bind_creates_series_at_zero(metrics: Metrics, registry: CollectorRegistry) -> None:
    """rate() in dashboards and alerts needs the series before the first packet."""
    metrics.bind_verdict("OUTPUT", "mangle", "egress", "reject")
    labels = {"hook": "OUTPUT", "table": "mangle", "verdict": "reject"}
    assert registry.get_sample_value("nfhooks_packets_total", labels) == 0
    assert registry.get_sample_value("nfhooks_bytes_total", labels) == 0


def test_default_handler_label(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.bind_verdict("FORWARD", "filter", "", "accept").count(100)
    assert DEFAULT_HANDLER_LABEL == "(default)"
    assert registry.get_sample_value(
        "nfhooks_handler_packets_total",
        {"hook": "FORWARD", "handler": "(default)", "verdict": "accept"},
    ) == 1
    metrics.handler_errors("FORWARD", "").inc()
    assert registry.get_sample_value(
        "nfhooks_handler_errors_total", {"hook": "FORWARD", "handler": "(default)"}) == 1


def test_two_handlers_share_the_hook_table_counter(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.bind_verdict("INPUT", "filter", "a", "accept").count(10)
    metrics.bind_verdict("INPUT", "filter", "b", "accept").count(20)
    get = registry.get_sample_value
    assert get("nfhooks_packets_total", {"hook": "INPUT", "table": "filter", "verdict": "accept"}) == 2
    assert get("nfhooks_handler_packets_total", {"hook": "INPUT", "handler": "a", "verdict": "accept"}) == 1
    assert get("nfhooks_handler_packets_total", {"hook": "INPUT", "handler": "b", "verdict": "accept"}) == 1


def test_histogram_observe(metrics: Metrics, registry: CollectorRegistry) -> None:
    h = metrics.decision_histogram("PREROUTING")
    h.observe(3e-6)
    h.observe(40e-6)
    h.observe(0.5)
    get = registry.get_sample_value
    assert get("nfhooks_decision_seconds_count", {"hook": "PREROUTING"}) == 3
    assert get("nfhooks_decision_seconds_sum", {"hook": "PREROUTING"}) == pytest.approx(0.500043)
    assert get("nfhooks_decision_seconds_bucket", {"hook": "PREROUTING", "le": "5e-06"}) == 1
    assert get("nfhooks_decision_seconds_bucket", {"hook": "PREROUTING", "le": "5e-05"}) == 2
    assert get("nfhooks_decision_seconds_bucket", {"hook": "PREROUTING", "le": "0.1"}) == 2
    assert get("nfhooks_decision_seconds_bucket", {"hook": "PREROUTING", "le": "+Inf"}) == 3


def test_histogram_buckets_are_microsecond_scale() -> None:
    assert DECISION_BUCKETS[0] == 5e-6
    assert DECISION_BUCKETS[-2] == 0.1 and DECISION_BUCKETS[-1] == float("inf")
    assert 0.01 in DECISION_BUCKETS  # the SlowDecisions alert threshold is exact
    assert list(DECISION_BUCKETS) == sorted(DECISION_BUCKETS)


def test_error_malformed_truncated_counters(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.handler_errors("INPUT", "ssh_guard").inc()
    metrics.malformed("INPUT").inc()
    metrics.truncated("POSTROUTING").inc(2)
    get = registry.get_sample_value
    assert get("nfhooks_handler_errors_total", {"hook": "INPUT", "handler": "ssh_guard"}) == 1
    assert get("nfhooks_malformed_packets_total", {"hook": "INPUT"}) == 1
    assert get("nfhooks_truncated_packets_total", {"hook": "POSTROUTING"}) == 2


def test_policy_info_reloads_nat_build_up(metrics: Metrics, registry: CollectorRegistry) -> None:
    get = registry.get_sample_value
    metrics.set_policy("lab.py", "v1", OURS)
    assert get("nfhooks_policy_info", {"policy": "lab.py", "version": "v1"}) == 1
    metrics.set_policy("lab.py", "v2", OURS)
    # Only the policy in force is 1; the old version's series is gone, not left at 1.
    assert get("nfhooks_policy_info", {"policy": "lab.py", "version": "v1"}) is None
    assert get("nfhooks_policy_info", {"policy": "lab.py", "version": "v2"}) == 1

    assert get("nfhooks_policy_reloads_total") == 0
    assert get("nfhooks_policy_reload_errors_total") == 0
    metrics.reloaded()
    metrics.reload_failed()
    metrics.reload_failed()
    assert get("nfhooks_policy_reloads_total") == 1
    assert get("nfhooks_policy_reload_errors_total") == 2

    metrics.set_nat_targets(3)
    assert get("nfhooks_nat_targets") == 3
    assert get("nfhooks_build_info", {"version": package_version()}) == 1
    assert package_version() != ""
    assert get("nfhooks_up") == 1
    metrics.close()
    assert get("nfhooks_up") == 0


def test_set_policy_creates_per_hook_series_at_zero(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.set_policy("p", "1", OURS)
    get = registry.get_sample_value
    for _, hook, handler in OURS:
        assert get("nfhooks_handler_errors_total", {"hook": hook, "handler": handler or "(default)"}) == 0
        assert get("nfhooks_malformed_packets_total", {"hook": hook}) == 0
        assert get("nfhooks_truncated_packets_total", {"hook": hook}) == 0
        assert get("nfhooks_decision_seconds_count", {"hook": hook}) == 0


def test_registries_are_independent(tmp_path: Path) -> None:
    """No module-level state: two engines (or a test and an engine) never collide."""
    a, b = CollectorRegistry(), CollectorRegistry()
    Metrics(a).bind_verdict("INPUT", "filter", "x", "accept").count(1)
    Metrics(b)
    labels = {"hook": "INPUT", "table": "filter", "verdict": "accept"}
    assert a.get_sample_value("nfhooks_packets_total", labels) == 1
    assert b.get_sample_value("nfhooks_packets_total", labels) is None
    # Metrics() without a registry makes its own, with the process collectors added.
    m1, m2 = Metrics(), Metrics()
    assert m1.registry is not m2.registry
    assert m1.registry.get_sample_value("process_start_time_seconds") is not None


# ----------------------------------------------------------------- plain-int hot path


def test_verdict_counter_is_two_plain_slots() -> None:
    """count() is attribute arithmetic: no prometheus object, no lock, no __dict__."""
    v = VerdictCounter()
    assert not hasattr(v, "__dict__")
    v.count(60)
    v.count(0)
    assert (v.packets, v.bytes) == (2, 60)


def test_bind_returns_the_same_counter_for_the_same_labels(metrics: Metrics) -> None:
    a = metrics.bind_verdict("INPUT", "filter", "h", "accept")
    assert metrics.bind_verdict("INPUT", "filter", "h", "accept") is a
    assert metrics.bind_verdict("INPUT", "filter", "h", "drop") is not a
    assert metrics.bind_verdict("INPUT", "mangle", "h", "accept") is not a
    # "" is the default handler, exported as "(default)": one series, one counter.
    assert metrics.bind_verdict("INPUT", "filter", "", "accept") is \
        metrics.bind_verdict("INPUT", "filter", DEFAULT_HANDLER_LABEL, "accept")
    assert metrics.decision_histogram("INPUT") is metrics.decision_histogram("INPUT")
    assert metrics.decision_histogram("INPUT") is not metrics.decision_histogram("OUTPUT")


def test_sums_over_handlers_and_over_tables(metrics: Metrics, registry: CollectorRegistry) -> None:
    """packets/bytes sum the handlers of a (hook, table); handler_packets sums the tables."""
    metrics.bind_verdict("INPUT", "filter", "a", "accept").count(10)
    metrics.bind_verdict("INPUT", "filter", "b", "accept").count(20)
    metrics.bind_verdict("INPUT", "filter", "", "accept").count(40)
    metrics.bind_verdict("INPUT", "mangle", "", "accept").count(80)
    get = registry.get_sample_value
    assert get("nfhooks_bytes_total", {"hook": "INPUT", "table": "filter", "verdict": "accept"}) == 70
    assert get("nfhooks_bytes_total", {"hook": "INPUT", "table": "mangle", "verdict": "accept"}) == 80
    assert get("nfhooks_packets_total", {"hook": "INPUT", "table": "filter", "verdict": "accept"}) == 3
    assert get("nfhooks_handler_packets_total",
               {"hook": "INPUT", "handler": "(default)", "verdict": "accept"}) == 2


def test_bound_series_exist_at_zero(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.bind_verdict("OUTPUT", "mangle", "egress", "reject")
    metrics.decision_histogram("OUTPUT")
    get = registry.get_sample_value
    assert get("nfhooks_handler_packets_total",
               {"hook": "OUTPUT", "handler": "egress", "verdict": "reject"}) == 0
    assert get("nfhooks_decision_seconds_sum", {"hook": "OUTPUT"}) == 0
    for le in ["5e-06", "0.01", "+Inf"]:
        assert get("nfhooks_decision_seconds_bucket", {"hook": "OUTPUT", "le": le}) == 0


def test_histogram_value_on_a_bound_is_in_that_bucket() -> None:
    """Prometheus' le is "less or equal": bisect_left, not bisect_right."""
    h = FastHistogram(DECISION_BUCKETS)
    for v in (5e-6, 0.01, 0.1):
        h.observe(v)
    h.observe(0.0100001)
    buckets = dict(h.cumulative()[0])
    assert buckets["5e-06"] == 1
    assert buckets["0.005"] == 1
    assert buckets["0.01"] == 2
    assert buckets["0.025"] == 3
    assert buckets["0.1"] == 4
    assert buckets["+Inf"] == 4


def test_histogram_bounds_must_be_sorted_and_end_with_inf() -> None:
    with pytest.raises(ValueError):
        FastHistogram((0.1, 0.01, float("inf")))
    with pytest.raises(ValueError):
        FastHistogram((0.01, 0.1))


def test_histogram_exports_like_prometheus_client(metrics: Metrics, registry: CollectorRegistry) -> None:
    """Same buckets, count and sum as prometheus_client's own Histogram for the same data."""
    ref_registry = CollectorRegistry()
    ref = Histogram("nfhooks_decision_seconds", "ref", ["hook"], buckets=DECISION_BUCKETS,
                    registry=ref_registry).labels("INPUT")
    ours = metrics.decision_histogram("INPUT")
    rnd = random.Random(7)
    values = [b for b in DECISION_BUCKETS[:-1]] + [0.0, 1.0, 1e-9]
    values += [10 ** rnd.uniform(-7, 0) for _ in range(2000)]
    for v in values:
        ref.observe(v)
        ours.observe(v)

    def samples(reg: CollectorRegistry) -> dict[tuple[str, str], float]:
        fam = next(f for f in reg.collect() if f.name == "nfhooks_decision_seconds")
        return {(s.name, s.labels.get("le", "")): s.value
                for s in fam.samples if not s.name.endswith("_created")}

    got, want = samples(registry), samples(ref_registry)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_families_keep_names_types_labels_and_help(metrics: Metrics, registry: CollectorRegistry) -> None:
    """Dashboards, alerts and the lab read these: exactly what prometheus_client exported."""
    metrics.bind_verdict("INPUT", "filter", "h", "accept").count(1)
    metrics.decision_histogram("INPUT").observe(1e-5)
    fams = _families(registry)
    expected = {
        "nfhooks_packets": ("counter", "Packets decided, by hook, table and verdict.",
                            {"hook", "table", "verdict"}),
        "nfhooks_bytes": ("counter", "Bytes of the packets decided, by hook, table and verdict.",
                          {"hook", "table", "verdict"}),
        "nfhooks_handler_packets": (
            "counter", "Packets decided per handler ((default) is the hook's default verdict).",
            {"hook", "handler", "verdict"}),
        "nfhooks_decision_seconds": ("histogram", "Time from reading a queued packet to its verdict: given, or held for the pass's batch verdict (vbatch.py).",
                                     {"hook"}),
    }
    for name, (type_, help_, labels) in expected.items():
        fam = fams[name]
        assert (fam.type, fam.documentation) == (type_, help_), name
        for s in fam.samples:
            assert set(s.labels) - {"le"} == labels, (name, s)
        # _created, as prometheus_client's Counter and Histogram export it by default.
        assert any(s.name == name + "_created" for s in fam.samples), name


def test_scrape_while_the_engine_thread_counts(metrics: Metrics, registry: CollectorRegistry) -> None:
    """One writer, one reader: scrapes never fail, never go backwards, end exact."""
    v = metrics.bind_verdict("INPUT", "filter", "h", "accept")
    h = metrics.decision_histogram("INPUT")
    labels = {"hook": "INPUT", "table": "filter", "verdict": "accept"}
    n = 200_000
    done = threading.Event()

    def engine() -> None:
        for _ in range(n):
            v.count(3)
            h.observe(2e-5)
        done.set()

    t = threading.Thread(target=engine)
    t.start()
    seen = [0.0]
    while not done.is_set():
        value = registry.get_sample_value("nfhooks_packets_total", labels)
        assert value is not None and value >= seen[-1]
        seen.append(value)
        # A rebind (reload) during scrapes must not break the collector's iteration.
        metrics.bind_verdict("INPUT", "filter", f"h{len(seen) % 50}", "accept")
    t.join()
    get = registry.get_sample_value
    assert get("nfhooks_packets_total", labels) == n
    assert get("nfhooks_bytes_total", labels) == 3 * n
    assert get("nfhooks_decision_seconds_count", {"hook": "INPUT"}) == n
    assert get("nfhooks_decision_seconds_bucket", {"hook": "INPUT", "le": "2.5e-05"}) == n


# ----------------------------------------------------------------- kernel queue stats


def test_parse_queue_stats_realistic_sample() -> None:
    stats = parse_queue_stats(PROC_SAMPLE)
    assert [s.queue_number for s in stats] == [0, 8, 9, 65535]
    assert stats[1] == QueueStat(
        queue_number=8, peer_portid=48213, queue_total=12, copy_mode=2, copy_range=65531,
        queue_dropped=340, user_dropped=25, id_sequence=901772,
    )
    assert stats[3].peer_portid == 2147483650
    assert stats[3].id_sequence == 4294967295


def test_parse_queue_stats_tolerates_junk() -> None:
    text = "\n  garbage line\n 1 2 3\n 4 100 0 2 65531 0 0 1 1\n 5 x 0 2 65531 0 0 1 1\n"
    assert parse_queue_stats(text) == [QueueStat(4, 100, 0, 2, 65531, 0, 0, 1)]
    assert parse_queue_stats("") == []
    # Without the historical trailing "1" the line is still understood.
    assert parse_queue_stats("3 7 1 2 100 0 0 9")[0].queue_number == 3


def test_collector_yields_our_queues_only(metrics: Metrics, registry: CollectorRegistry) -> None:
    Path(metrics.queue_stats.proc_path).write_text(PROC_SAMPLE)
    metrics.set_policy("p", "1", OURS)
    get = registry.get_sample_value
    q8 = {"queue": "8", "hook": "INPUT", "handler": "ssh_guard"}
    q9 = {"queue": "9", "hook": "FORWARD", "handler": "(default)"}
    assert get("nfhooks_queue_waiting_packets", q8) == 12
    assert get("nfhooks_queue_kernel_dropped_packets_total", q8) == 340
    assert get("nfhooks_queue_user_dropped_packets_total", q8) == 25
    assert get("nfhooks_queue_waiting_packets", q9) == 0

    fams = _families(registry)
    assert fams["nfhooks_queue_waiting_packets"].type == "gauge"
    assert fams["nfhooks_queue_kernel_dropped_packets"].type == "counter"
    assert fams["nfhooks_queue_user_dropped_packets"].type == "counter"
    queues = {s.labels["queue"] for s in fams["nfhooks_queue_waiting_packets"].samples}
    # 0 and 65535 belong to other programs; 10 is ours but not bound (not in the file).
    assert queues == {"8", "9"}


def test_collector_reads_at_scrape_time(metrics: Metrics, registry: CollectorRegistry) -> None:
    proc = Path(metrics.queue_stats.proc_path)
    metrics.set_policy("p", "1", OURS)
    proc.write_text("    8  48213     1 2  65531     0     0        17  1\n")
    labels = {"queue": "8", "hook": "INPUT", "handler": "ssh_guard"}
    assert registry.get_sample_value("nfhooks_queue_waiting_packets", labels) == 1
    proc.write_text("    8  48213    77 2  65531     5     0        99  1\n")
    assert registry.get_sample_value("nfhooks_queue_waiting_packets", labels) == 77
    assert registry.get_sample_value("nfhooks_queue_kernel_dropped_packets_total", labels) == 5


def test_collector_missing_file_yields_nothing(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.set_policy("p", "1", OURS)
    assert not Path(metrics.queue_stats.proc_path).exists()
    assert list(metrics.queue_stats.collect()) == []
    names = set(_families(registry))
    assert not any(n.startswith("nfhooks_queue_") for n in names)
    assert "nfhooks_packets" in names  # the rest of the scrape still works


def test_collector_unreadable_path_yields_nothing(registry: CollectorRegistry, tmp_path: Path) -> None:
    m = Metrics(registry, proc_path=str(tmp_path))  # a directory: open() raises
    m.set_policy("p", "1", OURS)
    assert list(m.queue_stats.collect()) == []


def test_collector_without_policy_yields_nothing(metrics: Metrics) -> None:
    Path(metrics.queue_stats.proc_path).write_text(PROC_SAMPLE)
    assert list(metrics.queue_stats.collect()) == []


def test_collector_registered_names_refuse_duplicates(registry: CollectorRegistry) -> None:
    Metrics(registry)
    with pytest.raises(ValueError):
        Metrics(registry)


# ----------------------------------------------------------------- serving


def test_default_address_is_loopback() -> None:
    assert DEFAULT_METRICS_ADDR == "127.0.0.1:9477"


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("127.0.0.1:9477", ("127.0.0.1", 9477)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9477", ("::1", 9477)),
        (":9477", ("0.0.0.0", 9477)),
        ("9477", ("127.0.0.1", 9477)),
    ],
)
def test_parse_listen_addr(addr: str, expected: tuple[str, int]) -> None:
    assert parse_listen_addr(addr) == expected


@pytest.mark.parametrize("addr", ["", "127.0.0.1", "::1:9477", "[::1]", "host:port", "1.2.3.4:70000"])
def test_parse_listen_addr_rejects(addr: str) -> None:
    with pytest.raises(ValueError):
        parse_listen_addr(addr)


def test_serve_returns_real_port_and_serves_metrics(metrics: Metrics) -> None:
    metrics.bind_verdict("INPUT", "filter", "ssh_guard", "accept").count(99)
    host, port = metrics.serve("127.0.0.1:0")
    try:
        assert host == "127.0.0.1"
        assert 0 < port < 65536
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            body = resp.read().decode()
        assert "nfhooks_build_info{" in body
        assert 'nfhooks_bytes_total{hook="INPUT",table="filter",verdict="accept"} 99.0' in body
        with pytest.raises(RuntimeError):
            metrics.serve("127.0.0.1:0")
    finally:
        metrics.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_serve_ipv6_loopback(metrics: Metrics) -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    host, port = metrics.serve("[::1]:0")
    try:
        assert host == "::1" and port > 0
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5) as resp:
            assert b"nfhooks_up 1.0" in resp.read()
    finally:
        metrics.close()


@pytest.mark.parametrize("addr", ["0.0.0.0:0", ":0", "[::]:0", "192.0.2.1:0"])
def test_serve_refuses_non_loopback_without_allow_public(metrics: Metrics, addr: str) -> None:
    with pytest.raises(ValueError, match="non-loopback"):
        metrics.serve(addr)


def test_serve_public_when_asked(metrics: Metrics) -> None:
    host, port = metrics.serve("0.0.0.0:0", allow_public=True)
    try:
        assert host == "0.0.0.0" and port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert b"nfhooks_build_info" in resp.read()
    finally:
        metrics.close()


# ----------------------------------------------------------------- conventions

_NAME = re.compile(r"^nfhooks_[a-z][a-z0-9_]*[a-z0-9]$")
_FORBIDDEN_LABELS = {"addr", "address", "port", "ip", "host", "instance", "job"}


def _full_registry(tmp_path: Path) -> CollectorRegistry:
    """A registry in which every nfhooks metric family has at least one sample."""
    reg = CollectorRegistry()
    proc = tmp_path / "q"
    proc.write_text(PROC_SAMPLE)
    m = Metrics(reg, proc_path=str(proc))
    m.set_policy("p", "1", OURS)
    m.bind_verdict("INPUT", "filter", "ssh_guard", "accept").count(1)
    return reg


def test_metric_names_follow_prometheus_conventions(tmp_path: Path) -> None:
    reg = _full_registry(tmp_path)
    families = [f for f in reg.collect() if f.name.startswith("nfhooks_")]
    assert {f.name for f in families} == {
        "nfhooks_packets", "nfhooks_bytes", "nfhooks_handler_packets", "nfhooks_handler_overruns",
        "nfhooks_decision_seconds", "nfhooks_handler_errors", "nfhooks_malformed_packets",
        "nfhooks_truncated_packets", "nfhooks_policy_info", "nfhooks_policy_reloads",
        "nfhooks_policy_reload_errors", "nfhooks_nat_targets", "nfhooks_build_info",
        "nfhooks_up", "nfhooks_queue_waiting_packets",
        "nfhooks_queue_kernel_dropped_packets", "nfhooks_queue_user_dropped_packets",
    }
    for fam in families:
        samples = [s for s in fam.samples if not s.name.endswith("_created")]
        assert samples, fam.name
        for s in samples:
            assert _NAME.match(s.name), s.name
            assert not (set(s.labels) & _FORBIDDEN_LABELS), (s.name, s.labels)
        names = {s.name for s in samples}
        if fam.type == "counter":
            assert names == {fam.name + "_total"}, fam.name
        else:
            assert not any(n.endswith("_total") for n in names), fam.name
        if fam.type == "histogram":
            assert fam.name.endswith("_seconds"), "durations are in seconds (base unit)"
        assert fam.documentation, fam.name
        # No unit prefixes: base units only.
        assert not re.search(r"_(milli|micro|nano)?(ms|us|ns|kb|mb|milliseconds|microseconds)(_|$)", fam.name)


def test_exposition_parses(tmp_path: Path) -> None:
    """The text Prometheus scrapes parses back, with the expected types."""
    from prometheus_client import generate_latest

    reg = _full_registry(tmp_path)
    text = generate_latest(reg).decode()
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["nfhooks_packets"] == "counter"
    assert types["nfhooks_decision_seconds"] == "histogram"
    assert types["nfhooks_queue_waiting_packets"] == "gauge"
    assert types["nfhooks_up"] == "gauge"
    assert types["nfhooks_policy_info"] == "gauge"
