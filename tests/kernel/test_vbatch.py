"""Verdict batching (vbatch.py) on the real kernel: a fast stream of numbered datagrams into a
handler that accepts most, drops every 5th and marks every 7th. The engine holds each pass's
plain accepts and answers them with one batch verdict; what the receiver sees must be exactly
what the handler decided -- none of the dropped ones (a batch accepts every waiting packet
up to an id: it must not take the ones given their own drop), every accepted and marked one,
in the order sent (a mark verdict settles the held accepts first). The metrics must show
batches of more than one packet, else this test proved nothing. ``--no-verdict-batch``
turns it off; under ``--pcap`` every decided packet is recorded with its verdict. IPv4 and
IPv6, both backends."""

from __future__ import annotations

import json
import sys

import pytest

from .conftest import metric

PORT = 5301
N = 20000

_POLICY = f"""
from nfhooks import Policy, accept, drop, mark
policy = Policy()

@policy.input(proto="udp", dport={PORT})
def numbered(pkt):
    seq = int.from_bytes(pkt.payload[:4], "big")
    if seq % 5 == 0:
        return drop()
    if seq % 7 == 0:
        return mark(0x1, 0x1)
    return accept()
"""

# Receives until 2 s pass without a datagram (after the first), prints the sequence numbers.
_RECEIVER = r"""
import json, socket, sys
family, addr, port, ready = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE (not in socket): no loss at the receiver
s.bind((addr, port))
open(ready, "w").close()
seqs = []
s.settimeout(30)
while True:
    try:
        d = s.recv(64)
    except socket.timeout:
        break
    seqs.append(int.from_bytes(d[:4], "big"))
    s.settimeout(2)
print(json.dumps(seqs))
"""

_SENDER = r"""
import socket, sys
family, addr, port, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("::" if family == 6 else "0.0.0.0", 41999))  # one fixed 5-tuple (conntrack is shared)
pad = bytes(28)
for i in range(n):
    s.sendto(i.to_bytes(4, "big") + pad, (addr, port))
"""


def _run(lab, tmp_path, family: int, *args: str):
    """(received numbers, accepted + marked, dropped, batch messages, batched accepts, engine)."""
    pol = tmp_path / "numbered.py"
    pol.write_text(_POLICY)
    # the whole stream fits in the queue: none is lost to a full queue, so every packet is decided
    eng = lab.start_engine(str(pol), "--fail-closed", "--queue-maxlen", str(2 * N), *args)
    addr = lab.addr("router", family)
    ready = tmp_path / f"ready{family}"
    recv = lab.popen("router", sys.executable, "-c", _RECEIVER, family, addr, PORT, ready,
                     stdout=-1, stderr=-1, text=True)
    lab.wait_for(ready.exists, timeout=10, what="receiver bound")
    lab.exec("client", sys.executable, "-c", _SENDER, family, addr, PORT, N, timeout=60)
    out, err = recv.communicate(timeout=60)
    assert recv.returncode == 0, err
    seqs = json.loads(out)
    decided = {v: metric(lab, "nfhooks_handler_packets_total", handler="numbered", verdict=v)
               for v in ("accept", "drop", "mark")}
    batches = metric(lab, "nfhooks_queue_verdict_batches_total", handler="numbered")
    batched = metric(lab, "nfhooks_queue_batched_verdicts_total", handler="numbered")
    return seqs, decided["accept"] + decided["mark"], decided["drop"], batches, batched, eng


@pytest.mark.timeout(180)
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_batched_accepts_deliver_exactly_what_the_handler_decided_in_order(nfh_lab, tmp_path, family):
    seqs, passed, dropped, batches, batched, _ = _run(nfh_lab, tmp_path, family)
    print(f"IPv{family}: {len(seqs)} received, {passed:.0f} accepted or marked, {dropped:.0f} dropped; "
          f"{batched:.0f} accepts in {batches:.0f} batch verdicts")
    assert batches > 0, (batches, batched)  # batch verdicts sent (each for 2 packets or more)
    assert not [s for s in seqs if s % 5 == 0], "a packet the handler dropped was delivered"
    assert len(seqs) == passed, (len(seqs), passed)  # every accept given, none twice
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "delivered out of order"
    assert passed + dropped > N * 0.5, (passed, dropped)  # most of the stream reached the handler


@pytest.mark.timeout(180)
def test_no_verdict_batch_gives_each_packet_its_own_verdict(nfh_lab, tmp_path):
    seqs, passed, dropped, batches, batched, _ = _run(nfh_lab, tmp_path, 4, "--no-verdict-batch")
    assert batches == 0 and batched == 0
    assert not [s for s in seqs if s % 5 == 0] and len(seqs) == passed
    assert seqs == sorted(seqs)


@pytest.mark.timeout(180)
def test_under_pcap_batched_packets_are_recorded_with_their_verdicts(nfh_lab, tmp_path):
    from nfhooks.pcap import read_packets

    cap = nfh_lab.tmpdir / "batched.pcapng"
    seqs, passed, dropped, batches, _, eng = _run(nfh_lab, tmp_path, 4, "--pcap", str(cap),
                                             "--pcap-max-bytes", str(256 << 20))
    assert batches > 0 and not [s for s in seqs if s % 5 == 0] and len(seqs) == passed
    assert seqs == sorted(seqs)
    assert eng.stop() == 0  # flushes the capture
    got: dict[str, int] = {}
    for _, raw, comment in read_packets(cap):
        seq = int.from_bytes(raw[28:32], "big")  # IPv4 20 + UDP 8: the datagram's number
        verdict = "drop" if "verdict=drop" in comment else "pass"
        assert (verdict == "drop") == (seq % 5 == 0), (seq, comment)
        got[verdict] = got.get(verdict, 0) + 1
    assert got == {"pass": passed, "drop": dropped}, got


@pytest.mark.timeout(180)
def test_workers_batch_and_the_main_endpoint_counts_it(nfh_lab, tmp_path):
    seqs, passed, dropped, batches, batched, _ = _run(nfh_lab, tmp_path, 4, "--workers", "2")
    assert batches > 0 and batched > batches, (batches, batched)  # summed over the workers
    assert not [s for s in seqs if s % 5 == 0] and len(seqs) == passed
    assert seqs == sorted(seqs)
