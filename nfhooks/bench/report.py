"""Showing the results: the rich table on the terminal, the markdown tables (and the block
in docs/performance.md they replace) and the PNG chart.

Formatting only: every number comes from :mod:`nfhooks.bench.results`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .cases import CASES, NOT_AVAILABLE, UDP_LEN
from .results import Row, added_latency, ratio

__all__ = ["DOCS_BEGIN", "DOCS_END", "chart", "describe_row", "fmt", "markdown", "render", "replace_block"]


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def describe_row(r: Row) -> str:
    what = f"{fmt(r.pps, ',.0f')} pps" if r.proto == "udp" else f"{fmt(r.gbps, '.2f')} Gbit/s"
    cpu = f", {fmt(r.cpu_us_per_packet, '.2f')} us CPU/pkt" if r.cpu_us_per_packet is not None else ""
    return f"  {r.case:<15} {r.proto}: {what}{cpu}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(rows: Sequence[Row], lat: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """The results as markdown: throughput/CPU/RSS with ratios to kernel and bare, then latency."""
    by = {(r.case, r.proto): r for r in rows}
    backend = (f" Rule backend of the rows not named after one: {meta['backend']}; 'nfhooks legacy' and "
               "'nfhooks nft' run the 'nfhooks' row's policy with --backend legacy / nft."
               if meta.get("backend") else "")
    out = [f"{meta.get('seconds', 0):g} s per row, {meta.get('cpus')} CPUs, kernel {meta.get('kernel')}, "
           f"Python {meta.get('python')}, {meta.get('iperf3')}, {meta.get('time')}; one run.{backend}", "",
           "| traffic | consumer | rx pps | rx Gbit/s | x kernel | x bare | decided in Python | "
           "CPU us/pkt | CPU x bare | CPU % core | max RSS MiB |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        traffic = f"UDP {UDP_LEN} B" if r.proto == "udp" else "TCP"
        if r.error:
            out.append(f"| {traffic} | {r.case} | {r.error.splitlines()[0][:90]} |" + " |" * 8)
            continue
        metric = "pps" if r.proto == "udp" else "gbps"
        k, b = by.get(("kernel", r.proto)), by.get(("bare", r.proto))
        xk = ratio(getattr(r, metric), getattr(k, metric, None)) if r.case != "kernel" else None
        xb = ratio(getattr(r, metric), getattr(b, metric, None)) if r.case not in ("kernel", "bare") else None
        cb = ratio(r.cpu_us_per_packet, getattr(b, "cpu_us_per_packet", None)) \
            if r.case not in ("kernel", "bare") else None
        out.append(f"| {traffic} | {r.case} | {fmt(r.pps, ',.0f')} | {fmt(r.gbps, '.3f')} | {_x(xk)} | {_x(xb)} "
                   f"| {fmt(r.handled, ',')} | {fmt(r.cpu_us_per_packet, '.2f')} | {_x(cb)} "
                   f"| {fmt(r.cpu_core_pct, '.0f')} | {fmt(r.max_rss_mib, '.1f')} |")
    if lat:
        add = added_latency(lat)
        eng = lat.get("nfhooks") or {}
        rate = next((st.get("rate") for st in lat.values() if st.get("rate")), None)
        out += ["", f"Latency: UDP echo round trip at {fmt(rate, ',.0f')} probes/s (us)", "",
                "| path | sent | received | p50 | p90 | p99 | max | added p50 | added p99 | CPU us/probe |",
                "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for case, st in lat.items():
            if st.get("error"):
                out.append(f"| {case} | {st['error'][:90]} |" + " |" * 8)
                continue
            a = add.get(case, {})
            out.append(f"| {case} | {st['sent']:,} | {st['received']:,} | {fmt(st['p50_us'], '.0f')} "
                       f"| {fmt(st['p90_us'], '.0f')} | {fmt(st['p99_us'], '.0f')} | {fmt(st['max_us'], '.0f')} "
                       f"| {fmt(a.get('p50_us'), '+.0f')} | {fmt(a.get('p99_us'), '+.0f')} "
                       f"| {fmt(st.get('cpu_us_per_probe'), '.1f')} |")
        if eng.get("decision_p99_le_us") is not None:
            out += ["", f"The engine's own time per probe (`nfhooks_decision_seconds` at INPUT: callback "
                        "entry to the verdict's return, which includes the kernel re-injecting the packet): "
                        f"p50 <= {fmt(eng.get('decision_p50_le_us'), 'g')} us, "
                        f"p99 <= {fmt(eng['decision_p99_le_us'], 'g')} us (bucket bounds). The rest of the "
                        "added round trip is handing the packet to userspace and waking the engine; a p99 far "
                        "above both is scheduling on a loaded machine (compare the kernel row's p99)."]
    return "\n".join(out) + "\n"


DOCS_BEGIN = "<!-- bench:begin (written by python -m nfhooks.bench --docs) -->"
DOCS_END = "<!-- bench:end -->"


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between the bench markers replaced (appended if absent)."""
    new = f"{DOCS_BEGIN}\n{block.rstrip()}\n{DOCS_END}"
    i, j = text.find(DOCS_BEGIN), text.find(DOCS_END)
    if i < 0 or j < i:
        return text.rstrip("\n") + "\n\n" + new + "\n"
    return text[:i] + new + text[j + len(DOCS_END):]


