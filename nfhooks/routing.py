"""Policy routing decided in Python, done by the kernel's routing tables.

A policy declares routing tables (``policy.routing_table("uplink2", routes=[...])``); a
handler at PREROUTING (forwarded traffic) or OUTPUT (local traffic) returns
``route("uplink2")`` for a connection's first packet. Python never routes a packet: the
verdict writes the table's index into the ``route`` mark field and accepts, and what nfhooks
installed does the rest::

    ip rule add priority 10000 lookup main suppress_prefixlength 0   # main's specific routes win
    ip rule add priority 10000+i fwmark <i>/<route mask> lookup <table id>   # IPv4 and IPv6
    ip route add <each declared route> table <table id>

At PREROUTING the routing decision comes right after mangle; at OUTPUT the kernel re-routes a
locally generated packet whose mark changed in the mangle table (``ip_route_me_harder``, also
done by ``nf_reinject`` when a queue verdict changed the mark). A re-routed local packet keeps
the source address chosen for the first route, so pair each uplink with source NAT
(``routing_table(..., masquerade=True)`` or ``snat="ADDR"``: a nat POSTROUTING rule nfhooks
owns, matching the table's mark and outgoing interface).

Connection stickiness (for route and, in the same way, the shaping ``class`` field, see
shaping.py): every packet of a connection must take the same table, but only the first one
is queued (route/shape handlers get ``--ctstate NEW`` like NAT handlers). So:

* ``NFH-SAVE`` (mangle POSTROUTING, first rule): a packet carrying a route/class value copies
  it to its connection (``CONNMARK --save-mark`` with ``--nfmask/--ctmask`` of that field);
* ``NFH-RESTORE`` (mangle PREROUTING and OUTPUT, first rule): a packet whose connection has
  route/class bits gets them back (``CONNMARK --restore-mark``, masked) before routing: later
  packets, and replies -- which is why main's specific routes come first
  (``suppress_prefixlength 0``: a reply to a LAN host finds the LAN's connected route in
  main; only what main would send by its default route goes to the uplink's table). The
  restore only fires when the connection has such bits, and writes only those bits, so it
  never wipes nfhooks' other fields (the loop the design notes warn about).

rp_filter and src_valid_mark: with strict reverse-path filtering a reply arriving on uplink 2
fails the check (main routes its source via uplink 1) unless the check uses the mark
(``net.ipv4.conf.all.src_valid_mark=1``) or is loose (``rp_filter=2``). nfhooks changes
these only when the policy asks: ``policy.routing(src_valid_mark=True, rp_filter=2)``, in the
engine's own network namespace, restoring the old values on exit.

Ownership: every ip rule and route nfhooks adds carries the routing protocol
:data:`RTPROT_NFHOOKS` (``ip rule``/``ip route`` show ``proto 78``); removal on exit, and of a
stale set after a crash, deletes exactly those. A declared table that already holds routes of
someone else is refused (give ``table_id=``).
"""

from __future__ import annotations

# The feature lives in three modules along its boundary: declarations (checked at load),
# compile (pure rules), runtime (pyroute2/tc). This module keeps the names it always had.
from .features.routing_compile import (  # noqa: F401
    add_chains, compile_rules, mark_fields, nat_rules, per_connection,
)
from .features.routing_decl import (  # noqa: F401
    DEFAULT_DYNAMIC_ROUTES, DEFAULT_PRIORITY, DEFAULT_TABLE_BASE, RESTORE_CHAIN, ROUTE_NAT_CHAIN, RTPROT_NFHOOKS,
    SAVE_CHAIN, RouteShapeError, RouteSpec, RoutingSettings, RoutingTable, check_references, class_names,
    declare_settings, declare_table, parse_route, resolve_route, route_slots, uses_dynamic_routes,
)
from .features.routing_runtime import (  # noqa: F401
    RouteShape, install_nat, reload, remove_owned, signature, start, stop,
)

_signature = signature  # the old name (tests compare two rule sets' routing with it)

__all__ = ["RTPROT_NFHOOKS", "RouteShapeError", "RouteSpec", "parse_route", "RoutingTable", "RoutingSettings",
           "declare_table", "declare_settings", "uses_dynamic_routes", "check_references", "class_names",
           "route_slots", "mark_fields", "per_connection", "compile_rules", "nat_rules", "RouteShape",
           "remove_owned", "start", "signature", "reload", "install_nat", "stop"]
