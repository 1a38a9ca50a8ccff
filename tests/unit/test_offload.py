"""Flow offload, pure parts: the mark fields, the compiled rules, the refusals, the generation
counter, and what the dispatcher does with a flow handler's verdicts."""

from __future__ import annotations

import inspect

import pytest
from prometheus_client import CollectorRegistry

from nfhooks import Policy, PolicyError, accept, drop, mark, set_ttl
from nfhooks.fake import fake_bytes
from nfhooks.marks import ACTION_FLOWSAVE, DEFAULT_MARK_MASK
from nfhooks.metrics import Metrics
from nfhooks.offload import (
    FLOW_GENERATIONS, FlowOffload, OffloadCollector, add_counters, layout_fields, next_flow_generation,
)
from nfhooks.rules import compile_policy


def web_policy(flow: bool = True) -> Policy:
    p = Policy("t")

    @p.input(proto="tcp", dport=8080)
    def inspect_all(pkt):
        return accept() if pkt.payload is not None else drop()

    @p.input(proto="tcp", dport=80, flow=flow)
    def web(pkt):
        return accept() if pkt.src.is_private else drop()

    return p


def lines(rs, chain_part: str) -> list[str]:
    return [line for line in rs.render([4]).splitlines() if chain_part in line]


def test_fields_exist_only_with_flow_handlers():
    assert layout_fields(web_policy(flow=False)) == []
    rs = compile_policy(web_policy(flow=False))
    assert "flowgen" not in rs.layout and "NFH-FLOW" not in rs.render() and rs.flow_generation == 0
    assert layout_fields(web_policy()) == [("flowgen", 3), ("flow:INPUT:orig", 1), ("flow:INPUT:reply", 1)]


def test_flow_fields_are_inside_the_mask_and_never_overlap():
    rs = compile_policy(web_policy(), flow_generation=5)
    fields = list(rs.layout.fields.values())
    for f in fields:
        assert f.mask & DEFAULT_MARK_MASK == f.mask
        for g in fields:
            assert f is g or not f.mask & g.mask
    assert rs.flow_generation == 5


def test_compiled_rules():
    rs = compile_policy(web_policy(), flow_generation=5)
    L = rs.layout
    g, o, r = L["flowgen"], L["flow:INPUT:orig"], L["flow:INPUT:reply"]
    act, res = L["action"], L["resume"]
    guard = L["resume"].mask | L["self"].mask
    inp = lines(rs, "-A NFH-INPUT ")
    # the flowsave jump comes before any queue rule; the offload rules right before web's queue rule
    jump = f"-A NFH-INPUT -m mark --mark {act.encode(ACTION_FLOWSAVE):#x}/{act.mask:#x} " \
           '-m comment --comment "nfhooks flowsave" -g NFH-FLOW-INPUT'
    assert jump in inp
    off_o = (f"-A NFH-INPUT -p tcp -m tcp --dport 80 -m conntrack --ctdir ORIGINAL -m connmark --mark "
             f"{g.encode(5) | o.encode(1):#x}/{g.mask | o.mask:#x} -m mark --mark 0x0/{guard:#x} "
             '-m comment --comment "nfhooks offload web" -j ACCEPT')
    off_r = off_o.replace("ORIGINAL", "REPLY").replace(
        f"{g.encode(5) | o.encode(1):#x}/{g.mask | o.mask:#x}", f"{g.encode(5) | r.encode(1):#x}/{g.mask | r.mask:#x}")
    queue_web = next(i for i, x in enumerate(inp) if '"nfhooks web"' in x)
    queue_inspect = next(i for i, x in enumerate(inp) if '"nfhooks inspect_all"' in x)
    assert inp[queue_web - 2:queue_web] == [off_o, off_r]
    assert inp.index(jump) < queue_inspect < queue_web  # the payload inspector still sees every packet
    flow = lines(rs, "-A NFH-FLOW-INPUT ")
    allf = g.mask | o.mask | r.mask
    assert flow == [
        f'-A NFH-FLOW-INPUT -m connmark ! --mark {g.encode(5):#x}/{g.mask:#x} -m comment --comment '
        f'"nfhooks flow generation" -j CONNMARK --set-xmark {g.encode(5):#x}/{allf:#x}',
        f"-A NFH-FLOW-INPUT -m mark --mark {res.encode(2):#x}/{res.mask:#x} -m conntrack --ctdir ORIGINAL "
        f'-m connmark --mark 0x0/{o.mask:#x} -m comment --comment "nfhooks flowsave web" '
        f"-j CONNMARK --set-xmark {o.encode(1):#x}/{o.mask:#x}",
        f"-A NFH-FLOW-INPUT -m mark --mark {res.encode(2):#x}/{res.mask:#x} -m conntrack --ctdir REPLY "
        f'-m connmark --mark 0x0/{r.mask:#x} -m comment --comment "nfhooks flowsave web" '
        f"-j CONNMARK --set-xmark {r.encode(1):#x}/{r.mask:#x}",
        f"-A NFH-FLOW-INPUT -m comment --comment nfhooks -j MARK --set-xmark 0x0/{act.mask | res.mask:#x}",
        "-A NFH-FLOW-INPUT -m comment --comment nfhooks -j ACCEPT",
    ]
    # every connmark write is masked, and never touches the user's bits
    for line in flow:
        if "CONNMARK" in line:
            mask = int(line.rsplit("/", 1)[1], 16)
            assert mask and not mask & rs.layout.user_mask


