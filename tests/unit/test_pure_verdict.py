"""nfhooks/verdict.py: the factories, ``|`` on rewrites, placement_kind, parse_default and the
errors (NAT target parsing is tests/unit/test_nat.py's, rewriting bytes test_mangle.py's)."""

from __future__ import annotations

from ipaddress import ip_address
from types import SimpleNamespace

import pytest

from nfhooks.verdict import (ACCEPT, DROP, FACTORIES, NAT_KINDS, ROUTESHAPE_KINDS, Accept, Dnat, Drop, Mangle, Mark,
                             Masquerade, Redirect, Reject, Route, Shape, Snat, accept, clamp_mss, connmark, dnat,
                             drop, mangle, mark, masquerade, parse_default, payload, placement_kind, redirect, reject,
                             route, set_dscp, set_tos, set_ttl, shape, snat)


def option(value):  # what policy.option() hands a factory
    return SimpleNamespace(value=value, option_name="opt")


#: one call of every factory a handler may use
CALLS = {
    "accept": lambda: accept(), "drop": lambda: drop(), "reject": lambda: reject(),
    "mark": lambda: mark(1), "connmark": lambda: connmark(1),
    "dnat": lambda: dnat("10.0.0.1"), "snat": lambda: snat("10.0.0.1"),
    "masquerade": lambda: masquerade(), "redirect": lambda: redirect(8080),
    "mangle": lambda: mangle(ttl=5), "set_ttl": lambda: set_ttl(5), "set_dscp": lambda: set_dscp(5),
    "set_tos": lambda: set_tos(5), "clamp_mss": lambda: clamp_mss(1200), "payload": lambda: payload(b"x"),
    "route": lambda: route("t"), "shape": lambda: shape("c"),
}


def test_the_source_scan_table_names_each_factory_by_the_kind_it_returns():
    """FACTORIES is what policy loading reads handler source with; a wrong entry would place
    a handler by the wrong verdict."""
    assert set(FACTORIES) == set(CALLS)
    assert {name: placement_kind(call()) for name, call in CALLS.items()} == FACTORIES


def test_kinds_and_classes():
    assert [type(CALLS[n]()) for n in ("dnat", "snat", "masquerade", "redirect", "route", "shape")] == [
        Dnat, Snat, Masquerade, Redirect, Route, Shape]
    assert NAT_KINDS == {"dnat", "snat", "masquerade", "redirect"} and ROUTESHAPE_KINDS == {"route", "shape"}
    assert mark(1).kind == connmark(1).kind == "mark"  # one class; placement tells them apart
    assert (placement_kind(mark(1)), placement_kind(connmark(1))) == ("mark", "connmark")
    assert placement_kind(set_ttl(3) | set_dscp(1)) == "mangle"


def test_accept_and_drop_are_singletons_and_values_compare_by_content():
    assert accept() is ACCEPT is accept() and drop() is DROP
    assert isinstance(ACCEPT, Accept) and isinstance(DROP, Drop)
    assert mark(5, 0xF) == Mark(5, 0xF, False) != connmark(5, 0xF)
    assert reject() == Reject("auto") and reject("tcp-reset") != reject()
    assert len({set_ttl(3), set_ttl(3), set_ttl(4)}) == 2  # hashable: frozen values


def test_verdicts_are_immutable():
    v = mark(1)
    with pytest.raises(AttributeError):
        v.value = 2  # type: ignore[misc]


# -- mark / connmark / reject ------------------------------------------------------------------

def test_mark_defaults_and_bounds():
    assert (mark(7).value, mark(7).mask, mark(7).connmark) == (7, 0xFFFFFFFF, False)
    assert mark(7, 0xF, connmark=True) == connmark(7, 0xF)
    assert mark(0xFFFFFFFF, 0).mask == 0
    for bad in ((-1,), (0x1_0000_0000,), (1, -1), (1, 0x1_0000_0000)):
        with pytest.raises(ValueError, match="32-bit unsigned"):
            mark(*bad)


@pytest.mark.parametrize("with_", ["auto", "tcp-reset", "port-unreachable", "host-unreachable", "admin-prohibited"])
def test_reject_kinds(with_):
    assert reject(with_).with_ == with_


def test_reject_with_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="reject\\(with_='icmp-net-unreachable'\\): use auto, tcp-reset"):
        reject("icmp-net-unreachable")  # type: ignore[arg-type]


# -- rewrites and | ------------------------------------------------------------------------

def test_each_rewrite_factory_sets_its_field_only():
    fields = ("ttl", "dscp", "tos", "mss", "payload", "packet")
    got = {name: {f: getattr(CALLS[name](), f) for f in fields if getattr(CALLS[name](), f) is not None}
           for name in ("set_ttl", "set_dscp", "set_tos", "clamp_mss", "payload")}
    assert got == {"set_ttl": {"ttl": 5}, "set_dscp": {"dscp": 5}, "set_tos": {"tos": 5},
                   "clamp_mss": {"mss": 1200}, "payload": {"payload": b"x"}}
    assert mangle(ttl=9, dscp=46, mss=536) == Mangle(ttl=9, dscp=46, mss=536)


def test_or_combines_and_the_right_side_wins_a_field_both_set():
    assert set_ttl(3) | set_dscp(46) | clamp_mss(1200) == Mangle(ttl=3, dscp=46, mss=1200)
    assert set_ttl(3) | set_ttl(9) == set_ttl(9)
    assert (set_ttl(3) | payload(b"y", allow_resize=True)) == Mangle(ttl=3, payload=b"y", allow_resize=True)
    assert (payload(b"y", allow_resize=True) | set_ttl(3)).allow_resize  # kept once asked for
    assert set_ttl(3) | Mangle() == set_ttl(3)


