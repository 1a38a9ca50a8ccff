"""`make soak`: mixed lab traffic for a long run with a policy reload every minute.

In a fresh namespace lab (nfhooks.lab), the engine runs a copy of policies/soak.py on the
router. Probes run back to back -- forwarded TCP accepted (8080) and rejected (8081), UDP echo
(7000), ICMP echo to the router, IPv4 and IPv6 -- each with its expected outcome; every
``--reload-every`` seconds the copy's version is bumped and `nfhooks reload` runs. Recorded:
the engine's RSS over time, probes whose outcome was wrong, packets left waiting in the
kernel queues, the nfhooks chains after each reload (exactly one generation's) and after exit
(none). Writes docs/soak.md; exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from .backends.tools import SAVE_TOOLS

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "policies" / "soak.py"


def rss_kib(lab: Any, pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^VmRSS:\s+(\d+)", text, re.M)
    return int(m.group(1)) if m else 0


def waiting(lab: Any) -> int:
    text = lab.exec("router", "cat", "/proc/net/netfilter/nfnetlink_queue").stdout
    return sum(int(line.split()[2]) for line in text.splitlines() if line.strip())


def chains(lab: Any) -> list[str]:
    from .backends import resolve

    tools = SAVE_TOOLS[resolve()[0]]  # the engine's: $NFHOOKS_BACKEND, else auto
    out = lab.exec("router", tools[4]).stdout + lab.exec("router", tools[6]).stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.startswith(":NFH-"))


def run(minutes: float, reload_every: float, out: Path | None) -> int:
    from .lab import Lab

    lab = Lab.router_topology()
    failures: list[str] = []
    samples: list[tuple[float, int]] = []
    probes = reloads = 0
    try:
        pol = lab.tmpdir / "soak.py"
        text = POLICY.read_text()
        pol.write_text(text)
        pol.chmod(0o644)
        eng = lab.start_engine(str(pol))
        server = lab.addr("server")
        server6 = lab.addr("server", 6)
        router = lab.addr("router", facing="client")
        for port in (8080, 8081):
            lab.tcp_server("server", port, 4, bind="0.0.0.0")
            lab.tcp_server("server", port, 6, bind="::")  # the lab's servers are v6-only on ::
        lab.udp_server("server", 7000, bind="0.0.0.0")
        expect = [
            (lambda: lab.tcp_connect("client", server, 8080), "ok", "tcp 8080 v4"),
            (lambda: lab.tcp_connect("client", server6, 8080), "ok", "tcp 8080 v6"),
            (lambda: lab.tcp_connect("client", server, 8081), "refused", "tcp 8081 v4"),
            (lambda: lab.udp_send("client", server, 7000, b"soak") == b"soak", True, "udp 7000"),
            (lambda: lab.ping("client", router), True, "ping router"),
        ]
        base_chains = chains(lab)
        t0 = time.monotonic()
        end = t0 + minutes * 60
        next_reload = t0 + reload_every
        next_sample = t0
        while time.monotonic() < end:
            for fn, want, what in expect:
                got = fn()
                probes += 1
                if got != want:
                    failures.append(f"{time.monotonic() - t0:7.1f}s {what}: got {got!r}, expected {want!r}")
            now = time.monotonic()
            if now >= next_sample:
                samples.append((now - t0, rss_kib(lab, eng.pid)))
                next_sample += 10
            if now >= next_reload:
                reloads += 1
                pol.write_text(text.replace('version="1"', f'version="{reloads + 1}"'))
                r = lab.exec("router", sys.executable, "-m", "nfhooks", "reload", check=False, timeout=60)
                if r.returncode != 0:
                    failures.append(f"reload {reloads} failed: {r.stderr.strip()}")
                try:
                    lab.wait_for(lambda: len(chains(lab)) == len(base_chains), timeout=15,
                                 what="the old generation retired")
                except TimeoutError:
                    failures.append(f"reload {reloads}: chains {chains(lab)}, expected as many as {base_chains}")
                next_reload += reload_every
        deadline = time.monotonic() + 10
        while (left := waiting(lab)) and time.monotonic() < deadline:
            time.sleep(0.1)  # polling the kernel's queue table, with a deadline
        if left:
            failures.append(f"{left} packet(s) still waiting for a verdict")
        if not eng.running():
            failures.append(f"the engine exited ({eng.returncode}): {eng.log()[-3000:]}")
        else:
            errors = sum(float(line.split()[-1]) for line in lab.exec(
                "router", "curl", "-s", "http://127.0.0.1:9477/metrics").stdout.splitlines()
                if line.startswith("nfhooks_handler_errors_total{"))
            if errors:
                failures.append(f"{errors:g} handler errors")
        eng.stop()
        leaked = chains(lab)
        if leaked:
            failures.append(f"chains left after exit: {leaked}")
    finally:
        lab.close()
    first = [r for t, r in samples if t < 60] or [samples[0][1]]
    last = [r for t, r in samples if t >= samples[-1][0] - 60]
    growth = (max(last) - max(first)) / max(first) if first and last else 0.0
    if growth > 0.10:
        failures.append(f"RSS grew {growth:.0%} from the first to the last minute")
    report = [
        "# Soak run", "",
        f"`make soak` ({minutes:g} min, a reload every {reload_every:g} s), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}:",
        "",
        "| figure | value |", "|---|---|",
        f"| probes (forwarded TCP accept/reject v4+v6, UDP echo, ping) | {probes} |",
        f"| probes with a wrong outcome | {sum(1 for f in failures if ': got ' in f)} |",
        f"| reloads | {reloads} |",
        f"| packets left in kernel queues at the end | {left} |",
        f"| RSS first minute (max) | {max(first)} KiB |",
        f"| RSS last minute (max) | {max(last)} KiB |",
        f"| RSS growth | {growth:+.1%} |",
        f"| nfhooks chains after exit | {0 if not any('chains left' in f for f in failures) else 'LEAKED'} |",
        "", "RSS samples (s, KiB): " + ", ".join(f"{t:.0f}:{r}" for t, r in samples), "",
        "Result: " + ("PASS" if not failures else "FAIL\n\n" + "\n".join(f"- {f}" for f in failures[:50])), "",
    ]
    text_out = "\n".join(report)
    print(text_out)
    if out is not None:
        out.write_text(text_out)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nfhooks.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--reload-every", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "soak.md")
    ap.add_argument("--backend", choices=("auto", "legacy", "nft"), default=None,
                    help="where the engine's rules go (default: $NFHOOKS_BACKEND, else auto)")
    a = ap.parse_args(argv)
    from .backends.choice import choose

    choose(a.backend)  # exported: the engine the soak starts uses it
    return run(a.minutes, a.reload_every, a.out)


if __name__ == "__main__":
    sys.exit(main())
