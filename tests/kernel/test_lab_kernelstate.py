"""`nfhooks lab --scenario kernel-state` end to end (issue 16.7): policies/ssh_guard.py on a lab
of its own; Python decides a handful of packets, the kernel drops the banned client's flood.
Asserted from the JSON summary: the handler's count (N) and the set rule's kernel counter (M)
side by side, M > N, for IPv4 and IPv6; the scenario is part of ``--scenario all``."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from nfhooks.testing import requires_netns

from .test_lab import assert_nothing_left, engine_pid, lab_id, nfhooks, root_links, root_nfhooks_rules

pytestmark = pytest.mark.kernel
_REASON = requires_netns(probe=False)


def lab_env(tmp_path) -> dict[str, str]:
    """A run-private state dir, so a kept lab of a developer is never touched."""
    return {**os.environ, "NFHOOKS_LAB_STATE_DIR": str(tmp_path / "state"), "PYTHONUNBUFFERED": "1"}


@pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
@pytest.mark.skipif(shutil.which("ipset") is None, reason="ssh_guard's set needs the ipset program")
@pytest.mark.timeout(150)
def test_kernel_state_python_decides_few_the_kernel_enforces_many(tmp_path):
    from nfhooks.lab.registry import groups

    assert "kernel-state" in groups()["all"] and groups()["kernel-state"] == ["kernel-state"]
    links, rules_before = root_links(), root_nfhooks_rules()
    r = nfhooks("lab", "--json", "--scenario", "kernel-state", "--duration", "0", env=lab_env(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout)
    (sc,) = [s for s in summary["scenarios"] if s["key"] == "kernel-state"]
    assert sc["ok"] and sc["error"] is None, sc
    (table,) = [t for t in sc["tables"] if t["title"].startswith("kernel-state")]
    assert table["columns"] == ["family", "python decided", "kernel enforced"]
    counts = {row[0]: (int(row[1]), int(row[2])) for row in table["rows"]}
    assert set(counts) == {"IPv4", "IPv6"}, counts
    for fam, (n, m) in counts.items():
        assert n == 4, (fam, n)  # max_new (3) accepted + the one that got the client banned
        assert m > n, (fam, n, m)  # the flood, dropped by the kernel's src=banned rule
        texts = [c["text"] for c in sc["checks"]]
        assert any(re.search(rf"{fam} python decided {n}, kernel enforced {m}\b", t) for t in texts), texts
    assert any("another source (the server) while the client is banned: ok" in c["text"] for c in sc["checks"])
    out = r.stdout + r.stderr
    assert_nothing_left(lab_id(out), [engine_pid(out)], links)
    assert root_nfhooks_rules() == rules_before
