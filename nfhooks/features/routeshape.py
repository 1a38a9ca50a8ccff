"""Routing and shaping as a feature: the ``route``/``class`` mark fields, queue rules for a
connection's first packet, the restore/save/CLASSIFY/uplink NAT chains, and at run time the
ip rules, routes, sysctls and qdiscs (the design is in nfhooks/routing.py). The RuleSet
carries only the plan (routing_decl.RouteShapePlan); the runtime that does pyroute2 I/O is
made per generation by ``runtime()`` and owned by the engine."""

from __future__ import annotations

from typing import Any

from . import routing_runtime
from .base import CompileContext, EngineEnv, Feature
from .routing_compile import compile_rules, describe, mark_fields, per_connection

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
        lines = describe(policy, rs.routeshape)  # the equivalent ip/tc commands
        if not lines:
            return []
        return ["# routing and shaping (installed by `run` besides these rules, removed on exit):",
                *(f"#   {line}" for line in lines)]

    def runtime(self, env: EngineEnv) -> routing_runtime.RouteShape | None:
        """The per-generation runtime (pyroute2 I/O), made from the RuleSet's plan (data)."""
        plan = env.ruleset.routeshape
        if plan is None:
            return None
        return routing_runtime.RouteShape(env.policy, plan, tuple(env.ruleset.side))

    def encoders(self, runtime: Any) -> dict[str, Any]:
        return {} if runtime is None else {"route": runtime, "shape": runtime}

    def start(self, env: EngineEnv) -> None:
        routing_runtime.start(env.runtimes.get(self.name), restore=env.backend.restore)

    def reload(self, old: EngineEnv, new: EngineEnv) -> None:
        routing_runtime.reload(old.runtimes.get(self.name), new.runtimes.get(self.name), restore=new.backend.restore)

    def stop(self, env: EngineEnv, owned: bool) -> None:
        routing_runtime.stop(env.runtimes.get(self.name), owned=owned)
