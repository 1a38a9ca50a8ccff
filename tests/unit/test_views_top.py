"""`nfhooks top` on realistic scraped data: it fits 80 columns and shows fractional rates.

The data is what a real engine exports for policies/lab.py (30 handlers at all five hooks):
its Metrics, with each handler's verdict counters bound as the engine binds them, some
packets counted for every verdict a policy can give (NAT, mangle, route and shape at the
mangle hooks), rendered by prometheus_client to the text a scrape reads. The table is drawn
on a recorded 80-column rich Console, as on a terminal.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console

from nfhooks.metrics import Metrics
from nfhooks.loader import load_policy
from nfhooks.top import parse, rate_text, render
from nfhooks.verdict import NAT_KINDS, ROUTESHAPE_KINDS

ROOT = Path(__file__).resolve().parents[2]
#: every verdict label a handler may be counted under (dispatch binds these)
COMMON = ("accept", "drop", "reject", "mark", "connmark", "(none)")
REWRITES = (*sorted(NAT_KINDS), "mangle", *sorted(ROUTESHAPE_KINDS))


def _lab_scrape(tmp_path: Path, packets: int) -> str:
    """The /metrics text of an engine running policies/lab.py after ``packets`` per verdict."""
    policy = load_policy(ROOT / "policies" / "lab.py")
    proc = tmp_path / "nfnetlink_queue"
    proc.write_text("")
    reg = CollectorRegistry()
    m = Metrics(reg, proc_path=str(proc))
    m.set_policy(policy.name or "lab", policy.version,
                 [(i, h.hook, h.name) for i, h in enumerate(policy.handlers)])
    for i, h in enumerate(policy.handlers):
        verdicts = COMMON + (REWRITES if h.table == "mangle" else ())
        for j, v in enumerate(verdicts):
            c = m.bind_verdict(h.hook, h.table, h.name, v)
            for _ in range(packets * (1 + (i + j) % 3)):
                c.count(1500)
        m.bind_verdict(h.hook, h.table, "", "drop").count(100)  # the hook's default applied
    return generate_latest(reg).decode()


def _lines(table: object, width: int = 80) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(table)
    return console.export_text().splitlines()


def _cells(line: str) -> list[str]:
    return [c for c in re.split(r"\s{2,}", line.strip()) if c]


@pytest.fixture
def scrapes(tmp_path: Path) -> tuple[dict, dict]:
    return parse(_lab_scrape(tmp_path, 2)), parse(_lab_scrape(tmp_path, 3))


def test_parse_reads_the_lab_policy_scrape(scrapes: tuple[dict, dict]) -> None:
    before, now = scrapes
    hooks = {k[0] for k in now}
    assert hooks == {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
    assert {"masquerade", "redirect", "(none)", "connmark"} <= {k[2] for k in now}
    assert all(now[k] > before[k] for k in now)


@pytest.mark.parametrize("live", [False, True])
def test_top_fits_80_columns_with_every_header_whole(scrapes: tuple[dict, dict], live: bool) -> None:
    before, now = scrapes
    lines = _lines(render(now, before, 2.0) if live else render(now, None, 0))
    too_long = [ln for ln in lines if len(ln) > 80]
    assert not too_long, "\n".join(too_long)
    header = next(ln for ln in lines if ln.split()[:1] == ["hook"])
    expected = ["hook", "table", "verdict", "packets"] + (["rate"] if live else [])
    assert header.split() == expected, header  # no header cut ("verd…") or wrapped
    # every verdict of every hook is on one line of its own: nothing wrapped or cut
    for (hook, table, verdict), n in now.items():
        assert any(verdict in _cells(ln) and f"{n:,.0f}" in _cells(ln) for ln in lines), (hook, table, verdict)
    for hook in ("PREROUTING", "POSTROUTING", "FORWARD"):
        assert any(ln.split()[:1] == [hook] for ln in lines), hook
    assert "\u2026" not in "\n".join(lines)  # rich's ellipsis: a cut cell


def test_top_shows_fractional_rates(tmp_path: Path) -> None:
    before = {("INPUT", "filter", "accept"): 10.0, ("INPUT", "filter", "drop"): 0.0}
    now = {("INPUT", "filter", "accept"): 11.0, ("INPUT", "filter", "drop"): 4.0}
    text = "\n".join(_lines(render(now, before, 2.0)))
    row = next(ln for ln in text.splitlines() if " accept " in ln)
    assert row.rstrip().endswith("0.5/s"), row
    assert "2.0/s" in text
    assert [rate_text(r) for r in (0, 0.04, 0.5, 2.25, 12.4, 12345.6)] == [
        "0/s", "0.04/s", "0.5/s", "2.2/s", "12/s", "12,346/s"]


def test_verdicts_given_another_way_are_told_apart() -> None:
    """A ``via`` label (how the verdict came about) that is not "handler" keeps its own row."""
    text = (
        "# TYPE nfhooks_packets_total counter\n"
        'nfhooks_packets_total{hook="INPUT",table="filter",handler="ssh",verdict="drop",via="handler"} 3\n'
        'nfhooks_packets_total{hook="INPUT",table="filter",handler="ssh",verdict="drop",via="error"} 1\n'
        'nfhooks_packets_total{hook="INPUT",table="filter",handler="(default)",verdict="drop",via="default"} 7\n'
        'nfhooks_packets_total{hook="INPUT",table="filter",handler="web",verdict="accept"} 2\n'
    )
    assert parse(text) == {("INPUT", "filter", "drop"): 3, ("INPUT", "filter", "drop (error)"): 1,
                           ("INPUT", "filter", "drop (default)"): 7, ("INPUT", "filter", "accept"): 2}
    assert any("drop (default)" in ln and ln.rstrip().endswith("7") for ln in _lines(render(parse(text), None, 0)))


def test_parse_refuses_what_is_not_prometheus_text() -> None:
    with pytest.raises(ValueError):
        parse("<html>not metrics {</html>\n")
