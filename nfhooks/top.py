"""`nfhooks top`: a live per-hook view of what the engine decides, read from its metrics endpoint.

It reads the same numbers Prometheus scrapes (so it works against any running engine, in any
namespace you can reach) and shows, per hook and table, packets by verdict and their rate since
the previous refresh -- like `iptables -L -v`, but live.
"""

from __future__ import annotations

import time
import urllib.parse
import urllib.request
from collections import defaultdict
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["check_args", "scrape", "render", "run"]

Key = tuple[str, str, str]  # hook, table, verdict


def check_args(url: str, interval: float) -> None:
    """ValueError, in words, for a --url that is no http(s) URL or a --interval that is not > 0:
    urllib would raise it later, deep in a traceback."""
    example = "e.g. http://127.0.0.1:9477/metrics"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as e:
        raise ValueError(f"--url {url!r} is not a valid URL ({e}); {example}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url {url!r} is not an http(s) URL with a host; {example}")
    if not interval > 0:
        raise ValueError(f"--interval {interval:g} must be more than 0 seconds")


def scrape(url: str, timeout: float = 2.0) -> dict[Key, float]:
    """Packet counters by (hook, table, verdict) from one scrape."""
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 -- the user's own endpoint
        text = r.read().decode()
    out: dict[Key, float] = defaultdict(float)
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as e:  # not Prometheus text: some other server answers there
        raise ValueError(f"{url} does not serve Prometheus metrics ({e})") from None
    for fam in families:
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
    """Print the table (once), or keep it live: redrawn in place on a terminal; on a pipe or
    in a file, one plain table per interval (a live display there would show nothing until
    the end)."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    now = scrape(url)
    if once:
        console.print(render(now, None, 0))
        return
    if not console.is_terminal:
        _print_every(console, url, interval, now)
        return
    with Live(render(now, None, 0), console=console, refresh_per_second=4) as live:
        t0 = time.monotonic()
        while True:
            time.sleep(interval)  # the refresh period of a live view, not a test wait
            before, now = now, scrape(url)
            t1 = time.monotonic()
            live.update(render(now, before, t1 - t0))
            t0 = t1


def _print_every(console: "Console", url: str, interval: float, now: dict[Key, float]) -> None:
    """Not a terminal: a plain table (no colours, no cursor movement) per interval, flushed."""
    console.print(render(now, None, 0))
    console.file.flush()
    t0 = time.monotonic()
    while True:
        time.sleep(interval)  # the refresh period, as on a terminal
        before, now = now, scrape(url)
        t1 = time.monotonic()
        console.print(render(now, before, t1 - t0))
        console.file.flush()
        t0 = t1
