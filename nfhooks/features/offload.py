"""Flow offload as a feature: the ``flowgen``/``flow:*`` connmark fields, the flowsave jump at
the top of a chain, the offload rules before a flow handler's queue rule, the NFH-FLOW-<HOOK>
chains, and the engine's FlowOffload and its metrics (the design is in nfhooks/offload.py).
Also the connection's other reader: the connmark restore rule before the queue rule of a
handler that reads pkt.connmark (offload.connmark_restore_rule)."""

from __future__ import annotations

from typing import Any, Callable

from ..offload import (
    FLOW_GENERATIONS, FlowOffload, OffloadCollector, add_to_ruleset, connmark_restore_rule, flow_handlers,
    layout_fields, offload_rules, next_flow_generation, ordinals, reads_connmark, save_jump,
)
from .base import ChainContext, CompileContext, EngineEnv, Feature

__all__ = ["OffloadFeature"]


class OffloadFeature(Feature):
    name = "offload"
    check_order = 2  # after routing and shaping

    def mark_fields(self, ctx: CompileContext) -> list[tuple[str, int]]:
        fields = layout_fields(ctx.policy)
        if fields and not 0 < ctx.flow_generation <= FLOW_GENERATIONS:
            raise ValueError(f"flow_generation must be 1..{FLOW_GENERATIONS}, not {ctx.flow_generation}")
        return fields

    def configure(self, rs: Any, ctx: CompileContext) -> None:
        rs.flow_generation = ctx.flow_generation if self.used(ctx) else 0

    def chain_head(self, ctx: CompileContext, chain: ChainContext) -> list[Any]:
        if not flow_handlers(chain.handlers):
            return []
        return [save_jump(chain.chain, chain.hook, chain.layout, ctx.generation)]

    def before_queue(self, ctx: CompileContext, chain: ChainContext, handler: Any) -> list[Any]:
        out = []
        if chain.table != "raw" and reads_connmark(handler):  # raw: no conntrack, nothing to restore
            out.append(connmark_restore_rule(chain.chain, handler, chain.family, chain.layout, chain.guard))
        if getattr(handler, "flow", False):
            out += offload_rules(chain.chain, handler, chain.family, chain.layout, chain.guard,
                                 ordinals(ctx.policy)[handler.name], ctx.flow_generation)
        return out

    def add_rules(self, ctx: CompileContext, rs: Any) -> None:
        if rs.flow_generation:
            add_to_ruleset(rs, ctx.policy, ctx.flow_generation)

    def compile_args(self, policy: Any, pinned: dict[str, Any]) -> dict[str, Any]:
        """A new flow generation for every compile of a policy with flow handlers."""
        if not flow_handlers(policy.handlers):
            return {}
        gen = pinned.get("flow_generation")
        if gen is not None:  # given (tests): the next one on each reload
            pinned["flow_generation"] = gen % FLOW_GENERATIONS + 1
            return {"flow_generation": gen}
        return {"flow_generation": next_flow_generation()}

    def check_lines(self, policy: Any, rs: Any) -> list[str]:
        if not rs.flow_generation:
            return []
        flows = ", ".join(h.name for h in policy.handlers if h.flow)
        return [f"# flow offload: {flows}; the connmark generation shown is {rs.flow_generation}, `run` picks "
                "a new one at every start and reload (flow fields live in the connmark only)"]

    def runtime(self, env: EngineEnv) -> FlowOffload | None:
        if not env.ruleset.flow_generation:
            return None
        return FlowOffload(env.ruleset, env.policy, saved=env.backend.counter_texts)

    def collector(self, current: Callable[[], Any]) -> OffloadCollector:
        return OffloadCollector(current)
