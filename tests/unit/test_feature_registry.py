"""The Feature interface: the registry's order, each feature's pure parts (mark fields, rules),
and a new feature plugged into the compiler without touching it (issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nfhooks import Policy, accept, dnat, route, shape
from nfhooks.features.base import ChainContext, CompileContext, Feature
from nfhooks.features.registry import FEATURES
from nfhooks.loader import load_policy
from nfhooks.rulebuild import COMMENT, Rule, comment, mark
from nfhooks.rules import compile_policy

GOLDEN = Path(__file__).resolve().parent / "golden"


def ctx(policy: Policy, nat_targets: int = 63, flow_generation: int = 1) -> CompileContext:
    return CompileContext(policy, nat_targets, 1, flow_generation)


def test_registry_order_is_the_mark_field_order() -> None:
    assert [f.name for f in FEATURES] == ["nat", "offload", "routeshape", "sets"]
    p = load_policy(GOLDEN / "kitchen_sink.py")
    fields = [n for f in FEATURES for n, _ in f.mark_fields(ctx(p, 3))]
    layout = compile_policy(p, mark_mask=0xFFFFFFF0, nat_targets=3).layout
    assert list(layout.fields)[4:] == fields  # after self, gen, action, resume
    assert fields == ["nat", "flowgen", "flow:INPUT:orig", "flow:INPUT:reply", "flow:FORWARD:orig",
                      "flow:FORWARD:reply", "route", "class"]


def test_a_policy_without_features_gets_no_feature_fields() -> None:
    p = Policy("plain")

    @p.input(proto="tcp", dport=22)
    def ssh(pkt):
        return accept()

    assert all(f.mark_fields(ctx(p)) == [] for f in FEATURES)
    rs = compile_policy(p)
    assert list(rs.layout.fields) == ["self", "gen", "action", "resume"]
    assert rs.nat_targets == 0 and rs.flow_generation == 0 and rs.routeshape is None


def test_nat_feature_fields_tables_and_new_only() -> None:
    p = Policy("n")

    @p.prerouting(proto="tcp", dport=80)
    def fwd(pkt):
        return dnat("10.0.0.2:8080")

    nat = next(f for f in FEATURES if f.name == "nat")
    assert nat.mark_fields(ctx(p, 7)) == [("nat", 3)]
    assert nat.hook_tables(ctx(p), "PREROUTING") == {"nat"} and nat.hook_tables(ctx(p), "INPUT") == set()
    assert nat.new_only(p.handlers[0])
    assert nat.keeps_empty_chain(ctx(p), 6, "nat", "PREROUTING")
    assert "--nat-targets 63" in nat.layout_hint(ctx(p))
    with pytest.raises(Exception, match="--nat-targets 0"):
        nat.check(ctx(p, 0))
    rs = compile_policy(p, nat_targets=7)
    assert rs.nat_targets == 7 and rs.chains[(4, "nat")] == ["NFH-PREROUTING"]


def test_offload_feature_rules_sit_before_the_flow_handlers_queue_rule() -> None:
    p = Policy("f")

    @p.input(proto="tcp", dport=80, flow=True)
    def web(pkt):
        return accept()

    off = next(f for f in FEATURES if f.name == "offload")
    with pytest.raises(ValueError, match="flow_generation"):
        off.mark_fields(ctx(p, flow_generation=8))
    rs = compile_policy(p, flow_generation=5)
    rules = [r.render() for r in rs.rules[(4, "filter")] if r.chain == "NFH-INPUT"]
    offload = [i for i, r in enumerate(rules) if '"nfhooks offload web"' in r]
    queue = [i for i, r in enumerate(rules) if "NFQUEUE" in r]
    assert len(offload) == 2 and queue and max(offload) < queue[0]
    assert "NFH-FLOW-INPUT" in rs.chains[(4, "filter")] and rs.flow_generation == 5


def test_routeshape_feature_queues_first_packets_and_adds_its_chains() -> None:
    p = Policy("r")
    p.routing_table("up2", "default via 10.0.12.2 dev up2")
    p.shaping("up2", classes={"bulk": dict(rate="5mbit")})

    @p.prerouting(proto="tcp")
    def pick(pkt):
        return route("up2") if pkt.dport == 80 else shape("bulk")

    rsf = next(f for f in FEATURES if f.name == "routeshape")
    assert [n for n, _ in rsf.mark_fields(ctx(p))] == ["route", "class"]
    assert rsf.new_only(p.handlers[0])
    rs = compile_policy(p)
    assert {"NFH-RESTORE", "NFH-SAVE"} <= set(rs.chains[(6, "mangle")])
    queue = next(r.render() for r in rs.rules[(4, "mangle")] if r.target == "NFQUEUE")
    assert "--ctstate NEW" in queue


class Tagger(Feature):
    """A feature the compiler has never heard of: one mark field, a rule before every queue
    rule, its own chain -- what issue 16 (kernel sets) will look like."""

    name = "tagger"

    def mark_fields(self, c: CompileContext) -> list[tuple[str, int]]:
        return [("tag", 2)]

    def before_queue(self, c: CompileContext, chain: ChainContext, handler) -> list[Rule]:
        f = chain.layout["tag"]
        return [Rule(chain.chain, "MARK", (("set-xmark", f"{f.encode(1):#x}/{f.mask:#x}"),),
                     matches=(mark(0, f.mask), comment(f"{COMMENT} tag {handler.name}")))]

    def add_rules(self, c: CompileContext, rs) -> None:
        for key in list(rs.rules):
            rs.chains[key].append("NFH-TAG")
            rs.rules[key].append(Rule("NFH-TAG", "RETURN", matches=(comment(COMMENT),)))


def test_a_new_feature_plugs_in_without_touching_the_compiler() -> None:
    p = Policy("t")

    @p.input(proto="tcp", dport=22)
    def ssh(pkt):
        return accept()

    plain = compile_policy(p)
    rs = compile_policy(p, features=(*FEATURES, Tagger()))
    assert list(rs.layout.fields)[-1] == "tag"
    assert rs.layout["resume"] == plain.layout["resume"]  # the features before it did not move
    rules = [r.render() for r in rs.rules[(4, "filter")]]
    tag = next(i for i, r in enumerate(rules) if '"nfhooks tag ssh"' in r)
    assert "NFQUEUE" in rules[tag + 1]
    assert "NFH-TAG" in rs.chains[(6, "filter")]
    assert rs.render().count(":NFH-TAG - [0:0]") == 2  # IPv4 and IPv6


def test_handler_source_is_parsed_once_and_shared() -> None:
    """introspect.Source: the verdict scan, flow checks, gso_safe and the route/shape scans
    all read the tree parsed when the handler was declared."""
    from nfhooks.introspect import option_value, parse
    from nfhooks.policy import verdict_calls
    from nfhooks.queue import gso_safe

    p = Policy("s")
    opt = p.option("port", default=80, type="port")

    @p.prerouting(proto="tcp")
    def pick(pkt):
        if pkt.payload:
            return route(via="10.0.0.1", dev="up9")
        return None

    h = p.handlers[0]
    assert h.source.readable and h.source.name == "pick"
    assert verdict_calls(h.source) == verdict_calls(pick) == {"route": h.line + 3}  # h.line: the decorator
    assert [line for _, _, line in h.source.calls({"route"})] == [h.line + 3]
    assert gso_safe(h) == (False, "it reads pkt.payload")
    assert not parse(len).readable  # a builtin has no source: checks then see nothing
    assert option_value(opt) == 80 and option_value("x") == "x"