def test_two_flow_handlers_at_a_hook_have_their_own_ordinals():
    p = Policy("t")

    @p.forward(proto="tcp", dport=80, flow=True)
    def a(pkt):
        return accept()

    @p.forward(proto="udp", dport=53, flow=True)
    def b(pkt):
        return None

    rs = compile_policy(p, flow_generation=1)
    f = rs.layout["flow:FORWARD:orig"]
    assert f.width == 2  # ordinals 1, 2
    text = rs.render([4])
    assert f"--mark {rs.layout['flowgen'].encode(1) | f.encode(2):#x}/" in text  # b's offload rule
    assert "-A NFH-FLOW-FORWARD" in text


def test_generation_is_checked():
    with pytest.raises(ValueError, match="flow_generation"):
        compile_policy(web_policy(), flow_generation=0)
    with pytest.raises(ValueError, match="flow_generation"):
        compile_policy(web_policy(), flow_generation=FLOW_GENERATIONS + 1)


def _line_of(func, text: str) -> int:
    src, start = inspect.getsourcelines(func)
    return start + next(i for i, line in enumerate(src) if text in line)


def refused(decorate, func) -> PolicyError:
    with pytest.raises(PolicyError) as e:
        decorate(func)
    return e.value


def test_refusals_name_file_and_line():
    p = Policy("t")

    def rewrites(pkt):
        return set_ttl(9)

    e = refused(p.prerouting(proto="tcp", flow=True), rewrites)
    assert "returns mangle with flow=True" in str(e) and e.line == _line_of(rewrites, "set_ttl(")
    assert str(e).startswith(f"{__file__}:{e.line}: ")

    def marks(pkt):
        return mark(1, 0xff)

    e = refused(p.input(proto="tcp", flow=True), marks)
    assert "returns mark with flow=True" in str(e) and e.line == _line_of(marks, "mark(1")

    def reads_payload(pkt):
        if pkt.dport == 80:
            return accept() if b"GET" in pkt.payload else drop()
        return None

    e = refused(p.input(proto="tcp", flow=True), reads_payload)
    assert "reads pkt.payload with flow=True" in str(e) and e.line == _line_of(reads_payload, "pkt.payload")

    def flags(pkt):
        return accept() if pkt.tcp_flags else None

    assert "pkt.tcp_flags" in str(refused(p.input(proto="tcp", flow=True), flags))

    def fine(pkt):
        return accept()

    assert "raw table" in str(refused(p.prerouting(table="raw", flow=True), fine))
    assert "ctstate" in str(refused(p.input(ctstate="NEW", flow=True), fine))
    assert "mark match" in str(refused(p.input(mark=(1, 0xff), flow=True), fine))
    assert p.handlers == []  # nothing refused was registered


def test_nat_with_flow_is_refused():
    from nfhooks import dnat
    p = Policy("t")

    def lb(pkt):
        return dnat("10.0.0.1:80")

    assert "NAT is already decided once per connection" in str(refused(p.prerouting(proto="tcp", flow=True), lb))


