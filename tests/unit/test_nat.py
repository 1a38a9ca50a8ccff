"""NAT verdicts without root: parsing, placement, compiled rules, target allocation, dispatch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nfhooks import Policy, PolicyError, accept, dnat, masquerade, redirect, snat
from nfhooks.fake import fake_bytes, fake_packet
from nfhooks.marks import MarkLayout, core_layout
from nfhooks.nat import NatError, NatTargets
from nfhooks.loader import load_policy
from nfhooks.rules import compile_policy, nat_rule

ROOT = Path(__file__).parents[2]


# -- the verdicts ------------------------------------------------------------------------

@pytest.mark.parametrize("args,text,family", [
    (("10.0.2.10:8080",), "10.0.2.10:8080", 4),
    (("10.0.2.10",), "10.0.2.10", 4),
    (("10.0.2.10", 8080), "10.0.2.10:8080", 4),
    (("10.0.2.10", "8000-8010"), "10.0.2.10:8000-8010", 4),
    (("10.0.2.10-10.0.2.20:80",), "10.0.2.10-10.0.2.20:80", 4),
    (("[fd00::1]:8080",), "[fd00::1]:8080", 6),
    (("fd00::1",), "fd00::1", 6),
    (("FD00:0::1", 53), "[fd00::1]:53", 6),
])
def test_dnat_targets_parse_to_iptables_text(args, text, family):
    v = dnat(*args)
    assert (v.target_text(), v.family, v.kind) == (text, family, "dnat")
    assert v.target_opts() == (("to-destination", text),)


@pytest.mark.parametrize("args,message", [
    (("nowhere",), "not an IP address"),
    (("10.0.2.10:80", 81), "given twice"),
    (("10.0.2.10:0",), "not a port"),
    (("10.0.2.10:99999",), "not a port"),
    (("10.0.2.20-10.0.2.10",), "low-high"),
    (("10.0.2.1-fd00::1",), "low-high"),
    (("[fd00::1",), "[addr]:port"),
    ((None,), "not an address"),
])
def test_bad_nat_targets_say_what_is_wrong(args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        dnat(*args)


def test_masquerade_redirect_snat_and_options():
    assert masquerade().target_opts() == () and masquerade("1024-2000").target_opts() == (("to-ports", "1024-2000"),)
    assert redirect(8080).target_opts() == (("to-ports", "8080"),) and redirect().family is None
    assert snat("192.0.2.1").target_opts() == (("to-source", "192.0.2.1"),)
    p = Policy()
    opt = p.option("to", default="10.0.0.1:80", type=dnat)
    assert dnat(opt) is opt.value and dnat(opt.value) is opt.value  # a checked option passes through
    assert dnat("10.0.0.1:80") == dnat("10.0.0.1", 80) and hash(dnat("10.0.0.1:80")) == hash(dnat("10.0.0.1", 80))


# -- placement (load time) ---------------------------------------------------------------

def test_nat_handlers_are_queued_from_mangle_and_refused_where_the_kernel_cannot():
    p = Policy()

    @p.output(proto="tcp", dport=80)
    def to_proxy(pkt):
        return dnat("10.0.2.10:8080")

    @p.input(proto="tcp", dport=22)
    def hide(pkt):
        return snat("192.0.2.1")

    assert [h.table for h in p.handlers] == ["mangle", "mangle"]
    with pytest.raises(PolicyError, match="masquerade cannot work at PREROUTING.*outgoing interface"):
        @p.prerouting()
        def masq(pkt):
            return masquerade()
    with pytest.raises(PolicyError, match=r"redirect cannot work at POSTROUTING.*PREROUTING, OUTPUT"):
        @p.postrouting()
        def redir(pkt):
            return redirect(8080)
    with pytest.raises(PolicyError, match="snat cannot work at PREROUTING") as e:
        @p.prerouting()
        def early(pkt):
            return snat("192.0.2.1")
    assert e.value.line is not None and e.value.file.endswith("test_nat.py")


def test_example_policies_load():
    for name in ("nat.py", "loadbalance.py"):
        pol = load_policy(ROOT / "policies" / name)
        assert all(h.table == "mangle" for h in pol.handlers)
    with pytest.raises(PolicyError, match=r"nat.py:\d+: --set proxy=nowhere: dnat"):
        load_policy(ROOT / "policies" / "nat.py", {"proxy": "nowhere"})
    with pytest.raises(PolicyError, match="backends"):
        load_policy(ROOT / "policies" / "loadbalance.py", {"backends": " , "})


# -- compilation -------------------------------------------------------------------------

def nat_policy(**match) -> Policy:
    p = Policy()

    @p.prerouting(proto="tcp", dport=80, **match)
    def fwd(pkt):
        return dnat("10.0.2.10:8080")

    return p


def test_nat_queue_rule_matches_new_connections_only():
    text = compile_policy(nat_policy()).render()
    q = next(line for line in text.splitlines() if "NFQUEUE" in line)
    assert "-p tcp -m tcp --dport 80 -m conntrack --ctstate NEW -m mark" in q
    text = compile_policy(nat_policy(ctstate="new,related")).render()
    q = next(line for line in text.splitlines() if "NFQUEUE" in line)
    assert "--ctstate NEW,RELATED -m mark" in q and q.count("conntrack") == 1


def test_nat_chains_exist_empty_in_both_families_with_their_jumps():
    rs = compile_policy(nat_policy())
    for fam in (4, 6):
        assert rs.chains[(fam, "nat")] == ["NFH-PREROUTING"]
        assert [r.comment for r in rs.rules[(fam, "nat")]] == ["nfhooks gen", "nfhooks gen"]  # guard only
        assert [j.render() for j in rs.jumps[(fam, "nat")]] == \
            ["-A PREROUTING -m comment --comment nfhooks -j NFH-PREROUTING"]
    assert "*nat\n:NFH-PREROUTING - [0:0]\n-A PREROUTING -m comment --comment nfhooks -j NFH-PREROUTING\n" \
        "-A NFH-PREROUTING -m mark --mark 0x0/0x60000000 -m comment --comment \"nfhooks gen\" " \
        "-j MARK --set-xmark 0x20000000/0x60000000\n" \
        "-A NFH-PREROUTING -m mark ! --mark 0x20000000/0x60000000 -m comment --comment \"nfhooks gen\" -j RETURN\n" \
        "COMMIT" in rs.render()


def test_nat_mark_field_sized_by_the_target_bound():
    assert compile_policy(nat_policy()).layout["nat"].width == 6  # 63 targets
    rs = compile_policy(nat_policy(), nat_targets=3)
    assert rs.layout["nat"].width == 2 and rs.nat_targets == 3
    assert rs.layout["nat"].mask & rs.layout.user_mask == 0
    p = Policy()
    p.input(proto="tcp")(lambda pkt: accept())
    assert "nat" not in compile_policy(p).layout and compile_policy(p).nat_targets == 0
    with pytest.raises(PolicyError, match="nat-targets 0"):
        compile_policy(nat_policy(), nat_targets=0)
    with pytest.raises(PolicyError, match="smaller bound takes fewer bits"):
        compile_policy(nat_policy(), nat_targets=5000, mark_mask=0xFF000000)


@pytest.mark.parametrize("verdict,proto,expected", [
    (dnat("10.0.2.10:8080"), "tcp", "-p tcp -m mark --mark 0x100000/0x1f80000 -m comment "
                                    "--comment \"nfhooks nat 2\" -j DNAT --to-destination 10.0.2.10:8080"),
    (dnat("10.0.2.10"), "tcp", "-m mark --mark 0x100000/0x1f80000 -m comment --comment \"nfhooks nat 2\" "
                               "-j DNAT --to-destination 10.0.2.10"),
    (dnat("[fd00::1]:80"), "udp", "-p udp -m mark --mark 0x100000/0x1f80000 -m comment "
                                  "--comment \"nfhooks nat 2\" -j DNAT --to-destination [fd00::1]:80"),
    (masquerade(), None, "-m mark --mark 0x100000/0x1f80000 -m comment --comment \"nfhooks nat 2\" -j MASQUERADE"),
    (redirect(8080), "tcp", "-p tcp -m mark --mark 0x100000/0x1f80000 -m comment "
                            "--comment \"nfhooks nat 2\" -j REDIRECT --to-ports 8080"),
    (snat("192.0.2.1"), None, "-m mark --mark 0x100000/0x1f80000 -m comment "
                              "--comment \"nfhooks nat 2\" -j SNAT --to-source 192.0.2.1"),
])
def test_nat_rule_text(verdict, proto, expected):
    layout = core_layout(1, extra=[("nat", 6)])
    assert nat_rule("POSTROUTING", 2, verdict, layout, proto).render() == "-A NFH-POSTROUTING " + expected


# -- targets installed on demand ------------------------------------------------------------

@dataclass
class Recorder:
    rules: list[tuple[int, str, str, str]] = field(default_factory=list)
    fail_with: Exception | None = None

    def __call__(self, family: int, table: str, hook: str, rule) -> None:
        if self.fail_with:
            raise self.fail_with
        self.rules.append((family, table, hook, rule.render()))


def targets(limit: int = 63, **kw) -> tuple[NatTargets, Recorder, list[int]]:
    rec, seen = Recorder(**kw), []
    layout: MarkLayout = core_layout(1, extra=[("nat", 6)])
    return NatTargets(layout, limit, rec, seen.append), rec, seen


def test_targets_get_indices_rules_once_and_are_reused():
    t, rec, seen = targets()
    f = t.field
    syn = fake_packet(hook="PREROUTING", dport=80)
    assert f.decode(t.mark_bits(syn, dnat("10.0.2.10:8080"))) == 1
    assert f.decode(t.mark_bits(syn, dnat("10.0.2.11:8080"))) == 2
    assert f.decode(t.mark_bits(syn, dnat("10.0.2.10", 8080))) == 1  # the same target again
    assert len(rec.rules) == 2 and seen == [1, 2]
    assert rec.rules[0][:3] == (4, "nat", "PREROUTING") and "-p tcp" in rec.rules[0][3]
    udp = fake_packet(hook="PREROUTING", proto="udp", dport=53)
    assert f.decode(t.mark_bits(udp, dnat("10.0.2.10:8080"))) == 3  # ports need the protocol in the rule
    v6 = fake_packet(hook="PREROUTING", src="fd00::2", dst="fd00::3")
    assert f.decode(t.mark_bits(v6, redirect())) == 4 and rec.rules[-1][0] == 6
    assert len(t) == 4 and t.describe()[0].startswith("  1 ipv4 PREROUTING dnat(10.0.2.10:8080)")


def test_past_the_bound_is_a_clear_error_and_installs_nothing():
    t, rec, _ = targets(limit=2)
    syn = fake_packet(hook="PREROUTING")
    t.mark_bits(syn, dnat("10.0.0.1"))
    t.mark_bits(syn, dnat("10.0.0.2"))
    with pytest.raises(NatError, match=r"distinct NAT target 3, past the bound of 2 \(--nat-targets"):
        t.mark_bits(syn, dnat("10.0.0.3"))
    assert len(rec.rules) == 2
    assert t.field.decode(t.mark_bits(syn, dnat("10.0.0.2"))) == 2  # known targets still work


def test_wrong_family_portless_protocol_and_a_refused_rule():
    t, rec, _ = targets()
    with pytest.raises(NatError, match="IPv6 target for an IPv4 packet"):
        t.mark_bits(fake_packet(hook="PREROUTING"), dnat("[fd00::1]:80"))
    with pytest.raises(NatError, match="names ports, but this packet is icmp"):
        t.mark_bits(fake_packet(hook="PREROUTING", proto="icmp"), dnat("10.0.0.1:80"))
    t, rec, _ = targets(fail_with=RuntimeError("no such target"))
    for _ in range(2):  # the second attempt does not ask the kernel again
        with pytest.raises(NatError, match="kernel refused the nat rule.*no such target"):
            t.mark_bits(fake_packet(hook="PREROUTING"), dnat("10.0.0.1"))
    assert len(t) == 0


# -- the dispatcher --------------------------------------------------------------------------

def test_dispatcher_sets_the_nat_field_masked_and_accepts(dispatch):
    d = dispatch(nat_policy(), nat_targets=2)
    rs = d.ruleset
    rec = Recorder()
    d.use(nat=NatTargets(rs.layout, rs.nat_targets, rec, d.metrics.set_nat_targets))
    pk = d.send(fake_bytes(dport=80), mark=0x1234 | rs.layout["nat"].mask)
    assert pk.calls == ["accept"]
    assert pk.set_marks == [0x1234 | rs.layout["nat"].encode(1)]  # user bits kept, old nat bits replaced
    assert d.sample("nfhooks_handler_packets_total",
                    {"hook": "PREROUTING", "handler": "fwd", "verdict": "dnat"}) == 1
    assert d.sample("nfhooks_nat_targets") == 1


def test_dispatcher_turns_a_nat_error_into_the_hook_default(dispatch):
    p = Policy(defaults={"PREROUTING": "drop"})

    @p.prerouting(proto="tcp")
    def every_port(pkt):
        return dnat("10.0.0.1", pkt.dport)

    d = dispatch(p, nat_targets=1)
    d.use(nat=NatTargets(d.ruleset.layout, d.ruleset.nat_targets, Recorder()))
    first, second = d.send(fake_bytes(dport=80)), d.send(fake_bytes(dport=81))
    assert first.calls == ["accept"] and second.calls == ["drop"]
    assert d.sample("nfhooks_handler_errors_total", {"hook": "PREROUTING", "handler": "every_port"}) == 1
