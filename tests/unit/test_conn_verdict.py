"""Connection verdicts, pure parts (nfhooks/connverdict.py): the verdict values, which handlers
get kernel rules (from their source), the mark fields and the compiled rules, the refusals, what
the dispatcher does with such a verdict, and the metrics read from the rules' counters."""

from __future__ import annotations

import inspect

import pytest
from prometheus_client import CollectorRegistry

from nfhooks import Policy, PolicyError, accept, drop, reject
from nfhooks.connverdict import CODES, conn_handlers, kinds, layout_fields
from nfhooks.fake import fake_bytes
from nfhooks.marks import ACTION_CONNVERDICT, DEFAULT_MARK_MASK
from nfhooks.offload import FlowOffload, OffloadCollector, all_flow_mask
from nfhooks.rules import compile_policy
from nfhooks.verdict import Accept, AcceptConnection, Drop, DropConnection, Reject, RejectConnection


def web_policy() -> Policy:
    p = Policy("t")

    @p.input(proto="tcp", dport=80)
    def web(pkt):
        if not pkt.payload:
            return accept()
        return reject(connection=True) if b"bad" in pkt.payload else accept(connection=True)

    @p.forward(proto="udp", dport=53)
    def dns(pkt):
        return drop(connection=True) if pkt.payload.startswith(b"x") else None

    @p.input(proto="tcp", dport=22)
    def ssh(pkt):
        return accept()

    return p


def lines(rs, part: str, family: int = 4) -> list[str]:
    return [line for line in rs.render([family]).splitlines() if part in line]


def test_verdict_values():
    assert accept() is accept() and type(accept()) is Accept and not accept().connection
    a, d, r = accept(connection=True), drop(connection=True), reject(connection=True)
    assert (type(a), type(d), type(r)) == (AcceptConnection, DropConnection, RejectConnection)
    assert isinstance(a, Accept) and isinstance(d, Drop) and isinstance(r, Reject)
    assert (a.kind, d.kind, r.kind) == ("accept", "drop", "reject")  # counted under their verdict
    assert a.connection and d.connection and r.connection and a != accept() and r != reject()
    assert str(a) == "accept(connection=True)" and str(r) == "reject(connection=True)"
    assert reject("tcp-reset", connection=True).with_ == "tcp-reset"
    with pytest.raises(ValueError, match="connection"):
        reject("admin-prohibited", connection=True)  # the kernel rule keeps one reject kind
    assert type(drop(connection=False)) is Drop


def test_the_compiler_knows_which_handlers_return_connection_verdicts():
    p = web_policy()
    assert [h.name for h in conn_handlers(p.handlers)] == ["web", "dns"]
    assert kinds(p.handlers[0]) == {"accept", "reject"} and kinds(p.handlers[1]) == {"drop"}
    q = Policy("q")

    @q.input(proto="tcp", dport=80)
    def plain(pkt):
        return accept(connection=False)

    assert layout_fields(q) == [] and "NFH-CONN-" not in compile_policy(q).render()
    assert compile_policy(q).flow_generation == 0


def test_fields_inside_the_mask_never_overlapping_and_reset_with_the_generation():
    rs = compile_policy(web_policy(), flow_generation=4)
    assert layout_fields(web_policy()) == [("conn:INPUT:filter", 2), ("conn:FORWARD:filter", 2)]
    fields = list(rs.layout.fields.values())
    for f in fields:
        assert f.mask & DEFAULT_MARK_MASK == f.mask
        for g in fields:
            assert f is g or not f.mask & g.mask
    L = rs.layout
    assert "flowgen" in L and rs.flow_generation == 4
    reset = all_flow_mask(L)
    assert reset & L["conn:INPUT:filter"].mask and reset & L["conn:FORWARD:filter"].mask
    # pkt.connmark / pkt.mark show the user's bits only: the restore rule and the dispatcher use the
    # user mask, which never holds a conn field
    assert not L.user_mask & (L["conn:INPUT:filter"].mask | L["conn:FORWARD:filter"].mask)


