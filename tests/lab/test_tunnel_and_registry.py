"""Pure parts of the lab: the tunnel's helpers and the scenario registry (no root needed)."""

from __future__ import annotations

import struct

import pytest

from nfhooks import tunnel


def test_ifreq_layout():
    raw = tunnel.ifreq("tun0")
    assert len(raw) == 40  # sizeof(struct ifreq)
    name, flags = struct.unpack_from("16sH", raw)
    assert name.rstrip(b"\0") == b"tun0"
    assert flags == tunnel.IFF_TUN | tunnel.IFF_NO_PI == 0x1001
    for bad in ("", "x" * 16, "a/b", "a b"):
        with pytest.raises(ValueError, match="interface name"):
            tunnel.ifreq(bad)


def test_parse_endpoint():
    assert tunnel.parse_endpoint("10.0.2.1:51820") == ("10.0.2.1", 51820)
    assert tunnel.parse_endpoint("[fd00::1]:5") == ("fd00::1", 5)
    for bad in ("10.0.2.1", "fd00::1:80", "[fd00::1]", "10.0.2.1:0", "10.0.2.1:70000", "host:80",
                "10.0.2.1:x"):
        with pytest.raises(ValueError):
            tunnel.parse_endpoint(bad)


def test_describe_packets():
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import IPv6

    assert tunnel.describe(bytes(IP(src="10.0.1.2", dst="10.0.3.2") / TCP(sport=4000, dport=8080, flags="S"))) \
        == "IPv4 tcp 10.0.1.2:4000 -> 10.0.3.2:8080 [S] 40B"
    assert tunnel.describe(bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1, dport=53))) \
        == "IPv6 udp [fd00::1]:1 -> [fd00::2]:53 48B"
    assert tunnel.describe(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP())) == "IPv4 icmp 10.0.0.1 -> 10.0.0.2 28B"
    assert tunnel.describe(b"") == "empty packet"
    assert tunnel.describe(b"\x45\x00") == "not an IP packet (2 bytes)"


def test_tunnel_refuses_mixed_families():
    with pytest.raises(ValueError, match="one address family"):
        tunnel.run("tun9", "127.0.0.1:5000", "[::1]:5000")


def test_registry_groups_select_and_register():
    from nfhooks.lab import runner
    from nfhooks.lab.runner import LabError, Scenario, groups, register, select

    g = groups()
    assert "vpn" in g["all"] and "vpn" not in g["standard"] and g["vpn"] == ["vpn"]
    for key in ("forwarded", "masquerade", "dnat-local", "port-forward", "reject", "mangle",
                "malformed", "forwarding-off", "to-router", "from-router", "output-drop"):
        assert key in g["standard"], key
    assert [s.key for s in select([])] == g["standard"]
    assert [s.key for s in select(["reject,forwarded"])] == ["forwarded", "reject"]  # registry order
    assert [s.key for s in select(["vpn"])] == ["vpn"]
    with pytest.raises(LabError, match="unknown scenario 'nope'.*groups.*vpn"):
        select(["nope"])
    before = list(runner.SCENARIOS)
    try:
        sc = register(Scenario("zz-test", "t", "d", ("FORWARD",), lambda c: [], groups=("zz",)))
        assert select(["zz"]) == [sc]
        sc2 = register(Scenario("zz-test", "t2", "d", ("FORWARD",), lambda c: [], groups=("zz",)))
        assert select(["zz"]) == [sc2] and len(runner.SCENARIOS) == len(before) + 1
    finally:
        runner.SCENARIOS[:] = before


def test_lab_sets_only_for_declared_options():
    from types import SimpleNamespace

    from nfhooks.lab.prepare import lab_sets

    class FakeLab:
        def addr(self, node, family=4, facing=None):
            return {4: f"10.9.0.{len(node)}", 6: f"fd00::{len(node)}"}[family]

        def iface(self, node, peer):
            return "lan" if peer == "client" else "wan"

    pol = SimpleNamespace(options={"proxy": None, "proxy6": None, "inside": None, "drop_dst": None})
    sets = lab_sets(FakeLab(), pol, [])
    assert sets == ["drop_dst=10.9.0.6", "proxy=10.9.0.5:8080", "proxy6=[fd00::5]:8080", "inside=10.9.0.6"]
    assert lab_sets(FakeLab(), SimpleNamespace(options={}), []) == []  # a user's policy without them
