"""nfhooks/match.py: every match keyword -- parse, negation, ranges, lists, the families a
match implies, and the errors (the kernel rule text is tests/unit/test_rules.py's)."""

from __future__ import annotations

from ipaddress import ip_network
from types import SimpleNamespace

import pytest

from nfhooks.fake import fake_packet
from nfhooks.match import Addr, Iface, Match, MatchError, Ports

M = Match.build


def option(value):  # what policy.option() hands a match: resolved at compile time
    return SimpleNamespace(value=value, option_name="opt")


# -- proto ---------------------------------------------------------------------------------

@pytest.mark.parametrize("given,proto,families", [
    ("tcp", "tcp", (4, 6)), ("UDP", "udp", (4, 6)), ("sctp", "sctp", (4, 6)),
    (6, "tcp", (4, 6)), (17, "udp", (4, 6)), (132, "sctp", (4, 6)),
    ("icmp", "icmp", (4,)), (1, "icmp", (4,)),
    ("icmpv6", "icmpv6", (6,)), ("ipv6-icmp", "icmpv6", (6,)), ("icmp6", "icmpv6", (6,)), (58, "icmpv6", (6,)),
    ("any", None, (4, 6)), (None, None, (4, 6)),
])
def test_proto_names_numbers_and_the_family_they_imply(given, proto, families):
    m = M(proto=given)
    assert (m.proto, m.families()) == (proto, families)


@pytest.mark.parametrize("given,message", [
    ("gre", "unknown protocol 'gre'"), (47, "protocol number 47 is not supported"),
])
def test_unknown_protocols_are_refused(given, message):
    with pytest.raises(MatchError, match=message):
        M(proto=given)


