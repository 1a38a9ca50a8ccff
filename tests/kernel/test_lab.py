"""`nfhooks lab` end to end: the whole run as a user starts it, then --keep / exec / down.

Runs the CLI as a subprocess (its exit status and output are the interface) and checks that
no lab namespace of the run is left behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from nfhooks.testing import requires_netns

from .conftest import ROOT

pytestmark = pytest.mark.kernel
_REASON = requires_netns(probe=False)
needs_netns = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
HOOKS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")


def _env(tmp_path) -> dict[str, str]:
    """A run-private state dir, so a kept lab of a developer is never touched."""
    return {**os.environ, "NFHOOKS_LAB_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200"}


def nfhooks(*args: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nfhooks", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def lab_id(out: str) -> str:
    m = re.search(r"^lab (\S+) up in", out, re.M)
    assert m, out
    return m.group(1)


def namespaces(lab: str) -> list[str]:
    return [n for n in os.listdir("/run/netns") if n.startswith(f"nfhlab-{lab}-")] \
        if os.path.isdir("/run/netns") else []


def hook_counts(out: str) -> dict[str, int]:
    """Packets per hook from the summary's per-hook table (rows: hook table verdict pkts ...)."""
    table = out.split("per-hook verdicts")[-1]
    counts: dict[str, int] = {}
    for hook, pkts in re.findall(rf"^\s*({'|'.join(HOOKS)})\s+\w+\s+\w+\s+(\d+)", table, re.M):
        counts[hook] = counts.get(hook, 0) + int(pkts)
    return counts


@needs_netns
@pytest.mark.timeout(150)
def test_lab_run_passes_explains_every_hook_and_leaves_nothing(tmp_path):
    r = nfhooks("lab", "--duration", "1", env=_env(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    lab = lab_id(out)
    counts = hook_counts(out)
    assert all(counts.get(h, 0) > 0 for h in HOOKS), (counts, out)
    # malformed frames: each with its real outcome and the evidence for it
    assert "dropped by the kernel before any hook: IpInHdrErrors +1" in out, out
    assert "PREROUTING invalid: drop" in out, out
    assert "counted in nfhooks_malformed_packets_total" in out, out
    assert "engine still running after the raw packets: True" in out, out
    assert "seed example" in out and "no_web:drop" in out, out
    assert "refused:reject" in out and "ECONNREFUSED (ICMP port unreachable)" in out, out
    assert "nfhooks lab exec router -- curl -s 127.0.0.1:9477/metrics" in out, out
    assert namespaces(lab) == [], namespaces(lab)


@needs_netns
@pytest.mark.timeout(150)
def test_keep_exec_down(tmp_path):
    env = _env(tmp_path)
    r = nfhooks("lab", "--duration", "0", "--keep", env=env)
    out = r.stdout + r.stderr
    lab = lab_id(out)
    try:
        assert r.returncode == 0, out
        assert len(namespaces(lab)) == 5
        ex = nfhooks("lab", "exec", "client", "--", "ip", "-br", "addr", env=env, timeout=20)
        assert ex.returncode == 0, ex.stderr
        assert re.search(r"^eth0\S*\s+UP\s+10\.", ex.stdout, re.M), ex.stdout
        # the kept engine still decides: its metrics answer inside the router namespace
        m = nfhooks("lab", "exec", "router", "--", "curl", "-s", "127.0.0.1:9477/metrics",
                    env=env, timeout=20)
        assert "nfhooks_packets_total" in m.stdout, m.stderr
    finally:
        d = nfhooks("lab", "down", env=env, timeout=60)
    assert d.returncode == 0, d.stdout + d.stderr
    assert "stopped" in d.stdout and namespaces(lab) == [], d.stdout
    gone = nfhooks("lab", "exec", "client", "--", "true", env=env, timeout=20)
    assert gone.returncode == 2 and "no kept lab" in gone.stderr
