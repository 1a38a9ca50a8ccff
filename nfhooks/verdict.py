"""Verdicts a handler returns.

Plain immutable values: a handler builds one, the engine applies it (see engine.py), the
metrics label it. ``kind`` is the key into hooks.PLACEMENTS, which says where each works.
Returning ``None`` means "not mine": the packet resumes in the kernel after this handler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

RejectWith = Literal["auto", "tcp-reset", "port-unreachable", "host-unreachable", "admin-prohibited"]


class Verdict:
    """Base of every verdict; ``kind`` names it in metrics, errors and hooks.PLACEMENTS."""

    kind: ClassVar[str] = "verdict"
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Accept(Verdict):
    kind: ClassVar[str] = "accept"


@dataclass(frozen=True, slots=True)
class Drop(Verdict):
    kind: ClassVar[str] = "drop"


@dataclass(frozen=True, slots=True)
class Reject(Verdict):
    """Refuse visibly: TCP reset or ICMP/ICMPv6 unreachable, sent by the kernel's REJECT."""

    kind: ClassVar[str] = "reject"
    with_: RejectWith = "auto"

    def __post_init__(self) -> None:
        if self.with_ not in ("auto", "tcp-reset", "port-unreachable", "host-unreachable", "admin-prohibited"):
            raise ValueError(f"reject(with_={self.with_!r}): use auto, tcp-reset, port-unreachable, "
                             "host-unreachable or admin-prohibited")


@dataclass(frozen=True, slots=True)
class Mark(Verdict):
    """Set user mark bits (``value`` under ``mask``) and accept; ``connmark`` also saves them
    on the connection, so later packets and other rules (``-m connmark``) see them."""

    kind: ClassVar[str] = "mark"
    value: int
    mask: int = 0xFFFFFFFF
    connmark: bool = False

    def __post_init__(self) -> None:
        if not (0 <= self.value <= 0xFFFFFFFF and 0 <= self.mask <= 0xFFFFFFFF):
            raise ValueError("mark value and mask are 32-bit unsigned integers")

    @property
    def placement_kind(self) -> str:
        return "connmark" if self.connmark else "mark"


ACCEPT = Accept()
DROP = Drop()


def accept() -> Accept:
    return ACCEPT


def drop() -> Drop:
    return DROP


def reject(with_: RejectWith = "auto") -> Reject:
    return Reject(with_)


def mark(value: int, mask: int = 0xFFFFFFFF, *, connmark: bool = False) -> Mark:
    return Mark(value, mask, connmark)


def connmark(value: int, mask: int = 0xFFFFFFFF) -> Mark:
    return Mark(value, mask, True)


def placement_kind(v: Verdict) -> str:
    return v.placement_kind if isinstance(v, Mark) else v.kind


#: Names of verdict factories a handler may call; policy loading scans handler source for them.
FACTORIES: dict[str, str] = {
    "accept": "accept", "drop": "drop", "reject": "reject", "mark": "mark", "connmark": "connmark",
    "dnat": "dnat", "snat": "snat", "masquerade": "masquerade", "redirect": "redirect",
}


def parse_default(v: "Verdict | str") -> Verdict:
    """A hook default given as a verdict or as 'accept' / 'drop' / 'reject'."""
    if isinstance(v, (Accept, Drop, Reject)):
        return v
    if isinstance(v, str) and v.lower() in ("accept", "drop", "reject"):
        return {"accept": ACCEPT, "drop": DROP, "reject": Reject()}[v.lower()]
    raise ValueError(f"a hook default must be accept, drop or reject, not {v!r}")
