"""Rule compilation: exact iptables-save text, without root."""

from pathlib import Path

import pytest

from nfhooks import Policy, PolicyError, accept
from nfhooks.marks import MarkLayout, MarkSpaceError
from nfhooks.loader import load_policy
from nfhooks.rules import compile_policy, save_string

ROOT = Path(__file__).parents[2]


def rules_of(pol: Policy, **kw) -> list[str]:
    return [line for line in compile_policy(pol, **kw).render().splitlines() if line.startswith("-A")]


def one(**match) -> Policy:
    p = Policy()
    p.input(**match)(lambda pkt: accept())
    return p


def queue_rule(lines: list[str]) -> str:
    return next(line for line in lines if "NFQUEUE" in line)


@pytest.mark.parametrize("match,expected", [
    (dict(proto="tcp", dport=22), "-p tcp -m tcp --dport 22 -m mark"),
    (dict(proto="tcp", dport="!22"), "-p tcp -m tcp ! --dport 22 -m mark"),
    (dict(proto="udp", sport="1000:2000"), "-p udp -m udp --sport 1000:2000 -m mark"),
    (dict(proto="tcp", dport=[80, 443, "8000:8080"]), "-p tcp -m multiport --dports 80,443,8000:8080 -m mark"),
    (dict(src="10.0.0.0/8"), "-s 10.0.0.0/8 -m mark"),
    (dict(src="!192.0.2.1"), "! -s 192.0.2.1/32 -m mark"),
    (dict(dst="fd00::/64"), "-d fd00::/64 -m mark"),
    (dict(iif="eth+"), "-i eth+ -m mark"),
    (dict(ctstate="established,related"), "-m conntrack --ctstate RELATED,ESTABLISHED -m mark"),
    (dict(mark=(0x5, 0xff)), "-m mark --mark 0x5/0xff -m mark --mark 0x0/"),
])
def test_match_compiles_into_the_queue_rule(match, expected):
    assert expected in queue_rule(rules_of(one(**match)))


def test_families_follow_the_match():
    text = compile_policy(one(src="10.0.0.0/8")).render()
    assert "# ip6tables\n" in text and "10.0.0.0/8" not in text.split("# ip6tables")[1]
    text6 = compile_policy(one(proto="icmpv6")).render()
    assert "-p ipv6-icmp" in text6.split("# ip6tables")[1] and "NFQUEUE" not in text6.split("# ip6tables")[0]


def test_queue_rules_skip_resumed_and_own_packets_and_resume_rule_follows():
    p = Policy()
    p.input(proto="tcp")(lambda pkt: None)
    p.input(proto="udp", name="second")(lambda pkt: accept())
    rs = compile_policy(p)
    lines = [line for line in rs.render().split("# ip6tables")[0].splitlines() if "NFH-INPUT" in line and "-A" in line]
    q = [i for i, line in enumerate(lines) if "NFQUEUE" in line]
    guard = rs.layout["resume"].mask | rs.layout["self"].mask
    assert all(f"--mark 0x0/{guard:#x}" in lines[i] for i in q)
    # the rule right after each queue rule clears that handler's resume index
    res = rs.layout["resume"]
    assert f"--mark {res.encode(1):#x}/{res.mask:#x}" in lines[q[0] + 1] and "--set-xmark" in lines[q[0] + 1]
    assert rs.positions == {"<lambda>": 1, "second": 2}


def test_default_verdict_is_a_final_kernel_rule_and_fail_mode_follows_it():
    p = Policy(defaults={"INPUT": "drop"})
    p.input(proto="tcp")(lambda pkt: accept())
    p.output(proto="tcp", name="out")(lambda pkt: accept())
    rs = compile_policy(p)
    inp = [line for line in rs.render().splitlines() if line.startswith("-A NFH-INPUT")]
    assert inp[-1].endswith("-j DROP") and "nfhooks default" in inp[-1]
    assert "--queue-bypass" not in queue_rule(inp)
    out = [line for line in rs.render().splitlines() if line.startswith("-A NFH-OUTPUT")]
    assert "--queue-bypass" in queue_rule(out)
    assert not rs.fail_open["INPUT"] and rs.fail_open["OUTPUT"]
    assert "--queue-bypass" in queue_rule([x for x in rules_of(p, fail="open") if "NFH-INPUT" in x])


