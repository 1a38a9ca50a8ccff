"""The dispatcher on fake NetfilterQueue packets: exactly one verdict, whatever happens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfhooks import accept, connmark, drop, mark, reject
from nfhooks.fake import FakeQueuedPacket as FakeNfPacket
from nfhooks.fake import fake_bytes
from nfhooks.marks import ACTION_CONNSAVE, ACTION_REJECT


TCP = fake_bytes(proto="tcp", dport=22)


@pytest.mark.parametrize("verdict,expect", [(accept(), "accept"), (drop(), "drop")])
def test_simple_verdicts(dispatch, verdict, expect):
    d = dispatch().add("INPUT", lambda pkt: verdict, proto="tcp")
    p = d.send(TCP)
    assert p.calls == [expect]
    assert d.sample("nfhooks_packets_total", {"hook": "INPUT", "table": "filter", "verdict": expect}) == 1


def test_reject_from_filter_marks_and_repeats(dispatch):
    d = dispatch().add("INPUT", lambda pkt: reject(), proto="tcp")
    p = d.send(TCP, mark=0x1234)
    act = d.ruleset.layout["action"]
    assert p.calls == ["repeat"] and act.decode(p.set_marks[0]) == ACTION_REJECT
    assert p.set_marks[0] & 0xFFFF == 0x1234  # the user's bits survive


def test_reject_from_mangle_accepts_for_filter_to_act(dispatch):
    d = dispatch().add("INPUT", lambda pkt: reject(), proto="tcp", table="mangle")
    p = d.send(TCP)
    assert p.calls == ["accept"] and d.ruleset.layout["action"].decode(p.set_marks[0]) == ACTION_REJECT


def test_mark_is_masked_read_modify_write(dispatch):
    d = dispatch().add("INPUT", lambda pkt: mark(0x5, 0xF), proto="tcp")
    p = d.send(TCP, mark=0x1230)
    assert p.calls == ["accept"] and p.set_marks == [0x1235]


def test_connmark_repeats_with_save_action(dispatch):
    d = dispatch().add("INPUT", lambda pkt: connmark(0x6), proto="tcp")
    p = d.send(TCP)
    assert p.calls == ["repeat"] and d.ruleset.layout["action"].decode(p.set_marks[0]) == ACTION_CONNSAVE
    assert p.set_marks[0] & 0xFFFF == 0x6


def test_none_resumes_after_this_handler(dispatch):
    d = dispatch().add("INPUT", lambda pkt: None, proto="tcp")
    p = d.send(TCP)
    assert p.calls == ["repeat"] and d.ruleset.layout["resume"].decode(p.set_marks[0]) == 1


@pytest.mark.parametrize("func,why", [
    (lambda pkt: 1 / 0, "raises"),
    (lambda pkt: "accept", "wrong type"),
    (lambda pkt: mark(0x10000), "nfhooks bits"),
])
def test_errors_give_the_hook_default_and_are_counted(dispatch, func, why):
    d = dispatch(defaults={"INPUT": "drop"}).add("INPUT", func, proto="tcp")
    p = d.send(TCP)
    assert p.calls == ["drop"], why
    assert d.sample("nfhooks_handler_errors_total", {"hook": "INPUT", "handler": "<lambda>"}) == 1


def test_impossible_verdict_at_runtime_gives_default(dispatch):
    """reject() returned at PREROUTING by code the load-time scan could not see."""
    hidden = {"v": reject()}
    d = dispatch().add("PREROUTING", lambda pkt: hidden["v"], proto="tcp")
    p = d.send(TCP)
    assert p.calls == ["accept"]
    assert d.sample("nfhooks_handler_errors_total", {"hook": "PREROUTING", "handler": "<lambda>"}) == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_any_bytes_get_exactly_one_verdict(dispatch, data):
    seen = []
    d = dispatch(defaults={"INPUT": "drop"}).add("INPUT", lambda pkt: seen.append(pkt) or accept(), proto="tcp")
    p = FakeNfPacket(data)
    d.send(p)
    assert len(p.calls) == 1
    if not seen:  # not parseable: default verdict, counted as malformed
        assert p.calls == ["drop"]
        assert d.sample("nfhooks_malformed_packets_total", {"hook": "INPUT"}) == 1
