"""The interface every feature implements, so the compiler and the engine loop over features
instead of naming them (pyroute2's plugin table and mitmproxy's addons are the models: a
feature implements only the hooks it needs; every hook has a do-nothing default).

Compile side (pure, called by rules.compile_policy, in the fixed order of registry.FEATURES,
which is also the order of their mark fields -- tests/unit/test_feature_golden.py pins it):

* ``mark_fields``: the fields the feature needs in the mark layout (``[]``: none);
* ``check``: refuse options the policy cannot use, before the layout is made;
* ``layout_hint``: words added to a "the mark mask is full" error;
* ``configure``: what the feature records on the RuleSet (data only);
* ``hook_tables`` / ``keeps_empty_chain``: extra tables at a hook, and chains that exist
  even empty (the nat chain the engine fills as targets appear);
* ``chain_head``, ``new_only``, ``before_queue``: rules at the top of an ``NFH-<HOOK>`` chain,
  ``--ctstate NEW`` on a handler's queue rule, rules right before it;
* ``add_rules``: the feature's own chains, after every ``NFH-<HOOK>`` chain exists;
* ``check_lines``: what ``nfhooks check`` says about the feature besides the rules.

Engine side (the engine owns the state a feature returns; a feature never imports a rule
backend: kernel rule work goes through the backend in :class:`EngineEnv`):

* ``compile_args``: arguments of each compile the engine makes (a new flow generation);
* ``runtime``: the per-generation state (NAT targets, flow offload, routing...), None if
  unused; the engine keeps it (``EngineEnv.runtimes``), never the RuleSet, which stays data;
* ``encoders``: verdict kinds whose mark bits the runtime computes per packet (route, shape):
  the engine hands them to the Dispatcher, which names no feature;
* ``collector``: a Prometheus collector over the current runtime, registered once;
* ``start`` / ``reload`` / ``stop``: what the feature sets up besides the rules (before
  they are installed), hands over on a hot reload (or refuses), removes on exit.

Features never import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..marks import MarkLayout
    from ..policy import Handler, Policy
    from ..rulebuild import Rule, RuleSet

__all__ = ["CompileContext", "ChainContext", "EngineEnv", "Feature"]


@dataclass(frozen=True)
class CompileContext:
    """What a feature may read while a policy is compiled (the compiler's arguments)."""

    policy: "Policy"
    nat_targets: int
    generation: int
    flow_generation: int


@dataclass(frozen=True)
class ChainContext:
    """One ``NFH-<HOOK>`` chain being built: where, for which handlers, with which layout."""

    chain: str
    hook: str
    table: str
    family: int
    handlers: "list[Handler]"  # this chain's handlers that match the family
    layout: "MarkLayout"
    guard: int  # the mark bits every queue rule excludes (resume | self)


@dataclass(frozen=True)
class EngineEnv:
    """What a feature's runtime gets from the engine for one generation."""

    policy: "Policy"
    ruleset: "RuleSet"
    backend: Any  # a backends.Backend (append_rule, restore, counter_texts)
    metrics: Any  # a metrics.Metrics
    #: feature name -> its runtime for this generation (filled by the engine from ``runtime()``)
    runtimes: dict[str, Any] = field(default_factory=dict)


class Feature:
    """A feature: override the hooks it needs (see the module docstring)."""

    name = "feature"
    #: Where ``nfhooks check`` prints this feature's lines (lowest first): that output is pinned
    #: byte for byte and predates the registry's order.
    check_order = 0
    #: ``run --workers``: each worker registers this feature's collector over the runtime it
    #: inherited (counts made in that process) and the main process sums them with its own.
    per_worker_collector = False

    # -- compile (pure) ---------------------------------------------------------------------
    def used(self, ctx: CompileContext) -> bool:
        return bool(self.mark_fields(ctx))

    def mark_fields(self, ctx: CompileContext) -> list[tuple[str, int]]:
        return []

    def check(self, ctx: CompileContext) -> None:
        return None

    def layout_hint(self, ctx: CompileContext) -> str:
        return ""

    def configure(self, rs: "RuleSet", ctx: CompileContext) -> None:
        return None

    def hook_tables(self, ctx: CompileContext, hook: str) -> set[str]:
        return set()

    def keeps_empty_chain(self, ctx: CompileContext, family: int, table: str, hook: str) -> bool:
        return False

    def chain_head(self, ctx: CompileContext, chain: ChainContext) -> "list[Rule]":
        return []

    def new_only(self, handler: "Handler") -> bool:
        return False

    def before_queue(self, ctx: CompileContext, chain: ChainContext, handler: "Handler") -> "list[Rule]":
        return []

    def add_rules(self, ctx: CompileContext, rs: "RuleSet") -> None:
        return None

    def compile_args(self, policy: "Policy", pinned: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of compile_policy the engine passes for each compile (start and
        reload). ``pinned``: values the engine was given instead (tests); the feature may
        advance them for the next compile."""
        return {}

    def check_lines(self, policy: "Policy", rs: "RuleSet") -> list[str]:
        """The comment lines ``nfhooks check`` prints about this feature (before the rules)."""
        return []

    # -- engine -----------------------------------------------------------------------------
    def runtime(self, env: EngineEnv) -> Any:
        return None

    def encoders(self, runtime: Any) -> dict[str, Any]:
        """Verdict kind -> what computes its mark bits per packet (``clear_mask(kind)``,
        ``bits(pkt, verdict)``, raising errors.KernelError with the reason), from this
        feature's ``runtime`` (None: the policy does not use the feature)."""
        return {}

    def collector(self, current: Callable[[], Any]) -> Any:
        return None

    def start(self, env: EngineEnv) -> None:
        return None

    def reload(self, old: EngineEnv, new: EngineEnv) -> None:
        return None

    def stop(self, env: EngineEnv, owned: bool) -> None:
        return None
