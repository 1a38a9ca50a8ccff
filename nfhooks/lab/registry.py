"""Which scenarios exist: the built-in ones, in order, plus those plugin modules register;
their groups, and what ``--scenario NAME`` selects.

The scenario registry (``--scenario NAME``)
-------------------------------------------
A scenario is a :class:`Scenario`; :func:`register` adds one (or replaces the one with the
same key). ``--scenario`` takes a scenario's key or a group name, repeatable: ``standard``
(the default set), ``vpn``, ``all``, or any group a scenario declares. A scenario that lives
in its own module -- e.g. ``nfhooks/lab/routeshape.py`` -- registers itself at import time,
and the module is listed in :data:`PLUGINS` (imported on first use; a listed module that
does not exist yet is skipped)::

    # nfhooks/lab/routeshape.py
    from .registry import register
    from .scenario import Check, Ctx, Scenario

    def setup(lab, ports):          # optional: before servers and the engine start
        lab.add_node(...)           # extra nodes/links/processes (all removed at close)
        return {"anything": "the run function needs"}   # -> ctx.state["route-shape"]

    def run(c: Ctx) -> list[Check]:  # drive traffic, return what was observed
        got = c.lab.tcp_connect("client", c.lab.addr("server"), 8080)
        return [Check(f"client -> server: {got}", got == "ok")]

    register(Scenario("route-shape", "route shaping: ...", "one line for the summary",
                      hooks=("PREROUTING", "FORWARD"), run=run, setup=setup,
                      groups=("route-shape",), options=lambda lab: {"some_option": "value"}))

Fields: ``key`` (unique, also selectable), ``title``/``description`` (shown), ``hooks`` (the
hooks its traffic must cross: the result fails if the engine's metrics do not show them),
``run(ctx) -> list[Check]`` (every Check false or an exception fails the scenario; other
scenarios still run), ``groups`` (default ``("standard",)``: part of the default set),
``setup(lab, ports)`` (optional, its return value is ``ctx.state[key]``), ``options(lab)``
(optional: policy options passed to the engine with ``--set``, only those the policy
declares; the user's ``--set`` wins), ``needs`` (names in nfhooks.verdict it depends on).
``ctx`` (:class:`Ctx`) gives the lab (``ctx.lab.exec/popen/tcp_connect/udp_send/ping/addr``),
the engine, the metrics scraper (``ctx.scraper.scrape()`` -> :class:`Snapshot`), the policy's
ports/options (``ctx.ports``), the standard servers (``ctx.servers``), ``ctx.progress(text)``
for the progress line and ``ctx.add_table(title, columns, rows)`` for an extra table in the
summary (and in ``--json``). Which hooks a scenario crossed, with which verdicts, is
measured around ``run`` by the runner itself.

(``from nfhooks.lab.runner import Check, Ctx, Scenario, register`` keeps working.)
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from ..hooks import HOOKS
from .config import LabError
from .rawpackets import malformed
from .scenario import Scenario
from .standard import (
    dnat_local,
    forwarded,
    forwarding_off,
    from_router,
    mangle_setup,
    mangled,
    masqueraded,
    port_forward,
    rejected,
    seed_output_drop,
    steady,
    to_router,
    wan_to_lan,
)

__all__ = ["PLUGINS", "SCENARIOS", "groups", "load_plugins", "register", "select"]


#: The lab's traffic, in order (see the module docstring: `register` adds to it).
SCENARIOS: list[Scenario] = [
    Scenario("forwarded", "forwarded: client → server",
             "the client's connection is routed through the router", ("PREROUTING", "FORWARD", "POSTROUTING"),
             forwarded),
    Scenario("to-router", "to the router: client → router",
             "the router's own service port, and ping", ("PREROUTING", "INPUT"), to_router),
    Scenario("from-router", "from the router: router → server",
             "the router opens a connection itself", ("OUTPUT", "POSTROUTING"), from_router),
    Scenario("output-drop", "classic example: router's own HTTP to port 80 dropped at OUTPUT",
             "locally generated tcp/80 vanishes; the client's tcp/80 is forwarded and works",
             ("OUTPUT",), seed_output_drop),
    Scenario("reject", "reject: refused ports on the router",
             "TCP reset and ICMP port unreachable, sent by the policy's reject()",
             ("PREROUTING", "INPUT"), rejected),
    Scenario("wan-to-lan", "default drop: WAN → LAN",
             "the server cannot open connections to the client (FORWARD default drop)",
             ("PREROUTING", "FORWARD"), wan_to_lan),
    Scenario("malformed", "raw packets: malformed frames from the client (scapy, AF_PACKET)",
             "bad header lengths, truncated TCP, bad checksums, odd flags; then a normal connection",
             ("PREROUTING",), malformed),
    Scenario("steady", "steady traffic for --duration seconds",
             "connections across all five hooks while the live table updates",
             HOOKS, steady),
    Scenario("masquerade", "NAT: masquerade client → server (nat_port)",
             "the server sees the router's WAN address instead of the client's",
             ("PREROUTING", "FORWARD", "POSTROUTING"), masqueraded, needs=("masquerade",)),
    Scenario("dnat-local", "classic example: router's own HTTP to port 80 → proxy:8080 (DNAT at OUTPUT)",
             "HTTP to the proxy's address is DNATed to its 8080 and returns its page; HTTP to the "
             "server (drop_dst) still times out", ("OUTPUT", "POSTROUTING"), dnat_local, needs=("dnat",)),
    Scenario("port-forward", "NAT: a port forward WAN → client (DNAT at PREROUTING)",
             "the server reaches the client's service via the router's WAN address and forward_port",
             ("PREROUTING", "FORWARD", "POSTROUTING"), port_forward, needs=("dnat",)),
    Scenario("mangle", "mangling: TTL and DSCP set at POSTROUTING",
             "client → server UDP to mangle_port; the server's kernel reports the TTL/hop limit and DSCP",
             ("PREROUTING", "FORWARD", "POSTROUTING"), mangled, needs=("set_ttl", "set_dscp"),
             setup=mangle_setup),
    Scenario("forwarding-off", "forwarding off: net.ipv4.ip_forward=0 on the router",
             "forwarded packets stop after PREROUTING and never reach FORWARD; then forwarding is on again",
             ("PREROUTING", "FORWARD"), forwarding_off),
]


#: Modules that register scenarios of their own when imported (see the module docstring);
#: one that does not exist (yet) is skipped.
PLUGINS: list[str] = ["nfhooks.lab.vpn", "nfhooks.lab.routeshape", "nfhooks.lab.kernelstate"]
_plugins_loaded = False


def register(scenario: Scenario) -> Scenario:
    """Add a scenario to the registry (replacing one with the same key); returns it."""
    for i, sc in enumerate(SCENARIOS):
        if sc.key == scenario.key:
            SCENARIOS[i] = scenario
            return scenario
    SCENARIOS.append(scenario)
    return scenario


def load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for name in PLUGINS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # the module exists but something it imports does not
                raise


def _ordered() -> list[Scenario]:
    """The registry in a fixed order, whatever imported a plugin first: the built-in scenarios
    as defined, then each plugin's in PLUGINS order."""
    def rank(sc: Scenario) -> int:
        mod = getattr(sc.run or sc.setup, "__module__", __name__)
        return PLUGINS.index(mod) + 1 if mod in PLUGINS else 0

    return sorted(SCENARIOS, key=rank)


def groups() -> dict[str, list[str]]:
    """Group name -> scenario keys ("all" included)."""
    load_plugins()
    out: dict[str, list[str]] = {}
    for sc in _ordered():
        for g in sc.groups:
            out.setdefault(g, []).append(sc.key)
    out["all"] = [sc.key for sc in _ordered()]
    return out


def select(names: Sequence[str]) -> list[Scenario]:
    """The scenarios `--scenario NAME...` asks for (keys or groups; none: "standard"),
    in registry order. Unknown names are a LabError listing what exists."""
    load_plugins()
    wanted = [n for name in (names or ["standard"]) for n in name.split(",") if n.strip()]
    g = groups()
    keys = {sc.key for sc in SCENARIOS}
    unknown = [n for n in wanted if n not in g and n not in keys]
    if unknown:
        raise LabError(f"unknown scenario {', '.join(map(repr, unknown))}: groups "
                       f"{', '.join(sorted(g))}; scenarios {', '.join(sc.key for sc in SCENARIOS)}")
    chosen = {k for n in wanted for k in (g.get(n) or [n])}
    return [sc for sc in _ordered() if sc.key in chosen]
