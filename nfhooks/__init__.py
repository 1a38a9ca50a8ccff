"""nfhooks: write Linux packet policy in Python.

iptables rules nfhooks compiles from a policy send exactly the packets the policy cares about,
at the netfilter hooks it names, into NFQUEUE; the engine gives each one exactly one verdict.
"""

from .hooks import HOOKS, PlacementError
from .loader import load_policy
from .policy import Option, Policy, PolicyError
from .verdict import (
    Accept, Dnat, Drop, Mangle, Mark, Masquerade, Nat, Redirect, Reject, Snat, Verdict, accept,
    clamp_mss, connmark, dnat, drop, mangle, mark, masquerade, payload, redirect, reject,
    set_dscp, set_tos, set_ttl, snat,
)
from .verdict import Route, Shape, route, shape

__version__ = "0.1.0"

__all__ = [
    "HOOKS", "PlacementError", "Option", "Policy", "PolicyError", "load_policy",
    "Accept", "Drop", "Mark", "Reject", "Verdict", "accept", "connmark", "drop", "mark", "reject",
    "Nat", "Dnat", "Snat", "Masquerade", "Redirect", "dnat", "snat", "masquerade", "redirect",
    "Mangle", "mangle", "set_ttl", "set_dscp", "set_tos", "clamp_mss", "payload",
    "Route", "Shape", "route", "shape",
    "__version__",
]
