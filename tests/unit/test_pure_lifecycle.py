"""lifecycle.py: start/stop as one undo-on-error transaction (the engine's and --workers')."""

from __future__ import annotations

from typing import Any

import pytest

from nfhooks import owner
from nfhooks.lifecycle import Lifecycle, Undo


class Store:
    """A rule backend that records the calls in one journal with the undos."""

    name = "stub"

    def __init__(self, journal: list[str], stale: bool = False) -> None:
        self.journal, self.stale = journal, stale

    def check_kernel(self) -> None:
        self.journal.append("check")

    def has_ours(self) -> bool:
        return self.stale

    def install(self, rs: Any) -> None:
        self.journal.append("install")

    def remove(self) -> list[str]:
        self.journal.append("remove")
        self.stale = False
        return ["ipv4 filter: 3 rules"]


class Lock:
    def __init__(self, journal: list[str]) -> None:
        self.journal = journal

    def release(self) -> None:
        self.journal.append("release")


@pytest.fixture
def journal(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    out: list[str] = []
    monkeypatch.setattr(owner.Ownership, "acquire", classmethod(lambda cls: out.append("lock") or Lock(out)))
    monkeypatch.setattr("nfhooks.backends.other_backends_with_ours", lambda b: [])
    return out


def started(journal: list[str], **kw: Any) -> Lifecycle:
    lc = Lifecycle(Store(journal, **kw))
    lc.begin()
    lc.on_stop(lambda: journal.append("queues closed"))
    lc.on_stop(lambda: journal.append("features stopped"), with_rules=True)
    lc.on_stop(lambda: journal.append("drained"), before_rules=True)
    lc.remove_stale()
    lc.install(object())
    return lc


def test_a_stop_drains_with_the_rules_in_place_then_undoes_newest_first(journal: list[str]) -> None:
    lc = started(journal, stale=True)
    assert lc.end() is False
    assert journal == ["check", "lock", "remove", "install",  # the stale set went first
                       "drained", "remove", "features stopped", "queues closed", "release"]
    assert not lc.installed and lc.owner is None


def test_an_error_while_serving_leaves_the_rules_and_what_they_need(journal: list[str],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    lc = started(journal)
    assert lc.end(RuntimeError("boom"), leaving="left as a kill -9 would") is True
    assert journal[-3:] == ["drained", "queues closed", "release"]  # no remove, features kept
    assert lc.left_installed and "left as a kill -9 would" in caplog.text


def test_a_failed_start_is_undone(journal: list[str]) -> None:
    lc = Lifecycle(Store(journal))
    lc.begin()
    lc.on_stop(lambda: journal.append("features stopped"), with_rules=True)
    # the install itself failed half way: the rules are removed by tag all the same
    lc.end(None)
    assert journal == ["check", "lock", "remove", "features stopped", "release"]


def test_another_engines_namespace_is_not_touched(journal: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(cls: Any) -> Any:
        raise owner.OwnedElsewhere(4242, "nfhooks run x.py")

    monkeypatch.setattr(owner.Ownership, "acquire", classmethod(refuse))
    lc = Lifecycle(Store(journal))
    with pytest.raises(owner.OwnedElsewhere):
        lc.begin()
    lc.on_stop(lambda: journal.append("closed"))
    lc.end(None)
    assert journal == ["check", "closed"]  # no remove: the rules are the other engine's


def test_every_undo_runs_even_when_one_fails_and_the_first_error_is_raised() -> None:
    done: list[str] = []
    u = Undo()
    u.push(lambda: done.append("a"))
    u.push(lambda: 1 / 0)
    u.push(lambda: done.append("c"))
    with pytest.raises(ZeroDivisionError):
        u.unwind()
    assert done == ["c", "a"]
    u.unwind()  # nothing left: undone once
    assert done == ["c", "a"]
