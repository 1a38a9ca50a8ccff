"""NAT as a feature: the ``nat`` mark field, the nat table's chain at each NAT hook, queue
rules for a connection's first packet only, and the engine's NatTargets (nfhooks/nat.py)."""

from __future__ import annotations

from typing import Any

from ..errors import PolicyError
from ..marks import bits_for
from ..nat import NatTargets, backend_installer, does_nat
from .base import CompileContext, EngineEnv, Feature

__all__ = ["NatFeature"]


class NatFeature(Feature):
    name = "nat"

    def _handlers(self, ctx: CompileContext) -> list[Any]:
        return [h for h in ctx.policy.handlers if does_nat(h)]

    def check(self, ctx: CompileContext) -> None:
        if self._handlers(ctx) and not 0 < ctx.nat_targets < 1 << 16:
            raise PolicyError(f"--nat-targets {ctx.nat_targets}: give 1..65535 distinct NAT targets", ctx.policy.file)

    def mark_fields(self, ctx: CompileContext) -> list[tuple[str, int]]:
        return [("nat", bits_for(ctx.nat_targets))] if self._handlers(ctx) else []

    def layout_hint(self, ctx: CompileContext) -> str:
        return (f" (the nat field holds --nat-targets {ctx.nat_targets}; a smaller bound takes fewer bits)"
                if self._handlers(ctx) else "")

    def configure(self, rs: Any, ctx: CompileContext) -> None:
        rs.nat_targets = ctx.nat_targets if self._handlers(ctx) else 0

    def hook_tables(self, ctx: CompileContext, hook: str) -> set[str]:
        return {"nat"} if any(h.hook == hook for h in self._handlers(ctx)) else set()

    def keeps_empty_chain(self, ctx: CompileContext, family: int, table: str, hook: str) -> bool:
        # the engine appends NAT targets as they appear (an empty chain now)
        return table == "nat" and any(family in h.match.families() for h in self._handlers(ctx) if h.hook == hook)

    def new_only(self, handler: Any) -> bool:
        return does_nat(handler)

    def runtime(self, env: EngineEnv) -> NatTargets | None:
        rs = env.ruleset
        if "nat" not in rs.layout:
            return None
        return NatTargets(rs.layout, rs.nat_targets, on_change=env.metrics.set_nat_targets, generation=rs.generation,
                          installer=backend_installer(env.backend, rs.layout, rs.generation))