def test_jumps_are_tagged_and_only_our_chains():
    text = compile_policy(load_policy(ROOT / "policies/firewall.py")).render()
    for line in text.splitlines():
        if line.startswith("-A ") and not line.startswith("-A NFH-"):
            assert line.endswith("-j NFH-" + line.split()[1]) and "--comment nfhooks" in line
        if line.startswith(":"):
            assert line.startswith(":NFH-")


def test_firewall_example_compiles_to_expected_ssh_rule():
    text = compile_policy(load_policy(ROOT / "policies/firewall.py", {"trusted": "192.0.2.0/24"})).render()
    assert ('-A NFH-INPUT -s 192.0.2.0/24 -p tcp -m tcp --dport 22 -m mark --mark 0x0/0x83800000 '
            '-m comment --comment "nfhooks ssh" -j NFQUEUE --queue-num 5') in text


def test_queue_base_shifts_queue_numbers():
    assert "--queue-num 100" in queue_rule(rules_of(one(proto="tcp"), queue_base=100))


def test_user_mark_match_on_nfhooks_bits_refused():
    with pytest.raises(PolicyError, match="belong to nfhooks"):
        compile_policy(one(mark=(0x10000, 0x10000)))


def test_mark_layout_runs_out_with_a_clear_error():
    with pytest.raises(MarkSpaceError, match="--mark-mask"):
        MarkLayout([("a", 4), ("b", 4)], mask=0xF0)
    layout = MarkLayout([("a", 1), ("b", 3)], mask=0xF0)
    assert layout["a"].mask == 0x80 and layout["b"].mask == 0x70 and layout.user_mask == 0xFFFFFF0F


def test_too_many_handlers_for_the_mask():
    p = Policy()
    for i in range(20):
        p.input(proto="tcp", dport=i + 1, name=f"h{i}")(lambda pkt: accept())
    with pytest.raises(PolicyError, match="resume"):
        compile_policy(p, mark_mask=0xFF000000)


def test_save_string_quotes_like_iptables():
    assert save_string("nfhooks") == "nfhooks"
    assert save_string("nfhooks ssh") == '"nfhooks ssh"'
    assert save_string('a"b') == '"a\\"b"'


def test_generation_two_has_its_own_chains_and_stamp():
    p = Policy()
    p.input(proto="tcp", dport=22, name="ssh")(lambda pkt: accept())
    one, two = compile_policy(p), compile_policy(p, queue_base=1, generation=2)
    assert one.chains[(4, "filter")] == ["NFH-CONNSAVE", "NFH-INPUT"]
    assert two.chains[(4, "filter")] == ["NFH-CONNSAVE-2", "NFH-INPUT-2"]
    assert [j.render() for j in two.jumps[(4, "filter")]] == ["-A INPUT -m comment --comment nfhooks -j NFH-INPUT-2"]
    gen = two.layout["gen"]
    assert gen.mask == one.layout["gen"].mask  # fixed position: both generations read the same bits
    first, second = [r.render() for r in two.rules[(4, "filter")][:2]]
    assert first == (f"-A NFH-INPUT-2 -m mark --mark 0x0/{gen.mask:#x} -m comment --comment \"nfhooks gen\" "
                     f"-j MARK --set-xmark {gen.encode(2):#x}/{gen.mask:#x}")
    assert second == (f"-A NFH-INPUT-2 -m mark ! --mark {gen.encode(2):#x}/{gen.mask:#x} "
                      "-m comment --comment \"nfhooks gen\" -j RETURN")
    assert list(two.queues) == [1]
    assert "-g NFH-CONNSAVE-2" in two.render()
    with pytest.raises(ValueError, match="generation"):
        compile_policy(p, generation=3)
