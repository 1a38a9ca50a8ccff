"""Routing and shaping, the pure parts: declarations, rule compilation, placement refusals,
verdict application on fake packets (the kernel side is tests/kernel/test_route_shape.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nfhooks import Policy, PolicyError, accept, load_policy, route, shape
from nfhooks.features.base import EngineEnv
from nfhooks.features.routeshape import RouteShapeFeature
from nfhooks.hooks import PlacementError, check_verdict
from nfhooks.routing import RouteShapeError, parse_route
from nfhooks.rules import compile_policy
from nfhooks.shaping import parse_rate, tree_commands

POLICIES = Path(__file__).parents[2] / "policies"


def runtime(policy, rs):
    """The routing feature's runtime for (policy, rs), made as the engine makes it."""
    return RouteShapeFeature().runtime(EngineEnv(policy, rs, None, None))


# -- parsing ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,dst,fam,via,dev", [
    ("default via 10.0.2.1 dev up2", "0.0.0.0/0", 4, "10.0.2.1", "up2"),
    ("default via fd00::1", "::/0", 6, "fd00::1", None),
    ("10.9.0.0/16 dev up2", "10.9.0.0/16", 4, None, "up2"),
    ("::/0 dev wg0", "::/0", 6, None, "wg0"),
    ("default dev up2", "0.0.0.0/0", 4, None, "up2"),
])
def test_parse_route(text, dst, fam, via, dev):
    r = parse_route(text)
    assert (r.dst, r.family, r.via, r.dev) == (dst, fam, via, dev)


@pytest.mark.parametrize("text,msg", [
    ("default", "next hop"), ("default via nope", "not an IP address"), ("default via 10.0.0.1 dev", "KEY VALUE"),
    ("default gw 10.0.0.1", "unknown key"), ("10.0.0.0/8 via fd00::1", "mixes IPv4 and IPv6"),
    ("somewhere dev x", "not 'default' or a network"),
])
def test_parse_route_errors(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_route(text)


@pytest.mark.parametrize("text,bps", [("5mbit", 5_000_000), ("512kbit", 512_000), ("1gbit", 10**9),
                                      ("2mbps", 16_000_000), (1000, 1000), ("1.5mbit", 1_500_000)])
def test_parse_rate(text, bps):
    assert parse_rate(text) == bps


@pytest.mark.parametrize("bad", ["5 mbits", "fast", 0, -1, True, "0kbit"])
def test_parse_rate_errors(bad):
    with pytest.raises(ValueError):
        parse_rate(bad)


# -- declarations -------------------------------------------------------------------------

def test_table_declaration_errors():
    p = Policy()
    p.routing_table("up2", routes="default via 10.0.2.1 dev up2")
    with pytest.raises(PolicyError, match="declared twice"):
        p.routing_table("up2", routes=["default via 10.0.2.1 dev up2"])
    with pytest.raises(PolicyError, match="give its routes"):
        p.routing_table("x", routes=[])
    with pytest.raises(PolicyError, match="table_id 254 .* main"):
        p.routing_table("y", routes=["default dev up2"], table_id=254)
    with pytest.raises(PolicyError, match="masquerade=True or snat"):
        p.routing_table("z", routes=["default dev up2"], masquerade=True, snat="192.0.2.1")
    with pytest.raises(PolicyError, match=r"test_route_shape.py:\d+: routing table 'w': route 'default via x'"):
        p.routing_table("w", routes=["default via x"])
    with pytest.raises(PolicyError, match="rp_filter"):
        p.routing(rp_filter="sometimes")


def test_routes_follow_options_set_later():
    p = Policy()
    gw = p.option("gw", default="10.0.2.1", type="address")
    t = p.routing_table("up2", routes=[lambda: f"default via {gw.value} dev up2", gw and "::/0 dev up2"])
    p.apply_overrides({"gw": "10.7.7.7"})
    assert [r.text for r in t.routes] == ["default via 10.7.7.7 dev up2", "default dev up2"]


def test_shaping_declaration_errors():
    def decl(**kw):
        p = Policy()
        args = dict(classes={"bulk": dict(rate="5mbit", ceil="5mbit", prio=2), "fast": dict(rate="50mbit")})
        args.update(kw)
        return p.shaping("eth1", **args)

    d = decl(default="fast")
    assert d.rate == 55_000_000 and d.classes["fast"].ceil == 55_000_000 and d.classes["bulk"].prio == 2
    for kw, msg in [
        (dict(default="nope"), "default='nope' is not one of its classes"),
        (dict(rate="10mbit"), "add up to 55mbit, more than the link rate 10mbit"),
        (dict(classes={"b": dict(rate="5mbit", ceil="1mbit")}), "ceil 1mbit is below its rate"),
        (dict(classes={"b": dict(rate="5mbit", leaf="fq_codel")}), "leaf 'fq_codel': pfifo or tbf"),
        (dict(classes={"b": dict(rate="5mbit", burst=3)}), "unknown key"),
        (dict(classes={"b": dict(ceil="5mbit")}), "give its rate"),
        (dict(classes={"b": dict(rate="5mbit", prio=9)}), "prio 9"),
        (dict(classes={}), "give classes"),
    ]:
        with pytest.raises(PolicyError, match=msg):
            decl(**kw)
    p = Policy()
    with pytest.raises(PolicyError, match="no wildcard"):
        p.shaping("eth+", classes={"b": dict(rate="1mbit")})


def test_unknown_table_or_class_named_in_a_handler_is_refused_at_compile():
    p = Policy()
    p.routing_table("up2", routes=["default dev up2"])

    @p.prerouting()
    def steer(pkt):
        return route("up3")

    with pytest.raises(PolicyError, match=r"returns route\('up3'\), but no routing table 'up3' is declared"):
        compile_policy(p)
    q = Policy()
    q.shaping("eth1", classes={"bulk": dict(rate="1mbit")})

    @q.forward()
    def cls(pkt):
        return shape("fast")

    with pytest.raises(PolicyError, match=r"shape\('fast'\), but no shaping class 'fast'.*classes: bulk"):
        compile_policy(q)


# -- placement ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind,hook,ok", [
    ("route", "PREROUTING", True), ("route", "OUTPUT", True), ("route", "FORWARD", False),
    ("route", "INPUT", False), ("route", "POSTROUTING", False), ("shape", "FORWARD", True),
    ("shape", "OUTPUT", True), ("shape", "PREROUTING", True), ("shape", "INPUT", False),
    ("shape", "POSTROUTING", False),
])
def test_placements(kind, hook, ok):
    if ok:
        check_verdict(kind, hook, "mangle")
    else:
        with pytest.raises(PlacementError, match=f"{kind} cannot work at {hook}"):
            check_verdict(kind, hook, "mangle")


