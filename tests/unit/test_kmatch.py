"""Kernel-state match keywords (nfhooks/kmatch.py): limit/hashlimit/connlimit, uid/gid, connmark --
parsed, refused where the kernel cannot do them, and rendered as iptables-save prints them
(the expected texts were read back from iptables-legacy-save and iptables-nft-save 1.8.9)."""

from __future__ import annotations

import os
import pwd
from types import SimpleNamespace

import pytest

from nfhooks.errors import PolicyError
from nfhooks.hooks import PlacementError
from nfhooks.kmatch import parse_rate, rate_text
from nfhooks.match import Match, MatchError
from nfhooks.policy import Policy
from nfhooks.rulebuild import Rule, match_specs
from nfhooks.rules import compile_policy
from nfhooks.verdict import accept

M = Match.build


def rendered(fam: int = 4, **kw) -> str:
    m = M(**kw)
    return Rule("X", "ACCEPT", proto=m.proto, matches=tuple(match_specs(m, fam))).render()[len("-A X "):-len(" -j ACCEPT")]


@pytest.mark.parametrize("kw,text", [
    (dict(limit="10/second"), "-m limit --limit 10/sec"),  # burst 5 is the default iptables-save leaves out
    (dict(limit=10, burst=3), "-m limit --limit 10/sec --limit-burst 3"),
    (dict(limit="5/min"), "-m limit --limit 5/min"),
    (dict(limit="7/h", burst=5), "-m limit --limit 7/hour"),
    (dict(limit="999/second"), "-m limit --limit 1000/sec"),  # xt_limit's 1/10000 s period rounds
    (dict(limit="5/minute", limit_over=True),
     "-m hashlimit --hashlimit-above 5/min --hashlimit-burst 5 --hashlimit-name NFH-"),
    (dict(hashlimit="5/minute"),
     "-m hashlimit --hashlimit-upto 5/min --hashlimit-burst 5 --hashlimit-mode srcip --hashlimit-name NFH-"),
    (dict(proto="tcp", hashlimit="999/s", hashlimit_by="dport, src", burst=7, limit_over=True),
     "-p tcp -m hashlimit --hashlimit-above 999/sec --hashlimit-burst 7 --hashlimit-mode srcip,dstport "
     "--hashlimit-name NFH-"),
    (dict(proto="tcp", connlimit=2), "-p tcp -m connlimit --connlimit-above 2 --connlimit-mask 32 --connlimit-saddr"),
    (dict(proto="tcp", connlimit=2, connlimit_mask=24, family="ipv4"),
     "-p tcp -m connlimit --connlimit-above 2 --connlimit-mask 24 --connlimit-saddr"),
    (dict(uid=1000), "-m owner --uid-owner 1000"),
    (dict(uid="!1000-2000", gid=100), "-m owner ! --uid-owner 1000-2000 --gid-owner 100"),
    (dict(connmark=(1, 0xFF)), "-m connmark --mark 0x1/0xff"),
    (dict(connmark="!0x5"), "-m connmark ! --mark 0x5"),
])
def test_rendered_like_iptables_save(kw, text):
    assert rendered(**kw).startswith(text)


def test_hashlimit_keeps_an_idle_bucket_until_it_would_have_refilled():
    """expire = burst at the rate plus one unit: never iptables' default of one unit (which
    python-iptables would lose, and which forgets a part-empty bucket)."""
    assert rendered(hashlimit="5/minute").endswith("--hashlimit-htable-expire 120000")
    assert rendered(hashlimit="1/minute", burst=2).endswith("--hashlimit-htable-expire 180000")
    assert rendered(hashlimit="10/second").endswith("--hashlimit-htable-expire 1500")


@pytest.mark.parametrize("kw,ok", [
    (dict(limit="1/day", burst=1), True), (dict(limit="1/day", burst=4), False),
    (dict(limit="1/hour", burst=1194), False), (dict(limit="10000/second", burst=10000), True),
    (dict(hashlimit="3/day"), False), (dict(hashlimit="20/day"), True), (dict(hashlimit="1/hour", burst=10000), False),
])
def test_buckets_the_kernel_cannot_hold_are_refused_at_load(kw, ok):
    """What xt_limit/xt_hashlimit refused with ERANGE here ("overflow, try lower"), or accepted only
    by wrapping the product around."""
    if ok:
        M(**kw)
    else:
        with pytest.raises(MatchError, match="cannot hold so slow a rate with so large a burst"):
            M(**kw)


def test_ipv6_defaults_and_per_family_connlimit_masks():
    assert rendered(6, proto="tcp", connlimit=3).endswith("--connlimit-mask 128 --connlimit-saddr")
    assert rendered(6, proto="tcp", connlimit=3, connlimit_mask=(24, 64)).endswith("--connlimit-mask 64 --connlimit-saddr")
    assert rendered(4, proto="tcp", connlimit=3, connlimit_mask=(24, 64)).endswith("--connlimit-mask 24 --connlimit-saddr")
    assert rendered(6, proto="tcp", connlimit=3, connlimit_mask=56, family=6).endswith("--connlimit-mask 56 --connlimit-saddr")


