"""Render the Grafana dashboard's panels from real Prometheus data: docs/img/dashboard.png.

``make docs-images`` (root, like the kernel tests). It reuses the machinery of
tests/kernel/test_prometheus.py: a namespace lab whose router runs
tests/kernel/policies/observed.py, Debian's prometheus scraping the engine every second inside
the router's namespace (the shipped config with faster timing). Traffic from the client
follows a fixed script -- steady accepts, forwarded connections and drops, a burst of handler
errors, a UDP flood that overruns a kernel queue, then slow decisions -- and afterwards every
panel's query of deploy/grafana/nfhooks-dashboard.json runs through Prometheus' range API and
is drawn with matplotlib in the dashboard's own layout (gridPos). Meanwhile ``nfhooks top`` runs
in a detached tmux in the router's namespace; its pane, captured with colours
(``tmux capture-pane -e``), is drawn with PIL: docs/img/top.png. Only the range of ``rate()``
differs from Grafana: ``[15s]`` instead of ``$__rate_interval``, which for a run of a minute or
two would be too smooth to show the events. Nothing is invented: an empty panel stays empty.

Everything happens in namespaces named nfhlab-<id>-*, removed at the end (also on failure).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DASHBOARD = ROOT / "deploy" / "grafana" / "nfhooks-dashboard.json"
POLICY = ROOT / "tests" / "kernel" / "policies" / "observed.py"
RATE_WINDOW = "15s"
#: Grafana unit ids of the panels (one per kind: packets/s, bytes/s, seconds, counts) as axis units
UNITS = {"pps": "p/s", "Bps": "B/s", "s": "s", "short": ""}

# The client's traffic, paced by the clock (seconds since start): what the panels show.
TRAFFIC = r"""
import socket, sys, time
router, server, duration = sys.argv[1], sys.argv[2], float(sys.argv[3])
t0 = time.monotonic()

def connect(host, port, timeout=1.0):
    s = socket.socket(); s.settimeout(timeout)
    try:
        s.connect((host, port)); s.sendall(b"hello"); s.recv(64)
    except OSError:
        pass
    finally:
        s.close()

flooded = False
while (t := time.monotonic() - t0) < duration:
    connect(router, 7001)                      # INPUT accept
    connect(server, 8080)                      # FORWARD accept
    if int(t * 4) % 4 == 0:
        connect(router, 7002, timeout=0.05)    # INPUT drop
    if 0.30 * duration < t < 0.45 * duration:
        connect(router, 7009, timeout=0.3)     # handler raises: errors, the default applies
    if not flooded and t > 0.55 * duration:    # overrun the slow 'flood' handler's queue
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(9000):
            try:
                u.sendto(b"flood" * 8, (router, 9999))
            except OSError:
                pass
        flooded = True
    if 0.70 * duration < t < 0.85 * duration:
        connect(router, 7010, timeout=0.5)     # 20 ms decisions: p99 rises
    time.sleep(0.05)                           # pacing of a traffic generator