@pytest.mark.parametrize("kw,message", [
    (dict(proto="icmp", family="ipv6"), "proto='icmp' is IPv4's ICMP; for IPv6 use proto='icmpv6'"),
    (dict(proto="icmp", src="fd00::1"), "proto='icmp' is IPv4's ICMP"),
    (dict(proto="icmpv6", dst="10.0.0.1"), "proto='icmpv6' is IPv6 only; for IPv4 use proto='icmp'"),
])
def test_icmp_of_the_other_family_is_refused(kw, message):
    with pytest.raises(MatchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        M(**kw)


# -- family --------------------------------------------------------------------------------

@pytest.mark.parametrize("given,families", [
    (4, (4,)), ("4", (4,)), ("ipv4", (4,)), ("inet", (4,)),
    (6, (6,)), ("6", (6,)), ("ipv6", (6,)), ("inet6", (6,)),
    (None, (4, 6)), ("any", (4, 6)), ("both", (4, 6)),
])
def test_family_spellings(given, families):
    assert M(family=given).families() == families


def test_bad_family_is_refused():
    with pytest.raises(MatchError, match="family must be 'ipv4', 'ipv6' or None, not 'ip4'"):
        M(family="ip4")


# -- src / dst -----------------------------------------------------------------------------

@pytest.mark.parametrize("given,net,negate", [
    ("10.0.0.0/8", "10.0.0.0/8", False),
    ("10.1.2.3/8", "10.0.0.0/8", False),  # host bits dropped, as iptables does
    ("192.0.2.1", "192.0.2.1/32", False),
    ("!192.0.2.1", "192.0.2.1/32", True),
    ("! 10.0.0.0/8", "10.0.0.0/8", True),
    ("fd00::/64", "fd00::/64", False),
    ("!fd00::1", "fd00::1/128", True),
    (ip_network("198.51.100.0/24"), "198.51.100.0/24", False),
])
def test_addresses_parse_with_negation(given, net, negate):
    for key in ("src", "dst"):
        a = getattr(M(**{key: given}), key)
        assert (a.text(), a.negate) == (net, negate)
        assert M(**{key: given}).families() == ((6,) if ":" in net else (4,))


def test_address_objects_and_options():
    from ipaddress import ip_address

    assert M(src=ip_address("192.0.2.7")).src == Addr(ip_network("192.0.2.7/32"))
    assert M(dst=option("fd00::/8")).dst == Addr(ip_network("fd00::/8"))


@pytest.mark.parametrize("given", ["10.0.0.300", "eth0", "", "10.0.0.0/33"])
def test_bad_addresses_are_refused_naming_the_key(given):
    with pytest.raises(MatchError, match=f"dst={given!r} is not an address or CIDR network"):
        M(dst=given)


def test_an_address_of_the_other_family_than_asked_is_refused():
    with pytest.raises(MatchError, match="address fd00::1/128 is IPv6 but the handler asks for family=ipv4"):
        M(src="fd00::1", family=4)
    with pytest.raises(MatchError, match="address 10.0.0.0/8 is IPv4 but the handler asks for family=ipv6"):
        M(dst="10.0.0.0/8", family="ipv6")


def test_src_and_dst_of_different_families_say_so():
    with pytest.raises(MatchError, match="src and dst are of different address families"):
        M(src="10.0.0.1", dst="fd00::1")


# -- ports ---------------------------------------------------------------------------------

@pytest.mark.parametrize("given,items,negate,text", [
    (22, ((22, 22),), False, "22"),
    ("22", ((22, 22),), False, "22"),
    ("!22", ((22, 22),), True, "22"),
    ("1000:2000", ((1000, 2000),), False, "1000:2000"),
    ("1000-2000", ((1000, 2000),), False, "1000:2000"),
    ("80, 443,8000:8010", ((80, 80), (443, 443), (8000, 8010)), False, "80,443,8000:8010"),
    ("!80,443", ((80, 80), (443, 443)), True, "80,443"),
    ([53, "5353"], ((53, 53), (5353, 5353)), False, "53,5353"),
    ((1, 2), ((1, 1), (2, 2)), False, "1,2"),
    ({443, 80}, ((443, 443), (80, 80)), False, "443,80"),  # a set: ordered by text, stable
    (range(8000, 8011), ((8000, 8010),), False, "8000:8010"),
    (0, ((0, 0),), False, "0"),
    ("65535", ((65535, 65535),), False, "65535"),
    (option("2222"), ((2222, 2222),), False, "2222"),
])
def test_ports_single_ranges_lists_and_negation(given, items, negate, text):
    for key in ("sport", "dport"):
        p = getattr(M(proto="tcp", **{key: given}), key)
        assert (p.items, p.negate, p.text()) == (items, negate, text)
        assert p.simple == (len(items) == 1)


@pytest.mark.parametrize("given,message", [
    ("http", "ports are numbers, 'lo:hi' ranges or lists of them"),
    ("80-", "ports are numbers"),
    ("65536", "ports run 0..65535 and ranges low to high"),
    ("2000:1000", "ports run 0..65535 and ranges low to high"),
    (-1, "ports run 0..65535"),
    ([], "empty port list"),
    (range(1, 10, 2), "only contiguous ranges"),
    (range(5, 5), "only contiguous ranges"),
    (list(range(1, 17)), "at most 15 ports"),
    (["1:2"] * 8, "at most 15 ports \\(a range counts 2\\)"),
])
def test_bad_ports_are_refused(given, message):
    with pytest.raises(MatchError, match="dport"):
        M(proto="udp", dport=given)
    with pytest.raises(MatchError, match=message):
        M(proto="udp", dport=given)


def test_multiport_limit_is_exactly_fifteen():
    assert len(M(proto="tcp", dport=list(range(1, 16))).dport.items) == 15
    assert M(proto="tcp", dport=["1:2"] * 7 + [5]).dport.text().count(",") == 7  # 7 ranges (14) + 1


@pytest.mark.parametrize("proto", [None, "icmp", "any", "icmpv6"])
def test_ports_need_a_port_protocol(proto):
    with pytest.raises(MatchError, match=f"a port match needs proto='tcp', 'udp' or 'sctp' \\(got proto={proto!r}\\)"):
        M(proto=proto, sport=1)


def test_ports_contains_with_negation():
    assert Ports(((80, 80), (8000, 8010)),).contains(8005) and not Ports(((80, 80),)).contains(81)
    neg = Ports(((80, 80),), negate=True)
    assert not neg.contains(80) and neg.contains(81)
    assert not Ports(((80, 80),)).contains(None) and neg.contains(None)


# -- interfaces ----------------------------------------------------------------------------

@pytest.mark.parametrize("given,name,negate", [
    ("eth0", "eth0", False), ("!eth0", "eth0", True), ("eth+", "eth+", False), (option("wg0"), "wg0", False),
    ("a" * 15, "a" * 15, False),
])
def test_interfaces_parse(given, name, negate):
    assert M(iif=given).iif == Iface(name, negate)
    assert M(oif=given).oif == Iface(name, negate)


@pytest.mark.parametrize("given", ["", "!", "a" * 16, "eth 0", "eth/0"])
def test_bad_interface_names_are_refused(given):
    with pytest.raises(MatchError, match=f"oif={given!r} is not an interface name"):
        M(oif=given)


def test_interface_prefix_and_negation():
    assert Iface("eth+").matches("eth0") and Iface("eth+").matches("eth") and not Iface("eth+").matches("wg0")
    assert Iface("eth0").matches("eth0") and not Iface("eth0").matches("eth00")
    assert not Iface("!x", negate=True).matches("!x") and Iface("lo", negate=True).matches("eth0")
    assert not Iface("lo").matches(None) and Iface("lo", negate=True).matches(None)


# -- ctstate -------------------------------------------------------------------------------

@pytest.mark.parametrize("given,states", [
    ("new", ("NEW",)),
    ("established,related", ("RELATED", "ESTABLISHED")),  # iptables-save's order, whatever given
    (["NEW", "invalid"], ("INVALID", "NEW")),
    ({"dnat", "snat", "untracked"}, ("UNTRACKED", "SNAT", "DNAT")),
    (option("NEW, ESTABLISHED"), ("NEW", "ESTABLISHED")),
    ("new,new", ("NEW",)),
])
def test_ctstate_parse_in_kernel_order(given, states):
    assert M(ctstate=given).ctstate == states


@pytest.mark.parametrize("given,message", [
    ("open", "unknown conntrack state 'OPEN': one of INVALID, NEW, RELATED, ESTABLISHED, UNTRACKED"),
    ([], "ctstate: give at least one state"),
])
def test_bad_ctstate_is_refused(given, message):
    with pytest.raises(MatchError, match=message):
        M(ctstate=given)


# -- mark ----------------------------------------------------------------------------------

@pytest.mark.parametrize("given,want", [
    (7, (7, 0xFFFFFFFF, False)),
    ((0x13, 0x0F), (0x03, 0x0F, False)),  # the value is taken under the mask, as the kernel compares
    ("0x5/0xff", (5, 0xFF, False)),
    ("!0x5/0xff", (5, 0xFF, True)),
    ("10", (10, 0xFFFFFFFF, False)),
    ("0o17/7", (7, 7, False)),
    (option(0x100), (0x100, 0xFFFFFFFF, False)),
])
def test_mark_forms(given, want):
    assert M(mark=given).mark == want


@pytest.mark.parametrize("given,message", [
    ("five", "use an int, \\(value, mask\\) or 'value/mask'"),
    ((1, 2, 3), "use an int"),
    (0x1_0000_0000, "32-bit unsigned"),
    ((1, -1), "32-bit unsigned"),
])
def test_bad_marks_are_refused(given, message):
    with pytest.raises(MatchError, match=message):
        M(mark=given)


# -- describe and the fake-packet evaluation -----------------------------------------------

def test_describe_every_keyword():
    m = M(proto="tcp", src="!10.0.0.0/8", dst="10.1.0.1", sport="1024:65535", dport="!22,23", iif="eth+",
          oif="!wg0", ctstate="new", mark="!0x1/0xf")
    assert m.describe() == ("ipv4 tcp src !10.0.0.0/8 dst 10.1.0.1/32 sport 1024:65535 dport !22,23 iif eth+ "
                            "oif !wg0 ctstate NEW mark !0x1/0xf")
    assert M().describe() == "all packets"
    assert M(family=6).describe() == "ipv6"


@pytest.mark.parametrize("kw,pkt,ctstate,hit", [
    (dict(proto="tcp", dport=22), dict(proto="tcp", dport=22), None, True),
    (dict(proto="tcp", dport=22), dict(proto="udp", dport=22), None, False),
    (dict(proto="tcp", dport="!22"), dict(proto="tcp", dport=80), None, True),
    (dict(src="!192.0.2.0/24"), dict(src="192.0.2.9", dst="192.0.2.10"), None, False),
    (dict(src="!192.0.2.0/24"), dict(src="198.51.100.1"), None, True),
    (dict(src="192.0.2.0/24"), dict(src="2001:db8::1"), None, False),  # other family: never
    (dict(family=6), dict(src="2001:db8::1"), None, True),
    (dict(family=6), dict(), None, False),
    (dict(iif="eth+"), dict(hook="FORWARD", iif="eth3"), None, True),
    (dict(iif="!eth+"), dict(hook="FORWARD", iif="eth3"), None, False),
    (dict(ctstate="new"), dict(), None, True),  # a fake packet is NEW unless told
    (dict(ctstate="new"), dict(), "established", False),
    (dict(mark=(0x4, 0x4)), dict(mark=0x6), None, True),
    (dict(mark="!0x4/0x4"), dict(mark=0x6), None, False),
])
def test_matches_evaluates_like_the_kernel_rule(kw, pkt, ctstate, hit):
    assert M(**kw).matches(fake_packet(**pkt), ctstate) is hit