def test_or_refuses_what_one_rewrite_cannot_hold():
    with pytest.raises(ValueError, match="give dscp or tos, not both"):
        set_dscp(10) | set_tos(4)
    with pytest.raises(ValueError, match="replace the payload or the whole packet, not both"):
        payload(b"x") | Mangle(packet=b"E" + bytes(19))
    with pytest.raises(TypeError):
        set_ttl(3) | accept()  # type: ignore[operator]


@pytest.mark.parametrize("kw", [dict(ttl=0), dict(ttl=256), dict(ttl=True), dict(ttl=5.0), dict(dscp=64),
                                dict(dscp=-1), dict(tos=256), dict(mss=0), dict(mss=65536)])
def test_rewrite_bounds(kw):
    (name, value), = kw.items()
    with pytest.raises(ValueError, match=f"{name}={value!r}: an integer"):
        Mangle(**kw)


def test_rewrite_bounds_are_inclusive():
    assert Mangle(ttl=1, dscp=0).ttl == 1 and Mangle(ttl=255, dscp=63).dscp == 63
    assert Mangle(tos=0).tos == 0 and Mangle(tos=255).tos == 255 and Mangle(mss=65535).mss == 65535


def test_payload_takes_bytes_like_or_scapy():
    assert payload(bytearray(b"ab")).payload == b"ab" and payload(memoryview(b"cd")).payload == b"cd"
    with pytest.raises(TypeError, match="payload\\(\\): bytes or a scapy packet, not str"):
        payload("text")
    scapy = pytest.importorskip("scapy.layers.inet")
    from scapy.packet import Raw

    whole = scapy.IP(dst="192.0.2.1") / scapy.UDP()
    assert payload(whole).packet == bytes(whole) and payload(whole).payload is None
    assert payload(Raw(b"zz")).payload == b"zz" and payload(Raw(b"zz")).packet is None


# -- route / shape -------------------------------------------------------------------------

def test_route_forms_and_text():
    assert route("uplink2") == Route("uplink2") and str(route("uplink2")) == "route(uplink2)"
    assert str(route(via="10.0.0.1")) == "route(via 10.0.0.1)"
    assert str(route(dev="up2")) == "route(dev up2)"
    assert str(route(via=ip_address("fd00::1"), dev="up2")) == "route(via fd00::1 dev up2)"
    assert route(option("t2")) == route("t2") and route(via=option("10.0.0.9")).via == "10.0.0.9"


@pytest.mark.parametrize("args,kw,message", [
    ((), {}, "give a declared table name, or via=ADDRESS and/or dev=INTERFACE"),
    (("t",), {"via": "10.0.0.1"}, "give a declared table name, or via"),
    ((), {"via": "gw"}, "route\\(via='gw'\\): not an IP address"),
    ((), {"dev": "x" * 16}, "not an interface name"),
    ((), {"dev": "a/b"}, "not an interface name"),
    ((), {"dev": ""}, "not an interface name"),
])
def test_bad_routes_are_refused(args, kw, message):
    with pytest.raises(ValueError, match=message):
        route(*args, **kw)


def test_shape_forms_and_refusals():
    assert shape("bulk") == Shape("bulk") and str(shape("bulk")) == "shape(bulk)"
    assert shape(option("fast")).cls == "fast"
    for bad in ("", 3, None):
        with pytest.raises(ValueError, match="give the name of a declared shaping class"):
            shape(bad)


# -- NAT texts not covered by test_nat -----------------------------------------------------

def test_nat_text_and_options():
    assert (str(masquerade()), str(masquerade((1000, 2000))), str(redirect("8080"))) == (
        "masquerade()", "masquerade(1000-2000)", "redirect(8080)")
    assert snat("10.0.0.1-10.0.0.9").target_text() == "10.0.0.1-10.0.0.9"
    assert snat("fd00::1", (80, 81)).target_text() == "[fd00::1]:80-81"
    assert snat(option("192.0.2.1")) == snat("192.0.2.1")
    s = snat("192.0.2.1")
    assert snat(s) is s
    assert masquerade().family is None and snat("fd00::1").family == 6


@pytest.mark.parametrize("call,message", [
    (lambda: masquerade("0"), "masquerade: '0' is not a port \\(1..65535\\)"),
    (lambda: redirect((90, 80)), "redirect: \\(90, 80\\) is not a port"),
    (lambda: redirect("http"), "redirect: 'http' is not a port or port range"),
    (lambda: snat("10.0.0.1-10.0.0.2-10.0.0.3"), "is not an address or range low-high"),
    (lambda: snat("host.example"), "snat: 'host.example' is not an IP address"),
])
def test_bad_nat_ports_and_ranges(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- parse_default -------------------------------------------------------------------------

@pytest.mark.parametrize("given,want", [
    ("accept", ACCEPT), ("ACCEPT", ACCEPT), ("drop", DROP), ("Drop", DROP), ("reject", Reject()),
    (ACCEPT, ACCEPT), (reject("tcp-reset"), Reject("tcp-reset")),
])
def test_parse_default(given, want):
    assert parse_default(given) == want


@pytest.mark.parametrize("given", ["continue", "", mark(1), set_ttl(1), dnat("10.0.0.1"), None, 0])
def test_parse_default_refuses_what_cannot_be_a_hook_default(given):
    with pytest.raises(ValueError) as e:
        parse_default(given)
    assert str(e.value) == f"a hook default must be accept, drop or reject, not {given!r}"
