"""Address sets without root (issue 16.1): declarations and their errors, the set match and
kernel verdict rules as compiled, fake packets against an unbound set, `check` lines, and the
time to read and check a 100,000-entry list (printed)."""

from __future__ import annotations

import ipaddress
import time

import pytest

from nfhooks import Policy, accept, drop, reject
from nfhooks.errors import PolicyError
from nfhooks.features.sets import SetsFeature
from nfhooks.fake import fake_packet
from nfhooks.rules import compile_policy
from nfhooks.sets import SetError, parse_entry


def rules_of(p: Policy) -> list[str]:
    return [line for line in compile_policy(p).render().splitlines() if line.startswith("-A NFH-")]


def test_set_match_renders_per_family_with_negation_and_ports() -> None:
    p = Policy("t")
    banned = p.set("banned", timeout=600)
    svc = p.set("svc", kind="ip,port", family="ipv6")

    @p.input(proto="tcp", dport=80, src=~banned)
    def web(pkt):
        return accept()

    @p.input(proto="tcp", src=svc)
    def pairs(pkt):
        return drop()

    got = rules_of(p)
    assert any("-m set ! --match-set nfh-banned-4 src -m mark" in r and '"nfhooks web"' in r for r in got)
    assert any("-m set ! --match-set nfh-banned-6 src -m mark" in r for r in got)
    assert [r for r in got if "nfh-svc" in r] == [next(r for r in got if "nfh-svc-6 src,dst" in r)]  # v6 only
    assert p.handlers[1].match.family == 6


def test_kernel_verdicts_are_queue_free_rules_before_every_handler() -> None:
    p = Policy("t")
    blocked = p.set("blocked", kind="net", entries=["192.0.2.0/24", "2001:db8::/32"])
    p.kernel_verdict("INPUT", drop(), src=blocked)
    p.kernel_verdict("INPUT", reject(), proto="tcp", dport=23, name="telnet")

    @p.input(proto="tcp", dport=22, table="mangle")
    def ssh(pkt):
        return accept()

    got = rules_of(p)
    drops = [r for r in got if '"nfhooks kernel drop_blocked"' in r]
    assert len(drops) == 4  # mangle and filter (a mangle handler must not see them), both families
    assert all(r.endswith("-j DROP") and "NFQUEUE" not in r for r in drops)
    mangle_v4 = [r for r in compile_policy(p).rules[(4, "mangle")]]
    kernel_at = next(i for i, r in enumerate(mangle_v4) if r.target == "DROP")
    queue_at = next(i for i, r in enumerate(mangle_v4) if r.target == "NFQUEUE")
    assert kernel_at < queue_at
    telnet = [r for r in got if '"nfhooks kernel telnet"' in r]
    assert len(telnet) == 2 and all("--reject-with tcp-reset" in r for r in telnet)  # filter only, v4 + v6


def test_declaration_errors_name_the_line() -> None:
    p = Policy("t")
    with pytest.raises(PolicyError, match="kind 'mac'"):
        p.set("a", kind="mac")
    with pytest.raises(PolicyError, match="1..25 letters"):
        p.set("a-b")
    with pytest.raises(PolicyError, match="timeout=0"):
        p.set("a", timeout=0)
    with pytest.raises(PolicyError, match="entries include IPv6"):
        p.set("a", family=4, entries=["2001:db8::1"])
    with pytest.raises(PolicyError, match="not an address"):
        p.set("a", entries=["10.0.0.0/8"])  # kind ip
    p.set("a")
    with pytest.raises(PolicyError, match="declared twice"):
        p.set("a")
    with pytest.raises(PolicyError, match="accept\\(\\), drop\\(\\) or reject\\(\\)"):
        p.kernel_verdict("INPUT", "drop")
    with pytest.raises(PolicyError, match="reject cannot"):
        p.kernel_verdict("PREROUTING", reject())
    v4 = p.set("v4", family=4)
    with pytest.raises(PolicyError, match="IPv4 only"):
        @p.input(src=v4, family="ipv6")
        def h(pkt):
            return accept()


def test_file_errors_name_the_file_and_line(tmp_path) -> None:
    f = tmp_path / "list.txt"
    f.write_text("# ok\n10.0.0.1\n\nnot-an-address\n")
    with pytest.raises(PolicyError) as e:
        Policy("t").set("b", file=str(f))
    assert f"{f}:4:" in str(e.value)


