"""`nfhooks rules` reads like `iptables -L -v` (nfhooks/rulesview.py), on recorded save text.

tests/unit/test_views_saved/ holds ``iptables-legacy-save -c`` output (both families) recorded
in a namespace lab while engines ran policies/firewall.py and policies/lab.py and a client sent
traffic (connections to open, rejected and dropped ports, a ping, a forwarded connection). The
view must show, per hook and table, the default like iptables' chain policy with its counters,
one row per handler with its rule's counters, and fold the plumbing away unless verbose.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from rich.console import Console

from nfhooks.rulesview import classify, human, sections, view
from nfhooks.saved import Counted, installed_text

SAVED = Path(__file__).parent / "test_views_saved"
HANDLER = re.compile(r'--comment "nfhooks (\w+)" -j NFQUEUE')


def _counted(name: str) -> list[Counted]:
    return installed_text({fam: (SAVED / f"{name}.{fam}.save").read_text() for fam in (4, 6)})[1]


def _text(counted: list[Counted], verbose: bool = False, width: int = 80) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(view(counted, verbose))
    return console.export_text().splitlines()


def _cells(line: str) -> list[str]:
    return [c for c in re.split(r"\s{2,}", line.strip()) if c]


def _section(lines: list[str], title_start: str) -> list[str]:
    i = next(i for i, ln in enumerate(lines) if ln.startswith(title_start))
    j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("Chain ")), len(lines))
    return lines[i:j]


@pytest.mark.parametrize("name", ["firewall", "lab"])
def test_one_row_per_handler_with_its_rule_counters(name: str) -> None:
    counted = _counted(name)
    lines = _text(counted)
    for c in counted:
        m = HANDLER.search(c.text)
        if not m:
            continue
        hook = c.chain.removeprefix("NFH-")
        fam = "IPv6" if c.family == 6 else "IPv4"
        sec = _section(lines, f"Chain {hook}, table {c.table}, {fam}")
        row = [_cells(ln) for ln in sec if m.group(1) in _cells(ln)]
        assert len(row) == 1, (m.group(1), sec)
        assert row[0][:2] == [human(c.packets), human(c.bytes)], (row, c)
        assert row[0][3].startswith("queue "), row
    # real traffic was counted somewhere, and the counters are shown
    assert any(c.packets for c in counted if HANDLER.search(c.text))


@pytest.mark.parametrize("name", ["firewall", "lab"])
def test_the_default_reads_like_a_chain_policy(name: str) -> None:
    counted = _counted(name)
    lines = _text(counted)
    for fam in (4, 6):
        defaults = [c for c in counted if c.family == fam and '"nfhooks default"' in c.text and c.chain == "NFH-INPUT"]
        pk, by = sum(c.packets for c in defaults), sum(c.bytes for c in defaults)
        verdict = "REJECT" if name == "firewall" else "DROP"
        want = f"Chain INPUT, table filter, IPv{fam} (default {verdict}: {human(pk)} packets, {human(by)} bytes)"
        assert want in lines, (want, [ln for ln in lines if ln.startswith("Chain INPUT")])
    # no default rule: accept, said as such (not a silent gap)
    assert "Chain OUTPUT, table filter, IPv4 (default ACCEPT, no rule)" in lines
    if name == "firewall":
        assert any(c.packets for c in counted if '"nfhooks default"' in c.text)  # the reject was counted


@pytest.mark.parametrize("name", ["firewall", "lab"])
def test_plumbing_is_folded_unless_verbose(name: str) -> None:
    counted = _counted(name)
    lines = _text(counted)
    text = "\n".join(lines)
    for plumbing in ("-m mark", "--set-xmark", "CONNMARK", "NFH-CONNSAVE", "nfhooks gen", "--comment"):
        assert plumbing not in text, plumbing
    folded = sum(int(n) for n in re.findall(r"\+ (\d+) plumbing rules", text))
    handlers = sum(1 for c in counted if HANDLER.search(c.text))
    defaults = sum(1 for c in counted if '"nfhooks default"' in c.text)
    assert folded + handlers + defaults == len(counted)  # every rule is shown or counted as folded
    verbose = "\n".join(_text(counted, verbose=True, width=400))
    for kind in ("(generation stamp)", "(resume mark)", "(reject dispatch)", "(connmark save)", "(jump)"):
        assert kind in verbose, kind
    body = [ln for ln in verbose.splitlines() if re.match(r"^\s+\d+[KMG]?\s+\d+[KMG]?\s{2,}", ln)]
    assert len(body) == len(counted)  # -v: one row per installed rule


@pytest.mark.parametrize("name", ["firewall", "lab"])
def test_fits_80_columns_with_whole_headers(name: str) -> None:
    lines = _text(_counted(name))
    assert all(len(ln) <= 80 for ln in lines)
    headers = [ln.split() for ln in lines if ln.split()[:1] == ["pkts"]]
    assert headers and all(h == ["pkts", "bytes", "handler", "action", "match"] for h in headers)


def test_lab_sections_follow_the_packet_path() -> None:
    titles = [ln for ln in _text(_counted("lab")) if ln.startswith("Chain ")]
    v4 = [re.match(r"Chain (\w+), table (\w+)", t).groups() for t in titles if "IPv4" in t]
    assert v4 == [("PREROUTING", "mangle"), ("INPUT", "filter"), ("FORWARD", "filter"), ("OUTPUT", "mangle"),
                  ("OUTPUT", "filter"), ("POSTROUTING", "mangle")]
    assert len([t for t in titles if "IPv6" in t]) == len(v4)
    assert "Chain FORWARD, table filter, IPv4 (default DROP" in "\n".join(titles)


def _c(chain: str, rest: str, pk: int = 0, table: str = "filter", fam: int = 4) -> Counted:
    return Counted(fam, table, pk, pk * 60, f"-A {chain} {rest}", chain)


def test_nat_route_and_offload_rows() -> None:
    nat = classify(_c("NFH-PREROUTING", '-p tcp -m mark --mark 0x10000/0x3f0000 -m comment --comment "nfhooks nat 1" '
                  "-j DNAT --to-destination 10.0.0.2:22", 4, "nat"))
    assert (nat.kind, nat.handler, nat.action, nat.match) == ("handler", "nat 1", "DNAT --to-destination 10.0.0.2:22",
                                                              "-p tcp")
    route = classify(_c("NFH-ROUTE-NAT", '-o up1 -m mark --mark 0x800000/0x1800000 -m comment --comment '
                    '"nfhooks route uplink1" -j MASQUERADE', 2, "nat"))
    assert (route.handler, route.action, route.match) == ("route uplink1", "MASQUERADE", "-o up1")
    off = [_c("NFH-INPUT", f'-p tcp -m tcp --dport 5203 -m conntrack --ctdir {d} -m connmark --mark 0x1/0x3 '
              '-m mark --mark 0x0/0x83800000 -m comment --comment "nfhooks offload tcp_flow" -j ACCEPT', n)
           for d, n in (("ORIGINAL", 5), ("REPLY", 7))]
    off.append(_c("NFH-INPUT", '-p tcp -m tcp --dport 5203 -m mark --mark 0x0/0x83800000 -m comment '
                  '--comment "nfhooks tcp_flow" -j NFQUEUE --queue-num 1 --queue-bypass', 2))
    off.append(_c("INPUT", "-m comment --comment nfhooks -j NFH-INPUT", 14))
    lines = _text(off)
    assert ["12", "720", "tcp_flow", "accept (offloaded)", "-p tcp -m tcp --dport 5203"] in map(_cells, lines)
    assert ["2", "120", "tcp_flow", "queue 1 bypass", "-p tcp -m tcp --dport 5203"] in map(_cells, lines)
    assert any("1\u00d7 jump" in ln for ln in lines)


def test_a_reload_in_progress_shows_both_generations() -> None:
    counted = [_c("INPUT", "-m comment --comment nfhooks -j NFH-INPUT"),
               _c("INPUT", "-m comment --comment nfhooks -j NFH-INPUT-2"),
               _c("NFH-INPUT", '-i lo -m comment --comment "nfhooks loopback" -j NFQUEUE --queue-num 1', 3),
               _c("NFH-INPUT-2", '-i lo -m comment --comment "nfhooks loopback" -j NFQUEUE --queue-num 9', 1),
               _c("NFH-CONNSAVE", "-m comment --comment nfhooks -j ACCEPT")]
    secs = sections(counted)
    assert [(s.hook, s.generations) for s in secs] == [("INPUT", {1, 2}), ("NFH-CONNSAVE", set())]
    lines = _text(counted)
    assert any(ln.startswith("Chain INPUT, table filter, IPv4, generation 1+2") for ln in lines)
    assert "+ 1 plumbing rules in chains without handler rules" in "\n".join(lines)


def test_human_counters() -> None:
    assert [human(n) for n in (0, 99999, 100000, 123456789, 10**15)] == ["0", "99999", "100K", "123M", "1000T"]
