"""`nfhooks rules` on a live engine, under both rule backends: what a user reads.

The router runs policies/firewall.py (INPUT default reject); the client pings the router (the
icmp handler) and connects to a closed port (no handler: the INPUT default rejects it). Then
`nfhooks rules` must show, read the way `iptables -L -v` reads: the INPUT default like a
chain policy with the kernel's counters of the default rules, a row per handler whose
counters are its queue rule's, no plumbing unless -v; `--save` stays what `check` prints.
"""

from __future__ import annotations

import os
import re
import sys

from .conftest import POLICIES, rule_counter, save

FIREWALL = str(POLICIES / "firewall.py")


def nfhooks(lab, *args: str) -> str:
    r = lab.exec("router", sys.executable, "-m", "nfhooks", *args, check=True, timeout=30,
                 env={**os.environ, "COLUMNS": "80"})  # rich: an 80-column terminal
    return r.stdout


def _cells(line: str) -> list[str]:
    return [c for c in re.split(r"\s{2,}", line.strip()) if c]


def _default_counter(lab, family: int) -> int:
    return sum(int(ln.split("]")[0].strip("[").split(":")[0]) for ln in save(lab, "router", family, "-c").splitlines()
               if '"nfhooks default"' in ln and "NFH-INPUT" in ln)


def test_rules_reads_like_iptables_list_verbose(nfh_lab):
    lab = nfh_lab
    want_save = nfhooks(lab, "check", FIREWALL)
    lab.start_engine(FIREWALL)
    router = lab.addr("router")
    assert lab.ping("client", router)
    assert lab.tcp_connect("client", router, 9, timeout=1.0) == "refused"  # the default: reject
    lab.wait_for(lambda: rule_counter(lab, "icmp") > 0 and _default_counter(lab, 4) > 0, timeout=10,
                 interval=0.1, what="the kernel counted the ping and the rejected connection")

    text = nfhooks(lab, "rules")
    lines = text.splitlines()
    assert all(len(ln) <= 80 for ln in lines), text
    default = _default_counter(lab, 4)
    title = next(ln for ln in lines if ln.startswith("Chain INPUT, table filter, IPv4"))
    m = re.search(r"\(default REJECT: (\d+) packets, \d+ bytes\)", title)
    assert m and 0 < int(m.group(1)) <= default, (title, default)  # counters only grow
    assert "Chain OUTPUT, table filter, IPv4 (default ACCEPT, no rule)" in lines
    assert any(ln.startswith("Chain INPUT, table filter, IPv6 (default REJECT") for ln in lines)
    icmp = next(_cells(ln) for ln in lines if "icmp" in _cells(ln))
    assert icmp[2:4] == ["icmp", "queue 3"] and 0 < int(icmp[0]) <= rule_counter(lab, "icmp"), icmp
    for gone in ("-m mark", "nfhooks gen", "NFH-CONNSAVE", "--set-xmark"):
        assert gone not in text, gone
    assert "plumbing rules" in text and "-v shows them" in text

    verbose = nfhooks(lab, "rules", "-v")
    for kind in ("(generation stamp)", "(resume mark)", "(reject dispatch)", "(connmark save)", "(jump)"):
        assert kind in verbose, kind

    assert nfhooks(lab, "rules", "--save") == want_save  # byte for byte what check prints