def test_allowed_fields_load(tmp_path):
    p = Policy("t")

    @p.forward(proto="tcp", iif="lan", flow=True)
    def by_tuple(pkt):
        ok = pkt.src.is_private and pkt.dport in (80, 443) and pkt.proto == 6 and pkt.iif == "lan"
        return accept() if ok else drop()

    assert p.handlers[0].flow


def test_next_flow_generation_cycles_and_never_repeats_the_last(tmp_path):
    gens = [next_flow_generation(str(tmp_path)) for _ in range(10)]
    assert all(1 <= g <= FLOW_GENERATIONS for g in gens)
    assert all(a != b for a, b in zip(gens, gens[1:]))
    assert gens[7] == gens[0]  # 7 values: a connection idle through 7 restarts would match again
    (next(tmp_path.iterdir())).write_text("garbage")
    assert 1 <= next_flow_generation(str(tmp_path)) <= FLOW_GENERATIONS


def _dispatch(dispatch, policy, gen=3):
    d = dispatch(policy, flow_generation=gen)
    return d.use(offload=FlowOffload(d.ruleset, policy))


def test_flow_accept_saves_via_repeat_other_verdicts_as_usual(dispatch):
    p = Policy("t")

    @p.input(proto="tcp", dport=80, flow=True)
    def web(pkt):
        return {80: accept(), 81: drop()}.get(pkt.sport)

    @p.input(proto="tcp", dport=22)
    def ssh(pkt):
        return accept()

    d = _dispatch(dispatch, p)
    rs = d.ruleset
    act, res = rs.layout["action"], rs.layout["resume"]
    pk = d.send(fake_bytes(proto="tcp", sport=80, dport=80), handler="web", mark=0x1234)
    assert pk.calls == ["repeat"]
    assert act.decode(pk.set_marks[0]) == ACTION_FLOWSAVE and res.decode(pk.set_marks[0]) == rs.positions["web"]
    assert pk.set_marks[0] & 0xFFFF == 0x1234
    assert d.sample("nfhooks_handler_packets_total",
                    {"hook": "INPUT", "handler": "web", "verdict": "accept"}) == 1
    dropped = d.send(fake_bytes(proto="tcp", sport=81, dport=80), handler="web")
    assert dropped.calls == ["drop"]  # a drop is applied per packet, never remembered
    fell = d.send(fake_bytes(proto="tcp", sport=99, dport=80), handler="web")
    assert fell.calls == ["repeat"] and act.decode(fell.set_marks[0]) == 0  # plain resume
    other = d.send(fake_bytes(proto="tcp", dport=22), handler="ssh")
    assert other.calls == ["accept"]  # a non-flow handler's accept is just an accept


def test_metrics_come_from_the_offload_rule_counters():
    p = web_policy()
    rs = compile_policy(p, flow_generation=2)
    off = FlowOffload(rs, p)
    saved = "\n".join(
        f"[{n}:{n * 100}] {line}" for n, line in zip((7, 3, 0, 500, 20), (
            *lines(rs, '"nfhooks flowsave web"'), *lines(rs, '"nfhooks offload web"'), "-A X -j ACCEPT")))
    out = {"offload": {}, "flowsave": {}}
    add_counters(out, saved, off.handlers)
    assert out == {"offload": {("INPUT", "web"): 500}, "flowsave": {("INPUT", "web"): 10}}
    off.counters = lambda: out  # type: ignore[method-assign]  # no iptables here
    reg = CollectorRegistry()
    reg.register(OffloadCollector(lambda: off))
    assert reg.get_sample_value("nfhooks_offloaded_flows_total", {"hook": "INPUT", "handler": "web"}) == 10
    assert reg.get_sample_value("nfhooks_offloaded_packets_total", {"hook": "INPUT", "handler": "web"}) == 500


def test_engine_gives_each_compile_a_new_flow_generation():
    from nfhooks.engine import Engine

    e = Engine(web_policy(), metrics=Metrics(CollectorRegistry()), flow_generation=7)
    assert e.ruleset.flow_generation == 7 and e.dispatcher.offload is not None
    assert e._flow_args(web_policy()) == {"flow_generation": 1}  # the next compile (a reload): 7 -> 1
    plain = Engine(web_policy(flow=False), metrics=Metrics(CollectorRegistry()))
    assert plain.ruleset.flow_generation == 0 and plain.dispatcher.offload is None
    assert plain._flow_args(web_policy(flow=False)) == {}
