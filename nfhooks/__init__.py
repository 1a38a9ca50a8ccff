"""nfhooks: write Linux packet policy in Python.

iptables rules nfhooks compiles from a policy send exactly the packets the policy cares about,
at the netfilter hooks it names, into NFQUEUE; the engine gives each one exactly one verdict.
"""

from .hooks import HOOKS, PlacementError
from .policy import Option, Policy, PolicyError, load_policy
from .verdict import Accept, Drop, Mark, Reject, Verdict, accept, connmark, drop, mark, reject

__version__ = "0.1.0"

__all__ = [
    "HOOKS", "PlacementError", "Option", "Policy", "PolicyError", "load_policy",
    "Accept", "Drop", "Mark", "Reject", "Verdict", "accept", "connmark", "drop", "mark", "reject",
    "__version__",
]
