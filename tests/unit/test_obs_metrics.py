"""Issue 17 without a kernel: via labels (17.2), series noise (17.3), the default-rule reader
(17.1), policy metrics (17.4), --audit's packet (17.7), NAT targets in pcap comments and
nfhooks_up (17.8)."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from nfhooks import Policy, accept, dnat, drop, mark, reject, set_dscp, set_ttl
from nfhooks.errors import PolicyError
from nfhooks.fake import FakeQueuedPacket, fake_bytes
from nfhooks.metrics import Metrics
from nfhooks.nat import NatTargets
from nfhooks.obs_audit import Audit, AuditCollector, AuditPacket
from nfhooks.obs_defaults import DefaultRuleCollector, DefaultRuleCounts, Merged, default_rule_counts
from nfhooks.obs_engine import source_hash
from nfhooks.obs_series import StableQueues
from nfhooks.obs_verdicts import returnable
from nfhooks.pcap import PcapWriter, comment_text, read_packets
from nfhooks.policy_metrics import PolicyMetrics, stray_metrics
from nfhooks.rules import compile_policy


def samples(registry: CollectorRegistry, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for fam in registry.collect() for s in fam.samples if s.name == name]


# -- 17.3: only the verdicts a handler can return -------------------------------------------

def _h(func, hook="INPUT", **kw):
    p = Policy()
    p.handler(hook, **kw)(func)
    return p.handlers[0]


def test_returnable_reads_the_returns_of_the_handler():
    def only_drop(pkt):
        return drop()

    def drop_or_continue(pkt):
        if pkt.dport == 1:
            return drop()

    def either(pkt):
        return accept() if pkt.dport == 1 else reject()

    def marks(pkt, flag=True):
        if pkt.dport == 2:
            return mark(1, connmark=flag)
        return mark(2)

    def rewrites(pkt):
        return set_ttl(9) | set_dscp(1)

    assert returnable(_h(only_drop)) == {"drop"}
    assert returnable(_h(drop_or_continue)) == {"drop", "continue"}
    assert returnable(_h(either)) == {"accept", "reject"}
    assert returnable(_h(marks)) == {"mark", "connmark"}
    assert returnable(_h(rewrites, hook="POSTROUTING", table="mangle")) == {"mangle"}


def test_returnable_is_none_when_the_source_does_not_say():
    v = drop()

    def via_variable(pkt):
        return v

    def nested(pkt):
        def inner():
            return accept()
        return inner()

    assert returnable(_h(via_variable)) is None
    assert returnable(_h(nested)) is None
    assert returnable(_h(lambda pkt: drop())) is None  # a lambda: no function body to read


def test_a_handler_gets_series_only_for_its_verdicts_and_an_unforeseen_one_still_counts(dispatch):
    p = Policy()
    state = {"v": None}

    @p.input(proto="tcp")
    def blocker(pkt):
        if state["v"] is None:
            return drop()
        return state["v"]  # not a factory call: unknown, every series

    @p.input(proto="udp")
    def only_drop(pkt):
        return drop()

    d = dispatch(p)
    d.callback(0), d.callback(1)
    verdicts = {s[0]["verdict"] for s in samples(d.registry, "nfhooks_handler_packets_total")
                if s[0]["handler"] == "only_drop"}
    assert verdicts == {"drop"}
    every = {s[0]["verdict"] for s in samples(d.registry, "nfhooks_handler_packets_total")
             if s[0]["handler"] == "blocker"}
    assert {"accept", "drop", "reject", "mark", "connmark", "continue"} <= every
    assert not any(s[0].get("via") for s in samples(d.registry, "nfhooks_packets_total"))  # failures: none yet
    # a verdict outside the scan still counted: its series appears with the packet
    p2 = Policy()
    fake_scan = p2.input(proto="udp")

    def sneaky(pkt):
        return drop()

    fake_scan(sneaky)
    d2 = dispatch(p2)
    d2.callback(0)
    sneaky.__code__ = (lambda pkt: accept()).__code__  # now returns what the source scan did not see
    d2.send(fake_bytes(proto="udp"))
    assert d2.sample("nfhooks_handler_packets_total", {"hook": "INPUT", "handler": "sneaky",
                                                        "verdict": "accept"}) == 1


def test_no_created_series_under_the_run_switch_and_stable_queue_series():
    class Queues:  # a queue collector: two generations' queues of one handler, then one retires
        def __init__(self):
            self.rows = {3: 5.0}

        def collect(self):
            c = CounterMetricFamily("nfhooks_queue_enobufs", "x", labels=["queue", "hook", "handler"])
            g = GaugeMetricFamily("nfhooks_queue_config_info", "x", labels=["queue", "hook", "handler"])
            for q, v in self.rows.items():
                c.add_metric([str(q), "INPUT", "ssh"], v, created=1.0)
                g.add_metric([str(q), "INPUT", "ssh"], 1)
            yield c
            yield g

    inner = Queues()
    reg = CollectorRegistry()
    reg.register(StableQueues(inner))
    labels = {"hook": "INPUT", "handler": "ssh"}
    assert reg.get_sample_value("nfhooks_queue_enobufs_total", labels) == 5
    inner.rows = {3: 6.0, 9: 1.0}  # a reload: generation 2's queue, under another number
    assert reg.get_sample_value("nfhooks_queue_enobufs_total", labels) == 7
    assert reg.get_sample_value("nfhooks_queue_config_info", labels) == 1  # info: max, not 2
    inner.rows = {9: 2.0}  # generation 1 retired: its count stays, the series goes on
    assert reg.get_sample_value("nfhooks_queue_enobufs_total", labels) == 8
    inner.rows = {3: 0.0}  # the next reload: queue 3 again, counting from 0
    assert reg.get_sample_value("nfhooks_queue_enobufs_total", labels) == 8
    text = generate_latest(reg).decode()
    assert "_created" not in text and "queue=" not in text


# -- 17.2: failures under the handler's name, with how ----------------------------------------

def test_failures_keep_the_handler_name_with_via_in_metrics_and_pcap(dispatch, tmp_path):
    p = Policy(defaults={"INPUT": "drop"})

    @p.input(proto="tcp", dport=22)
    def broken(pkt):
        raise RuntimeError("on purpose")

    @p.input(proto="tcp", dport=23)
    def wrong(pkt):
        return "nonsense" if pkt.dport else None  # noqa: not a verdict

    path = tmp_path / "c.pcapng"
    w = PcapWriter(path, flush_interval=None)
    d = dispatch(p).use(tap=w)
    assert d.send(fake_bytes(proto="tcp", dport=22), handler=0).calls == ["drop"]
    assert d.send(fake_bytes(proto="tcp", dport=23), handler=1).calls == ["drop"]
    assert d.send(b"\x45\x00", handler=0).calls == ["drop"]
    w.close()
    get = d.sample
    base = {"hook": "INPUT", "verdict": "drop"}
    assert get("nfhooks_handler_packets_total", {**base, "handler": "broken", "via": "error"}) == 1
    assert get("nfhooks_handler_packets_total", {**base, "handler": "wrong", "via": "invalid"}) == 1
    assert get("nfhooks_handler_packets_total", {**base, "handler": "broken", "via": "malformed"}) == 1
    assert get("nfhooks_packets_total", {**base, "table": "filter", "via": "error"}) == 1
    assert not [s for s in samples(d.registry, "nfhooks_handler_packets_total") if s[0]["handler"] == "(default)"]
    comments = [c for _, _, c in read_packets(path)]
    assert comments == ["hook=INPUT table=filter handler=broken verdict=drop via=error",
                        "hook=INPUT table=filter handler=wrong verdict=drop via=invalid",
                        "hook=INPUT table=filter handler=broken verdict=drop via=malformed"]


def test_overrun_counts_under_the_handler(dispatch):
    p = Policy()

    @p.input(proto="udp")
    def slow(pkt):
        import time
        t = time.perf_counter()
        while time.perf_counter() - t < 0.002:  # past the 1 ms budget below
            pass
        return drop()

    d = dispatch(p).use(budget=0.001)
    assert d.send(fake_bytes(proto="udp")).calls == ["accept"]  # the INPUT default
    assert d.sample("nfhooks_handler_packets_total", {"hook": "INPUT", "handler": "slow", "verdict": "accept",
                                                       "via": "overrun"}) == 1


def test_pcap_comment_words():
    assert comment_text("INPUT", "filter", "x", "drop") == "hook=INPUT table=filter handler=x verdict=drop"
    assert comment_text("INPUT", "filter", "x", "drop", via="timeout").endswith(" via=timeout")
    assert comment_text("FORWARD", "mangle", "", "accept", via_default=True).endswith("handler=- verdict=accept via=default")


def test_nat_comment_names_the_chosen_target(dispatch, tmp_path):
    p = Policy()

    @p.prerouting(proto="tcp", dport=80)
    def fwd(pkt):
        return dnat("10.0.2.10:8080") if str(pkt.src) == "10.0.0.1" else dnat("10.0.2.11")

    path = tmp_path / "n.pcapng"
    w = PcapWriter(path, flush_interval=None)
    d = dispatch(p, nat_targets=3)
    d.use(nat=NatTargets(d.ruleset.layout, d.ruleset.nat_targets, lambda *a: None), tap=w)
    d.send(fake_bytes(dport=80, src="10.0.0.1"))
    d.send(fake_bytes(dport=80, src="10.0.0.2"))
    d.send(fake_bytes(dport=80, src="10.0.0.1"))
    w.close()
    assert [c for _, _, c in read_packets(path)] == [
        "hook=PREROUTING table=mangle handler=fwd verdict=dnat target=10.0.2.10:8080",
        "hook=PREROUTING table=mangle handler=fwd verdict=dnat target=10.0.2.11",
        "hook=PREROUTING table=mangle handler=fwd verdict=dnat target=10.0.2.10:8080"]


# -- 17.1: the default rules' counters ------------------------------------------------------

SAVE4 = """# Generated by iptables-save v1.8.9
*filter
:NFH-INPUT - [0:0]
[5:300] -A NFH-INPUT -p tcp -m comment --comment "nfhooks web" -j NFQUEUE --queue-num 0
[7:420] -A NFH-INPUT -p tcp -m comment --comment "nfhooks default" -j REJECT --reject-with tcp-reset
[2:100] -A NFH-INPUT -m comment --comment "nfhooks default" -j REJECT --reject-with icmp-port-unreachable
[4:240] -A NFH-OUTPUT-2 -m comment --comment "nfhooks default" -j DROP
COMMIT
"""
SAVE6 = """# Generated by ip6tables-save v1.8.9
*filter
[3:200] -A NFH-INPUT -m comment --comment "nfhooks default" -j ACCEPT
COMMIT
"""


def test_default_rule_counts_from_the_save_text():
    got = default_rule_counts([SAVE4, SAVE6], would=lambda hook: "drop")
    assert got == {(4, "filter", "NFH-INPUT", "INPUT", "reject"): (9, 520),
                   (4, "filter", "NFH-OUTPUT-2", "OUTPUT", "drop"): (4, 240),
                   (6, "filter", "NFH-INPUT", "INPUT", "drop"): (3, 200)}  # --audit: the would-be verdict


def test_default_rule_counts_stay_monotonic_over_a_reload_and_export_with_via():
    texts = [[SAVE4]]
    counts = DefaultRuleCounts(lambda: texts[0], max_age=0)
    assert ("INPUT", "filter", "reject", 9, 520) in counts()
    texts[0] = [SAVE4.replace("NFH-INPUT", "NFH-INPUT-2").replace("[7:420]", "[1:60]").replace("[2:100]", "[0:0]")]
    assert ("INPUT", "filter", "reject", 10, 580) in counts()  # generation 1's 9 carried, plus 1
    m = Metrics(CollectorRegistry())
    m.packet_stats.kernel_defaults = counts
    m.bind_verdict("INPUT", "filter", "web", "reject").count(60)
    get = m.registry.get_sample_value
    assert get("nfhooks_packets_total", {"hook": "INPUT", "table": "filter", "verdict": "reject",
                                         "via": "default_rule"}) == 10
    assert get("nfhooks_packets_total", {"hook": "INPUT", "table": "filter", "verdict": "reject"}) == 1
    assert get("nfhooks_handler_packets_total", {"hook": "INPUT", "handler": "(default)", "verdict": "reject",
                                                 "via": "default_rule"}) == 10


def test_merged_puts_the_default_rule_samples_into_the_workers_families():
    class Workers:
        def collect(self):
            f = CounterMetricFamily("nfhooks_packets", "Packets.", labels=["hook", "table", "verdict"])
            f.add_metric(["INPUT", "filter", "accept"], 4)
            yield f

    reg = CollectorRegistry()
    reg.register(Merged(Workers(), DefaultRuleCollector(lambda: [("INPUT", "filter", "drop", 3, 180)])))
    text = generate_latest(reg).decode()
    assert text.count("# TYPE nfhooks_packets_total counter") == 1
    assert reg.get_sample_value("nfhooks_packets_total", {"hook": "INPUT", "table": "filter", "verdict": "drop",
                                                          "via": "default_rule"}) == 3
    assert reg.get_sample_value("nfhooks_packets_total", {"hook": "INPUT", "table": "filter",
                                                          "verdict": "accept"}) == 4


# -- 17.4: policy metrics --------------------------------------------------------------------

def test_policy_counter_and_gauge_are_bound_on_the_engine_registry_and_survive_a_reload():
    def load():
        p = Policy()
        c = p.counter("hits", "Hits by port", labels=["port"])
        g = p.gauge("level", "A level")
        return p, c, g

    p, c, g = load()
    c.labels(22).inc()  # before binding: counts in its own registry, nothing breaks
    reg = CollectorRegistry()
    pm = PolicyMetrics(reg)
    pm.bind(p)
    c.labels(22).inc(2)
    g.set(5)
    assert reg.get_sample_value("nfhooks_policy_hits_total", {"port": "22"}) == 2
    assert reg.get_sample_value("nfhooks_policy_level") == 5
    p2, c2, _ = load()  # the reload: the same declaration keeps counting
    pm.bind(p2)
    c2.labels(22).inc()
    assert reg.get_sample_value("nfhooks_policy_hits_total", {"port": "22"}) == 3
    p3 = Policy()  # declared no more: gone from the endpoint
    pm.bind(p3)
    assert reg.get_sample_value("nfhooks_policy_hits_total", {"port": "22"}) is None


@pytest.mark.parametrize("args, message", [
    (("bad-name", "x"), "letters, digits"),
    (("info", "x"), "nfhooks' own"),
    (("ok", ""), "help text"),
    (("ok", "x", ["a", "a"]), "named twice"),
    (("ok", "x", ["__x"]), "bad label"),
])
def test_policy_metric_declarations_are_checked(args, message):
    p = Policy()
    name, help_, *labels = args
    with pytest.raises(PolicyError, match=message):
        p.counter(name, help_, labels=labels[0] if labels else ())


def test_a_policy_metric_declared_twice_and_a_stray_global_one():
    p = Policy()
    p.counter("x", "y")
    with pytest.raises(PolicyError, match="declared twice"):
        p.gauge("x", "y")
    reg = CollectorRegistry()
    Counter("my_own", "made by a policy itself", registry=reg)
    assert stray_metrics(reg) == ["my_own"]


def test_stray_metric_warned_at_bind(caplog):
    from prometheus_client import REGISTRY

    c = Counter("obs_test_stray", "a policy's own prometheus_client counter")
    try:
        with caplog.at_level(logging.WARNING, logger="nfhooks.engine"):
            PolicyMetrics(CollectorRegistry()).bind(Policy())
        assert "obs_test_stray" in caplog.text and "does not serve" in caplog.text
    finally:
        REGISTRY.unregister(c)


# -- 17.7 and 17.8 ---------------------------------------------------------------------------

def test_audit_packet_accepts_unchanged_and_passes_a_fall_through():
    resume = 0x3800000
    pk = FakeQueuedPacket(fake_bytes(), mark=0x10)
    ap = AuditPacket(pk, resume)
    ap.drop()
    assert pk.calls == ["accept"] and ap.changed
    pk = FakeQueuedPacket(fake_bytes(), mark=0x10)
    ap = AuditPacket(pk, resume)
    ap.set_mark(0x10 | 0x800000)  # the resume index only: continue to the next handler
    ap.repeat()
    assert pk.calls == ["repeat"] and pk.set_marks == [0x800010] and not ap.changed
    pk = FakeQueuedPacket(fake_bytes(), mark=0)
    ap = AuditPacket(pk, resume)
    ap.set_mark(0x4000000)  # action=reject
    ap.repeat()
    assert pk.calls == ["accept"] and pk.set_marks == [] and ap.changed


def test_audit_callback_counts_the_verdict_accepts_the_packet(dispatch):
    p = Policy()

    @p.input(proto="tcp")
    def blocked(pkt):
        return reject()

    audit = Audit()
    d = dispatch(p).use(audit=audit)
    pk = d.send(fake_bytes(proto="tcp"))
    assert pk.calls == ["accept"] and pk.set_marks == []
    assert d.sample("nfhooks_handler_packets_total", {"hook": "INPUT", "handler": "blocked", "verdict": "reject"}) == 1
    reg = CollectorRegistry()
    reg.register(AuditCollector(lambda: audit))
    assert reg.get_sample_value("nfhooks_audit_mode") == 1
    assert reg.get_sample_value("nfhooks_audit_overridden_packets_total", {"hook": "INPUT", "handler": "blocked"}) == 1


def test_audit_ruleset_makes_the_default_rules_accept_keeping_their_comment():
    p = Policy(defaults={"INPUT": "reject", "OUTPUT": "drop"})
    rs = Audit.ruleset(compile_policy(p))
    text = rs.render()
    defaults = [line for line in text.splitlines() if '"nfhooks default"' in line]
    assert defaults and all(line.endswith("-j ACCEPT") for line in defaults), defaults
    assert rs.defaults["INPUT"].kind == "reject"  # what the counters are exported as


def test_nfhooks_up_follows_the_engine_and_policy_info_carries_the_hash(tmp_path):
    m = Metrics(CollectorRegistry())
    state = {"up": False}
    m.up_when = lambda: state["up"]
    assert m.registry.get_sample_value("nfhooks_up") == 0  # starting: a scrape sees it
    state["up"] = True
    assert m.registry.get_sample_value("nfhooks_up") == 1
    f = tmp_path / "pol.py"
    f.write_text("from nfhooks import Policy\npolicy = Policy('hashed', version='3')\n")
    from nfhooks.loader import load_policy

    pol = load_policy(f)
    import hashlib

    digest = hashlib.sha256(f.read_bytes()).hexdigest()[:12]
    assert source_hash(pol) == digest and source_hash(Policy()) == ""
    m.set_policy(pol.name, pol.version, [], source_hash(pol))
    assert m.registry.get_sample_value("nfhooks_policy_info", {"policy": "hashed", "version": "3",
                                                               "hash": digest}) == 1
    m.close()
    assert m.registry.get_sample_value("nfhooks_up") == 0