"""


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out += p.get("panels") or []
    return out


def promql(expr: str) -> str:
    from tests.dashboard import substitute  # the same substitution the kernel test uses

    return substitute(expr).replace("[1m]", f"[{RATE_WINDOW}]")


def legend(fmt: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt or "")
    return text.strip() or ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__")


def collect(duration: float, top: bool = True) -> dict[str, Any]:
    """Run the lab, the traffic and Prometheus; return every panel's query results."""
    from nfhooks.lab import Lab
    from nfhooks.metrics import DEFAULT_METRICS_ADDR
    from tests.kernel.test_prometheus import Prometheus  # the kernel test's Prometheus

    dashboard = json.loads(DASHBOARD.read_text())
    with Lab.router_topology() as lab:
        lab.tcp_server("router", 7001)
        lab.tcp_server("server", 8080)
        engine = lab.start_engine(str(POLICY), "--metrics-addr", DEFAULT_METRICS_ADDR)
        prom = Prometheus(lab)
        prom.wait_ready()
        prom.wait_scraped()
        start = time.time()
        traffic = lab.popen("client", sys.executable, "-c", TRAFFIC, lab.addr("router"),
                            lab.addr("server"), duration)
        top_ansi = capture_top(lab, start + 0.38 * duration) if top else None
        traffic.wait(duration + 60)
        lab.wait_for(lambda: prom.result("sum(nfhooks_queue_waiting_packets) == 0"), timeout=60,
                     interval=0.5, what="the kernel queues drained")
        end = time.time() + 2
        lab.wait_for(lambda: time.time() > end + 1.5, timeout=10, interval=0.25,
                     what="a scrape after the traffic")  # 1 s scrapes: the last points are in
        results: dict[str, Any] = {"start": start, "end": end, "panels": [], "top": top_ansi}
        for p in panels(dashboard):
            entry = {"title": p.get("title", "").replace("$hook", "All hooks"), "type": p["type"],
                     "gridPos": p["gridPos"], "series": [],
                     "unit": p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")}
            for t in p.get("targets") or []:
                if t.get("hide") or not t.get("expr"):
                    continue
                q = promql(t["expr"])
                if p["type"] in ("stat", "bargauge"):
                    r = prom.get("/api/v1/query", query=q, time=str(end))
                    for s in (r or {}).get("data", {}).get("result", []):
                        entry["series"].append({"name": legend(t.get("legendFormat", ""), s["metric"]),
                                                "value": float(s["value"][1])})
                else:
                    r = prom.get("/api/v1/query_range", query=q, start=str(start), end=str(end), step="1")
                    for s in (r or {}).get("data", {}).get("result", []):
                        name = legend(t.get("legendFormat", ""), s["metric"])
                        if "hook" in s["metric"] and "{{hook}}" not in t.get("legendFormat", ""):
                            name = f"{s['metric']['hook']} {name}"  # the panel repeats per hook
                        entry["series"].append({
                            "name": name,
                            "points": [(float(ts) - start, float(v)) for ts, v in s["values"]]})
            results["panels"].append(entry)
        engine.stop()
    return results


def capture_top(lab: Any, at: float) -> str:
    """`nfhooks top` in a detached tmux (its own socket, named after the lab) in the router's
    namespace; the pane with its colours (capture-pane -e) once it shows rates, at ``at``."""
    import shutil
    import subprocess

    tmux = shutil.which("tmux")
    if tmux is None:
        raise SystemExit("tmux is not installed (Debian: apt-get install tmux)")
    sock = lab.ns_name("tmux")  # nfhlab-<id>-tmux: a server of our own, ended below
    cmd = ["ip", "netns", "exec", lab.ns_name("router"), sys.executable, "-m", "nfhooks", "top",
           "--interval", "2"]
    base = [tmux, "-L", sock]
    subprocess.run([*base, "-f", "/dev/null", "new-session", "-d", "-s", sock, "-x", "80", "-y", "24",
                    "env", "TERM=xterm-256color", "COLUMNS=80", *cmd], check=True, timeout=10)  # a classic terminal
    try:
        def pane() -> str:
            return subprocess.run([*base, "capture-pane", "-e", "-p", "-t", sock], capture_output=True,
                                  text=True, check=True, timeout=10).stdout

        lab.wait_for(lambda: time.time() >= at and re.search(r"\d/s\b", pane()), timeout=120, interval=0.5,
                     what="nfhooks top showing rates")
        return pane()
    finally:
        subprocess.run([*base, "kill-server"], capture_output=True, timeout=10)
        Path(f"/tmp/tmux-{os.getuid()}/{sock}").unlink(missing_ok=True)  # tmux leaves its socket


def render_ansi(text: str, out: Path) -> None:
    """A terminal capture (ANSI colours) drawn with PIL in DejaVu Sans Mono (matplotlib's)."""
    import matplotlib.font_manager as fm
    from PIL import Image, ImageDraw, ImageFont
    from rich.text import Text

    size, pad = 15, 14
    regular = ImageFont.truetype(fm.findfont("DejaVu Sans Mono"), size)
    bold = ImageFont.truetype(fm.findfont(fm.FontProperties(family="DejaVu Sans Mono", weight="bold")), size)
    ascent, descent = regular.getmetrics()
    cw, ch = regular.getlength("M"), ascent + descent  # no gap: box-drawing lines join
    lines = [Text.from_ansi(line) for line in text.rstrip("\n").split("\n")]
    width = max(len(t.plain) for t in lines)
    img = Image.new("RGB", (int(cw * width) + 2 * pad, ch * len(lines) + 2 * pad), (24, 27, 31))
    draw = ImageDraw.Draw(img)
    default = (204, 204, 220)
    for row, t in enumerate(lines):
        styles: list[Any] = [None] * len(t.plain)
        for span in t.spans:
            for i in range(span.start, min(span.end, len(styles))):
                styles[i] = span.style
        for col, char in enumerate(t.plain):
            st = styles[col]
            color = default
            if st is not None and not isinstance(st, str) and st.color is not None and not st.color.is_default:
                color = tuple(st.color.get_truecolor())
            font = bold if st is not None and not isinstance(st, str) and st.bold else regular
            draw.text((pad + col * cw, pad + row * ch), char, fill=color, font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, optimize=True)


def render(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    bg, panel_bg, fg, grid = "#111217", "#181b1f", "#ccccdc", "#2c3235"
    colors = ["#73bf69", "#f2cc0c", "#5794f2", "#ff780a", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in results["panels"])
    fig = plt.figure(figsize=(16, rows * 0.38), dpi=72, facecolor=bg)
    gs = fig.add_gridspec(rows, 24, left=0.055, right=0.99, top=0.97, bottom=0.02, hspace=2.2, wspace=1.4)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(results["start"]))
    fig.suptitle(f"nfhooks dashboard: real Prometheus data from a lab run ({stamp}); x: seconds since "
                 f"the traffic started, rate() over [{RATE_WINDOW}]", color=fg, fontsize=12)
    for p in results["panels"]:
        g = p["gridPos"]
        if p["type"] == "row":
            ax = fig.add_subplot(gs[g["y"]:g["y"] + 1, :])
            ax.axis("off")
            ax.text(0, 0.2, p["title"], color=fg, fontsize=12, fontweight="bold", transform=ax.transAxes)
            continue
        ax = fig.add_subplot(gs[g["y"] + 1:g["y"] + g["h"], g["x"]:g["x"] + g["w"]])
        ax.set_facecolor(panel_bg)
        for s in ax.spines.values():
            s.set_color(grid)
        ax.set_title(p["title"], color=fg, fontsize=10, loc="left")
        ax.tick_params(colors=fg, labelsize=8)
        if p["type"] == "stat":
            ax.set_xticks([])
            ax.set_yticks([])
            text = "\n".join(
                (s["name"] if p["title"] == "Policy loaded" else
                 ("UP" if s["value"] == 1 else "DOWN") if p["title"] == "Engine up" else f"{s['value']:g}")
                for s in p["series"]) or "no data"
            ax.text(0.5, 0.45, text, ha="center", va="center", color=colors[0], fontsize=16,
                    fontweight="bold", transform=ax.transAxes)
        elif p["type"] == "bargauge":
            series = sorted(p["series"], key=lambda s: s["value"])[-8:]
            ax.barh([s["name"] for s in series], [s["value"] for s in series], color=colors[2])
            ax.grid(axis="x", color=grid)
        else:
            moving = [s for s in p["series"] if any(v for _, v in s["points"])]
            still = len(p["series"]) - len(moving)
            for i, s in enumerate(moving[:8]):
                xs, ys = zip(*s["points"])
                ax.plot(xs, ys, color=colors[i % len(colors)], lw=1.6, label=s["name"][:40])
            if still:  # the dashboard's legends hide series that stayed at 0; one line says so
                ax.plot([0, results["end"] - results["start"]], [0, 0], color="#6e7079", lw=1,
                        label=f"{still} series at 0 (hidden in the legend)")
            ax.grid(color=grid, lw=0.6)
            unit = UNITS.get(p.get("unit", ""))
            if unit is not None:
                ax.yaxis.set_major_formatter(EngFormatter(unit=unit, sep=" "))
            if p["series"]:
                ax.legend(fontsize=7, facecolor=panel_bg, edgecolor=grid, labelcolor=fg, loc="upper left",
                          framealpha=0.8)
            else:
                ax.text(0.5, 0.5, "no data", ha="center", color=fg, transform=ax.transAxes)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, facecolor=bg)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png")
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of scripted traffic")
    ap.add_argument("--data", type=Path, help="also save (or, with --replot, read) the query results (JSON)")
    ap.add_argument("--replot", action="store_true", help="draw from --data without a lab run")
    ap.add_argument("--top-out", type=Path, default=ROOT / "docs" / "img" / "top.png",
                    help="`nfhooks top` captured from tmux during the run ('' to skip)")
    args = ap.parse_args()
    top = bool(str(args.top_out)) and str(args.top_out) != "."
    if args.replot:
        results = json.loads(args.data.read_text())
    else:
        results = collect(args.duration, top=top)
        if args.data:
            args.data.write_text(json.dumps(results))
    render(results, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    if top and results.get("top"):
        render_ansi(results["top"], args.top_out)
        print(f"wrote {args.top_out} ({args.top_out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