@pytest.mark.parametrize("family", [4, 6])
def test_compiled_kernel_rules(family):
    rs = compile_policy(web_policy(), flow_generation=4)
    L = rs.layout
    g, f, act, res = L["flowgen"], L["conn:INPUT:filter"], L["action"], L["resume"]
    icmp = "icmp6-port-unreachable" if family == 6 else "icmp-port-unreachable"
    want = {
        "accept": f"-A NFH-INPUT -m connmark --mark {g.encode(4) | f.encode(1):#x}/{g.mask | f.mask:#x} "
                  '-m comment --comment "nfhooks conn accept" -j ACCEPT',
        "reject": f"-A NFH-INPUT -p tcp -m connmark --mark {g.encode(4) | f.encode(3):#x}/{g.mask | f.mask:#x} "
                  '-m comment --comment "nfhooks conn reject" -j REJECT --reject-with tcp-reset',
        "reject2": f"-A NFH-INPUT -m connmark --mark {g.encode(4) | f.encode(3):#x}/{g.mask | f.mask:#x} "
                   f'-m comment --comment "nfhooks conn reject" -j REJECT --reject-with {icmp}',
    }
    text = rs.render([family]).splitlines()
    inp = [x for x in text if x.startswith("-A NFH-INPUT ")]
    for w in want.values():
        assert w in inp
    # before every handler's queue rule: a decided connection never reaches Python at INPUT
    first_queue = next(i for i, x in enumerate(inp) if "NFQUEUE" in x)
    assert max(inp.index(w) for w in want.values()) < first_queue
    assert not any('"nfhooks conn drop"' in x for x in inp)  # web never drops: no rule
    jump = (f"-A NFH-INPUT -m mark --mark {act.encode(ACTION_CONNVERDICT):#x}/{act.mask:#x} "
            '-m comment --comment "nfhooks connverdict" -g NFH-CONN-INPUT')
    assert jump in inp
    save = [x for x in text if x.startswith("-A NFH-CONN-INPUT ")]
    assert save[0] == (f"-A NFH-CONN-INPUT -m connmark ! --mark {g.encode(4):#x}/{g.mask:#x} -m comment "
                       f'--comment "nfhooks flow generation" -j CONNMARK --set-xmark {g.encode(4):#x}/'
                       f"{all_flow_mask(L):#x}")
    pos = res.encode(rs.positions["web"])
    assert (f"-A NFH-CONN-INPUT -m mark --mark {pos | f.encode(1):#x}/{res.mask | f.mask:#x} -m connmark "
            f'--mark 0x0/{f.mask:#x} -m comment --comment "nfhooks conn accept web" -j CONNMARK --set-xmark '
            f"{f.encode(1):#x}/{f.mask:#x}") in save
    assert any('"nfhooks conn reject web"' in x for x in save)
    assert save[-2:] == [f"-A NFH-CONN-INPUT -m comment --comment nfhooks -j MARK --set-xmark "
                         f"0x0/{act.mask | res.mask | f.mask:#x}",
                         "-A NFH-CONN-INPUT -m comment --comment nfhooks -j ACCEPT"]
    fwd = [x for x in text if x.startswith(("-A NFH-FORWARD ", "-A NFH-CONN-FORWARD "))]
    assert any('"nfhooks conn drop" -j DROP' in x for x in fwd)
    assert any('"nfhooks conn drop dns"' in x for x in fwd)
    assert not any("REJECT" in x and "conn" in x for x in fwd)


def _line_of(func, text: str) -> int:
    src, start = inspect.getsourcelines(func)
    return start + next(i for i, line in enumerate(src) if text in line)


def test_refusals_name_file_and_line():
    p = Policy("t")

    @p.prerouting(proto="udp", table="raw")
    def early(pkt):
        return drop(connection=True)

    with pytest.raises(PolicyError, match="raw table") as e:
        compile_policy(p)
    assert e.value.line == _line_of(early, "drop(connection=True)")

    q = Policy("q")

    def both(pkt):
        return accept(connection=True)

    with pytest.raises(PolicyError, match="flow=True") as e:
        q.input(proto="tcp", dport=80, flow=True)(both)
    assert e.value.line == _line_of(both, "accept(connection=True)")


def test_dispatcher_keeps_the_decision_via_repeat(dispatch):
    d = dispatch(web_policy(), flow_generation=3)
    d = d.use(offload=FlowOffload(d.ruleset, d.policy))
    L = d.ruleset.layout
    act, res, f = L["action"], L["resume"], L["conn:INPUT:filter"]
    handshake = d.send(proto="tcp", dport=80, handler="web", mark=0x1234)
    assert handshake.calls == ["accept"]  # no payload: a plain accept, nothing kept
    ok = d.send(proto="tcp", dport=80, payload=b"GET / HTTP/1.1\r\n", handler="web", mark=0x1234)
    assert ok.calls == ["repeat"]
    m = ok.set_marks[0]
    assert (act.decode(m), res.decode(m), f.decode(m)) == (ACTION_CONNVERDICT, d.ruleset.positions["web"],
                                                           CODES["accept"])
    assert m & 0xFFFF == 0x1234  # the user's bits kept
    bad = d.send(proto="tcp", dport=80, payload=b"bad", handler="web")
    assert bad.calls == ["repeat"] and f.decode(bad.set_marks[0]) == CODES["reject"]
    assert d.sample("nfhooks_handler_packets_total", {"hook": "INPUT", "handler": "web", "verdict": "accept"}) == 2
    assert d.sample("nfhooks_handler_packets_total", {"hook": "INPUT", "handler": "web", "verdict": "reject"}) == 1
    fd = L["conn:FORWARD:filter"]
    gone = d.send(fake_bytes(proto="udp", dport=53, payload=b"xyz", hook="FORWARD"), handler="dns")
    assert gone.calls == ["repeat"] and fd.decode(gone.set_marks[0]) == CODES["drop"]


