"""The nfnetlink_queue messages nfhooks writes by hand: NFQNL_MSG_CONFIG with queue flags, and
NFQNL_MSG_VERDICT_BATCH (one verdict for a run of packets: vbatch.py).

Why by hand: NetfilterQueue 1.1.0 binds a queue, sets its copy mode and its length, and has
no way to set the queue's flags (libnetfilter_queue's ``nfq_set_queue_flags`` is not wrapped);
pyroute2 0.9.7 knows the nfnetlink subsystem number (``NFNL_SUBSYS_QUEUE = 3``) but has no
nfqueue message class or socket (its nfnetlink package covers nftables, ipset and conntrack
only). NetfilterQueue does not wrap ``nfq_set_verdict_batch`` either. The message is four fixed headers and three u32 attributes, so it is built here with
``struct`` (layouts from include/uapi/linux/netlink.h, netfilter/nfnetlink.h and
netfilter/nfnetlink_queue.h) and sent on the very socket NetfilterQueue bound the queue with:
the kernel accepts a config message for a queue only from the netlink port that owns it.

Flags (``NFQA_CFG_F_*``):

* ``FAIL_OPEN``: when the queue is full (``queue_maxlen`` packets waiting) or the socket
  buffer overruns, the kernel accepts the packet instead of dropping it. It counts neither:
  see queue.py's OverloadCollector for how the count is derived.
* ``GSO``: GSO/GRO super-packets are queued whole instead of being segmented (and, for a
  CHECKSUM_PARTIAL packet, instead of having the checksum completed in software) just to
  be queued. The copy is then often truncated and its transport checksum unfinished.

The ACK is read on the same socket, so this must run before any packet can reach the queue
(before nfhooks installs the rules that feed it): a packet message read here would never get
a verdict. One that shows up anyway (another program's rule feeds this queue number) is
reported as an error rather than silently swallowed.
"""

from __future__ import annotations

import errno as _errno
import os
import select
import socket
import struct
import time

__all__ = [
    "NFQA_CFG_F_FAIL_OPEN",
    "NFQA_CFG_F_GSO",
    "NetlinkError",
    "config_message",
    "parse_replies",
    "send_queue_config",
    "set_queue_config",
    "verdict_batch_prefix",
]

# include/uapi/linux/netlink.h
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLMSG_ERROR = 0x02
NLMSG_DONE = 0x03
# include/uapi/linux/netfilter/nfnetlink.h
NFNL_SUBSYS_QUEUE = 3
NFNETLINK_V0 = 0
# include/uapi/linux/netfilter/nfnetlink_queue.h
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_VERDICT_HDR = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 0x01
NFQA_CFG_F_CONNTRACK = 0x02
NFQA_CFG_F_GSO = 0x04

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host byte order)
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (queue number, big endian)
_NLATTR = struct.Struct("=HH")
_BE32 = struct.Struct("!I")
_ERRNO = struct.Struct("=i")


class NetlinkError(OSError):
    """The kernel refused the config message (``errno`` says why) or did not answer."""


def _attr_u32(kind: int, value: int) -> bytes:
    return _NLATTR.pack(8, kind) + _BE32.pack(value)


def config_message(queue: int, *, flags: int, mask: int, maxlen: int | None, seq: int,
                   ack: bool = True) -> bytes:
    """NFQNL_MSG_CONFIG for ``queue``: set the ``mask`` bits of its flags to ``flags`` (and
    its length to ``maxlen`` if given), asking for an ACK unless ``ack`` is False.
    Attributes are u32 big endian."""
    if not 0 <= queue <= 0xFFFF:
        raise ValueError(f"queue number {queue} out of range")
    body = _NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue)
    if maxlen is not None:
        body += _attr_u32(NFQA_CFG_QUEUE_MAXLEN, maxlen)
    body += _attr_u32(NFQA_CFG_MASK, mask) + _attr_u32(NFQA_CFG_FLAGS, flags & mask)
    kind = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
    nl_flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, nl_flags, seq, 0) + body