def test_route_at_forward_refused_at_load_with_the_line():
    p = Policy()
    with pytest.raises(PolicyError, match=r"returns route: route cannot work at FORWARD: .* It works at: "
                                          r"PREROUTING, OUTPUT"):
        @p.forward()
        def late(pkt):
            return route("up2")


def test_route_handlers_are_queued_from_mangle_for_new_connections_only():
    p = Policy()
    p.routing_table("up2", routes=["default dev up2"])

    @p.output(proto="tcp")
    def local(pkt):
        return route("up2")

    rs = compile_policy(p)
    assert p.handlers[0].table == "mangle"
    text = rs.render()
    assert "-A NFH-OUTPUT -p tcp -m conntrack --ctstate NEW" in text


# -- compilation --------------------------------------------------------------------------

def test_uplinks_compiles_restore_save_and_uplink_nat():
    pol = load_policy(POLICIES / "uplinks.py")
    rs = compile_policy(pol)
    f = rs.layout["route"]
    assert f.width == 2  # two tables: values 1, 2
    m = f"{f.mask:#x}"
    text = rs.render()
    for fam_text in text.split("# ip6tables"):
        assert "-A PREROUTING -m comment --comment nfhooks -j NFH-RESTORE\n-A PREROUTING -m comment --comment " \
               "nfhooks -j NFH-PREROUTING" in fam_text  # restore runs before any handler
        assert "-A OUTPUT -m comment --comment nfhooks -j NFH-RESTORE" in fam_text
        assert (f'-A NFH-RESTORE -m connmark ! --mark 0x0/{m} -m comment --comment "nfhooks route-shape" '
                f"-j CONNMARK --restore-mark --nfmask {m} --ctmask {m}") in fam_text
        assert (f'-A NFH-SAVE -m mark ! --mark 0x0/{m} -m comment --comment "nfhooks route-shape" '
                f"-j CONNMARK --save-mark --nfmask {m} --ctmask {m}") in fam_text
        assert (f'-A NFH-ROUTE-NAT -o up2 -m mark --mark {f.encode(2):#x}/{m} -m comment --comment '
                '"nfhooks route uplink2" -j MASQUERADE') in fam_text
    assert rs.routeshape is not None and [t.table_id for t in pol.routing_tables.values()] == [4201, 4202]


