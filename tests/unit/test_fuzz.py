"""Fuzzing the whole per-packet path (parse, handler, verdict, mangle) with hypothesis.

`make test` runs a few hundred examples per property; `make fuzz` runs the same properties
with NFHOOKS_FUZZ_EXAMPLES (default there: 20000) -- a longer search, same assertions:
whatever the bytes and whatever the handler returns, exactly one verdict, never an exception
out of the callback, and a rewritten packet is always one the parser accepts again.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfhooks import accept, clamp_mss, drop, mark, payload, reject, set_dscp, set_tos, set_ttl
from nfhooks.fake import FakeQueuedPacket, fake_bytes
from nfhooks.mangle import MangleError, TruncatedPacket, rewrite
from nfhooks.packet import Malformed, parse

EXAMPLES = int(os.environ.get("NFHOOKS_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SEEDS = [
    fake_bytes(),
    fake_bytes(flags="S"),
    fake_bytes(flags="PA", payload=b"GET / HTTP/1.1\r\n\r\n"),
    fake_bytes(proto="udp", dport=53, payload=b"\x12\x34" * 10),
    fake_bytes(proto="icmp", payload=b"ping"),
    fake_bytes(src="2001:db8::1", dst="2001:db8::2", proto="tcp", flags="S"),
    fake_bytes(src="2001:db8::1", dst="2001:db8::2", proto="udp", payload=b"q" * 7),
    fake_bytes(src="2001:db8::1", dst="2001:db8::2", proto="icmpv6"),
]


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    """Valid packets, bit-flipped, overwritten, cut short or extended, and random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    raw = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 5))):
        i = draw(st.integers(0, len(raw) - 1))
        if draw(st.booleans()):
            raw[i] ^= 1 << draw(st.integers(0, 7))
        else:
            raw[i] = draw(st.integers(0, 255))
    how = draw(st.integers(0, 3))
    if how == 1:
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif how == 2:
        raw += draw(st.binary(max_size=40))
    return bytes(raw)


MANGLES = st.one_of(
    st.integers(1, 255).map(set_ttl), st.integers(0, 63).map(set_dscp), st.integers(0, 255).map(set_tos),
    st.integers(536, 1460).map(clamp_mss), st.binary(max_size=64).map(payload),
    st.tuples(st.integers(1, 255), st.integers(0, 63)).map(lambda t: set_ttl(t[0]) | set_dscp(t[1])),
)
VERDICTS = st.one_of(st.sampled_from([accept(), drop(), reject(), None, "junk", 42]),
                     st.integers(0, 0xFFFFFFFF).map(lambda v: mark(v)), MANGLES)


def _dispatch(dispatch, raw: bytes, verdict, table: str) -> FakeQueuedPacket:  # type: ignore[no-untyped-def]
    def h(pkt):  # noqa: ANN001, ANN202
        pkt.src, pkt.dst, pkt.proto, pkt.payload  # read what a handler reads
        return verdict

    return dispatch(defaults={"FORWARD": "drop"}).add("FORWARD", h, table=table).use(budget=0.0).send(raw)


@FUZZ
@given(packets(), VERDICTS, st.sampled_from(["filter", "mangle"]))
def test_whatever_comes_in_and_whatever_the_handler_returns_one_verdict(dispatch, raw, verdict, table):
    q = _dispatch(dispatch, raw, verdict, table)
    final = [c for c in q.calls if c in ("accept", "drop", "repeat")]
    assert len(final) == 1, q.calls


@FUZZ
@given(packets(), MANGLES)
def test_a_rewrite_is_refused_or_parses_again(raw, verdict):
    try:
        pkt = parse(raw, "FORWARD")
    except Malformed:
        return
    try:
        new = rewrite(raw, verdict, pkt)
    except (MangleError, TruncatedPacket):
        return
    again = parse(bytes(new), "FORWARD")
    assert again.version == pkt.version and again.proto == pkt.proto
    if verdict.ttl is not None:
        assert again.ttl == verdict.ttl
