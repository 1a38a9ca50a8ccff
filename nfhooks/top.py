"""`nfhooks top`: a live per-hook view of what the engine decides, read from its metrics endpoint.

It reads the same numbers Prometheus scrapes (so it works against any running engine, in any
namespace you can reach) and shows, per hook and table, packets by verdict and their rate since
the previous refresh -- like `iptables -L -v`, but live. One row per verdict that happened, so
it fits an 80-column terminal whatever the policy returns.
"""

from __future__ import annotations

import time
import urllib.parse
import urllib.request
from collections import defaultdict
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.table import Table

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["check_args", "parse", "rate_text", "render", "run", "scrape"]

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
    try:
        return parse(text)
    except ValueError as e:  # not Prometheus text: some other server answers there
        raise ValueError(f"{url} does not serve Prometheus metrics ({e})") from None


def parse(text: str) -> dict[Key, float]:
    """``nfhooks_packets_total`` of Prometheus text, summed over handlers, by (hook, table,
    verdict). A ``via`` label other than "handler" (how a verdict came about: the hook's
    default rule, an error) is kept apart, as "verdict (via)": those are the decisions an
    operator most needs to tell from the handlers' own."""
    out: dict[Key, float] = defaultdict(float)
    for fam in text_string_to_metric_families(text):
        if fam.name != "nfhooks_packets":
            continue
        for s in fam.samples:
            if s.name == "nfhooks_packets_total":
                verdict, via = s.labels["verdict"], s.labels.get("via", "")
                if via and via != "handler":
                    verdict = f"{verdict} ({via})"
                out[(s.labels["hook"], s.labels["table"], verdict)] += s.value
    return dict(out)


def rate_text(rate: float) -> str:
    """A rate a person reads at a glance, fractions kept: 0.5/s is not 0/s."""
    if rate <= 0:
        return "0/s"
    if rate < 0.1:
        return f"{rate:.2f}/s"
    if rate < 10:
        return f"{rate:.1f}/s"
    return f"{rate:,.0f}/s"


def render(now: dict[Key, float], before: dict[Key, float] | None, seconds: float) -> Table:
    """One row per (hook, table, verdict) that happened: a fixed five columns fit 80 columns
    whatever verdicts a policy gives (a column per verdict did not: headers were cut)."""
    live = before is not None and seconds > 0
    prev = before or {}
    title = ("nfhooks: packets by hook and verdict, rate/s since the last refresh" if live
             else "nfhooks: packets by hook and verdict (totals; live: without --once)")
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, min_width=len(title))  # a title on one line
    t.add_column("hook", no_wrap=True)
    t.add_column("table", no_wrap=True)
    t.add_column("verdict", no_wrap=True)
    t.add_column("packets", justify="right", no_wrap=True)
    if live:
        t.add_column("rate", justify="right", no_wrap=True)
    # only verdicts that happened: a policy's metrics carry every verdict it may return, at 0
    shown = {k: n for k, n in now.items() if n} or now
    groups = sorted({(k[0], k[1]) for k in shown}, key=_hook_order)
    for gi, (hook, table) in enumerate(groups):
        keys = sorted(k for k in shown if (k[0], k[1]) == (hook, table))
        for i, key in enumerate(keys):
            n = now.get(key, 0.0)
            cells = [hook if i == 0 else "", table if i == 0 else "", key[2], f"{n:,.0f}"]
            if live:
                cells.append(rate_text(max(0.0, n - prev.get(key, 0.0)) / seconds))
            t.add_row(*cells, end_section=i == len(keys) - 1 and gi < len(groups) - 1)
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
