"""vbatch.py and its message (netlink.verdict_batch_prefix) without root: the bytes against the
uapi layouts, what is held and when it is settled, the fallback when the message cannot be
sent, and the dispatcher's part -- plain accepts held, every other verdict settling the held
ones first (the order packets leave in), no batching under --audit (--pcap batches). The kernel's
side is tests/kernel/test_vbatch.py."""

from __future__ import annotations

import struct

import pytest

from nfhooks.fake import FakeQueuedPacket, fake_bytes
from nfhooks.netlink import verdict_batch_prefix
from nfhooks.vbatch import NF_ACCEPT, BatchCollector, VerdictBatch
from nfhooks.verdict import accept, drop, mark


class Sock:
    """Records what is sent, in one list shared with the packets' verdicts (their order)."""

    def __init__(self, log: list, fail: bool = False) -> None:
        self.log, self.fail = log, fail

    def sendto(self, data: bytes, addr: tuple) -> int:
        if self.fail:
            raise OSError(105, "No buffer space available")
        self.log.append(("batch", data))
        return len(data)


class Pkt(FakeQueuedPacket):
    """A fake packet whose verdicts go into a shared log."""

    def __init__(self, pid: int, log: list, raw: bytes = b"") -> None:
        super().__init__(raw, id=pid)
        self.log = log

    def accept(self) -> None:
        super().accept()
        self.log.append(("accept", self.id))

    def drop(self) -> None:
        super().drop()
        self.log.append(("drop", self.id))


def test_the_batch_message_is_nfqnl_msg_verdict_batch_for_the_queue():
    msg = verdict_batch_prefix(513) + struct.pack("!II", NF_ACCEPT, 0xDEADBEEF)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq, pid) == (len(msg), (3 << 8) | 3, 0x01, 0, 0) and length == 32
    assert struct.unpack_from("!BBH", msg, 16) == (0, 0, 513)  # AF_UNSPEC, NFNETLINK_V0, res_id
    assert struct.unpack_from("=HH", msg, 20) == (12, 2)  # NFQA_VERDICT_HDR, 8 bytes of payload
    assert struct.unpack_from("!II", msg, 24) == (1, 0xDEADBEEF)
    with pytest.raises(ValueError):
        verdict_batch_prefix(70000)


def test_inert_it_accepts_at_once():
    log: list = []
    b = VerdictBatch()
    b.accept(Pkt(7, log))
    assert log == [("accept", 7)] and not b.held
    b.settle()
    assert log == [("accept", 7)]


def test_armed_it_holds_and_answers_the_run_with_one_message_for_the_last_id():
    log: list = []
    b = VerdictBatch()
    b.arm(Sock(log), 4)
    for i in (10, 11, 12):
        b.accept(Pkt(i, log))
    assert log == []  # held
    b.settle()
    assert log == [("batch", verdict_batch_prefix(4) + struct.pack("!II", NF_ACCEPT, 12))]
    assert (b.batches, b.batched, b.held) == (1, 3, [])
    b.settle()  # nothing held: nothing sent
    assert len(log) == 1


def test_a_run_of_one_is_an_ordinary_verdict_and_no_batch():
    log: list = []
    b = VerdictBatch()
    b.arm(Sock(log), 0)
    b.accept(Pkt(3, log))
    b.settle()
    assert log == [("accept", 3)] and (b.batches, b.batched) == (0, 0)


def test_a_batch_that_cannot_be_sent_gives_each_packet_its_verdict():
    log: list = []
    b = VerdictBatch()
    b.arm(Sock(log, fail=True), 0)
    pkts = [Pkt(i, log) for i in (1, 2, 3)]
    for p in pkts:
        b.accept(p)
    b.settle()
    assert log == [("accept", 1), ("accept", 2), ("accept", 3)] and b.batches == 0
    assert all(p.calls == ["accept"] for p in pkts)


def _numbered(pkt):
    seq = pkt.payload[0]
    return drop() if seq == 3 else mark(0x1, 0x1) if seq == 5 else accept()


def test_the_dispatcher_holds_plain_accepts_and_settles_them_before_any_other_verdict(dispatch):
    d = dispatch(defaults={"INPUT": "drop"})
    d.add("INPUT", _numbered, proto="udp", dport=53)
    cb = d.callback()
    log: list = []
    cb.batch.arm(Sock(log), 0)  # as queue.py arms it
    for i in range(1, 8):
        raw = fake_bytes(src="10.0.0.1", dst="10.0.0.2", proto="udp", sport=1, dport=53, payload=bytes([i]))
        d.send(Pkt(i, log, raw))
    cb.batch.settle()  # the end of the pass
    kinds = [(k, v if k != "batch" else struct.unpack_from("!I", v, 28)[0]) for k, v in log]
    # 1, 2 held, settled (one message up to 2) before 3's drop; 4 held, settled as a lone accept
    # before 5's mark (accepted with its mark); 6, 7 held, one message at the pass's end
    assert kinds == [("batch", 2), ("drop", 3), ("accept", 4), ("accept", 5), ("batch", 7)]
    labels = {"hook": "INPUT", "table": "filter", "verdict": "accept"}
    assert d.sample("nfhooks_packets_total", labels) == 5  # counted when decided, as before


def test_no_batch_under_audit_and_batched_under_pcap(dispatch):
    d = dispatch(defaults={"INPUT": "drop"})
    d.add("INPUT", _numbered, proto="udp", dport=53)
    assert isinstance(d.callback().batch, VerdictBatch)

    class Wrap:
        def wrap(self, on_packet, *a, **kw):
            return lambda nfpkt: on_packet(nfpkt)

    for kw, batched in (({"audit": Wrap()}, False), ({"tap": Wrap()}, True)):
        d = dispatch(defaults={"INPUT": "drop"}).use(**kw)
        d.add("INPUT", _numbered, proto="udp", dport=53)
        assert isinstance(getattr(d.callback(), "batch", None), VerdictBatch) is batched, kw


def test_the_collector_reads_each_batched_queue():
    from dataclasses import dataclass

    @dataclass
    class Bound:
        hook: str
        handler: str
        batch: VerdictBatch | None

    b = VerdictBatch()
    b.batches, b.batched = 2, 9
    fams = list(BatchCollector({3: Bound("INPUT", "h", b), 4: Bound("INPUT", "x", None)}).collect())
    got = {(f.name, s.labels["queue"]): s.value for f in fams for s in f.samples}
    assert got == {("nfhooks_queue_verdict_batches", "3"): 2, ("nfhooks_queue_batched_verdicts", "3"): 9}
    assert list(BatchCollector({}).collect()) == []