def test_shaping_compiles_classify_and_tc_tree():
    pol = load_policy(POLICIES / "shaping.py", {"dev": "up1"})
    rs = compile_policy(pol)
    f = rs.layout["class"]
    text = rs.render()
    assert (f'-A NFH-SAVE -o up1 -m mark --mark {f.encode(1):#x}/{f.mask:#x} -m comment --comment '
            '"nfhooks route-shape" -j CLASSIFY --set-class 4e46:0011') in text
    assert "route" not in rs.layout and "NFH-ROUTE-NAT" not in text
    decl = next(iter(pol.shaping_decls.values()))
    cmds = tree_commands(decl, {"bulk": 1, "interactive": 2})
    assert cmds[0] == ["tc", "qdisc", "replace", "dev", "up1", "root", "handle", "4e46:", "htb", "default", "12"]
    assert ["tc", "class", "add", "dev", "up1", "parent", "4e46:1", "classid", "4e46:11", "htb", "rate", "5mbit",
            "ceil", "5mbit", "prio", "2"] in cmds
    assert ["tc", "qdisc", "add", "dev", "up1", "parent", "4e46:12", "handle", "4e02:", "pfifo"] in cmds


def test_policies_without_routing_get_no_fields_or_chains():
    rs = compile_policy(load_policy(POLICIES / "firewall.py"))
    assert "route" not in rs.layout and "class" not in rs.layout and rs.routeshape is None
    assert "NFH-RESTORE" not in rs.render()


# -- verdicts on fake packets -------------------------------------------------------------

def test_route_and_shape_set_their_masked_fields_and_accept(dispatch):
    p = Policy()
    p.routing_table("a", routes=["default dev up1"])
    p.routing_table("b", routes=["default dev up2"])
    p.shaping("up2", classes={"bulk": dict(rate="1mbit"), "fast": dict(rate="9mbit")})

    @p.prerouting()
    def steer(pkt):
        return route("b")

    @p.output()
    def cls(pkt):
        return shape("fast")

    d = dispatch(p)
    rs = d.ruleset
    pk = d.send(proto="tcp", dport=80, mark=0x1234)
    assert pk.calls == ["accept"]
    assert rs.layout["route"].decode(pk.set_marks[0]) == 2 and pk.set_marks[0] & 0xFFFF == 0x1234
    pk = d.send(proto="tcp", dport=80, mark=rs.layout["route"].encode(1), handler=1)
    assert pk.calls == ["accept"]
    assert rs.layout["class"].decode(pk.set_marks[0]) == 2 and rs.layout["route"].decode(pk.set_marks[0]) == 1


def test_unknown_table_at_runtime_gives_the_default(dispatch):
    p = Policy()
    p.routing_table("a", routes=["default dev up1"])
    name = "zz"

    @p.prerouting()
    def steer(pkt):
        return route(name)  # not a literal: the compile-time check cannot see it

    d = dispatch(p)
    rs = d.ruleset
    pk = d.send(proto="tcp", dport=80)
    assert pk.calls == ["accept"] and not any(rs.layout["route"].decode(m) for m in pk.set_marks)
    with pytest.raises(RouteShapeError, match="no routing table 'zz'"):
        runtime(p, rs).bits(None, route("zz"))


def test_route_verdict_values():
    with pytest.raises(ValueError, match="declared table name, or via"):
        route()
    with pytest.raises(ValueError, match="not an IP address"):
        route(via="gateway")
    assert str(route(via="10.0.0.1", dev="up2")) == "route(via 10.0.0.1 dev up2)"
    with pytest.raises(ValueError):
        shape("")
    assert accept() is accept()


def test_hot_reload_keeps_routing_only_when_unchanged():
    from nfhooks import routing

    def compiled(name, sets=None, generation=1):
        pol = load_policy(POLICIES / name, sets)
        rs = compile_policy(pol, generation=generation)
        return rs, runtime(pol, rs)

    (_, ra), (b, rb) = compiled("uplinks.py"), compiled("uplinks.py", generation=2)
    assert routing._signature(ra) == routing._signature(rb)
    assert "NFH-RESTORE-2" in b.render()  # the second generation's chains do not clash
    routing.reload(compiled("firewall.py")[1], compiled("firewall.py", generation=2)[1])  # neither routes: fine
    for _, new in (compiled("shaping.py", generation=2), compiled("uplinks.py", {"gw2": "10.9.9.9"}, 2),
                   compiled("firewall.py", generation=2)):
        with pytest.raises(RouteShapeError, match="restart the engine"):
            routing.reload(ra, new)


def test_missing_qdisc_is_named():
    from nfhooks.shaping import _explain

    msg = _explain("Error: Specified qdisc kind is unknown.", ["tc", "qdisc", "add", "dev", "x", "root", "tbf"])
    assert msg.startswith("the kernel has no tbf qdisc (CONFIG_NET_SCH_TBF; modprobe sch_tbf)")
