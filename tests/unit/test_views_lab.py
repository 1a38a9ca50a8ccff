"""The lab's per-hook table (nfhooks/lab/render.py) says where a NAT verdict is carried out.

A NAT handler is queued from mangle, and the nat table's nfhooks rule applies the target later
at the same hook. Listed under "mangle" alone, a DNAT read as if mangle did the NAT: the
table column must say "mangle -> nat" and the caption what that means. The data is the text a
scrape of a lab engine returns (policies/lab.py's port forward, masquerade and mangle).
"""

from __future__ import annotations

from rich.console import Console

from nfhooks.lab.evidence import Snapshot
from nfhooks.lab.render import acting_table, hook_table

SCRAPE = """# TYPE nfhooks_packets_total counter
nfhooks_packets_total{hook="PREROUTING",table="mangle",handler="port_forward",verdict="dnat"} 3
nfhooks_packets_total{hook="PREROUTING",table="mangle",handler="arriving",verdict="accept"} 40
nfhooks_packets_total{hook="POSTROUTING",table="mangle",handler="nat_out",verdict="masquerade"} 2
nfhooks_packets_total{hook="POSTROUTING",table="mangle",handler="marked",verdict="mangle"} 5
nfhooks_packets_total{hook="INPUT",table="filter",handler="refused",verdict="reject"} 1
nfhooks_packets_total{hook="INPUT",table="filter",handler="refused",verdict="reject",via="error"} 1
# TYPE nfhooks_bytes_total counter
nfhooks_bytes_total{hook="PREROUTING",table="mangle",handler="port_forward",verdict="dnat"} 180
# TYPE nfhooks_handler_packets_total counter
nfhooks_handler_packets_total{hook="PREROUTING",handler="port_forward",verdict="dnat"} 3
"""


def _lines() -> list[str]:
    console = Console(width=200, record=True, color_system=None)
    console.print(hook_table(Snapshot.parse(SCRAPE)))
    return console.export_text().splitlines()


def test_nat_rows_say_the_nat_table_carries_them_out() -> None:
    lines = _lines()
    dnat = next(ln for ln in lines if " dnat " in ln)
    assert "mangle \u2192 nat" in dnat and "port_forward 3" in dnat, dnat
    masq = next(ln for ln in lines if " masquerade " in ln)
    assert "mangle \u2192 nat" in masq, masq
    caption = " ".join(lines[lines.index(masq) + 1:])
    assert "where the packet was queued" in caption and "nat table" in caption, caption


def test_verdicts_done_where_queued_keep_their_table() -> None:
    lines = _lines()
    for verdict, table in (("accept", "mangle"), ("mangle", "mangle"), ("reject", "filter")):
        row = next(ln for ln in lines if f" {verdict} " in ln)
        assert f" {table} " in row and "\u2192" not in row, row
    assert acting_table("mangle", "reject") == "mangle \u2192 filter"  # reject from mangle: filter's REJECT
    assert acting_table("mangle", "route") == "mangle"  # an ip rule, not a table


def test_series_that_differ_in_other_labels_add_up() -> None:
    reject = next(ln for ln in _lines() if " reject " in ln)
    assert reject.split()[3] == "2", reject  # handler and via="error" series: summed, not overwritten