def test_entries_as_ipset_writes_them() -> None:
    assert parse_entry("ip", ipaddress.ip_address("2001:db8::1")) == (6, "2001:db8::1")
    assert parse_entry("net", "10.1.2.3/8") == (4, "10.0.0.0/8")
    assert parse_entry("ip,port", ("192.0.2.1", 22)) == (4, "192.0.2.1,tcp:22")
    assert parse_entry("ip,port", "2001:db8::1,udp:53") == (6, "2001:db8::1,udp:53")
    for kind, bad in (("ip", "example.com"), ("net", "0.0.0.0/0"), ("ip,port", "192.0.2.1,icmp:3"),
                      ("ip", "10.0.0.1\nflush")):
        with pytest.raises(SetError):
            parse_entry(kind, bad)


def test_unbound_set_answers_fake_packets_like_the_kernel() -> None:
    p = Policy("t")
    banned = p.set("banned", timeout=600, entries=["10.0.0.9"])
    nets = p.set("nets", kind="net", entries=["192.0.2.0/24"])

    @p.input(proto="tcp", dport=80, src=~banned)
    def web(pkt):
        banned.add(pkt.src, timeout=60)
        return accept()

    @p.input(proto="tcp", dport=81, src=nets)
    def listed(pkt):
        return drop()

    assert "10.0.0.9" in banned and len(banned) == 1
    h, v = p.decide(fake_packet(src="10.0.0.1", dst="10.0.0.2", proto="tcp", dport=80, hook="INPUT"))
    assert h is not None and h.name == "web" and v.kind == "accept"
    assert "10.0.0.1" in banned and len(banned) == 2
    h, _ = p.decide(fake_packet(src="10.0.0.1", dst="10.0.0.2", proto="tcp", dport=80, hook="INPUT"))
    assert h is None  # now banned: the handler's match no longer fits
    banned.remove("10.0.0.1")
    assert "10.0.0.1" not in banned
    h, _ = p.decide(fake_packet(src="192.0.2.77", dst="10.0.0.2", proto="tcp", dport=81, hook="INPUT"))
    assert h is not None and h.name == "listed"
    with pytest.raises(SetError):
        banned.add("10.0.0.1", timeout=-1)


def test_check_lines_show_the_ipset_commands_only_for_policies_with_sets() -> None:
    plain = Policy("plain")
    assert SetsFeature().check_lines(plain, compile_policy(plain)) == []
    p = Policy("t")
    p.set("banned", timeout=60, entries=[f"10.0.0.{i}" for i in range(1, 6)])
    lines = SetsFeature().check_lines(p, compile_policy(p))
    assert "#   create nfh-banned-4 hash:ip family inet timeout 60 maxelem 65536" in lines
    assert "#   add nfh-banned-4 10.0.0.1 timeout 0" in lines
    assert any("2 more add lines" in line for line in lines)
    assert "#   create nfh-banned-6 hash:ip family inet6 timeout 60 maxelem 65536" in lines


def test_a_100k_list_is_read_and_checked_quickly(tmp_path) -> None:
    f = tmp_path / "big.txt"
    f.write_text("".join(f"{ipaddress.IPv4Address(0x0B000000 + i)}\n" for i in range(100_000)))
    t0 = time.perf_counter()
    s = Policy("t").set("big", kind="net", file=str(f))
    took = time.perf_counter() - t0
    print(f"\n100,000-entry list read and checked in {took:.2f} s (the kernel load is timed in "
          "tests/kernel/test_sets_kernel.py)")
    assert len(s.declared()) == 100_000
    assert s.maxelem(4) == 262144 and s.maxelem(6) == 65536


def test_a_forked_process_never_uses_or_ends_the_shell_it_inherited():
    """--workers: a worker holds the main process's IpsetShell object after fork; writing the
    same ipset's stdin from two processes would mix their answers."""
    import os

    from nfhooks.sets_ipset import IpsetShell

    sh = IpsetShell()
    theirs, their_lock = object(), sh._lock
    sh._proc = theirs  # type: ignore[assignment]  # as if started by the process we were forked from
    sh._owner = os.getpid() + 1
    their_lock.acquire()  # held by a thread that does not exist in a forked child
    sh.close()  # must not quit the other process's shell (nor wait for its lock)
    assert sh._proc is None and sh._lock is not their_lock and sh._owner == os.getpid()
    their_lock.release()
    sh._proc = theirs  # type: ignore[assignment]
    sh._mine()  # our own process's shell is kept
    assert sh._proc is theirs
