"""How a lab run looks: the live per-hook table while scenarios run, the summary (topology,
scenarios, raw packets, per-hook verdicts, metrics and what to try next) and the same
summary as JSON for scripts (``--json``).

Rendering only: everything shown was measured by the runner and the scenarios.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from ..hooks import HOOK_DOC, HOOKS, PLACEMENTS, TABLE_HOOKS, decision_table
from .config import WEB_PORT, LabConfig
from .evidence import KERNEL_DEFAULT, Scraper, Snapshot
from .registry import SCENARIOS
from .scenario import Result, Scenario
from .topology import EngineProc, Lab

__all__ = ["HOOK_STYLE", "VERDICT_STYLE", "LiveView", "acting_table", "hook_table", "make_console", "print_summary",
           "summary_json", "topology_table"]


def _verdict_text(verdicts: Iterable[tuple[dict[str, str], float]], hook: str) -> str:
    parts = [f"{l['handler']}:{l['verdict']} {v:g}" for l, v in verdicts if l["hook"] == hook]
    return ", ".join(sorted(parts))


#: Colours of the per-hook table: what the verdict does to the packet.
VERDICT_STYLE = {"accept": "green", "drop": "bold red", "reject": "yellow", "mark": "blue",
                 "connmark": "blue", "mangle": "magenta", "dnat": "cyan", "snat": "cyan",
                 "masquerade": "cyan", "redirect": "cyan", "nat": "cyan"}
HOOK_STYLE = "bold"


def _vtext(verdict: str) -> Text:
    return Text(verdict, style=VERDICT_STYLE.get(verdict, ""))


def acting_table(table: str, verdict: str) -> str:
    """``table`` (where the packet was queued), or ``mangle → nat`` when another table's
    nfhooks rule carries the verdict out (NAT is done by the nat table, later at the hook):
    listing a DNAT under "mangle" alone read as if mangle did the NAT."""
    place = PLACEMENTS.get(verdict)
    if place is not None and place.acts_in in TABLE_HOOKS and place.acts_in != table:
        return f"{table} \u2192 {place.acts_in}"
    return table


def _sum(series: Iterable[tuple[dict[str, str], float]]) -> dict[tuple[str, str, str], float]:
    out: dict[tuple[str, str, str], float] = {}
    for l, v in series:  # summed: series that differ in other labels (handler, via) add up
        key = (l["hook"], l["table"], l["verdict"])
        out[key] = out.get(key, 0.0) + v
    return out


def hook_table(snap: Snapshot, rules: Sequence[tuple[dict[str, str], float]] = (),
               title: str = "per-hook verdicts") -> Table:
    """hook x table x verdict packet and byte counts, like `iptables -L -v`, plus which
    handlers gave them; `rules` adds the defaults the kernel's rules gave (never queued)."""
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", caption_justify="left")
    for col, just in (("hook", "left"), ("table", "left"), ("verdict", "left"),
                      ("pkts", "right"), ("bytes", "right"), ("handlers", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    packets = _sum(snap.series("nfhooks_packets_total"))
    nbytes = _sum(snap.series("nfhooks_bytes_total"))
    handlers = snap.series("nfhooks_handler_packets_total")
    for hook in HOOKS:
        rows = sorted((k, v) for k, v in packets.items() if k[0] == hook and v > 0)
        kernel = [(l, v) for l, v in rules if l["hook"] == hook]
        if not rows and not kernel:
            t.add_row(hook, "-", "-", "0", "0", Text("nothing queued here", style="dim"))
        for (h, table, verdict), v in rows:
            names = ", ".join(f"{l['handler']} {n:g}" for l, n in sorted(handlers, key=lambda x: -x[1])
                              if l["hook"] == h and l["verdict"] == verdict and n > 0)
            t.add_row(Text(h, style=HOOK_STYLE), acting_table(table, verdict), _vtext(verdict), f"{v:g}",
                      f"{nbytes.get((h, table, verdict), 0):.0f}", names)
            if acting_table(table, verdict) != table:
                t.caption = (f"table: where the packet was queued; {table} \u2192 {PLACEMENTS[verdict].acts_in}: "
                             f"the {PLACEMENTS[verdict].acts_in} table's nfhooks rule carries the verdict out, "
                             "later at the same hook")
        for l, v in kernel:
            t.add_row(Text(hook, style=HOOK_STYLE), decision_table(hook), _vtext(l["verdict"]), f"{v:g}", "",
                      Text("(default rule) in the kernel: no handler queued these", style="dim"))
    return t


class LiveView:
    """Progress plus the per-hook table from the latest scrape, re-rendered by rich.live."""

    def __init__(self, progress: Progress, scraper: Scraper) -> None:
        self.progress, self.scraper = progress, scraper

    def __rich__(self) -> RenderableType:
        return Group(self.progress, hook_table(self.scraper.latest, title="live: per-hook verdicts"))


def topology_table(lab: Lab) -> Table:
    roles = {"client": "the private LAN's host (default route: the router)",
             "router": "forwarding on; runs the engine and the lab policy",
             "switch": "a bridge for the WAN segment (no addresses)",
             "server": "outside: web servers on 8080 and 80",
             "proxy": "outside: the NAT scenarios' target (web server on 8080)",
             "gw_b": "office B's gateway (vpn): the tunnel's other end",
             "host_b": "office B's host (vpn): web server on 8080"}
    t = Table(title=f"topology: client --lan-- router --wan-- switch(br0) -- server, proxy "
                    f"(lan {lab.networks['lan'][4]} {lab.networks['lan'][6]}, "
                    f"wan {lab.networks['wan'][4]} {lab.networks['wan'][6]})",
              box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("node", "namespace", "addresses", "role"):
        t.add_column(col)
    if "lan_b" in lab.networks:
        t.title = str(t.title) + (f"; vpn: office B lan_b {lab.networks['lan_b'][4]} {lab.networks['lan_b'][6]}"
                                  " behind gw_b, joined to the lan by tun0")
    for name, node in lab.nodes.items():
        addrs = " ".join(node.addrs.get(4, []) + node.addrs.get(6, [])) or "-"
        t.add_row(name, node.ns, addrs, roles.get(name, ""))
    return t


def _scenario_table(results: Sequence[Result]) -> Table:
    t = Table(title="scenarios", box=box.SIMPLE_HEAD, title_justify="left", show_lines=True)
    for col in ("scenario", "hooks: expected → crossed (handler:verdict packets)", "observed", "result"):
        t.add_column(col)
    for r in results:
        hooks = Text()
        hooks.append("expected " + (", ".join(r.scenario.hooks) or "- (a lab of its own, see its tables)") + "\n",
                     style="dim")
        for h in r.crossed:
            hooks.append(f"{h}", style="bold" if h in r.scenario.hooks else "")
            hooks.append(f"  {_verdict_text(r.verdicts, h)}\n")
        for h in r.missing_hooks:
            hooks.append(f"{h}  no handler saw it\n" if r.strict_hooks else
                         f"{h}  no handler saw it (this policy may have none there)\n",
                         style="red" if r.strict_hooks else "yellow")
        observed = Text("\n".join(("✓ " if c.ok else "✗ ") + c.text for c in r.checks))
        if r.error:
            observed.append(f"\nerror: {r.error}", style="red")
        result = Text("PASS", style="green") if r.ok else Text("FAIL", style="bold red")
        title = Text(r.scenario.title + "\n")
        title.append(r.scenario.description, style="dim")
        t.add_row(title, hooks, observed,
                  Text.assemble(result, f"\n{r.seconds:.1f}s"))
    return t


def _malformed_table(rows: Sequence[tuple[str, ...]]) -> Table:
    t = Table(title="raw packets from the client (layer 2, to the router's MAC): what really happened",
              box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("packet", "what is wrong", "outcome (evidence)", ""):
        t.add_column(col)
    for row in rows:
        t.add_row(*(Text(cell) for cell in row))
    return t


def _hooks_explained(snap: Snapshot, rules: Sequence[tuple[dict[str, str], float]],
                     skip: set[str]) -> Table:
    t = Table(title="what happened at each hook (whole run)", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("hook", "sees", "the policy's verdicts (handler:verdict packets)"):
        t.add_column(col)
    series = [(l, v) for l, v in snap.series("nfhooks_handler_packets_total") if v > 0] + list(rules)
    for hook in HOOKS:
        text = _verdict_text(series, hook) or "nothing"
        if any(l["handler"] in skip and l["hook"] == hook for l, _ in series):
            text += "  (" + ", ".join(sorted(skip)) + ": the lab's own metric scrapes over lo)"
        t.add_row(hook, HOOK_DOC[hook], text)
    return t


def _metrics_panel(cfg: LabConfig, url: str, kept: bool, snap: Snapshot) -> Panel:
    malformed = sum(v for _, v in snap.series("nfhooks_malformed_packets_total"))
    p50 = _decision_summary(snap)
    where = "are" if kept else "were (the lab is gone now)"
    text = (f"The engine's Prometheus metrics {where} served inside the router namespace at {url}\n"
            f"  nfhooks lab exec router -- curl -s {url.removeprefix('http://')}   (with --keep)\n"
            "  nfhooks_packets_total{hook,table,verdict}      the per-hook table above\n"
            "  nfhooks_handler_packets_total{hook,handler,verdict}  who decided\n"
            f"  nfhooks_malformed_packets_total{{hook}}        {malformed:g} this run\n"
            f"  nfhooks_decision_seconds{{hook}}               {p50}\n"
            "  nfhooks_queue_kernel_dropped_packets_total     packets the kernel dropped (queue full)")
    if cfg.pcap:
        text += (f"\nEvery queued packet, with its hook, handler and verdict, was recorded by the engine in "
                 f"{Path(cfg.pcap).resolve()} (open it with wireshark or tcpdump -r)")
    return Panel(text, title="metrics", title_align="left")


def _decision_summary(snap: Snapshot) -> str:
    count = sum(v for _, v in snap.series("nfhooks_decision_seconds_count"))
    total = sum(v for _, v in snap.series("nfhooks_decision_seconds_sum"))
    return f"{count:g} decisions, mean {total / count * 1e6:.0f} µs" if count else "no decisions"


def _nfhooks_cmd() -> str:
    """How to call nfhooks inside a node (the venv's script, which may not be on PATH)."""
    script = Path(sys.executable).parent / "nfhooks"
    return str(script) if script.exists() else f"{sys.executable} -m nfhooks"


def _next_panel(lab: Lab, kept: bool) -> Panel:
    server = lab.addr("server")
    if kept:
        text = (f"The lab {lab.id} is still up (engine and servers running):\n"
                f"  nfhooks lab exec client -- ping -c 3 {server}\n"
                f"  nfhooks lab exec client -- curl -s {server}:{WEB_PORT}\n"
                f"  nfhooks lab exec router -- {_nfhooks_cmd()} rules\n"
                f"  nfhooks lab exec router -- nstat -az IpInHdrErrors\n"
                f"  nfhooks lab down            # stops the engine, removes the namespaces")
    else:
        text = ("  nfhooks lab --keep                      # leave the lab up to explore it\n"
                "  nfhooks lab exec client -- ping -c 3 SERVER   (after --keep; it prints SERVER's address)\n"
                "  nfhooks lab --set service_port=2200     # the policy's options\n"
                "  nfhooks lab --policy my_policy.py       # your own policy on the same traffic\n"
                "  nfhooks lab --scenario vpn              # two offices joined by a tun tunnel (nfhooks tunnel)\n"
                "  nfhooks lab --scenario reject --json    # one scenario, the summary as JSON for scripts\n"
                "  nfhooks lab --pcap lab.pcapng           # record every queued packet with its verdict\n"
                "  nfhooks lab down                        # remove a kept lab or a crashed run's leftovers")
    return Panel(text, title="try next", title_align="left")


def _not_yet_panel(pending: Sequence[Scenario]) -> Panel | None:
    if not pending:
        return None
    lines = []
    for sc in pending:
        missing = sc.missing()
        why = (f"needs nfhooks.verdict.{', '.join(missing)} (NAT/mangle verdicts are being added)"
               if missing else "the verdicts exist now; its scenario and lab-policy handler are "
               "not written yet")
        lines.append(f"  not yet: {sc.key}: {sc.title} -- {why}")
    return Panel("\n".join(lines), title="TODO: not yet in the lab", title_align="left", style="yellow")


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty() or os.environ.get("COLUMNS"):
        return Console(stderr=stderr)
    return Console(width=160, stderr=stderr)


def summary_json(lab: Lab, results: Sequence[Result], final: Snapshot,
                 rules: Sequence[tuple[dict[str, str], float]], cfg: LabConfig, url: str, kept: bool,
                 engine: EngineProc | None = None) -> dict[str, Any]:
    """The summary for scripts (``--json``): topology, every scenario with the hooks it
    crossed, the verdicts given and what was observed, and the per-hook totals."""
    hooks: dict[str, list[dict[str, Any]]] = {h: [] for h in HOOKS}
    for l, v in final.series("nfhooks_packets_total"):
        if v > 0:
            hooks[l["hook"]].append({"table": l["table"], "verdict": l["verdict"], "packets": int(v),
                                     "handler": "(any)",
                                     "acts_in": acting_table(l["table"], l["verdict"]).split(" ")[-1]})
    for l, v in rules:
        hooks[l["hook"]].append({"table": decision_table(l["hook"]), "verdict": l["verdict"],
                                 "packets": int(v), "handler": KERNEL_DEFAULT})
    return {
        "lab": lab.id,
        "ok": all(r.ok for r in results),
        "passed": sum(r.ok for r in results),
        "total": len(results),
        "kept": kept,
        "metrics": url,
        "pcap": str(cfg.pcap) if cfg.pcap else None,
        "engine": {"pid": engine.pid, "argv": engine.argv} if engine is not None else None,
        "topology": {
            "networks": lab.networks,
            "nodes": {n: {"namespace": node.ns, "ipv4": node.addrs.get(4, []), "ipv6": node.addrs.get(6, [])}
                      for n, node in lab.nodes.items()},
        },
        "scenarios": [
            {
                "key": r.scenario.key, "title": r.scenario.title, "ok": r.ok,
                "seconds": round(r.seconds, 3),
                "hooks_expected": list(r.scenario.hooks), "hooks_crossed": r.crossed,
                "verdicts": [{"hook": l["hook"], "handler": l["handler"], "verdict": l["verdict"],
                              "packets": int(v)} for l, v in r.verdicts],
                "checks": [{"text": c.text, "ok": c.ok} for c in r.checks],
                "error": r.error,
                "tables": [{"title": t, "columns": list(cols), "rows": [list(x) for x in rows]}
                           for t, cols, rows in r.tables]
                + ([{"title": "raw packets", "columns": ["packet", "what is wrong", "outcome", "result"],
                     "rows": [list(x) for x in r.rows]}] if r.rows else []),
            }
            for r in results
        ],
        "hooks": hooks,
    }


def print_summary(console: Console, lab: Lab, results: Sequence[Result], final: Snapshot,
             rules: list[tuple[dict[str, str], float]], skip: set[str], cfg: LabConfig, url: str,
             kept: bool, scenarios: Sequence[Scenario] = ()) -> None:
    passed = sum(r.ok for r in results)
    console.print()
    console.rule(f"nfhooks lab {lab.id}: {passed}/{len(results)} scenarios passed")
    console.print(topology_table(lab))
    console.print(_scenario_table(results))
    rows = [row for r in results for row in r.rows]
    if rows:
        console.print(_malformed_table(rows))
    for r in results:
        for title, cols, trows in r.tables:
            t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
            for col in cols:
                t.add_column(col)
            for row in trows:
                t.add_row(*(Text(cell) for cell in row))
            console.print(t)
    if results and all(not r.scenario.hooks for r in results):
        # every scenario ran in a lab of its own (route-shape): the standard router was idle
        console.print("[dim]These scenarios ran in labs of their own (their tables are above); the "
                      "standard lab's router, idle meanwhile, is not shown.[/dim]")
    else:
        console.print(_hooks_explained(final, rules, skip))
        console.print(hook_table(final, rules))
        console.print(_metrics_panel(cfg, url, kept, final))
    pending = _not_yet_panel([s for s in (scenarios or SCENARIOS) if not s.ready])
    if pending is not None:
        console.print(pending)
    console.print(_next_panel(lab, kept))
