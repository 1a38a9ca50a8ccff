"""`nfhooks top`: a live per-hook view of what the engine decides, read from its metrics endpoint.

It reads the same numbers Prometheus scrapes (so it works against any running engine, in any
namespace you can reach) and shows, per hook and table, packets by verdict and their rate since
the previous refresh -- like `iptables -L -v`, but live.
"""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

Key = tuple[str, str, str]  # hook, table, verdict


def scrape(url: str, timeout: float = 2.0) -> dict[Key, float]:
    """Packet counters by (hook, table, verdict) from one scrape."""
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 -- the user's own endpoint
        text = r.read().decode()
    out: dict[Key, float] = defaultdict(float)
    for fam in text_string_to_metric_families(text):
        if fam.name != "nfhooks_packets":
            continue
        for s in fam.samples:
            if s.name == "nfhooks_packets_total":
                out[(s.labels["hook"], s.labels["table"], s.labels["verdict"])] += s.value
    return dict(out)


def render(now: dict[Key, float], before: dict[Key, float] | None, seconds: float) -> Table:
    # only verdicts that happened: a policy's metrics carry every verdict it may return, at 0,
    # and fifteen mostly-empty columns do not fit a terminal
    verdicts = sorted({k[2] for k, n in now.items() if n}) or sorted({k[2] for k in now})
    title = ("nfhooks: packets by hook and verdict (rate/s since the last refresh)" if before is not None
             else "nfhooks: packets by hook and verdict (totals; live view: without --once)")
    t = Table(title=title)
    t.add_column("hook")
    t.add_column("table")
    for v in verdicts:
        t.add_column(v, justify="right")
    for hook, table in sorted({(k[0], k[1]) for k in now}, key=_hook_order):
        cells = []
        for v in verdicts:
            n = now.get((hook, table, v), 0.0)
            rate = (n - before.get((hook, table, v), 0.0)) / seconds if before and seconds > 0 else None
            cells.append(f"{n:.0f}" + (f" ({rate:.0f}/s)" if rate is not None else ""))
        t.add_row(hook, table, *cells)
    return t


def _hook_order(key: tuple[str, str]) -> tuple[int, str]:
    order = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
    return (order.index(key[0]) if key[0] in order else 9, key[1])


def run(url: str, interval: float, once: bool) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    now = scrape(url)
    if once:
        console.print(render(now, None, 0))
        return
    with Live(render(now, None, 0), console=console, refresh_per_second=4) as live:
        t0 = time.monotonic()
        while True:
            time.sleep(interval)  # the refresh period of a live view, not a test wait
            before, now = now, scrape(url)
            t1 = time.monotonic()
            live.update(render(now, before, t1 - t0))
            t0 = t1
