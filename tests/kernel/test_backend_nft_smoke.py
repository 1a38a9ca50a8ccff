"""The backend an engine runs with holds all of its rules and the other holds none; a stale
set left by a kill -9 under one backend is removed by a start or a flush under the other.

Parametrized by conftest over both backends (``nfh_backend``): the test's backend is the one
``nfhooks run`` starts with, ``other`` the one the stale set is left in.
"""

from __future__ import annotations

import signal
import sys

from .conftest import POLICIES, SAVE_TOOLS, metric

FIREWALL = str(POLICIES / "firewall.py")
LAB = str(POLICIES / "lab.py")


def ours(lab, backend: str, node: str = "router") -> list[str]:
    """Our lines in ``backend``'s save output (both families), read with that backend's tool."""
    out = ""
    for fam in (4, 6):
        cp = lab.exec(node, SAVE_TOOLS[backend][fam], check=False)
        out += cp.stdout
    return [line for line in out.splitlines() if "NFH-" in line or "nfhooks" in line]


def other(backend: str) -> str:
    return "legacy" if backend == "nft" else "nft"


def nfhooks(lab, *args: str, check: bool = True):
    return lab.exec("router", sys.executable, "-m", "nfhooks", *args, check=check, timeout=60)


def test_run_writes_only_to_its_backend_and_decides_traffic(nfh_lab, nfh_backend):
    lab = nfh_lab
    server = lab.tcp_server("router", 7001)
    assert lab.tcp_connect("client", lab.addr("router"), 7001) == "ok"  # before: open
    eng = lab.start_engine(FIREWALL, "--backend", nfh_backend)
    assert f"nfhooks: backend {nfh_backend} (--backend)" in eng.log()
    mine = ours(lab, nfh_backend)
    assert len(mine) > 20 and any("-j NFQUEUE --queue-num" in line for line in mine)
    assert ours(lab, other(nfh_backend)) == []
    assert lab.ping("client", lab.addr("router")) and lab.ping("client", lab.addr("router", 6))
    assert lab.tcp_connect("client", lab.addr("router"), 7001) == "refused"  # INPUT default reject
    assert metric(lab, "nfhooks_handler_packets_total", handler="icmp", verdict="accept") >= 1
    assert metric(lab, "nfhooks_handler_packets_total", handler="icmpv6", verdict="accept") >= 1
    # `nfhooks rules --save` reads the same backend: the same text `check` prints
    want = nfhooks(lab, "check", FIREWALL, "--backend", nfh_backend).stdout
    assert nfhooks(lab, "rules", "--save", "--backend", nfh_backend).stdout == want
    assert want.startswith("# backend nft (iptables-nft-restore)\n") == (nfh_backend == "nft")
    assert eng.stop(signal.SIGTERM) == 0
    assert ours(lab, nfh_backend) == [] and ours(lab, other(nfh_backend)) == []
    assert lab.tcp_connect("client", lab.addr("router"), 7001) == "ok"
    assert server.wait_peers(2)


def test_lab_policy_all_tables_in_its_backend(nfh_lab, nfh_backend):
    lab = nfh_lab
    eng = lab.start_engine(LAB, "--backend", nfh_backend)
    mine = "\n".join(ours(lab, nfh_backend))
    for chain in ("-A PREROUTING", "-A POSTROUTING", "-A FORWARD", "NFH-CONNSAVE"):
        assert chain in mine
    assert ours(lab, other(nfh_backend)) == []
    assert eng.stop(signal.SIGTERM) == 0
    assert ours(lab, nfh_backend) == [] and ours(lab, other(nfh_backend)) == []


def test_kill9_under_one_backend_then_start_under_the_other(nfh_lab, nfh_backend):
    lab = nfh_lab
    stale = lab.start_engine(FIREWALL, "--backend", other(nfh_backend))
    left = sorted(ours(lab, other(nfh_backend)))
    stale.kill9()
    assert sorted(ours(lab, other(nfh_backend))) == left and left  # nobody removed it
    eng = lab.start_engine(FIREWALL, "--backend", nfh_backend)
    assert f"stale nfhooks rule set (backend {other(nfh_backend)})" in eng.log()
    assert ours(lab, other(nfh_backend)) == []  # gone from the other backend
    assert len(ours(lab, nfh_backend)) == len(left)  # exactly one set, in this backend
    assert lab.tcp_connect("client", lab.addr("router"), 7001, timeout=2) in ("refused", "timeout")
    assert eng.stop() == 0
    assert ours(lab, nfh_backend) == [] and ours(lab, other(nfh_backend)) == []


def test_flush_removes_a_stale_set_from_both_backends(nfh_lab, nfh_backend):
    lab = nfh_lab
    lab.start_engine(FIREWALL, "--backend", other(nfh_backend)).kill9()
    assert ours(lab, other(nfh_backend))
    out = nfhooks(lab, "flush", "--backend", nfh_backend).stdout
    assert f"{other(nfh_backend)}: iptables filter" in out
    assert ours(lab, other(nfh_backend)) == [] and ours(lab, nfh_backend) == []
    assert "nothing to remove" in nfhooks(lab, "flush", "--backend", nfh_backend).stdout
