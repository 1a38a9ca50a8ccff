"""Flow offload as a feature: the ``flowgen``/``flow:*`` connmark fields, the flowsave jump at
the top of a chain, the offload rules before a flow handler's queue rule, the NFH-FLOW-<HOOK>
chains, and the engine's FlowOffload and its metrics (the design is in nfhooks/offload.py).
Its generalisation, connection verdicts (``accept(connection=True)``...: nfhooks/connverdict.py),
shares the generation: the ``conn:*`` fields, the jump and verdict rules at the top of a chain,
the NFH-CONN-<HOOK> chains. Also the connection's other reader: the connmark restore rule
before the queue rule of a handler that reads pkt.connmark (offload.connmark_restore_rule)."""

from __future__ import annotations

from typing import Any, Callable

from .. import connverdict
from ..offload import (
    FLOW_GENERATIONS, GEN_FIELD, FlowOffload, OffloadCollector, add_to_ruleset, all_flow_mask,
    connmark_restore_rule, flow_handlers, layout_fields, offload_rules, next_flow_generation, ordinals,
    reads_connmark, save_jump,
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

    def check(self, ctx: CompileContext) -> None:
        connverdict.check(ctx.policy)

    def configure(self, rs: Any, ctx: CompileContext) -> None:
        rs.flow_generation = ctx.flow_generation if self.used(ctx) else 0

    def chain_head(self, ctx: CompileContext, chain: ChainContext) -> list[Any]:
        out = []
        if flow_handlers(chain.handlers):
            out.append(save_jump(chain.chain, chain.hook, chain.layout, ctx.generation))
        if chain.table != "raw" and connverdict.conn_handlers(chain.handlers):
            out += connverdict.head_rules(chain.chain, chain.hook, chain.table, chain.family, chain.handlers,
                                          chain.layout, chain.layout[GEN_FIELD], ctx.generation,
                                          ctx.flow_generation)
        return out

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
            connverdict.add_to_ruleset(rs, ctx.policy, rs.layout[GEN_FIELD], all_flow_mask(rs.layout),
                                       ctx.flow_generation)

    def compile_args(self, policy: Any, pinned: dict[str, Any]) -> dict[str, Any]:
        """A new flow generation for every compile of a policy with flow handlers or connection verdicts."""
        if not flow_handlers(policy.handlers) and not connverdict.conn_handlers(policy.handlers):
            return {}
        gen = pinned.get("flow_generation")
        if gen is not None:  # given (tests): the next one on each reload
            pinned["flow_generation"] = gen % FLOW_GENERATIONS + 1
            return {"flow_generation": gen}
        return {"flow_generation": next_flow_generation()}

    def check_lines(self, policy: Any, rs: Any) -> list[str]:
        if not rs.flow_generation:
            return []
        out = []
        flows = ", ".join(h.name for h in policy.handlers if h.flow)
        if flows:
            out.append(f"# flow offload: {flows}; the connmark generation shown is {rs.flow_generation}, `run` "
                       "picks a new one at every start and reload (flow fields live in the connmark only)")
        conns = [f"{h.name} ({'/'.join(k for k in connverdict.CODES if k in connverdict.kinds(h))})"
                 for h in connverdict.conn_handlers(policy.handlers)]
        if conns:
            out.append(f"# connection verdicts: {', '.join(conns)}; kept in the connmark (conn:* fields, "
                       f"generation {rs.flow_generation}, new at every start and reload), the rest of a decided "
                       "connection decided by the kernel at its hook (NFH-CONN-* chains)")
        return out

    def runtime(self, env: EngineEnv) -> FlowOffload | None:
        if not env.ruleset.flow_generation:
            return None
        return FlowOffload(env.ruleset, env.policy, saved=env.backend.counter_texts)

    def collector(self, current: Callable[[], Any]) -> OffloadCollector:
        return OffloadCollector(current)
