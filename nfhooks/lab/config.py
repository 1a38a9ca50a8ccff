"""What a ``nfhooks lab`` run is configured with: the user's options (:class:`LabConfig`),
the error a user can fix (:class:`LabError`), the lab policy and the ports its servers use.

At the bottom of the lab's run modules: scenarios, rendering and the runner all read these.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..metrics import DEFAULT_METRICS_ADDR

__all__ = ["CONNECT_TIMEOUT", "DEFAULT_POLICY", "HTTP_PORT", "PROXY_PORT", "RUN_TAG", "SCRAPE_INTERVAL",
           "WEB_PORT", "LabConfig", "LabError", "check_root"]

#: Lab ids of `nfhooks lab` runs carry this tag, so `lab down` only ever clears lab runs
#: (test suites' labs use plain hex ids, which never contain an "l").
RUN_TAG = "lab"
#: The policy the lab runs unless ``--policy`` names another.
DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "lab.py"

# Ports the lab's servers listen on; the router's ones come from the policy's options.
WEB_PORT = 8080      # server (and client, for the WAN -> LAN attempt)
HTTP_PORT = 80       # server: the classic OUTPUT drop; proxy: DNATed to PROXY_PORT
PROXY_PORT = 8080    # proxy: where the router's HTTP to the proxy is DNATed
CONNECT_TIMEOUT = 1.0  # for connections that are expected to be dropped
SCRAPE_INTERVAL = 0.5


@dataclass
class LabConfig:
    """What the user asked for on the command line."""

    policy: Path | None = None
    sets: list[str] = field(default_factory=list)
    duration: float = 5.0
    metrics_addr: str = DEFAULT_METRICS_ADDR
    keep: bool = False
    #: passed through to the engine as ``nfhooks run --pcap FILE``
    pcap: Path | None = None
    #: print the summary as JSON on stdout (everything else goes to stderr)
    json: bool = False
    #: scenario keys or groups (empty: "standard")
    scenarios: list[str] = field(default_factory=list)


class LabError(Exception):
    """A problem the user can fix (not root, bad policy, a kept lab in the way); exit 2."""


def check_root() -> None:
    """Refuse early, with the fix in the message, instead of failing half-way through a build."""
    if os.geteuid() != 0:
        raise LabError("nfhooks lab builds network namespaces and installs iptables rules in them: "
                       "run it as root (sudo .venv/bin/nfhooks lab); nothing outside the lab is touched")
