"""Rule backends on the real kernel (issue 15): rules live only in the store the backend names.

With ``--backend nft`` nothing of ours appears in legacy xtables and no legacy table is even
created in the namespace (/proc/net/ip*_tables_names stays empty): the closest this machine
comes to a kernel without legacy tables. With ``--backend legacy`` nf_tables holds nothing of
ours. A policy with handlers in all four tables (raw, mangle, nat through a DNAT and a
masquerade verdict, filter through a reject) runs for IPv4 and IPv6 under real traffic. And a
stale set a kill -9 left under one backend is removed by a start under the other.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import BACKENDS, metric, nfh_lines, rule_counter, save

OTHER = {"legacy": "nft", "nft": "legacy"}
TABLES = {"raw", "mangle", "nat", "filter"}
HANDLERS = ("raw_seen", "to_server", "masq", "refused")
RAW_PORT, DNAT_PORT, SERVER_PORT, REJECT_PORT = 9100, 9180, 8080, 9123

POLICY = f'''
from nfhooks import Policy, accept, reject
from nfhooks.verdict import dnat, masquerade

policy = Policy()
server = policy.option("server", default="192.0.2.2", type="address")
server6 = policy.option("server6", default="2001:db8::2", type="address")


@policy.prerouting(table="raw", proto="udp", dport={RAW_PORT})
def raw_seen(pkt):
    return accept()


@policy.prerouting(iif="lan", proto="tcp", dport={DNAT_PORT})
def to_server(pkt):
    return dnat(str(server6.value if pkt.version == 6 else server.value), {SERVER_PORT})


@policy.postrouting(proto="tcp", dport={SERVER_PORT})
def masq(pkt):
    return masquerade()


@policy.input(proto="tcp", dport={REJECT_PORT})
def refused(pkt):
    return reject()
'''


def backend_flag(name: str) -> list[str]:
    """``--backend NAME`` once ``nfhooks run`` has it (NFHOOKS_BACKEND is set in any case)."""
    helptext = subprocess.run([sys.executable, "-m", "nfhooks", "run", "--help"], capture_output=True,
                              text=True, timeout=60).stdout
    return ["--backend", name] if "--backend" in helptext else []


def legacy_tables(lab) -> list[str]:
    """Legacy xtables tables that exist in the router's namespace (both families)."""
    out = lab.exec("router", "cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names", check=False)
    return out.stdout.split()


def ours(text: str) -> list[str]:
    return [line for line in text.splitlines() if "NFH-" in line or "nfhooks" in line]


def our_tables(text: str) -> set[str]:
    """Tables of save text that hold one of our chains."""
    found, table = set(), ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":NFH-"):
            found.add(table)
    return found


def our_chains(lab, backend: str) -> list[str]:
    return sorted(f"{fam} {line.split()[0]}" for fam in (4, 6)
                  for line in save(lab, "router", fam, backend=backend).splitlines() if line.startswith(":NFH-"))


def write_policy(tmp_path: Path) -> str:
    pol = tmp_path / "four_tables.py"
    pol.write_text(POLICY)
    pol.chmod(0o644)
    return str(pol)


def start(lab, tmp_path: Path, backend: str, **kw):
    return lab.start_engine(write_policy(tmp_path), "--set", f"server={lab.addr('server')}",
                            "--set", f"server6={lab.addr('server', 6)}", *backend_flag(backend), **kw)


def drive(lab, servers, n: int) -> None:
    """Traffic through every table, both families; ``n``: connections each server saw so far."""
    for fam in (4, 6):
        router = lab.addr("router", fam)
        assert lab.udp_send("client", router, RAW_PORT, b"raw") == b"raw"  # raw PREROUTING: accept
        assert lab.tcp_connect("client", router, REJECT_PORT) == "refused"  # filter INPUT: reject
        # mangle PREROUTING: DNAT to the server's SERVER_PORT; nat POSTROUTING: masqueraded
        assert lab.tcp_connect("client", lab.addr("server", fam), DNAT_PORT) == "ok"
        assert servers[fam].wait_peers(n)[-1] == lab.addr("router", fam, facing="server")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nfh_backend", BACKENDS, indirect=True)
def test_rules_live_only_in_the_chosen_backend(nfh_lab, tmp_path, nfh_backend):
    lab, other = nfh_lab, OTHER[nfh_backend]
    assert legacy_tables(lab) == [], "the lab itself created legacy tables: nothing below would mean much"
    servers = {fam: lab.tcp_server("server", SERVER_PORT, fam) for fam in (4, 6)}
    for fam in (4, 6):
        lab.udp_server("router", RAW_PORT, fam)
    eng = start(lab, tmp_path, nfh_backend)
    drive(lab, servers, 1)

    for fam in (4, 6):
        mine = save(lab, "router", fam, "-c", backend=nfh_backend)
        assert our_tables(mine) == TABLES, mine
        nat = [line for line in mine.splitlines() if '"nfhooks nat' in line]
        assert any("-j DNAT" in line for line in nat) and any("-j MASQUERADE" in line for line in nat), mine
        for handler in HANDLERS:  # the kernel counted what it queued, in this store
            assert rule_counter(lab, handler, family=fam) >= 1, (fam, handler, mine)
        assert ours(save(lab, "router", fam, backend=other)) == [], f"{other} holds rules of ours (IPv{fam})"
    for handler in HANDLERS:
        assert metric(lab, "nfhooks_handler_packets_total", handler=handler) >= 2, handler
    assert metric(lab, "nfhooks_handler_errors_total") == 0
    ruleset = lab.exec("router", "nft", "list", "ruleset", check=False).stdout
    if nfh_backend == "nft":
        assert legacy_tables(lab) == [], "--backend nft created legacy xtables tables"
        assert "NFH-INPUT" in ruleset and "table ip6 raw" in ruleset, ruleset
    else:
        assert ours(ruleset) == [], ruleset

    assert eng.stop() == 0, eng.log()[-2000:]
    assert nfh_lines(lab, backend=nfh_backend) == [] and nfh_lines(lab, backend=other) == []
    if nfh_backend == "nft":
        assert legacy_tables(lab) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nfh_backend", BACKENDS, indirect=True)
def test_a_stale_set_of_the_other_backend_is_removed_by_a_start(nfh_lab, tmp_path, nfh_backend):
    """kill -9 under one backend, start under ``nfh_backend``: exactly one set, in the new store."""
    lab, first = nfh_lab, OTHER[nfh_backend]
    servers = {fam: lab.tcp_server("server", SERVER_PORT, fam) for fam in (4, 6)}
    for fam in (4, 6):
        lab.udp_server("router", RAW_PORT, fam)
    eng = start(lab, tmp_path, first, env={"NFHOOKS_BACKEND": first})
    stale = our_chains(lab, first)
    assert stale and our_chains(lab, nfh_backend) == []
    eng.kill9()
    assert our_chains(lab, first) == stale  # a crash removes nothing

    eng2 = start(lab, tmp_path, nfh_backend)
    assert nfh_lines(lab, backend=first) == [], eng2.log()[-2000:]
    assert our_chains(lab, nfh_backend) == stale  # exactly one set, now in the other store
    drive(lab, servers, 1)
    assert metric(lab, "nfhooks_handler_packets_total", handler="raw_seen") == 2
    assert eng2.stop() == 0, eng2.log()[-2000:]
    assert nfh_lines(lab, backend=first) == [] and nfh_lines(lab, backend=nfh_backend) == []