def chart(rows: Sequence[Row], lat: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    """docs/img/bench.png: throughput, CPU per packet and latency per consumer (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.error]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    panels = (
        (axes[0][0], "tcp", "gbps", 1.0, "TCP Gbit/s (receiver)"),
        (axes[0][1], "udp", "pps", 1e-3, f"UDP {UDP_LEN} B: thousand packets/s received"),
        (axes[1][0], None, "cpu_us_per_packet", 1.0, "consumer CPU us per packet (UDP | TCP)"),
    )
    colors = {"kernel": "#777777", "bare": "#4c72b0", "scapy": "#dd8452"}
    for ax, proto, attr, scale, label in panels:
        if proto is None:
            cases = [c for c in CASES if any(r.case == c and r.cpu_us_per_packet is not None for r in ok)]
            width = 0.4
            for i, (p, col) in enumerate((("udp", "#55a868"), ("tcp", "#8172b2"))):
                vals = [next((r.cpu_us_per_packet or 0 for r in ok if r.case == c and r.proto == p), 0) for c in cases]
                ys = [y + (i - 0.5) * width for y in range(len(cases))]
                ax.barh(ys, vals, height=width, color=col, label=p.upper())
                for y, v in zip(ys, vals):
                    ax.text(v, y, f" {v:.2f}", va="center", fontsize=7)
            ax.set_yticks(range(len(cases)), cases)
            ax.legend()
        else:
            sel = [r for c in CASES for r in ok if r.case == c and r.proto == proto and getattr(r, attr)]
            base = next((getattr(r, attr) for r in sel if r.case == "kernel"), None)
            vals = [getattr(r, attr) * scale for r in sel]
            ax.barh(range(len(sel)), vals, color=[colors.get(r.case, "#c44e52") for r in sel])
            ax.set_yticks(range(len(sel)), [r.case for r in sel])
            for y, r in enumerate(sel):
                if base:
                    ax.text(getattr(r, attr) * scale, y, f" {getattr(r, attr) / base:.2f}x kernel", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_title(label, fontsize=10)
    ax = axes[1][1]
    good = [(c, st) for c, st in lat.items() if not st.get("error") and st.get("p50_us") is not None]
    if good:
        width = 0.4
        for i, (k, col) in enumerate((("p50_us", "#4c72b0"), ("p99_us", "#c44e52"))):
            ys = [y + (i - 0.5) * width for y in range(len(good))]
            ax.barh(ys, [st[k] for _, st in good], height=width, color=col, label=k.split("_")[0])
            for y, (_, st) in zip(ys, good):
                ax.text(st[k], y, f" {st[k]:.0f}", va="center", fontsize=7)
        ax.set_yticks(range(len(good)), [c for c, _ in good])
        ax.invert_yaxis()
        ax.legend()
        rate = good[0][1].get("rate")
        ax.set_title(f"UDP echo round trip, us ({rate:,.0f} probes/s)", fontsize=10)
    else:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(rows: Sequence[Row], rat: Mapping[str, float | None], meta: Mapping[str, Any]) -> None:
    con = Console()
    if not con.is_terminal:
        con = Console(width=160)  # piped to a file: do not squeeze the table to 80 columns
    t = Table(title=f"nfhooks bench: {meta['seconds']:g} s per row, {meta['cpus']} CPUs, "
                    f"kernel {meta['kernel']}, one run")
    for col in ("traffic", "consumer", "tx pps", "rx pps", "rx Gbit/s", "lost %", "decided",
                "queue-full drops", "CPU us/pkt", "CPU % of a core", "max RSS MiB"):
        t.add_column(col, justify="left" if col in ("traffic", "consumer") else "right")
    for r in rows:
        traffic = f"UDP {UDP_LEN} B" if r.proto == "udp" else "TCP"
        if r.error:
            style = "yellow" if r.error.startswith(NOT_AVAILABLE) else "red"
            what = "" if r.error.startswith(NOT_AVAILABLE) else "failed: "
            t.add_row(traffic, r.case, f"[{style}]{what}{escape(r.error.splitlines()[0][:80])}[/{style}]", *[""] * 8)
            continue
        t.add_row(traffic, r.case, fmt(r.tx_pps, ",.0f"), fmt(r.pps, ",.0f"), fmt(r.gbps, ".3f"),
                  fmt(r.lost_pct, ".1f"), fmt(r.handled, ","), fmt(r.queue_dropped, ","),
                  fmt(r.cpu_us_per_packet, ".2f"), fmt(r.cpu_core_pct, ".0f"), fmt(r.max_rss_mib, ".1f"))
    con.print(t)
    rt = Table(title="ratios (same run)")
    rt.add_column("ratio")
    rt.add_column("value", justify="right")
    for k, v in rat.items():
        rt.add_row(k, fmt(v, ".3f"))
    con.print(rt)
