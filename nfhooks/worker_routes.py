"""Routing under ``--workers``: on-demand route slots have one owner, the main process.

Declared routing tables and shaping classes encode from the compiled plan (pure data), the
same in every worker. An on-demand ``route(via=..., dev=...)`` allocates a table slot (and
adds its route) on first use, which must happen once for the whole engine: the main process
owns the routing runtime (its setup and teardown run around the rules, as for any feature)
and answers ``"slot"`` requests over each worker's request pipe (worker_nat.NatServer's
topics); a worker's :class:`SlotClient` caches every answer, so only a new next hop's first
packet in each worker pays the round trip.

An encoder (Feature.encoders) takes part by having ``on_demand(verdict)`` (whether its bits
need the owner) and ``slot_bits(verdict, family)`` (the owner's allocation); others are used
as they are.
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import KernelError

__all__ = ["SlotClient", "slot_topics", "worker_encoders"]

TOPIC = "slot"


def _takes_part(enc: Any) -> bool:
    return callable(getattr(enc, "on_demand", None)) and callable(getattr(enc, "slot_bits", None))


class SlotClient:
    """A worker's encoder for one kind: declared verdicts encoded locally by ``enc`` (the
    runtime the worker inherited), on-demand ones asked of the main process once per
    (verdict, family) and cached, refusals too (slots are never freed: an answer is final;
    "the engine is stopping" is not cached)."""

    def __init__(self, enc: Any, asker: Any) -> None:
        self.enc = enc
        self.asker = asker
        self.bits_of: dict[tuple[Any, int], int] = {}
        self.failed: dict[tuple[Any, int], str] = {}

    def clear_mask(self, kind: str) -> int:
        return self.enc.clear_mask(kind)

    def bits(self, pkt: Any, v: Any) -> int:
        if not self.enc.on_demand(v):
            return self.enc.bits(pkt, v)
        key = (v, pkt.version)
        got = self.bits_of.get(key)
        if got is not None:
            return got
        if key in self.failed:
            raise KernelError(self.failed[key])
        kind, value = self.asker.ask(TOPIC, key, f"the route for {v}", KernelError)
        if kind == "bits":
            self.bits_of[key] = value
            return value
        if kind == "error":  # final (past the bound, refused by the kernel); "unavailable" is not
            self.failed[key] = value
        raise KernelError(value)


def worker_encoders(encoders: dict[str, Any], asker: Any) -> dict[str, Any]:
    """A worker's Dispatcher encoders: each taking part wrapped in a SlotClient on ``asker``
    (one client per encoder object, shared by its kinds). ``asker`` None: as they are."""
    if asker is None:
        return dict(encoders)
    made: dict[int, SlotClient] = {}
    out = {}
    for kind, enc in encoders.items():
        if _takes_part(enc):
            enc = made.setdefault(id(enc), SlotClient(enc, asker))
        out[kind] = enc
    return out


def slot_topics(encoders: dict[str, Any]) -> dict[str, Callable[[Any], tuple[str, Any]]]:
    """The main process's answer to ``"slot"`` requests, from its own encoders (the owner
    runtimes); empty when none takes part (no request pipe is then needed for routes)."""
    owners = {kind: enc for kind, enc in encoders.items() if _takes_part(enc)}
    if not owners:
        return {}

    def answer(payload: Any) -> tuple[str, Any]:
        v, family = payload
        enc = owners.get(v.kind)
        if enc is None:
            return "error", f"returned {v}: nothing in the main process allocates {v.kind!r} verdicts"
        try:
            return "bits", enc.slot_bits(v, family)
        except KernelError as e:  # routing_decl.RouteShapeError: the same text one engine gives
            return "error", str(e)

    return {TOPIC: answer}