def test_a_connection_verdict_the_scan_missed_gives_the_default(dispatch):
    p = Policy("t", defaults={"INPUT": "drop"})
    decided = accept(connection=True)

    @p.input(proto="tcp", dport=80)
    def hidden(pkt):
        return decided  # no accept(connection=...) call in the source: no rules for it

    @p.input(proto="tcp", dport=81)
    def seen(pkt):
        return accept(connection=True)

    d = dispatch(p, flow_generation=2)
    d = d.use(offload=FlowOffload(d.ruleset, d.policy))
    assert d.send(proto="tcp", dport=80, handler="hidden").calls == ["drop"]
    assert d.sample("nfhooks_handler_errors_total", {"hook": "INPUT", "handler": "hidden"}) == 1


def test_metrics_come_from_the_rule_counters():
    p = web_policy()
    rs = compile_policy(p, flow_generation=2)
    off = FlowOffload(rs, p)
    counts = {'"nfhooks conn accept web"': 3, '"nfhooks conn reject web"': 1, '"nfhooks conn accept"': 700,
              '"nfhooks conn reject"': 2, '"nfhooks conn drop dns"': 4, '"nfhooks conn drop"': 40}
    saved = "\n".join(f"[{n}:{n * 60}] {line}" for part, n in counts.items() for line in lines(rs, part))
    off.saved = lambda: [saved, saved.replace("NFH-INPUT ", "NFH-INPUT-2 ")]  # both families' texts
    c = off.counters()
    assert c["conn"][("INPUT", "web", "accept")] == 6 and c["conn"][("FORWARD", "dns", "drop")] == 8
    assert c["connpkts"] == {("INPUT", "accept"): 1400, ("INPUT", "reject"): 2 * 2 * 2, ("FORWARD", "drop"): 80}
    reg = CollectorRegistry()
    reg.register(OffloadCollector(lambda: off))
    assert reg.get_sample_value("nfhooks_connection_verdicts_total",
                                {"hook": "INPUT", "handler": "web", "verdict": "reject"}) == 2
    assert reg.get_sample_value("nfhooks_connection_verdict_packets_total",
                                {"hook": "INPUT", "verdict": "accept"}) == 1400
    assert reg.get_sample_value("nfhooks_offloaded_flows_total", {"hook": "INPUT", "handler": "web"}) is None


def test_check_says_which_handlers_decide_connections():
    from typer.testing import CliRunner

    from nfhooks.cli import app

    r = CliRunner().invoke(app, ["check", "policies/inspect_then_offload.py", "--set", "port=8080"])
    assert r.exit_code == 0, r.output
    assert "# connection verdicts: http (accept/reject), http_forward (accept/reject)" in r.output
    assert '--dport 8080' in r.output and '"nfhooks conn reject" -j REJECT --reject-with tcp-reset' in r.output


def test_the_handler_sees_only_the_user_bits_of_the_mark(dispatch):
    p = Policy("t")

    @p.input(proto="tcp", dport=80)
    def web(pkt):
        return accept(connection=True) if pkt.mark == 0x12 else drop()

    d = dispatch(p, flow_generation=5)
    d = d.use(offload=FlowOffload(d.ruleset, d.policy))
    L = d.ruleset.layout
    nfh_bits = L["conn:INPUT:filter"].encode(3) | L["flowgen"].encode(5)  # as a restored connmark could carry
    assert d.send(proto="tcp", dport=80, handler="web", mark=0x12 | nfh_bits).calls == ["repeat"]


def test_the_engine_gives_a_connection_verdict_policy_a_new_generation_per_compile():
    from nfhooks.engine import Engine
    from nfhooks.metrics import Metrics

    e = Engine(web_policy(), metrics=Metrics(CollectorRegistry()), flow_generation=7)
    assert e.ruleset.flow_generation == 7 and e.dispatcher.offload is not None
    assert e.dispatcher.offload.connection(e.policy.handlers[0])["accept"][0] & e.ruleset.layout["action"].mask
    assert e._flow_args(web_policy()) == {"flow_generation": 1}  # a reload: 7 -> 1, old decisions forgotten


def test_nfhooks_rules_shows_what_the_kernel_decided_for_decided_connections():
    from nfhooks.rulesview import sections
    from nfhooks.saved import counted_rules

    rs = compile_policy(web_policy(), flow_generation=1)
    text = "\n".join(f"[9:900] {x}" if x.startswith("-A") else x for x in rs.render([4]).splitlines())
    inp = next(s for s in sections(counted_rules(text, 4)) if s.hook == "INPUT")
    rows = [(r.handler, r.action, r.packets) for r in inp.rows if r.kind == "handler"]
    assert rows[:3] == [("(connections)", "accept (decided)", 9), ("(connections)", "reject (decided)", 9),
                        ("(connections)", "reject (decided)", 9)]  # TCP reset + port unreachable: one line shown
    assert {r.kind for r in inp.rows if r.kind != "handler"} >= {"connection verdict save"}
