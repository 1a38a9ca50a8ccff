"""nfhooks/netlink.py's bytes, beyond tests/unit/test_queue.py's layout and ACK checks: the
no-ACK form, attribute order and sizes, and parse_replies on padded, short, DONE and garbage
messages (crafted here from the uapi layouts, never sent)."""

from __future__ import annotations

import errno
import struct

import pytest

from nfhooks.netlink import NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_GSO, config_message, parse_replies

NLMSGHDR = struct.Struct("=IHHII")  # include/uapi/linux/netlink.h: len, type, flags, seq, pid
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x01, 0x04
PACKET = (3 << 8) | 0  # NFNL_SUBSYS_QUEUE, NFQNL_MSG_PACKET


def header(length: int, kind: int, seq: int, flags: int = 0) -> bytes:
    return NLMSGHDR.pack(length, kind, flags, seq, 0)


def ack(seq: int, err: int = 0) -> bytes:
    """An NLMSG_ERROR answering ``seq``: the errno (negative, 0 = ACK) and the request's header."""
    body = struct.pack("=i", err) + header(16, 0x302, seq, NLM_F_REQUEST | NLM_F_ACK)
    return header(16 + len(body), NLMSG_ERROR, seq) + body


def attrs(msg: bytes) -> list[tuple[int, int, int]]:
    """(nla_len, nla_type, u32 big-endian value) of each attribute after nfgenmsg."""
    out, off = [], 20
    while off < len(msg):
        length, kind = struct.unpack_from("=HH", msg, off)
        out.append((length, kind, struct.unpack_from("!I", msg, off + 4)[0]))
        off += (length + 3) & ~3
    return out


def test_without_ack_only_the_request_flag():
    msg = config_message(7, flags=NFQA_CFG_F_FAIL_OPEN, mask=NFQA_CFG_F_FAIL_OPEN, maxlen=None, seq=0, ack=False)
    length, kind, flags, seq, pid = NLMSGHDR.unpack_from(msg)
    assert (length, kind, flags, seq, pid) == (len(msg), 0x302, NLM_F_REQUEST, 0, 0)


def test_attributes_are_maxlen_mask_flags_each_8_bytes():
    msg = config_message(0xFFFF, flags=NFQA_CFG_F_GSO, mask=NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO,
                         maxlen=10000, seq=0x6E66FFFF)
    assert attrs(msg) == [(8, 3, 10000), (8, 4, 0x05), (8, 5, 0x04)]  # QUEUE_MAXLEN, MASK, FLAGS
    assert struct.unpack_from("!H", msg, 18)[0] == 0xFFFF  # res_id: the queue, big endian
    assert NLMSGHDR.unpack_from(msg)[3] == 0x6E66FFFF
    # clearing a flag: the mask says which bits to set, the flags value their new state (0)
    assert attrs(config_message(1, flags=0, mask=NFQA_CFG_F_GSO, maxlen=None, seq=1)) == [(8, 4, 4), (8, 5, 0)]


@pytest.mark.parametrize("queue", [-1, 0x10000])
def test_queue_numbers_outside_16_bits_are_refused(queue):
    with pytest.raises(ValueError, match=f"queue number {queue} out of range"):
        config_message(queue, flags=0, mask=0, maxlen=None, seq=1)


def test_an_ack_after_an_unaligned_message_is_found():
    odd = header(21, PACKET, 0) + b"\x01" * 5 + b"\0" * 3  # 21 bytes, padded to 24 (NLMSG_ALIGN)
    assert parse_replies(odd + ack(5), 5) == (0, [PACKET])


def test_errno_is_given_positive_and_done_is_not_a_stranger():
    assert parse_replies(ack(5, -errno.EPERM), 5) == (errno.EPERM, [])
    assert parse_replies(header(20, NLMSG_DONE, 5) + b"\0" * 4 + ack(5), 5) == (0, [])


def test_an_error_too_short_to_hold_an_errno_is_not_our_answer():
    assert parse_replies(header(16, NLMSG_ERROR, 5), 5) == (None, [NLMSG_ERROR])


@pytest.mark.parametrize("data", [
    b"",
    b"\0" * 15,  # shorter than a header
    header(8, PACKET, 5) + ack(5),  # a length below the header size: nothing after it is trusted
    header(400, PACKET, 5) + ack(5),  # a length past the datagram
])
def test_garbage_stops_the_walk(data):
    assert parse_replies(data, 5) == (None, [])


def test_our_answer_among_answers_to_other_seqs():
    assert parse_replies(ack(1) + ack(5, -errno.EINVAL) + ack(7), 5) == (errno.EINVAL, [NLMSG_ERROR, NLMSG_ERROR])
