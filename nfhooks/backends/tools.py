"""The programs each backend's rules are read and written with, per address family.

A table of literal names (no imports), so any module can name the right tool for the
backend in use, and tests/unit/test_programs.py can see every program it may run.
"""

from __future__ import annotations

__all__ = ["SAVE_TOOLS", "IPTABLES"]

#: backend -> family -> the save program (``-c`` adds the counters)
SAVE_TOOLS = {"legacy": {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"},
              "nft": {4: "iptables-nft-save", 6: "ip6tables-nft-save"}}
#: backend -> family -> the iptables command (for a rule next to nfhooks' own, e.g. the bench)
IPTABLES = {"legacy": {4: "iptables-legacy", 6: "ip6tables-legacy"},
            "nft": {4: "iptables-nft", 6: "ip6tables-nft"}}
