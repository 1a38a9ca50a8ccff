"""The shared unit fixture: a policy compiled and dispatched on fake queued packets.

Unit tests of verdict application all need the same thing production does per queue -- the
policy compiled (``compile_policy``), a ``Dispatcher`` counting into a registry of its own, a
callback per handler -- and a fake ``netfilterqueue.Packet`` to feed it. Built here once so
every test drives the dispatcher the way the engine does, and a change to how the engine wires
it is made in one place.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from prometheus_client import CollectorRegistry

from nfhooks.dispatch import Dispatcher
from nfhooks.fake import FakeQueuedPacket, fake_bytes
from nfhooks.features.base import EngineEnv
from nfhooks.features.routeshape import RouteShapeFeature
from nfhooks.metrics import Metrics
from nfhooks.policy import Handler, Policy
from nfhooks.rules import RuleSet, compile_policy

__all__ = ["FakeDispatch", "dispatch"]


class FakeDispatch:
    """One policy, compiled and dispatched like the engine does, on fake queued packets.

    Lazy in two stages, so a test can give the dispatcher what needs the compiled rules
    (NAT targets, a flow offload): ``ruleset``/``metrics`` compile on first use; the
    ``Dispatcher`` is built at the first ``callback``/``send``, with what ``use`` gave it.
    """

    def __init__(self, policy: Policy | None = None, *, defaults: dict[str, Any] | None = None,
                 **compile_kw: Any) -> None:
        if policy is not None and defaults is not None:
            raise ValueError("defaults= is for the policy this builds; give them to your Policy instead")
        self.policy = policy if policy is not None else Policy(defaults=defaults)
        self.registry = CollectorRegistry()
        self._compile_kw = compile_kw
        self._dispatcher_kw: dict[str, Any] = {}
        self._ruleset: RuleSet | None = None
        self._metrics: Metrics | None = None
        self._dispatcher: Dispatcher | None = None
        self._callbacks: dict[int, Callable[[Any], None]] = {}

    def add(self, hook: str, func: Callable[..., Any], **match: Any) -> "FakeDispatch":
        """Declare ``func`` at ``hook`` (``table=``, ``flow=`` and match keywords as Policy.handler)."""
        if self._ruleset is not None:
            raise RuntimeError("add handlers before the policy is compiled (first ruleset/send)")
        self.policy.handler(hook, **match)(func)
        return self

    @property
    def ruleset(self) -> RuleSet:
        if self._ruleset is None:
            self._ruleset = compile_policy(self.policy, **self._compile_kw)
        return self._ruleset

    @property
    def metrics(self) -> Metrics:
        if self._metrics is None:
            self._metrics = Metrics(self.registry)
        return self._metrics

    def use(self, **dispatcher_kw: Any) -> "FakeDispatch":
        """Dispatcher arguments beyond policy/ruleset/metrics: nat=, tap=, offload=, budget=..."""
        if self._dispatcher is not None:
            raise RuntimeError("use() before the first callback/send: the dispatcher is already built")
        self._dispatcher_kw.update(dispatcher_kw)
        return self

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            kw = dict(self._dispatcher_kw)
            if "encoders" not in kw:  # route/shape verdicts: the routing feature's runtime, as the engine makes it
                f = RouteShapeFeature()
                kw["encoders"] = f.encoders(f.runtime(EngineEnv(self.policy, self.ruleset, None, self.metrics)))
            self._dispatcher = Dispatcher(self.policy, self.ruleset, self.metrics, **kw)
        return self._dispatcher

    def handler(self, which: int | str = 0) -> Handler:
        """A handler by position in the policy or by name."""
        if isinstance(which, int):
            return self.policy.handlers[which]
        for h in self.policy.handlers:
            if h.name == which:
                return h
        raise KeyError(f"no handler {which!r}; the policy has {[h.name for h in self.policy.handlers]}")

    def callback(self, which: int | str = 0) -> Callable[[Any], None]:
        """The queue callback of one handler, built once (as the engine builds one per queue)."""
        h = self.handler(which)
        key = self.policy.handlers.index(h)
        if key not in self._callbacks:
            self._callbacks[key] = self.dispatcher.callback(h)
        return self._callbacks[key]

    def send(self, packet: bytes | FakeQueuedPacket | None = None, *, handler: int | str = 0, mark: int = 0,
             **fake: Any) -> FakeQueuedPacket:
        """Queue one packet to ``handler``'s callback and return it with the verdict calls it got.

        ``packet``: raw bytes, a ready FakeQueuedPacket (its own mark kept), or None to build the
        bytes with ``fake_bytes(**fake)``."""
        if packet is None:
            packet = fake_bytes(**fake)
        elif fake:
            raise TypeError(f"fake_bytes arguments {sorted(fake)} given with a ready packet")
        q = packet if isinstance(packet, FakeQueuedPacket) else FakeQueuedPacket(packet, mark=mark)
        self.callback(handler)(q)
        return q

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """A metric sample from this dispatcher's own registry (None: no such series)."""
        return self.registry.get_sample_value(name, labels or {})


@pytest.fixture(scope="session")
def dispatch() -> type[FakeDispatch]:
    """``dispatch(policy=None, *, defaults=None, **compile_kw)`` -> a FakeDispatch.

    Session-scoped because it holds no state (each call builds a fresh policy, registry and
    dispatcher), which also lets hypothesis ``@given`` tests use it."""
    return FakeDispatch
