"""The dispatcher on fake NetfilterQueue packets: exactly one verdict, whatever happens."""

from __future__ import annotations


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from nfhooks import Policy, accept, connmark, drop, mark, reject
from nfhooks.engine import Dispatcher
from nfhooks.fake import fake_bytes
from nfhooks.marks import ACTION_CONNSAVE, ACTION_REJECT
from nfhooks.metrics import Metrics
from nfhooks.rules import compile_policy
from nfhooks.fake import FakeQueuedPacket as FakeNfPacket


def build(func, hook="INPUT", default=None, **match):
    p = Policy(defaults={hook: default} if default else None)
    p.handler(hook, **match)(func)
    rs = compile_policy(p)
    registry = CollectorRegistry()
    d = Dispatcher(p, rs, Metrics(registry))
    return d.callback(p.handlers[0]), rs, registry


TCP = fake_bytes(proto="tcp", dport=22)


@pytest.mark.parametrize("verdict,expect", [(accept(), "accept"), (drop(), "drop")])
def test_simple_verdicts(verdict, expect):
    cb, _, reg = build(lambda pkt: verdict, proto="tcp")
    p = FakeNfPacket(TCP)
    cb(p)
    assert p.calls == [expect]
    assert reg.get_sample_value("nfhooks_packets_total", {"hook": "INPUT", "table": "filter", "verdict": expect}) == 1


def test_reject_from_filter_marks_and_repeats():
    cb, rs, _ = build(lambda pkt: reject(), proto="tcp")
    p = FakeNfPacket(TCP, mark=0x1234)
    cb(p)
    act = rs.layout["action"]
    assert p.calls == ["repeat"] and act.decode(p.set_marks[0]) == ACTION_REJECT
    assert p.set_marks[0] & 0xFFFF == 0x1234  # the user's bits survive


def test_reject_from_mangle_accepts_for_filter_to_act():
    cb, rs, _ = build(lambda pkt: reject(), proto="tcp", table="mangle")
    p = FakeNfPacket(TCP)
    cb(p)
    assert p.calls == ["accept"] and rs.layout["action"].decode(p.set_marks[0]) == ACTION_REJECT


def test_mark_is_masked_read_modify_write():
    cb, _, _ = build(lambda pkt: mark(0x5, 0xF), proto="tcp")
    p = FakeNfPacket(TCP, mark=0x1230)
    cb(p)
    assert p.calls == ["accept"] and p.set_marks == [0x1235]


def test_connmark_repeats_with_save_action():
    cb, rs, _ = build(lambda pkt: connmark(0x6), proto="tcp")
    p = FakeNfPacket(TCP)
    cb(p)
    assert p.calls == ["repeat"] and rs.layout["action"].decode(p.set_marks[0]) == ACTION_CONNSAVE
    assert p.set_marks[0] & 0xFFFF == 0x6


def test_none_resumes_after_this_handler():
    cb, rs, reg = build(lambda pkt: None, proto="tcp")
    p = FakeNfPacket(TCP)
    cb(p)
    assert p.calls == ["repeat"] and rs.layout["resume"].decode(p.set_marks[0]) == 1


@pytest.mark.parametrize("func,why", [
    (lambda pkt: 1 / 0, "raises"),
    (lambda pkt: "accept", "wrong type"),
    (lambda pkt: mark(0x10000), "nfhooks bits"),
])
def test_errors_give_the_hook_default_and_are_counted(func, why):
    cb, _, reg = build(func, default="drop", proto="tcp")
    p = FakeNfPacket(TCP)
    cb(p)
    assert p.calls == ["drop"], why
    assert reg.get_sample_value("nfhooks_handler_errors_total", {"hook": "INPUT", "handler": "<lambda>"}) == 1


def test_impossible_verdict_at_runtime_gives_default():
    """reject() returned at PREROUTING by code the load-time scan could not see."""
    hidden = {"v": reject()}
    cb, _, reg = build(lambda pkt: hidden["v"], hook="PREROUTING", proto="tcp")
    p = FakeNfPacket(TCP)
    cb(p)
    assert p.calls == ["accept"]
    assert reg.get_sample_value("nfhooks_handler_errors_total", {"hook": "PREROUTING", "handler": "<lambda>"}) == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_any_bytes_get_exactly_one_verdict(data):
    seen = []
    cb, _, reg = build(lambda pkt: seen.append(pkt) or accept(), default="drop", proto="tcp")
    p = FakeNfPacket(data)
    cb(p)
    assert len(p.calls) == 1
    if not seen:  # not parseable: default verdict, counted as malformed
        assert p.calls == ["drop"]
        assert reg.get_sample_value("nfhooks_malformed_packets_total", {"hook": "INPUT"}) == 1
