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
from .results import Row, added_latency, ratios, throughput

__all__ = ["DOCS_BEGIN", "DOCS_END", "chart", "describe_row", "fmt", "markdown", "render", "replace_block"]


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def spread(r: Row, name: str, spec: str) -> str:
    """``value`` or, for a row summarized over rounds, ``median (min–max)``."""
    v = getattr(r, name)
    lo_hi = (r.extra.get("range") or {}).get(name)
    if v is None or not lo_hi or r.extra.get("rounds", 1) < 2:
        return fmt(v, spec)
    return f"{fmt(v, spec)} ({fmt(lo_hi[0], spec)}–{fmt(lo_hi[1], spec)})"


def _xs(key: str, rat: Mapping[str, float | None], span: Mapping[str, Sequence[float]]) -> str:
    v = rat.get(key)
    lo_hi = span.get(key)
    if v is None or not lo_hi or lo_hi[0] == lo_hi[1]:
        return _x(v)
    return f"{_x(v)} ({lo_hi[0]:.2f}–{lo_hi[1]:.2f})"


def describe_row(r: Row) -> str:
    what = (f"{fmt(r.decided_pps if r.decided_pps is not None else r.pps, ',.0f')} pps"
            f"{' decided' if r.decided_pps is not None else ''}"
            if r.proto == "udp" else f"{fmt(r.gbps, '.2f')} Gbit/s")
    cpu = f", {fmt(r.cpu_us_per_packet, '.2f')} us CPU/pkt" if r.cpu_us_per_packet is not None else ""
    return f"  {r.case:<15} {r.proto}: {what}{cpu}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(rows: Sequence[Row], lat: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any],
             rat: Mapping[str, float | None] | None = None, span: Mapping[str, Sequence[float]] | None = None) -> str:
    """The results as markdown: throughput/CPU/RSS with ratios to kernel and bare, then latency.

    ``rows`` are summarized rows (results.summarize: medians, ``extra["range"]``) or single
    measurements; ``rat``/``span`` the round ratios (results.round_ratios; default: formed
    from ``rows``). Throughput is what the consumer decided (UDP decided/s; TCP Gbit/s)."""
    rat = ratios(rows) if rat is None else rat
    span = span or {}
    rounds = meta.get("rounds", 1)
    backend = (f" Rule backend of the rows not named after one: {meta['backend']}; 'nfhooks legacy' and "
               "'nfhooks nft' run the 'nfhooks' row's policy with --backend legacy / nft."
               if meta.get("backend") else "")
    how = (f"{rounds} interleaved rounds, median (min–max), ratios formed within each round"
           if rounds > 1 else "one round")
    out = [f"{meta.get('seconds', 0):g} s per row, {meta.get('cpus')} CPUs, kernel {meta.get('kernel')}, "
           f"Python {meta.get('python')}, {meta.get('iperf3')}, {meta.get('time')}; {how}; every queue "
           f"fail-closed.{backend}", "",
           "| traffic | consumer | decided/s | rx pps | rx Gbit/s | x kernel | x bare | bypassed | "
           "CPU us/pkt | CPU x bare | CPU us/MB | CPU/MB x bare | CPU % core | max RSS MiB |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        traffic = f"UDP {UDP_LEN} B" if r.proto == "udp" else "TCP"
        if r.error:
            out.append(f"| {traffic} | {r.case} | {r.error.splitlines()[0][:90]} |" + " |" * 11)
            continue
        metric = "pps" if r.proto == "udp" else "gbps"
        xk = _xs(f"{r.proto}_{metric} {r.case}/kernel", rat, span) if r.case != "kernel" else "-"
        xb = _xs(f"{r.proto}_{metric} {r.case}/bare", rat, span) if r.case not in ("kernel", "bare") else "-"
        cb = _xs(f"{r.proto}_cpu_per_packet {r.case}/bare", rat, span) if r.case not in ("kernel", "bare") else "-"
        mb = _xs(f"tcp_cpu_per_mb {r.case}/bare", rat, span) if r.proto == "tcp" and r.case not in ("kernel", "bare") \
            else "-"
        out.append(f"| {traffic} | {r.case} | {spread(r, 'decided_pps', ',.0f')} | {spread(r, 'pps', ',.0f')} "
                   f"| {spread(r, 'gbps', '.3f')} | {xk} | {xb} | {fmt(r.bypassed, ',')} "
                   f"| {spread(r, 'cpu_us_per_packet', '.2f')} | {cb} "
                   f"| {spread(r, 'cpu_us_per_mb', '.0f') if r.proto == 'tcp' else '-'} | {mb} "
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
                        "entry to the verdict, given or held for the pass's batch verdict; a given verdict includes the "
                        "kernel re-injecting the packet, a held one is sent after the pass): "
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
        (axes[0][1], "udp", "pps", 1e-3, f"UDP {UDP_LEN} B: thousand packets/s decided (fail-closed)"),
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
            sel = [r for c in CASES for r in ok if r.case == c and r.proto == proto and throughput(r)]
            base = next((throughput(r) for r in sel if r.case == "kernel"), None)
            vals = [(throughput(r) or 0.0) * scale for r in sel]
            ax.barh(range(len(sel)), vals, color=[colors.get(r.case, "#c44e52") for r in sel])
            ax.set_yticks(range(len(sel)), [r.case for r in sel])
            for y, (r, v) in enumerate(zip(sel, vals)):
                if base:
                    # UDP: decided over what the kernel row delivered (it decides nothing)
                    ax.text(v, y, f" {v / scale / base:.2f}x kernel{' rx' if proto == 'udp' else ''}",
                            va="center", fontsize=8)
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


def render(rows: Sequence[Row], rat: Mapping[str, float | None], meta: Mapping[str, Any],
           span: Mapping[str, Sequence[float]] | None = None) -> None:
    con = Console()
    if not con.is_terminal:
        con = Console(width=180)  # piped to a file: do not squeeze the table to 80 columns
    rounds = meta.get("rounds", 1)
    t = Table(title=f"nfhooks bench: {meta['seconds']:g} s per row, {meta['cpus']} CPUs, "
                    f"kernel {meta['kernel']}, " + (f"median (min–max) of {rounds} rounds" if rounds > 1
                                                    else "one round"))
    for col in ("traffic", "consumer", "tx pps", "decided/s", "rx pps", "rx Gbit/s", "lost %", "bypassed",
                "queue-full drops", "CPU us/pkt", "CPU us/MB", "CPU % of a core", "max RSS MiB"):
        t.add_column(col, justify="left" if col in ("traffic", "consumer") else "right")
    for r in rows:
        traffic = f"UDP {UDP_LEN} B" if r.proto == "udp" else "TCP"
        if r.error:
            style = "yellow" if r.error.startswith(NOT_AVAILABLE) else "red"
            what = "" if r.error.startswith(NOT_AVAILABLE) else "failed: "
            t.add_row(traffic, r.case, f"[{style}]{what}{escape(r.error.splitlines()[0][:80])}[/{style}]", *[""] * 10)
            continue
        t.add_row(traffic, r.case, fmt(r.tx_pps, ",.0f"), spread(r, "decided_pps", ",.0f"), spread(r, "pps", ",.0f"),
                  spread(r, "gbps", ".3f"), fmt(r.lost_pct, ".1f"), fmt(r.bypassed, ","), fmt(r.queue_dropped, ","),
                  spread(r, "cpu_us_per_packet", ".2f"), fmt(r.cpu_us_per_mb, ".0f"), fmt(r.cpu_core_pct, ".0f"),
                  fmt(r.max_rss_mib, ".1f"))
    con.print(t)
    span = span or {}
    rt = Table(title="ratios (each formed within one round; median, min, max over the rounds)")
    rt.add_column("ratio")
    for col in ("median", "min", "max"):
        rt.add_column(col, justify="right")
    for k, v in rat.items():
        lo, hi = span.get(k, (None, None))
        rt.add_row(k, fmt(v, ".3f"), fmt(lo, ".3f"), fmt(hi, ".3f"))
    con.print(rt)
