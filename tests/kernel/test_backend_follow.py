"""Commands without --backend follow the running engine: `nfhooks rules` and `flush` look where
the engine's rules are, whichever backend it was started with (auto prefers the store that
already holds nfhooks' rules over the host's iptables variant)."""

from __future__ import annotations

import os
import sys

from .conftest import POLICIES, nfh_lines


def test_rules_and_flush_without_backend_follow_the_engine(nfh_lab, nfh_backend):
    lab = nfh_lab
    eng = lab.start_engine(str(POLICIES / "firewall.py"), "--set", f"trusted={lab.addr('client')}/32")
    plain = {k: v for k, v in os.environ.items() if k != "NFHOOKS_BACKEND"}  # as a user would type it
    shown = lab.exec("router", sys.executable, "-m", "nfhooks", "rules", "--save", env=plain, timeout=30)
    assert "-j NFH-INPUT" in shown.stdout, shown.stdout + shown.stderr
    assert ("# backend nft" in shown.stdout) == (nfh_backend == "nft")
    flushed = lab.exec("router", sys.executable, "-m", "nfhooks", "flush", "--force", env=plain, timeout=30)
    assert "NFH-INPUT" in flushed.stdout, flushed.stdout + flushed.stderr
    assert eng.stop() == 0
    assert nfh_lines(lab) == []
