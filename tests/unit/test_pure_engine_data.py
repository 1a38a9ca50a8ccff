"""A RuleSet is data only, and a Policy is not changed by the engine that runs it.

The routing feature's runtime (pyroute2 I/O) used to live on ``RuleSet.routeshape`` and the
engine wrote ``policy.self_mark``; both are the engine's now (``Engine.runtimes``, the
Dispatcher's ``encoders=``, ``policy.self_marked``). These tests fail if either comes back.
"""

from __future__ import annotations

import copy
import dataclasses
import socket
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from nfhooks import load_policy
from nfhooks.engine import Engine
from nfhooks.features.routing_runtime import RouteShape
from nfhooks.metrics import Metrics
from nfhooks.policy import Handler, Policy, self_marked
from nfhooks.rules import compile_policy

POLICIES = Path(__file__).parents[2] / "policies"
#: policy file -> --set values it needs; every example policy whose feature needs no kernel to load
EXAMPLES = {"firewall.py": None, "nat.py": None, "uplinks.py": None, "shaping.py": {"dev": "up1"},
            "mangle.py": None, "verdicts.py": None, "bench_flow.py": None, "loadbalance.py": None}
#: modules whose objects are plain data (rules, marks, matches, verdicts, declarations)
DATA_MODULES = ("builtins", "ipaddress", "nfhooks.rulebuild", "nfhooks.marks", "nfhooks.match", "nfhooks.kmatch",
                "nfhooks.verdict", "nfhooks.hooks")


def _offenders(obj: Any, path: str, seen: set[int]) -> list[str]:
    """Every object reachable from ``obj`` whose type is not plain data, as "path: type (module)".
    A Handler is the policy's (its function is the user's code): not walked into."""
    if id(obj) in seen or isinstance(obj, Handler):
        return []
    seen.add(id(obj))
    mod = type(obj).__module__
    out = []
    if not (mod in DATA_MODULES or (mod.startswith("nfhooks.features.") and mod.endswith("_decl"))):
        out.append(f"{path}: {type(obj).__qualname__} ({mod})")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f".{f.name}", getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        items = [(f"[{k!r}]", v) for k, v in obj.items()] + [(f"<key {k!r}>", k) for k in obj]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = [(f"[{i}]", v) for i, v in enumerate(obj)]
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = [(f".{k}", v) for k, v in vars(obj).items()]
    else:
        items = []
    for step, value in items:
        out += _offenders(value, path + step, seen)
    return out


def _load(name: str) -> Policy:
    return load_policy(POLICIES / name, EXAMPLES[name])


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_a_compiled_ruleset_holds_only_data(name: str) -> None:
    rs = compile_policy(_load(name))
    assert _offenders(rs, "rs", set()) == []
    twin = copy.deepcopy(rs)  # data: copies, and the copy renders the same rules
    assert twin.render() == rs.render()


def test_the_routing_plan_is_on_the_ruleset_and_the_runtime_is_not() -> None:
    """The walk above does reach the routing feature's part of a RuleSet (so it can fail)."""
    rs = compile_policy(_load("uplinks.py"))
    assert rs.routeshape is not None and rs.routeshape.slots == 2
    assert _offenders(rs.routeshape, "plan", set()) == []
    bad = dataclasses.replace(rs, routeshape=RouteShape(_load("uplinks.py"), rs.routeshape))
    assert any("RouteShape (nfhooks.features.routing_runtime)" in o for o in _offenders(bad, "rs", set()))


class StubBackend:
    """Records what the engine asks of a rule store; installs nothing."""

    name = "stub"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        def record(*a: Any, **kw: Any) -> Any:
            self.calls.append(name)
            return [] if name in ("remove", "remove_generation", "counter_texts") else None
        return record


class StubQueues:
    """The bind/unbind half of a QueueSet (a reload binds the new generation's queues)."""

    def __init__(self) -> None:
        self.bound: dict[int, Any] = {}

    def bind(self, num: int, callback: Any, **kw: Any) -> None:
        self.bound[num] = callback

    def unbind(self, num: int) -> None:
        self.bound.pop(num)


@pytest.mark.parametrize("name", ["firewall.py", "nat.py", "uplinks.py", "bench_flow.py"])
def test_an_engine_and_its_reload_leave_the_policies_unchanged(name: str) -> None:
    loaded: list[tuple[Policy, dict[str, Any]]] = []

    def loader() -> Policy:
        p = _load(name)
        loaded.append((p, dict(vars(p))))
        return p

    pol = loader()
    eng = Engine(pol, metrics=Metrics(CollectorRegistry()), backend=StubBackend(), loader=loader,
                 handler_timeout=None)
    eng.queues = StubQueues()
    ok, msg = eng.reload()
    assert ok, msg
    assert eng.policy is loaded[1][0] and eng.ruleset.generation == 2
    for p, before in loaded:
        assert vars(p) == before
        assert "self_mark" not in vars(p)


def test_the_engine_owns_the_routing_runtime_and_hands_it_to_the_dispatcher() -> None:
    eng = Engine(_load("uplinks.py"), metrics=Metrics(CollectorRegistry()), backend=StubBackend(),
                 handler_timeout=None)
    rt = eng.runtimes["routeshape"]
    assert isinstance(rt, RouteShape) and rt.plan is eng.ruleset.routeshape
    assert eng.dispatcher.encoders == {"route": rt, "shape": rt}
    assert eng.env.runtimes is eng.runtimes  # what the feature's start/reload/stop get
    plain = Engine(_load("firewall.py"), metrics=Metrics(CollectorRegistry()), backend=StubBackend(),
                   handler_timeout=None)
    assert plain.runtimes["routeshape"] is None and plain.dispatcher.encoders == {}


def test_policy_socket_is_marked_only_while_an_engine_serves() -> None:
    pol = Policy()
    with pol.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0
    try:
        with self_marked(0x80000000), pol.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            mark = s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) & 0xFFFFFFFF
    except PermissionError:
        pytest.skip("setting SO_MARK needs CAP_NET_ADMIN")
    assert mark == 0x80000000
    with pol.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # the block is over: unmarked again
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0
    assert "self_mark" not in vars(pol)
