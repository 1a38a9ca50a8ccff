"""Policy loading and its errors: every refusal names file:line and says why."""

from pathlib import Path

import pytest

from nfhooks import Policy, PolicyError, accept, load_policy
from nfhooks.fake import fake_packet

HERE = Path(__file__).parent / "policies"
ROOT = Path(__file__).parents[2]


def load_bad(name: str, **sets: str) -> PolicyError:
    with pytest.raises(PolicyError) as e:
        load_policy(HERE / name, sets)
    return e.value


def test_syntax_error_names_file_and_line():
    e = load_bad("bad_syntax.py")
    assert e.file.endswith("bad_syntax.py") and e.line == 7
    assert "syntax error" in str(e)


def test_import_error_names_file_and_line():
    e = load_bad("bad_import.py")
    assert e.line == 2 and "ModuleNotFoundError" in str(e)


def test_runtime_error_at_import_names_line():
    e = load_bad("raises_at_import.py")
    assert e.line == 5 and "KeyError" in str(e)


def test_missing_policy_object():
    assert "policy = Policy" in str(load_bad("no_policy.py"))


def test_missing_file():
    assert "not found" in str(load_bad("does_not_exist.py"))


def test_reject_at_prerouting_refused_at_the_return_line():
    e = load_bad("reject_prerouting.py")
    assert e.line == 9
    assert "reject cannot work at PREROUTING" in str(e) and "INPUT" in str(e)


def test_dnat_at_postrouting_refused_says_output():
    e = load_bad("dnat_postrouting.py")
    assert e.line == 8 and "OUTPUT" in str(e) and "PREROUTING" in str(e)


def test_ctstate_in_raw_refused():
    e = load_bad("ctstate_raw.py")
    assert e.line == 6 and "raw" in str(e)


def test_unknown_option_lists_known_ones():
    e = load_bad("../../../policies/firewall.py", bogus="1")
    assert "bogus" in str(e) and "trusted (network)" in str(e)


def test_bad_option_value_names_option_line():
    e = load_bad("../../../policies/firewall.py", trusted="not-a-net")
    assert "trusted" in str(e) and e.line is not None


def test_option_value_reaches_the_compiled_match():
    pol = load_policy(ROOT / "policies/firewall.py", {"trusted": "192.0.2.0/24"})
    ssh = next(h for h in pol.handlers if h.name == "ssh")
    assert str(ssh.match.src.net) == "192.0.2.0/24"


def test_handlers_in_declaration_order_with_locations():
    pol = load_policy(ROOT / "policies/firewall.py")
    names = [h.name for h in pol.handlers]
    assert names == ["no_web", "loopback", "established", "icmp", "icmpv6", "ssh"]
    assert all(h.file.endswith("firewall.py") and h.line > 0 for h in pol.handlers)


def test_default_reject_at_prerouting_refused():
    with pytest.raises(PolicyError, match="default for PREROUTING"):
        Policy(defaults={"PREROUTING": "reject"})


def test_interface_matches_where_they_exist():
    p = Policy()
    with pytest.raises(PolicyError, match="input-interface"):
        p.output(iif="eth0")(lambda pkt: accept())
    with pytest.raises(PolicyError, match="output-interface"):
        p.prerouting(oif="eth0")(lambda pkt: accept())


def test_port_match_needs_protocol():
    p = Policy()
    with pytest.raises(PolicyError, match="port match needs proto"):
        p.input(dport=22)(lambda pkt: accept())


def test_duplicate_handler_names_refused():
    p = Policy()

    def h(pkt):
        return accept()

    p.input(proto="tcp")(h)
    with pytest.raises(PolicyError, match="two handlers"):
        p.input(proto="udp")(h)


def test_policy_unit_testable_with_fake_packets():
    """What a policy author does, without root: feed fake packets to the handlers."""
    pol = load_policy(ROOT / "policies/firewall.py", {"trusted": "10.1.0.0/16"})
    ssh = next(h for h in pol.handlers if h.name == "ssh")
    inside = fake_packet(src="10.1.2.3", dst="10.1.0.1", proto="tcp", dport=22)
    outside = fake_packet(src="192.0.2.9", dst="10.1.0.1", proto="tcp", dport=22)
    assert ssh.match.matches(inside) and not ssh.match.matches(outside)
    assert ssh.func(inside) == accept()
    icmp = next(h for h in pol.handlers if h.name == "icmp")
    assert icmp.func(fake_packet(proto="icmp", icmp_type=8)) == accept()
    assert icmp.func(fake_packet(proto="icmp", icmp_type=13)) is None


def test_decide_simulates_fall_through_and_default():
    pol = load_policy(ROOT / "policies/firewall.py", {"trusted": "10.1.0.0/16"})
    h, v = pol.decide(fake_packet(src="192.0.2.9", proto="tcp", dport=22, hook="INPUT"), ctstate="NEW")
    assert h is None and v.kind == "reject"
    h, v = pol.decide(fake_packet(src="192.0.2.9", proto="tcp", dport=22, hook="INPUT"), ctstate="ESTABLISHED")
    assert h.name == "established" and v == accept()
    h, v = pol.decide(fake_packet(proto="tcp", dport=80, hook="OUTPUT"))
    assert h.name == "no_web" and v.kind == "drop"


def test_policy_writable_by_others_is_refused(tmp_path):
    f = tmp_path / "p.py"
    f.write_text("from nfhooks import Policy\npolicy = Policy()\n")
    f.chmod(0o666)
    with pytest.raises(PolicyError, match="writable by other users"):
        load_policy(f)
    f.chmod(0o644)
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    g = d / "p.py"
    g.write_text(f.read_text())
    with pytest.raises(PolicyError, match="every user can write"):
        load_policy(g)
    d.chmod(0o1777)  # sticky, like /tmp or a ConfigMap mount: the owner alone can replace it
    assert load_policy(g).handlers == []


def test_configmap_style_symlinks_are_accepted(tmp_path):
    data = tmp_path / "..2026_11_25"
    data.mkdir()
    (data / "p.py").write_text("from nfhooks import Policy\npolicy = Policy()\n")
    (data / "p.py").chmod(0o444)
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "p.py").symlink_to("..data/p.py")
    tmp_path.chmod(0o1777)
    assert load_policy(tmp_path / "p.py").handlers == []


def test_policy_in_a_directory_another_user_or_group_controls_is_refused(tmp_path):
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user (chown)")
    for name, mode, uid, gid, why in (("other", 0o755, 65534, 0, "owned by uid 65534"),
                                      ("group", 0o775, 0, 65534, "group 65534 can write")):
        d = tmp_path / name
        d.mkdir()
        f = d / "p.py"
        f.write_text("from nfhooks import Policy\npolicy = Policy()\n")
        os.chown(d, uid, gid)
        d.chmod(mode)
        with pytest.raises(PolicyError, match=why):
            load_policy(f)
        d.chmod(mode | 0o1000)  # sticky: only the root-owned file's owner could replace it
        assert load_policy(f).handlers == []
