"""GSO by default (gso.py, docs/gso.md) on the real kernel, with default options: a header-only
handler takes locally generated TCP as GSO super-packets, far fewer than the segments on the
wire; a handler that reads the payload through a helper (which the source scan cannot see)
still sees only segments -- the first super-packet it reads switches its queue off and is
queued again, segmented -- and the transfer completes. IPv4 and IPv6, both backends."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from .conftest import metric

_POLICY = """
from nfhooks import Policy, accept, mark
policy = Policy()

def first_bytes(pkt):
    return pkt.payload[:4]  # a helper: the handler's own source names no payload

@policy.output(proto="tcp", dport=5201)
def headers(pkt):
    return accept() if pkt.length <= 1500 else mark(0x1, 0x1)

@policy.output(proto="tcp", dport=5202)
def reads(pkt):
    first_bytes(pkt)
    # a super-packet past the payload read would be counted as mark: there must be none
    return accept() if pkt.length <= 1500 else mark(0x1, 0x1)
"""


def _iperf(lab, family: int, port: int) -> int:
    server = lab.addr("server", family)
    lab.popen("server", "iperf3", "-s", "-1", "-p", str(port), "-B", server,
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.wait_for(lambda: f":{port} " in lab.exec("server", "ss", "-ltnH").stdout + " ",
                 what="iperf3 server listening")
    cp = lab.exec("router", "iperf3", "-c", server, "-p", str(port), "-n", "8M", "-J", timeout=60, check=False)
    assert cp.returncode == 0, cp.stdout[-2000:]
    end = json.loads(cp.stdout)["end"]
    # completed: 8 MB sent and acknowledged (a bad checksum would stall it in retransmissions)
    assert end["sum_sent"]["bytes"] >= 8 * 1024 * 1024 and end["sum_received"]["bytes"] > 0
    return int(end["sum_sent"]["bytes"])


def _gso_label(lab, handler: str) -> str:
    text = lab.exec("router", "curl", "-s", "-m", "2", "http://127.0.0.1:9477/metrics").stdout
    for line in text.splitlines():
        if line.startswith("nfhooks_queue_config_info{") and f'handler="{handler}"' in line:
            return dict(re.findall(r'(\w+)="([^"]*)"', line))["gso"]
    return ""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_gso_by_default_for_headers_and_segments_for_payload_readers(nfh_lab, tmp_path, family):
    lab = nfh_lab
    pol = tmp_path / "gso.py"
    pol.write_text(_POLICY)
    eng = lab.start_engine(str(pol), "-v")  # default options: --gso auto
    assert _gso_label(lab, "headers") == "on" and _gso_label(lab, "reads") == "on"

    sent = _iperf(lab, family, 5201)
    whole = metric(lab, "nfhooks_handler_packets_total", handler="headers", verdict="mark")
    small = metric(lab, "nfhooks_handler_packets_total", handler="headers", verdict="accept")
    segments = sent / 1500  # at least this many segments crossed the wire
    assert whole > 0, (whole, small)  # super-packets, whole
    assert whole + small < segments / 2, (whole, small, segments)  # far fewer decisions than segments
    assert _gso_label(lab, "headers") == "on"
    assert metric(lab, "nfhooks_queue_gso_switch_offs_total", handler="headers") == 0

    _iperf(lab, family, 5202)
    assert metric(lab, "nfhooks_handler_packets_total", handler="reads", verdict="mark") == 0
    segs = metric(lab, "nfhooks_handler_packets_total", handler="reads", verdict="accept")
    assert segs > 5 * (whole + small), (segs, whole, small)  # segments, as without GSO
    print(f"IPv{family}: headers decided {whole + small:.0f} ({whole:.0f} super-packets) for {sent} bytes; "
          f"reads decided {segs:.0f} segments")
    assert metric(lab, "nfhooks_queue_gso_switch_offs_total", handler="reads") == 1
    assert metric(lab, "nfhooks_queue_gso_repeated_packets_total", handler="reads") >= 1
    assert _gso_label(lab, "reads") == "off"
    assert "GSO switched off: handler 'reads' read pkt.payload" in eng.log()
    assert metric(lab, "nfhooks_handler_errors_total") == 0 and metric(lab, "nfhooks_malformed_packets_total") == 0


@pytest.mark.timeout(120)
def test_no_gso_segments_everything(nfh_lab, tmp_path):
    lab = nfh_lab
    pol = tmp_path / "gso.py"
    pol.write_text(_POLICY)
    lab.start_engine(str(pol), "--no-gso")
    assert _gso_label(lab, "headers") == "off"
    _iperf(lab, 4, 5201)
    assert metric(lab, "nfhooks_handler_packets_total", handler="headers", verdict="mark") == 0
