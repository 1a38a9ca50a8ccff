"""nfhooks/marks.py: the mark bit layout -- field positions, encode/decode, masks, and the
refusal when a policy needs more bits than --mark-mask gives (naming the field)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nfhooks import Policy, PolicyError, accept, dnat
from nfhooks.marks import (ACTION_BITS, DEFAULT_MARK_MASK, GEN_BITS, Field, MarkLayout, MarkSpaceError, bits_for,
                           core_layout)
from nfhooks.rules import compile_policy


def test_core_layout_takes_the_top_of_the_default_mask_in_order():
    layout = core_layout(1)
    got = {name: (f.shift, f.width, f.mask) for name, f in layout.fields.items()}
    assert got == {
        "self": (31, 1, 0x80000000),
        "gen": (29, 2, 0x60000000),
        "action": (26, 3, 0x1C000000),
        "resume": (25, 1, 0x02000000),
    }
    assert (GEN_BITS, ACTION_BITS) == (2, 3)
    assert layout.mask == DEFAULT_MARK_MASK == 0xFFFF0000 and layout.user_mask == 0x0000FFFF


def test_resume_grows_with_the_longest_chain_and_fixed_fields_stay_put():
    for handlers, width in ((1, 1), (2, 2), (3, 2), (4, 3), (7, 3), (8, 4), (15, 4), (16, 5)):
        layout = core_layout(handlers)
        assert layout["resume"].width == width, handlers
        assert layout["resume"].shift == 26 - width  # right under action
        assert [layout[n].mask for n in ("self", "gen", "action")] == [0x80000000, 0x60000000, 0x1C000000]


def test_bits_for_holds_zero_to_count():
    assert [bits_for(n) for n in (0, 1, 2, 3, 4, 63, 64, 255, 256)] == [1, 1, 2, 2, 3, 6, 7, 8, 9]


def test_fields_under_a_narrow_mask_start_at_its_top():
    layout = core_layout(3, mask=0x0000FF00)
    assert {n: f.mask for n, f in layout.fields.items()} == {
        "self": 0x8000, "gen": 0x6000, "action": 0x1C00, "resume": 0x0300}
    assert layout.user_mask == 0xFFFF00FF


def test_a_split_mask_is_used_run_by_run():
    layout = MarkLayout([("a", 2), ("b", 2), ("c", 3)], mask=0xF00F)
    assert [(f.name, f.mask) for f in layout.fields.values()] == [("a", 0xC000), ("b", 0x3000), ("c", 0x000E)]  # highest run first
    assert layout.user_mask == 0xFFFF0FF0
    with pytest.raises(MarkSpaceError, match="no 5 contiguous free bits left for the 'd' field"):
        MarkLayout([("a", 4), ("d", 5)], mask=0xF00F)  # 4 bits left, but not 5 in a row


def test_zero_width_fields_are_skipped():
    layout = MarkLayout([("a", 0), ("b", 1)], mask=0x1)
    assert "a" not in layout and "b" in layout and layout["b"].mask == 0x1


@pytest.mark.parametrize("mask", [0, -1, 0x1_0000_0000])
def test_mask_must_be_a_nonzero_32_bit_value(mask):
    with pytest.raises(MarkSpaceError, match="non-zero 32-bit"):
        MarkLayout([], mask=mask)


def test_encode_decode_and_the_bits_outside_the_field():
    f = Field("x", 4, 3)
    assert f.mask == 0x70
    assert f.encode(0) == 0 and f.encode(5) == 0x50 and f.encode(7) == 0x70
    assert f.decode(0xFFFFFF5F) == 5  # the other bits do not leak into the value
    assert f.decode(0x0F) == 0
    with pytest.raises(MarkSpaceError, match="value 8 does not fit the 3-bit mark field 'x'"):
        f.encode(8)
    with pytest.raises(MarkSpaceError, match="value -1"):
        f.encode(-1)


@given(st.integers(1, 8), st.integers(0, 24), st.integers(0, 0xFFFFFFFF), st.data())
def test_encode_then_decode_round_trips_and_keeps_other_bits(width, shift, other, data):
    f = Field("x", shift, width)
    value = data.draw(st.integers(0, (1 << width) - 1))
    mark = (other & ~f.mask) | f.encode(value)
    assert f.decode(mark) == value
    assert mark & ~f.mask == other & ~f.mask


def test_describe_rows():
    assert core_layout(1).describe() == [
        "self     bits 31..31 mask 0x80000000",
        "gen      bits 30..29 mask 0x60000000",
        "action   bits 28..26 mask 0x1c000000",
        "resume   bits 25..25 mask 0x02000000",
        "user     mask 0x0000ffff (never written by nfhooks)",
    ]


def test_running_out_names_the_field_and_what_is_used():
    with pytest.raises(MarkSpaceError) as e:
        core_layout(5, mask=0x0000FF00)
    assert str(e.value).startswith("the mark mask 0x0000ff00 has no 3 contiguous free bits left for the 'resume' "
                                   "field (already used: self=1, gen=2, action=3).")
    assert "--mark-mask" in str(e.value)


def _nat_policy() -> Policy:
    p = Policy()

    @p.prerouting(proto="tcp")
    def fwd(pkt):
        return dnat("10.0.0.1")

    return p


def test_a_policy_needing_more_bits_than_the_mask_is_refused_naming_the_field():
    with pytest.raises(PolicyError) as e:
        compile_policy(_nat_policy(), mark_mask=0xFF000000)  # 7 core bits + nat's 6 > 8
    msg = str(e.value)
    assert "no 6 contiguous free bits left for the 'nat' field (already used: self=1, gen=2, action=3, resume=1)" in msg
    assert "--nat-targets 63" in msg  # the hint: a smaller bound takes fewer bits
    layout = compile_policy(_nat_policy(), mark_mask=0xFF000000, nat_targets=1).layout
    assert layout["nat"].mask == 0x01000000 and layout.user_mask == 0x00FFFFFF


def test_too_many_handlers_name_the_resume_field():
    p = Policy()
    for i in range(20):
        p.input(proto="tcp", dport=i + 1, name=f"h{i}")(lambda pkt: accept())
    with pytest.raises(PolicyError, match="no 5 contiguous free bits left for the 'resume' field"):
        compile_policy(p, mark_mask=0xFF000000)
    assert compile_policy(p, mark_mask=0xFFF00000).layout["resume"].mask == 0x03E00000
