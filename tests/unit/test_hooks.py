"""Placement refusals: what check_table / check_verdict / check_interfaces accept and refuse,
against kernel facts stated here (not read back from nfhooks.hooks' own tables)."""

import pytest

from nfhooks.hooks import (PlacementError, check_ctstate, check_interfaces, check_table, check_verdict,
                           default_table, explain)
from nfhooks.verdict import FACTORIES

HOOKS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")

#: The built-in chains of each iptables table: the valid_hooks of net/ipv4/netfilter/
#: iptable_{raw,mangle,nat,filter}.c (iptables(8), TABLES).
KERNEL_CHAINS = {
    "raw": {"PREROUTING", "OUTPUT"},
    "mangle": set(HOOKS),
    "nat": {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
    "filter": {"INPUT", "FORWARD", "OUTPUT"},
}
#: Table priorities at a hook (NF_IP_PRI_RAW -300, _MANGLE -150, _NAT_DST -100, _FILTER 0).
PRIORITY_ORDER = ("raw", "mangle", "nat", "filter")
QUEUEABLE = ("raw", "mangle", "filter")  # nfhooks never queues from nat (first packet only)

ALL = set(HOOKS)
NO_RAW = {"mangle", "filter"}
MANGLE = {"mangle"}
#: verdict kind -> (hooks where the kernel can carry it out, tables it may be decided from).
#: accept/drop/mark: the queue verdict itself, anywhere. reject: ipt_REJECT is a filter-table
#: target (INPUT/FORWARD/OUTPUT), carried by the mark from mangle or filter. connmark: needs
#: conntrack, which runs after raw. DNAT/REDIRECT: xt_nat hooks PREROUTING/OUTPUT; SNAT:
#: POSTROUTING/INPUT; MASQUERADE: POSTROUTING only (it needs the outgoing interface); NAT and
#: rewrites are decided in mangle, before nat at the same hook. route: before the routing
#: decision (PREROUTING; OUTPUT re-routes on a mark changed in mangle). shape: CLASSIFY at
#: mangle POSTROUTING, so decided before it, on a packet that leaves (not INPUT).
EXPECTED = {
    "accept": (ALL, set(QUEUEABLE)),
    "drop": (ALL, set(QUEUEABLE)),
    "mark": (ALL, set(QUEUEABLE)),
    "reject": ({"INPUT", "FORWARD", "OUTPUT"}, NO_RAW),
    "connmark": (ALL, NO_RAW),
    "dnat": ({"PREROUTING", "OUTPUT"}, MANGLE),
    "redirect": ({"PREROUTING", "OUTPUT"}, MANGLE),
    "snat": ({"POSTROUTING", "INPUT"}, MANGLE),
    "masquerade": ({"POSTROUTING"}, MANGLE),
    "mangle": (ALL, MANGLE),
    "route": ({"PREROUTING", "OUTPUT"}, MANGLE),
    "shape": ({"PREROUTING", "FORWARD", "OUTPUT"}, MANGLE),
}


def _listed(message: str, after: str) -> set[str]:
    """The comma-separated names a refusal lists after ``after``."""
    assert after in message, message
    return set(message.split(after, 1)[1].rstrip(".").split(", "))


def test_every_verdict_a_handler_can_return_is_covered_here():
    assert set(FACTORIES.values()) == set(EXPECTED)


@pytest.mark.parametrize("table", PRIORITY_ORDER)
@pytest.mark.parametrize("hook", HOOKS)
def test_tables_are_accepted_where_the_kernel_has_the_chain(table, hook):
    if table == "nat":
        with pytest.raises(PlacementError, match="does not queue from the nat table.*Use table='mangle' at " + hook):
            check_table(hook, table)
    elif hook in KERNEL_CHAINS[table]:
        check_table(hook, table)
    else:
        with pytest.raises(PlacementError) as e:
            check_table(hook, table)
        where = ", ".join(h for h in HOOKS if h in KERNEL_CHAINS[table])
        here = ", ".join(t for t in PRIORITY_ORDER if hook in KERNEL_CHAINS[t])
        assert str(e.value) == (f"the {table} table has no {hook} chain in the kernel ({table} exists at "
                                f"{where}); tables at {hook}: {here}")


def test_impossible_table_hook_is_refused_with_where_it_exists():
    with pytest.raises(PlacementError) as e:
        check_table("PREROUTING", "filter")
    assert "(filter exists at INPUT, FORWARD, OUTPUT)" in str(e.value)
    assert str(e.value).endswith("tables at PREROUTING: raw, mangle, nat")
    with pytest.raises(PlacementError, match=r"\(raw exists at PREROUTING, OUTPUT\); tables at FORWARD: mangle, filter$"):
        check_table("FORWARD", "raw")
    with pytest.raises(PlacementError, match="unknown table 'security': one of raw, mangle, nat, filter"):
        check_table("INPUT", "security")


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_verdicts_only_where_the_kernel_can_act(kind):
    hooks, tables = EXPECTED[kind]
    for hook in HOOKS:
        for table in (t for t in QUEUEABLE if hook in KERNEL_CHAINS[t]):
            if hook in hooks and table in tables:
                check_verdict(kind, hook, table)
                continue
            with pytest.raises(PlacementError) as e:
                check_verdict(kind, hook, table)
            msg = str(e.value)
            if hook not in hooks:
                assert msg.startswith(f"{kind} cannot work at {hook}: "), msg
                assert _listed(msg, "It works at: ") == hooks, msg
            else:
                assert msg.startswith(f"{kind} cannot be decided from the {table} table at {hook}: "), msg
                assert _listed(msg, "Queue the handler from: ") == {
                    t for t in tables if hook in KERNEL_CHAINS[t]}, msg


@pytest.mark.parametrize("kind,hook,table,reason", [
    ("dnat", "POSTROUTING", "mangle", "route is already chosen"),
    ("reject", "PREROUTING", "mangle", "the filter table exists only at INPUT, FORWARD and OUTPUT"),
    ("connmark", "PREROUTING", "raw", "conntrack, which does not exist yet in the raw table"),
    ("masquerade", "PREROUTING", "mangle", "known only at POSTROUTING"),
    ("shape", "INPUT", "mangle", "packets to this host (INPUT) never leave by an interface"),
])
def test_refusals_say_why(kind, hook, table, reason):
    with pytest.raises(PlacementError) as e:
        check_verdict(kind, hook, table)
    assert reason in str(e.value)


def test_unknown_verdict_kind_is_refused():
    with pytest.raises(PlacementError, match="unknown verdict kind 'nat'"):
        check_verdict("nat", "PREROUTING", "mangle")


def test_ctstate_never_in_raw():
    with pytest.raises(PlacementError, match="before conntrack"):
        check_ctstate("raw")
    check_ctstate("mangle")
    check_ctstate("filter")


@pytest.mark.parametrize("hook", HOOKS)
def test_interfaces_only_where_the_packet_has_them(hook):
    # an input interface: not on locally generated packets (OUTPUT) nor, hence, at POSTROUTING
    # for all of them; an output interface: only once routing chose it (FORWARD onwards, OUTPUT)
    if hook in ("OUTPUT", "POSTROUTING"):
        with pytest.raises(PlacementError, match=f"input-interface match \\(iif\\) cannot work at {hook}"):
            check_interfaces(hook, "eth0", None)
    else:
        check_interfaces(hook, "eth0", None)
    if hook in ("PREROUTING", "INPUT"):
        with pytest.raises(PlacementError, match=f"output-interface match \\(oif\\) cannot work at {hook}"):
            check_interfaces(hook, None, "eth0")
    else:
        check_interfaces(hook, None, "eth0")
    check_interfaces(hook, None, None)


def test_default_table_is_filter_where_it_exists():
    assert {h: default_table(h) for h in HOOKS} == {
        h: "filter" if h in KERNEL_CHAINS["filter"] else "mangle" for h in HOOKS}


def test_explain_lists_each_verdict_with_its_hooks_and_tables():
    rows = [line.split() for line in explain().splitlines()[1:] if not line.startswith(" ")]
    got = {r[0]: (set(r[1].split(",")), set(r[2].split(","))) for r in rows}
    assert got == EXPECTED
    assert explain().splitlines()[0].split() == ["verdict", "hooks", "queued", "from", "acted", "on", "by"]