def test_the_rate_is_the_last_match_so_failing_matches_spend_no_token():
    specs = [s.module for s in match_specs(M(proto="tcp", dport="80,443", ctstate="NEW", mark=1, connmark=2,
                                               uid=0, connlimit=1, limit=5), 4)]
    assert specs == ["multiport", "conntrack", "mark", "connmark", "owner", "connlimit", "limit"]


def test_hashlimit_names_are_short_stable_and_differ_by_rule():
    def name(**kw):
        return rendered(**kw).split("--hashlimit-name ", 1)[1].split()[0]
    a = name(proto="tcp", dport=22, hashlimit="5/minute")
    assert a == name(proto="tcp", dport=22, hashlimit="5/minute") and a.startswith("NFH-") and len(a) <= 15
    assert a != name(proto="tcp", dport=23, hashlimit="5/minute")
    assert a != name(proto="tcp", dport=22, hashlimit="6/minute")


@pytest.mark.parametrize("rate", ["1/s", "3/second", "7/minute", "13/hour", "1000/day", "10000/second",
                                  "61/minute", "3601/hour", "86401/day", "2/day"])
def test_rate_text_rounds_like_libxt(rate):
    """The values iptables-save printed for these rates (limit, hashlimit)."""
    printed = {"1/s": ("1/sec", "1/sec"), "3/second": ("3/sec", "3/sec"), "7/minute": ("7/min", "7/min"),
               "13/hour": ("13/hour", "13/hour"), "1000/day": ("1000/day", "1000/day"),
               "10000/second": ("10000/sec", "10000/sec"), "61/minute": ("61/min", "61/min"),
               "3601/hour": ("3601/hour", "3601/hour"), "86401/day": ("1/sec", "86401/day"),
               "2/day": ("2/day", "2/day")}
    assert (rate_text(parse_rate(limit=rate, burst=1)), rate_text(parse_rate(hashlimit=rate, burst=1))) == printed[rate]


@pytest.mark.parametrize("kw,message", [
    (dict(limit="0/second"), "at least 1"),
    (dict(limit="10/fortnight"), "the unit is one of second, minute, hour, day"),
    (dict(limit="fast"), "give a rate such as"),
    (dict(limit="20000/second"), "faster than the kernel can count"),
    (dict(limit=True), "give a rate such as"),
    (dict(burst=3), "burst= needs a rate"),
    (dict(limit_over=True), "limit_over= needs a rate"),
    (dict(limit=5, burst=0), "burst=0"),
    (dict(limit=5, burst=20000), "1..10000"),
    (dict(limit=5, hashlimit=5), "a handler has one rate"),
    (dict(limit=5, hashlimit_by="src"), "use it with hashlimit="),
    (dict(hashlimit=5, hashlimit_by="mac"), "a comma list of src, sport, dst, dport"),
    (dict(hashlimit=5, hashlimit_by="src,dport"), "keys on ports: give proto="),
    (dict(limit=5, limit_over="yes"), "limit_over='yes'"),
    (dict(connlimit_mask=24), "connlimit_mask= needs connlimit=N"),
    (dict(connlimit=-1), "a whole number 0..4294967295"),
    (dict(connlimit=2, connlimit_mask=24), "this handler matches IPv4 and IPv6"),
    (dict(connlimit=2, connlimit_mask=33, family=4), r"connlimit_mask=33: a whole number 0..32"),
    (dict(connlimit=2, connlimit_mask=(24, 129)), r"\(IPv6\)=129"),
    (dict(uid="no-such-user-nfhooks"), "no such user on this host"),
    (dict(gid="no-such-group-nfhooks"), "no such group on this host"),
    (dict(uid="5-1"), "ranges low to high"),
    (dict(uid=1.5), "a number, a name"),
    (dict(connmark="x/y"), "connmark='x/y': use an int"),
])
def test_refused_with_the_reason(kw, message):
    with pytest.raises(MatchError, match=message):
        M(**kw)


def test_user_and_group_names_are_resolved_at_load():
    root = pwd.getpwuid(0).pw_name
    m = M(uid=root, gid="root")
    assert (m.owner.uid, m.owner.gid) == ((0, 0, False), (0, 0, False))
    assert M(uid=str(os.getuid())).owner.uid[0] == os.getuid()


def test_options_stand_in_for_the_values():
    opt = SimpleNamespace(value="20/minute", option_name="rate")
    assert M(limit=opt).rate.count == 20


