"""The packet-mark bit layout nfhooks publishes.

The 32-bit packet mark (and the connmark) are shared by everything that steers packets:
nfhooks' own handler resume and reject/NAT actions, later flow offload, routing and shaping,
and the user's own marks. nfhooks only ever uses the bits of one configurable mask
(``--mark-mask``, default 0xffff0000) and only ever writes them masked (``--set-xmark``,
``CONNMARK --nfmask/--ctmask``, read-modify-write in Python, because NetfilterQueue's
``set_mark`` writes all 32 bits). The bits outside the mask are the user's and survive every
verdict. Fields are allocated from the top of the mask down; when a policy needs more bits
than the mask has, loading fails and says which field did not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

DEFAULT_MARK_MASK = 0xFFFF0000
FULL = 0xFFFFFFFF

#: Values of the ``action`` field: what an nfhooks rule must do with a packet that comes back
#: from the queue (NF_REPEAT, same table) or reaches a later table at the same hook.
ACTION_NONE = 0
ACTION_REJECT = 1          # REJECT: tcp-reset for TCP, port unreachable otherwise
ACTION_REJECT_ADMIN = 2    # REJECT --reject-with icmp-admin-prohibited
ACTION_REJECT_HOST = 3     # REJECT --reject-with icmp-host-unreachable
ACTION_CONNSAVE = 4        # CONNMARK --save-mark of the user bits, then ACCEPT
ACTION_FLOWSAVE = 5        # a flow handler accepted: save the decision in the connmark (offload.py)
ACTION_CONNVERDICT = 6     # a connection verdict: save it in the connmark, apply it (connverdict.py)
ACTION_BITS = 3

#: The ``gen`` field: which rule-set generation a packet belongs to (1 or 2; 0 = not yet seen
#: by nfhooks). Stamped by the first nfhooks chain a packet meets, so that during a hot reload,
#: when two generations' chains are installed side by side, every packet is decided by exactly
#: one of them at every hook (rules.generation_rules). ``self``, ``gen`` and ``action`` have
#: fixed widths and come first, so their positions never change between generations.
GEN_BITS = 2
GENERATIONS = (1, 2)

#: Distinct NAT targets a policy may use unless told otherwise (``--nat-targets``): the
#: ``nat`` field holds a target's index, 1..N (0 = no NAT), so 63 takes 6 bits.
DEFAULT_NAT_TARGETS = 63


class MarkSpaceError(ValueError):
    """The policy needs more mark bits than the configured mask gives nfhooks."""


@dataclass(frozen=True)
class Field:
    name: str
    shift: int
    width: int

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.shift

    def encode(self, value: int) -> int:
        if not 0 <= value < (1 << self.width):
            raise MarkSpaceError(f"value {value} does not fit the {self.width}-bit mark field {self.name!r}")
        return value << self.shift

    def decode(self, mark: int) -> int:
        return (mark >> self.shift) & ((1 << self.width) - 1)


class MarkLayout:
    """Named bit fields carved out of ``mask``; the rest of the 32 bits are the user's."""

    def __init__(self, fields: Iterable[tuple[str, int]], mask: int = DEFAULT_MARK_MASK) -> None:
        if not 0 < mask <= FULL:
            raise MarkSpaceError(f"mark mask {mask:#x} must be a non-zero 32-bit value")
        self.mask = mask
        self.user_mask = FULL & ~mask
        free = mask
        self.fields: dict[str, Field] = {}
        for name, width in fields:
            if width <= 0:
                continue
            shift = _highest_run(free, width)
            if shift is None:
                used = ", ".join(f"{f.name}={f.width}" for f in self.fields.values())
                raise MarkSpaceError(
                    f"the mark mask {mask:#010x} has no {width} contiguous free bits left for the "
                    f"{name!r} field (already used: {used or 'none'}). Give nfhooks more bits with "
                    "--mark-mask (e.g. 0xffff0000 or 0xffffff00), or declare fewer handlers per hook"
                )
            f = Field(name, shift, width)
            free &= ~f.mask
            self.fields[name] = f

    def __getitem__(self, name: str) -> Field:
        return self.fields[name]

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def describe(self) -> list[str]:
        rows = [f"{f.name:<8} bits {f.shift + f.width - 1:>2}..{f.shift:<2} mask {f.mask:#010x}"
                for f in self.fields.values()]
        rows.append(f"{'user':<8} mask {self.user_mask:#010x} (never written by nfhooks)")
        return rows


def _highest_run(free: int, width: int) -> int | None:
    """Lowest bit index of the highest run of ``width`` free bits, or None."""
    want = (1 << width) - 1
    for shift in range(32 - width, -1, -1):
        if (free >> shift) & want == want:
            return shift
    return None


def bits_for(count: int) -> int:
    """Bits needed to hold the values 0..count."""
    return max(1, count.bit_length())


def core_layout(max_handlers_per_chain: int, mask: int = DEFAULT_MARK_MASK,
                extra: Iterable[tuple[str, int]] = ()) -> MarkLayout:
    """The layout for a policy: nfhooks' own packets, the generation, the action, the resume index."""
    return MarkLayout(
        [("self", 1), ("gen", GEN_BITS), ("action", ACTION_BITS), ("resume", bits_for(max_handlers_per_chain)),
         *extra],
        mask,
    )
