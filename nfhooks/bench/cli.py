"""``python -m nfhooks.bench`` / ``make bench``: the arguments, one run in a fresh lab, and
the results written as a table, JSON, markdown (optionally into the docs) and a chart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..lab.topology import Lab
from .cases import DEFAULT_POLICY, LATENCY_RATE, NOT_AVAILABLE, ROOT, UDP_LEN
from .report import chart, markdown, render, replace_block
from .results import added_latency, round_ratios, summarize
from .run import Bench, find_pyspy

__all__ = ["DESCRIPTION", "main"]

DESCRIPTION = ("`make bench`: what nfhooks costs per packet, next to what it is compared with: every row in "
               "interleaved rounds, median (min-max), ratios within a round.")


def _meta(seconds: float) -> dict[str, Any]:
    return {
        "seconds": seconds,
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "udp_payload": UDP_LEN,
        "iperf3": (subprocess.run(["iperf3", "--version"], capture_output=True, text=True)
                   .stdout.split("\n")[0].strip() if shutil.which("iperf3") else None),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nfhooks.bench", description=DESCRIPTION)
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per measurement (default 4)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds: every row once per round (default 3; >= 3 for a median)")
    ap.add_argument("--quick", action="store_true", help="2 s per row, no 'nfhooks fields' rows")
    ap.add_argument("--json", default="bench-results.json", help="write results here (default %(default)s)")
    ap.add_argument("--proto", choices=("udp", "tcp", "both"), default="both")
    ap.add_argument("--no-scapy", action="store_true", help="skip the scapy rows")
    ap.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help="benchmark policy")
    ap.add_argument("--profile", type=Path, metavar="PATH",
                    help="also run py-spy on the engine under the UDP flood; raw stacks to PATH")
    ap.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--latency-rate", type=float, default=LATENCY_RATE,
                    help="UDP echo probes per second for the latency rows (default %(default)g)")
    ap.add_argument("--no-latency", action="store_true", help="skip the latency probes")
    ap.add_argument("--only", choices=("latency",),
                    help="only these rows: 'latency' = the kernel, bare and nfhooks latency probes "
                         "(with each consumer's CPU per probe), no throughput rows")
    ap.add_argument("--markdown", type=Path, default=Path("bench-results.md"),
                    help="write the markdown tables here (default %(default)s)")
    ap.add_argument("--chart", type=Path, default=ROOT / "docs" / "img" / "bench.png",
                    help="write the PNG chart here (needs matplotlib: pip install -e '.[docs]'); "
                         "'-' for none (default docs/img/bench.png)")
    ap.add_argument("--docs", type=Path, metavar="MD",
                    help="also put the markdown tables into MD between the bench markers "
                         "(e.g. docs/performance.md)")
    ap.add_argument("--backend", choices=("auto", "legacy", "nft"), default=None,
                    help="where the engines' rules go (default: $NFHOOKS_BACKEND, else auto)")
    args = ap.parse_args(argv)
    from ..backends.choice import choose

    backend, why = choose(args.backend)  # exported: the engines the bench starts use it
    print(f"nfhooks bench: backend {backend.name} ({why})", file=sys.stderr)

    if os.geteuid() != 0:
        print("nfhooks bench: needs root (network namespaces, iptables, NFQUEUE)", file=sys.stderr)
        return 2
    if shutil.which("iperf3") is None:
        print("nfhooks bench: iperf3 is not installed (make deps)", file=sys.stderr)
        return 2
    if args.profile and find_pyspy() is None:
        print("nfhooks bench: --profile needs py-spy (.venv/bin/pip install py-spy)", file=sys.stderr)
        return 2
    seconds = 2.0 if args.quick and args.seconds == 4.0 else args.seconds
    if args.rounds < 1:
        print("nfhooks bench: --rounds must be at least 1", file=sys.stderr)
        return 2
    protos: tuple[str, ...] = ("udp", "tcp") if args.proto == "both" else (args.proto,)
    if args.only == "latency":
        if args.no_latency:
            print("nfhooks bench: --only latency and --no-latency exclude each other", file=sys.stderr)
            return 2
        protos = ()

    meta = _meta(seconds)
    meta["backend"] = backend.name  # report.py names it in the markdown
    meta["rounds"] = args.rounds
    t0 = time.monotonic()
    profile: dict[str, Any] | None = None
    with Lab() as lab:
        print(f"nfhooks bench: lab {lab.id} (client -- router), {seconds:g} s per row, {args.rounds} round(s)",
              flush=True)
        bench = Bench(lab, seconds, args.policy, log=lambda s: print(s, flush=True))
        bench.build()
        latency: dict[str, Any] | None = None if args.no_latency else {}
        rows = bench.run(protos, fields=not args.quick, scapy=not args.no_scapy, more=not args.quick,
                         latency=latency, rate=args.latency_rate, rounds=args.rounds)
        if args.profile:
            try:
                profile = bench.profile(args.profile, max(seconds, 5.0), args.profile_native)
            except Exception as e:  # noqa: BLE001 -- the measurements are still worth writing
                print(f"nfhooks bench: profile failed: {e}", file=sys.stderr)
    meta["wall_seconds"] = round(time.monotonic() - t0, 1)
    measured = rows  # every round's rows; the tables show the summary
    rows = summarize(measured)
    rat, span = round_ratios(measured)
    render(rows, rat, meta, span)
    doc: dict[str, Any] = {"meta": meta, "rows": [asdict(r) for r in rows], "ratios": rat, "ratio_ranges": span,
                           "measurements": [asdict(r) for r in measured],
                           "latency": latency or {}, "latency_added": added_latency(latency or {})}
    md = markdown(rows, latency or {}, meta, rat, span)
    args.markdown.write_text(md)
    print(md)
    print(f"markdown: {args.markdown}")
    if args.docs:
        args.docs.write_text(replace_block(args.docs.read_text(), md))
        print(f"tables written into {args.docs}")
    if str(args.chart) != "-":
        try:
            chart(rows, latency or {}, args.chart,
                  f"nfhooks bench, median of {args.rounds} round(s): {meta['cpus']} CPUs, kernel {meta['kernel']}, {meta['time']}")
            print(f"chart: {args.chart}")
        except ImportError:
            print("nfhooks bench: no chart: matplotlib is not installed (pip install -e '.[docs]')", file=sys.stderr)
    if profile is not None:
        doc["profile"] = profile
        print(f"profile: {profile['samples']} samples in {args.profile}; top self time:")
        for f, pct in profile["self"][:10]:
            print(f"  {pct:5.1f}%  {f}")
        print("where the packet loop's time goes:")
        for k, pct in profile["breakdown"]["percent"].items():
            print(f"  {pct:5.1f}%  {k}")
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results: {args.json} ({meta['wall_seconds']} s)")
    return 1 if any(r.error and not r.error.startswith(NOT_AVAILABLE) for r in rows) else 0

