"""The hooks table: valid combinations and the sentences users read."""

import pytest

from nfhooks.hooks import (HOOKS, PLACEMENTS, TABLE_HOOKS, PlacementError, check_ctstate, check_table,
                           check_verdict, default_table, explain)


def test_kernel_table_chain_combinations():
    assert TABLE_HOOKS["filter"] == ("INPUT", "FORWARD", "OUTPUT")
    assert TABLE_HOOKS["nat"] == ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")
    assert TABLE_HOOKS["mangle"] == HOOKS
    assert TABLE_HOOKS["raw"] == ("PREROUTING", "OUTPUT")


@pytest.mark.parametrize("table,hook", [("filter", "PREROUTING"), ("filter", "POSTROUTING"),
                                        ("raw", "INPUT"), ("raw", "FORWARD"), ("nat", "FORWARD")])
def test_impossible_table_hook_is_refused_with_where_it_exists(table, hook):
    with pytest.raises(PlacementError) as e:
        check_table(hook, table)
    assert hook in str(e.value)


@pytest.mark.parametrize("kind,bad,good", [
    ("dnat", "POSTROUTING", "OUTPUT"), ("redirect", "INPUT", "PREROUTING"),
    ("snat", "PREROUTING", "POSTROUTING"), ("masquerade", "INPUT", "POSTROUTING"),
    ("reject", "PREROUTING", "INPUT"), ("reject", "POSTROUTING", "FORWARD"),
])
def test_verdicts_only_where_the_kernel_can_act(kind, bad, good):
    with pytest.raises(PlacementError) as e:
        check_verdict(kind, bad, "mangle")
    msg = str(e.value)
    assert f"{kind} cannot work at {bad}" in msg and good in msg
    check_verdict(kind, good, "mangle")


def test_dnat_at_postrouting_explains_routing_already_decided():
    with pytest.raises(PlacementError, match="route is already chosen"):
        check_verdict("dnat", "POSTROUTING", "mangle")


def test_ctstate_never_in_raw():
    with pytest.raises(PlacementError, match="before conntrack"):
        check_ctstate("raw")
    check_ctstate("mangle")


def test_default_table_is_filter_where_it_exists():
    assert [default_table(h) for h in HOOKS] == ["mangle", "filter", "filter", "filter", "mangle"]


def test_every_verdict_kind_is_explained():
    text = explain()
    for kind in PLACEMENTS:
        assert kind in text
