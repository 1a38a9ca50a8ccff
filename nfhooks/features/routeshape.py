"""Routing and shaping as a feature: the ``route``/``class`` mark fields, queue rules for a
connection's first packet, the restore/save/CLASSIFY/uplink NAT chains, and at run time the
ip rules, routes, sysctls and qdiscs (the design is in nfhooks/routing.py)."""

from __future__ import annotations

from typing import Any

from . import routing_runtime
from .base import CompileContext, EngineEnv, Feature
from .routing_compile import compile_rules, mark_fields, per_connection

__all__ = ["RouteShapeFeature"]


class RouteShapeFeature(Feature):
    name = "routeshape"
    check_order = 1

    def mark_fields(self, ctx: CompileContext) -> list[tuple[str, int]]:
        return mark_fields(ctx.policy)

    def new_only(self, handler: Any) -> bool:
        return per_connection(handler)

    def add_rules(self, ctx: CompileContext, rs: Any) -> None:
        compile_rules(rs, ctx.policy)  # connmark restore/save, CLASSIFY, uplink NAT

    def check_lines(self, policy: Any, rs: Any) -> list[str]:
        if rs.routeshape is None:
            return []
        lines = rs.routeshape.describe()  # the equivalent ip/tc commands
        if not lines:
            return []
        return ["# routing and shaping (installed by `run` besides these rules, removed on exit):",
                *(f"#   {line}" for line in lines)]

    def runtime(self, env: EngineEnv) -> Any:
        return env.ruleset.routeshape

    def start(self, env: EngineEnv) -> None:
        routing_runtime.start(env.ruleset, restore=env.backend.restore)

    def reload(self, old: EngineEnv, new: EngineEnv) -> None:
        routing_runtime.reload(old.ruleset, new.ruleset, restore=new.backend.restore)

    def stop(self, env: EngineEnv, owned: bool) -> None:
        routing_runtime.stop(env.ruleset, owned=owned)
