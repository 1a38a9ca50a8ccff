"""`nfhooks top` in live mode on a pipe prints a plain table per interval.

A live (cursor-redrawn) display on a pipe shows nothing until it ends -- and `top` never ends
by itself. Against a tiny metrics server on 127.0.0.1 whose counters grow with every scrape,
`top --interval 0.2 | ...` must print the totals table and then tables with rates, without
terminal escape sequences.
"""
from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class _Metrics(BaseHTTPRequestHandler):
    scrapes = 0

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        type(self).scrapes += 1
        n = 100 * type(self).scrapes
        body = ("# HELP nfhooks_packets_total packets by verdict\n# TYPE nfhooks_packets_total counter\n"
                f'nfhooks_packets_total{{hook="INPUT",table="filter",verdict="accept"}} {n}\n'
                f'nfhooks_packets_total{{hook="FORWARD",table="filter",verdict="drop"}} {n // 2}\n').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def metrics_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(60)
def test_live_top_prints_a_table_per_interval_on_a_pipe(metrics_url):
    proc = subprocess.Popen([sys.executable, "-m", "nfhooks", "top", "--url", metrics_url, "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while sum("rate/s" in line for line in lines) < 2:  # polling the pipe with a deadline
            assert proc.poll() is None, f"top exited {proc.returncode}: {proc.stderr.read()}"
            assert time.monotonic() < deadline, f"no live tables on the pipe after 30 s: {lines}"
            time.sleep(0.05)
    finally:
        proc.terminate()  # by PID: the process this test started
        proc.wait(timeout=10)
    text = "".join(lines)
    assert "totals" in lines[0] or "totals" in text.split("rate/s")[0], text
    assert "INPUT" in text and "FORWARD" in text and "accept" in text
    assert re.search(r"\d/s\b", text)  # rates since the previous refresh
    assert "\x1b[" not in text, "terminal escape sequences on a pipe"
