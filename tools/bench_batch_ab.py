"""Verdict batching A/B on the bench harness (docs/performance.md, "Applied: verdict batching").

Run as root from the repository: ``.venv/bin/python tools/bench_batch_ab.py [ROUNDS] [SECONDS]``
(``PROTOS="udp tcp"`` by default; ``LATENCY=1`` for the latency probe instead). Each round
measures the bare NetfilterQueue script, then one engine with batching and one with
``--no-verdict-batch`` in alternating order; every engine fail-closed, ``--no-gso --backend
legacy``; CPU per packet is formed against the bare row of the same round. Everything runs in
the bench's lab namespaces, removed at the end.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nfhooks.bench.cases import ECHO_PORT, FIELDS_PORT, PORT  # noqa: E402
from nfhooks.bench.run import Bench  # noqa: E402
from nfhooks.lab import Lab  # noqa: E402

POLICY = ROOT / "policies" / "bench.py"


def engine(lab: Lab, which: str):  # type: ignore[no-untyped-def]
    argv = [sys.executable, "-m", "nfhooks", "run", str(POLICY), "--set", f"port={PORT}",
            "--set", f"fields_port={FIELDS_PORT}", "--set", f"echo_port={ECHO_PORT}", "--fail-closed",
            "--no-gso", "--backend", "legacy", *(["--no-verdict-batch"] if which == "nobatch" else [])]
    return lab.start_engine(str(POLICY), node="router", ready_timeout=30, _argv=argv)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    secs = float(sys.argv[2]) if len(sys.argv) > 2 else 4
    protos = os.environ.get("PROTOS", "udp tcp").split()
    res: dict[tuple[str, str], list] = {}
    with Lab() as lab:
        b = Bench(lab, secs, POLICY, log=lambda s: print(s, flush=True))
        b.build()
        for r in range(rounds):
            order = ("batch", "nobatch") if r % 2 == 0 else ("nobatch", "batch")
            if os.environ.get("LATENCY"):
                for which in order:
                    e = engine(lab, which)
                    try:
                        st = b.latency(which, 10000, secs)
                    finally:
                        e.stop()
                    print(f"{which}: p50 {st['p50_us']:.0f} us, p90 {st['p90_us']:.0f} us, p99 {st['p99_us']:.0f} us")
                continue
            for proto in protos:
                res.setdefault(("bare", proto), []).append(b.script_consumer("bare", proto))
                for which in order:
                    e = engine(lab, which)
                    try:
                        res.setdefault((which, proto), []).append(b.measure(which, proto, PORT, e.pid, None))
                    finally:
                        e.stop()
    for (which, proto), rows in sorted(res.items()):
        if which == "bare":
            continue
        ratios = [n.cpu_us_per_packet / x.cpu_us_per_packet for n, x in zip(rows, res[("bare", proto)])
                  if n.cpu_us_per_packet and x.cpu_us_per_packet]
        if ratios:
            print(f"{proto} {which}: CPU/pkt {statistics.median(ratios):.2f}x bare "
                  f"({min(ratios):.2f}-{max(ratios):.2f}), decided/s {[round(r.decided_pps or 0) for r in rows]}, "
                  f"bare {[round(r.decided_pps or 0) for r in res[('bare', proto)]]}")


if __name__ == "__main__":
    main()