@pytest.mark.parametrize("hook,table,kw,message", [
    ("INPUT", None, dict(uid=0), "a uid/gid \\(owner\\) match cannot work at INPUT"),
    ("PREROUTING", None, dict(gid=0), "cannot work at PREROUTING: the kernel knows a packet's socket"),
    ("FORWARD", None, dict(uid=0), "It works at OUTPUT, POSTROUTING"),
    ("PREROUTING", "raw", dict(proto="tcp", connlimit=2), "a connlimit match cannot work in the raw table"),
    ("OUTPUT", "raw", dict(connmark=1), "a connmark match cannot work in the raw table"),
])
def test_placement_refusals(hook, table, kw, message):
    with pytest.raises(PlacementError, match=message):
        M(**kw).check_placement(hook, table or "filter")
    policy = Policy("t")
    with pytest.raises(PolicyError, match=message):
        policy.handler(hook, table=table, **kw)(lambda pkt: accept())


def test_allowed_placements():
    M(uid=0).check_placement("OUTPUT", "filter")
    M(uid=0).check_placement("POSTROUTING", "mangle")
    M(uid=0, limit=5).check_placement("OUTPUT", "raw")  # the owner and rates need no conntrack
    M(proto="tcp", connlimit=1).check_placement("PREROUTING", "mangle")


def test_policy_handlers_take_the_keywords_and_the_queue_rule_carries_them():
    policy = Policy("kstate")

    @policy.input(proto="tcp", dport=22, ctstate="NEW", hashlimit="5/minute", limit_over=True)
    def ssh(pkt):
        return accept()

    @policy.output(proto="udp", uid=0, connmark=(0x5, 0xFF), family="ipv6")
    def mine(pkt):
        return accept()

    text = compile_policy(policy).render()
    ssh_rules = [line for line in text.splitlines() if '"nfhooks ssh"' in line]
    assert len(ssh_rules) == 2  # both families
    hl = "-m hashlimit --hashlimit-above 5/min --hashlimit-burst 5 --hashlimit-mode srcip"
    # the rate after nfhooks' guard (resume/self bits): a resumed packet or nfhooks' own spends no token
    assert all("--ctstate NEW -m mark --mark 0x0/" in r and hl in r and r.index("-m mark --mark 0x0/") < r.index(hl)
               for r in ssh_rules), ssh_rules
    mine_rules = [line for line in text.splitlines() if '"nfhooks mine"' in line]
    assert len(mine_rules) == 1 and "-m connmark --mark 0x5/0xff -m owner --uid-owner 0" in mine_rules[0]


def test_unknown_keyword_hint_knows_the_new_ones():
    policy = Policy("t")
    with pytest.raises(PolicyError, match="'hashlimt' \\(did you mean 'hashlimit'\\?\\)"):
        policy.input(hashlimt="5/minute")(lambda pkt: accept())


def test_fake_packet_simulation_checks_connmark_and_passes_kernel_state():
    m = M(connmark=(5, 0xFF), limit=1, uid=0)
    assert m.matches(SimpleNamespace(version=4, proto=6, src=None, dst=None, connmark=0x105, mark=0))
    assert not m.matches(SimpleNamespace(version=4, proto=6, src=None, dst=None, connmark=0x6, mark=0))


def test_a_handler_reading_pkt_connmark_gets_the_connmark_restored_before_its_queue_rule():
    from nfhooks.verdict import connmark

    policy = Policy("restore")

    @policy.input(proto="udp", dport=53, limit=5)
    def reader(pkt):
        return accept() if pkt.connmark == 5 else connmark(5, 0xFF)

    @policy.input(proto="udp", dport=54)
    def blind(pkt):
        return accept()

    @policy.prerouting(table="raw", proto="udp", dport=55)
    def early(pkt):  # raw: conntrack has not run, nothing to restore
        return accept() if pkt.connmark else None

    lines = compile_policy(policy).render().splitlines()
    restore = [x for x in lines if "CONNMARK --restore-mark" in x]
    assert len(restore) == 2  # reader, per family; not blind, not early
    assert all('-p udp -m udp --dport 53 -m mark --mark 0x0/' in x and '"nfhooks restore reader"' in x
               and x.endswith("--nfmask 0xffff --ctmask 0xffff") and "limit" not in x for x in restore)
    for fam_lines in (lines[:lines.index("# ip6tables")], lines[lines.index("# ip6tables"):]):
        i = next(i for i, x in enumerate(fam_lines) if "restore reader" in x)
        assert '"nfhooks reader"' in fam_lines[i + 1]  # right before the queue rule


def test_offload_rules_leave_out_the_rate_of_an_already_decided_connection():
    policy = Policy("flowrate")

    @policy.input(proto="tcp", dport=80, flow=True, limit="10/second")
    def web(pkt):
        return accept()

    lines = compile_policy(policy).render().splitlines()
    assert all("limit" not in x for x in lines if '"nfhooks offload web"' in x)
    assert all("-m limit --limit 10/sec" in x for x in lines if '"nfhooks web"' in x)


def test_packet_connmark_is_the_restored_packet_mark():
    from nfhooks.fake import fake_packet

    assert fake_packet(mark=0x5).connmark == 0x5
