"""worker_routes without a kernel: the workers' SlotClients against one NatServer (the main
process's request server) over real pipes, with the real RouteShape runtime of a compiled
policy (its netlink calls replaced): declared tables and classes encode in the worker, an
on-demand route is allocated once by the owner whichever worker asks, answers and errors
are cached, and a closed server answers an error, never a slot."""

from __future__ import annotations

import multiprocessing
import threading
from types import SimpleNamespace

import pytest

from nfhooks.errors import KernelError
from nfhooks.verdict import route, shape
from nfhooks.worker_nat import Asker, NatServer
from nfhooks.worker_routes import SlotClient, slot_topics, worker_encoders

POLICY = '''
from nfhooks import Policy, route
policy = Policy()
policy.routing_table("up2", routes=["default via 10.0.2.1 dev up2", "default via fd00:2::1 dev up2"])
policy.routing(dynamic_routes=2)
policy.shaping("up1", classes={"bulk": dict(rate="5mbit"), "fast": dict(rate="50mbit")}, default="bulk")

@policy.output(proto="tcp", dport=80)
def r(pkt):
    return route(via="10.0.1.1", dev="up1")
'''


@pytest.fixture
def owner(tmp_path, monkeypatch):
    """The main process's RouteShape, its route additions recorded instead of made."""
    from nfhooks.features import routing_runtime
    from nfhooks.loader import load_policy
    from nfhooks.rules import compile_policy

    p = tmp_path / "pol.py"
    p.write_text(POLICY)
    pol = load_policy(p)
    rs = compile_policy(pol, queue_base=10)
    added: list[tuple[int, str]] = []

    class FakeIpr:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    def add_route(ipr, table, spec):
        if spec.via == "10.9.9.9":
            raise OSError("Network is unreachable")
        added.append((table, spec.text))

    monkeypatch.setattr(routing_runtime, "_ipr", FakeIpr)
    monkeypatch.setattr(routing_runtime, "_add_route", add_route)
    rt = routing_runtime.RouteShape(pol, rs.routeshape, ())
    return rt, added


def _pair(owner_rt, n=2):
    """A NatServer answering "slot" from ``owner_rt`` and ``n`` workers' clients (as forked
    workers hold them: their own copy of the runtime, which must never allocate)."""
    import copy

    pipes = [multiprocessing.Pipe() for _ in range(n)]
    encs = {"route": owner_rt, "shape": owner_rt}
    server = NatServer(None, [p[0] for p in pipes], topics=slot_topics(encs))
    server.start()
    clients = []
    for p in pipes:
        mine = copy.copy(owner_rt)

        def no_slot(*a, **k):
            raise AssertionError("a worker allocated a route slot itself")

        mine.slot = no_slot  # type: ignore[method-assign]
        clients.append(worker_encoders({"route": mine, "shape": mine}, Asker(p[1], timeout=5)))
    return server, clients, pipes


def test_declared_verdicts_encode_in_the_worker_on_demand_ones_in_the_owner(owner):
    rt, added = owner
    server, clients, pipes = _pair(rt)
    pkt4, pkt6 = SimpleNamespace(version=4), SimpleNamespace(version=6)
    a, b = clients
    assert a["route"] is a["shape"] and isinstance(a["route"], SlotClient)
    # declared table and class: the plan's bits, no request (the server is closed for them)
    server.close()
    assert a["route"].bits(pkt4, route("up2")) == rt.bits(pkt4, route("up2"))
    assert a["shape"].bits(pkt6, shape("fast")) == rt.bits(pkt6, shape("fast")) != 0
    with pytest.raises(KernelError, match="no shaping class 'nope'"):
        a["shape"].bits(pkt4, shape("nope"))
    with pytest.raises(KernelError, match="the engine is stopping"):
        a["route"].bits(pkt4, route(via="10.0.1.1", dev="up1"))
    assert added == []
    server.closed = False
    # on demand: both workers get one slot, allocated once by the owner
    hop = route(via="10.0.1.1", dev="up1")
    got = []
    threads = [threading.Thread(target=lambda c=c: got.append(c["route"].bits(pkt4, hop))) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(got) == 2 and got[0] == got[1] == rt.route_field.encode(2)  # slot 1 is the declared table
    assert added == [(rt.plan.table_id(2), "default via 10.0.1.1 dev up1")]
    # cached: no request any more (a dead server would make it fail)
    server.close()
    assert a["route"].bits(pkt4, hop) == got[0]
    assert a["route"].clear_mask("route") == rt.clear_mask("route")
    server.closed = False
    # refused by the owner: the same text as one engine, cached in the worker
    with pytest.raises(KernelError, match="IPv4 next hop for an IPv6 packet"):
        b["route"].bits(pkt6, route(via="10.0.1.2"))
    with pytest.raises(KernelError, match="the kernel refused the route"):
        b["route"].bits(pkt4, route(via="10.9.9.9"))
    server.close()
    with pytest.raises(KernelError, match="the kernel refused the route"):
        b["route"].bits(pkt4, route(via="10.9.9.9"))  # from the cache, not "stopping"
    server.closed = False
    # the bound: dynamic_routes=2, one used, one failed (10.9.9.9 took no slot): one left
    assert b["route"].bits(pkt4, route(via="10.0.1.2")) == rt.route_field.encode(3)
    with pytest.raises(KernelError, match="past the 2 policy.routing"):
        b["route"].bits(pkt4, route(via="10.0.1.3"))
    assert len(added) == 2
    for p in pipes:
        p[1].close()


def test_without_a_request_pipe_encoders_are_used_as_they_are(owner):
    rt, _ = owner
    assert worker_encoders({"route": rt}, None) == {"route": rt}
    assert slot_topics({}) == {} and slot_topics({"x": object()}) == {}


def test_an_unanswered_request_times_out_with_the_reason():
    mine, theirs = multiprocessing.Pipe()
    enc = SimpleNamespace(on_demand=lambda v: True, slot_bits=None, clear_mask=lambda k: 0)
    client = SlotClient(enc, Asker(mine, timeout=0.2))
    with pytest.raises(KernelError, match="did not allocate the route for"):
        client.bits(SimpleNamespace(version=4), route(via="10.0.1.1"))
    assert theirs.recv()[1] == "slot"
