"""Verdict batching: the plain accepts of one pass over a queue answered with one message.

Why: a verdict is a sendmsg() per packet (NetfilterQueue's ``accept()``), and under load
that syscall, the netlink skb and its parsing are a large share of what a queued packet
costs. The kernel takes NFQNL_MSG_VERDICT_BATCH (libnetfilter_queue's
``nfq_set_verdict_batch``, which NetfilterQueue 1.1.0 does not wrap; Suricata's NFQ mode
batches the same way): one verdict for every packet of the queue still waiting with an
id up to a given one. Each pass of queue.py's loop holds its plain accepts here and sends
one batch verdict when the pass ends (the socket had nothing more, or the pass's budget of
packets was spent), so a held packet waits at most one pass.

Why it is exact (net/netfilter/nfnetlink_queue.c): the kernel numbers a queue's packets in
the order it puts them on the socket (``++id_sequence`` and the unicast under the queue
lock) and keeps a packet in the queue only once it is on the socket, so when the last held
packet's id is sent, every waiting packet with a lower id has been read by this loop and
either is held here or already has its own verdict (and left the queue). Nothing else is
accepted by it. Order is kept: every other verdict (a mark, a rewrite, NAT, a repeat, the
default after an error) first sends the held accepts (``settle``), so packets leave in the
order they came, as with one verdict each. A drop needs no settle, but is given one for
simplicity of reasoning: the cost is only paid off the fast path.

If the batch message cannot be sent, every held packet gets its own verdict, so no packet
is left waiting. A batch of one is sent as an ordinary verdict.
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import Any

from .netlink import verdict_batch_prefix
from .qcounters import QueueCounters

__all__ = ["BatchCollector", "VerdictBatch", "NF_ACCEPT"]

log = logging.getLogger("nfhooks.vbatch")
NF_ACCEPT = 1
_HDR = struct.Struct("!II")  # struct nfqnl_msg_verdict_hdr: verdict, id (big endian)


class VerdictBatch:
    """One queue's held accepts. Inert (every accept is given at once) until ``arm``ed."""

    __slots__ = ("held", "sock", "prefix", "batches", "batched")

    def __init__(self) -> None:
        self.held: list[Any] = []
        self.sock: socket.socket | None = None
        self.prefix = b""
        self.batches = 0  # batch messages sent
        self.batched = 0  # packets they answered

    def arm(self, sock: socket.socket, queue: int) -> None:
        """Hold accepts from now on: ``sock`` is the queue's own netlink socket (a dup of it:
        the kernel takes a verdict only from the port that owns the queue)."""
        self.sock, self.prefix = sock, verdict_batch_prefix(queue)

    def accept(self, nfpkt: Any) -> None:
        """The fast path's accept: held while armed, given now otherwise."""
        if self.sock is None:
            nfpkt.accept()
        else:
            self.held.append(nfpkt)

    def settle(self) -> None:
        """Give the held packets their accept now (the end of a pass, or before any other verdict)."""
        held = self.held
        if not held:
            return
        self.held = []
        if len(held) == 1:
            held[0].accept()
            return
        try:
            self.sock.sendto(self.prefix + _HDR.pack(NF_ACCEPT, held[-1].id), (0, 0))  # type: ignore[union-attr]
        except OSError as e:
            log.warning("batch verdict for %d packets not sent (%s): giving each its own", len(held), e)
            for p in held:
                p.accept()
            return
        self.batches += 1
        self.batched += len(held)


class BatchCollector(QueueCounters):
    """``nfhooks_queue_verdict_batches_total`` and ``nfhooks_queue_batched_verdicts_total`` per
    queue, read at scrape time from queue.py's ``BoundQueue.batch``."""

    def __init__(self, bound: Any) -> None:
        super().__init__(bound, "batch", (
            ("nfhooks_queue_verdict_batches", "Batch verdict messages sent: each accepted a run of a queue's "
             "packets at once (vbatch.py).", "batches"),
            ("nfhooks_queue_batched_verdicts", "Packets accepted by a batch verdict message instead of a "
             "message each.", "batched")))
