"""policies/ssh_guard.py on the real kernel (issue 16.6): Python counts new SSH connections per
source, a source over ``max_new`` is banned in a kernel set, the kernel drops it until the ban
ends; Python never sees a banned source's packets nor the rest of an allowed connection.
IPv4 and IPv6, both rule backends (conftest.py)."""

from __future__ import annotations

import shutil

import pytest

from .conftest import POLICIES, metric, rule_counter

pytestmark = pytest.mark.skipif(shutil.which("ipset") is None,
                                reason="address sets need the ipset program (Debian package ipset)")

PORT = 2022  # the option port (not 22: nothing in the lab listens there by accident)
MAX_NEW, BAN = 3, 3


def ssh_packets(lab) -> float:
    return metric(lab, "nfhooks_handler_packets_total", handler="ssh")


def members(lab, name: str) -> list[str]:
    out = lab.exec("router", "ipset", "list", name).stdout
    lines = out.split("Members:\n", 1)[1].splitlines() if "Members:\n" in out else []
    return [line.split()[0] for line in lines if line.strip()]


@pytest.mark.parametrize("family", [4, 6])
def test_flooding_source_is_banned_in_the_kernel_until_the_ban_ends(nfh_lab, family):
    lab = nfh_lab
    eng = lab.start_engine(str(POLICIES / "ssh_guard.py"), "--set", f"port={PORT}", "--set", "window=30",
                           "--set", f"max_new={MAX_NEW}", "--set", f"ban={BAN}")
    lab.tcp_server("router", PORT, family, bind="::" if family == 6 else "0.0.0.0")
    to_router = lab.addr("router", family, facing="client")
    client, banned_set = lab.addr("client", family), f"nfh-banned-{family}"

    for i in range(MAX_NEW):  # allowed: Python sees each connection's first packet only
        assert lab.tcp_connect("client", to_router, PORT, timeout=2.0) == "ok", f"connection {i + 1}"
    assert ssh_packets(lab) == MAX_NEW  # the rest of each connection: the kernel's established rule
    assert rule_counter(lab, "kernel established", family=family) > 0

    # the (max_new+1)-th connection: its first packet gets the source banned, and is dropped
    assert lab.tcp_connect("client", to_router, PORT, timeout=0.5) == "timeout"
    assert members(lab, banned_set) == [client]
    seen = ssh_packets(lab)
    assert seen == MAX_NEW + 1
    dropped = rule_counter(lab, "kernel banned", family=family)

    # banned: the kernel drops the next attempt by itself, Python sees nothing of it
    assert lab.tcp_connect("client", to_router, PORT, timeout=0.5) == "timeout"
    assert ssh_packets(lab) == seen
    assert rule_counter(lab, "kernel banned", family=family) > dropped

    # another source (the server, on the WAN side) is unaffected
    assert lab.tcp_connect("server", lab.addr("router", family, facing="server"), PORT, timeout=2.0) == "ok"
    assert ssh_packets(lab) == seen + 1

    # the ban ends: the source is served again, and counted afresh by Python
    lab.wait_for(lambda: not members(lab, banned_set), timeout=BAN + 10, interval=0.2)
    assert lab.tcp_connect("client", to_router, PORT, timeout=2.0) == "ok"
    assert ssh_packets(lab) == seen + 2
    eng.stop()
    assert "Traceback" not in eng.log()