def verdict_batch_prefix(queue: int) -> bytes:
    """NFQNL_MSG_VERDICT_BATCH for ``queue`` up to its verdict header's attribute header: append
    ``struct.pack("!II", verdict, max_id)`` (struct nfqnl_msg_verdict_hdr, big endian) to get
    the message. No ACK asked: it goes on a socket that carries packet messages. The kernel
    (nfqnl_recv_verdict_batch) gives ``verdict`` to every packet of the queue still waiting
    with an id up to ``max_id`` (wrap-around safe), in queue order, and leaves marks alone."""
    if not 0 <= queue <= 0xFFFF:
        raise ValueError(f"queue number {queue} out of range")
    body = _NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue) + _NLATTR.pack(4 + 8, NFQA_VERDICT_HDR)
    kind = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body) + 8, kind, NLM_F_REQUEST, 0, 0) + body


def parse_replies(data: bytes, seq: int) -> tuple[int | None, list[int]]:
    """Walk the netlink messages of one datagram.

    Returns ``(error, others)``: ``error`` is the ACK's errno for our ``seq`` (0 = accepted,
    None = no answer to us in this datagram); ``others`` lists the message types that were
    something else (an nfqueue packet message here means a packet was read that nobody will
    give a verdict to).
    """
    error: int | None = None
    others: list[int] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            break  # truncated or garbage: nothing more to trust
        if kind == NLMSG_ERROR and mseq == seq and length >= _NLMSGHDR.size + _ERRNO.size:
            error = -_ERRNO.unpack_from(data, off + _NLMSGHDR.size)[0]
        elif kind != NLMSG_DONE:
            others.append(kind)
        off += (length + 3) & ~3
    return error, others


def set_queue_config(fd: int, queue: int, *, flags: int, mask: int, maxlen: int | None = None,
                     timeout: float = 2.0) -> None:
    """Send the config message on the bound queue's socket ``fd`` and wait for its ACK.

    Raises :class:`NetlinkError` with the kernel's errno if it refuses, or ETIMEDOUT /
    EPROTO if no ACK comes or packet messages arrive first (see the module docstring).
    """
    seq = 0x6E660000 | (queue & 0xFFFF)  # "nf" + queue: far from libnfnetlink's own counter
    sock = socket.socket(fileno=os.dup(fd))  # a dup: closing it leaves NetfilterQueue's fd alone
    try:
        sock.setblocking(False)
        sock.sendto(config_message(queue, flags=flags, mask=mask, maxlen=maxlen, seq=seq), (0, 0))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                raise NetlinkError(_errno.ETIMEDOUT, f"no ACK from the kernel for the config of queue {queue}")
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno == _errno.ENOBUFS:  # an overrun notice, not our answer
                    continue
                raise
            error, others = parse_replies(data, seq)
            packets = [k for k in others if k == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET]
            if packets:
                raise NetlinkError(_errno.EPROTO, f"queue {queue} received packets before nfhooks "
                                                  "installed its rules: another program's rule queues "
                                                  "to this number (see --queue-base)")
            if error is not None:
                if error:
                    raise NetlinkError(error, os.strerror(error))
                return
    finally:
        sock.close()


def send_queue_config(fd: int, queue: int, *, flags: int, mask: int, maxlen: int | None = None) -> None:
    """Send a config message on a queue that is already serving packets, without an ACK.

    ``set_queue_config`` reads the socket for its ACK and refuses packet messages it finds
    there (each would be a packet nobody answers); on a live queue packet messages are
    expected, so this only sends. The kernel takes the same message at bind time, ACK
    checked; what this sends (a new length at stop, see QueueSet.close_intake) is bounded
    by a deadline at the caller either way.
    """
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.sendto(config_message(queue, flags=flags, mask=mask, maxlen=maxlen, seq=0, ack=False), (0, 0))
    finally:
        sock.close()
