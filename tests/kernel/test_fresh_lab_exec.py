"""`nfhooks lab exec NODE -- nfhooks ...` works when nfhooks was called as `.venv/bin/nfhooks`
without an activated virtualenv (the README says that is fine): `ip netns exec` searches PATH,
which then has no nfhooks, so exec_in_node puts the running interpreter's bin dir first.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nfhooks.testing import requires_netns

from .conftest import ROOT

pytestmark = pytest.mark.kernel
_REASON = requires_netns(probe=False)
NFHOOKS = Path(sys.executable).with_name("nfhooks")  # the virtualenv's console script
#: a login shell's PATH: no virtualenv on it
PLAIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _run(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(NFHOOKS), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


@pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
@pytest.mark.skipif(not NFHOOKS.exists(), reason=f"no console script {NFHOOKS} (pip install -e . makes it)")
@pytest.mark.timeout(150)
def test_lab_exec_finds_nfhooks_without_an_activated_venv(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=PLAIN_PATH, NFHOOKS_LAB_STATE_DIR=str(tmp_path / "state"), PYTHONUNBUFFERED="1",
               COLUMNS="200")
    assert subprocess.run(["sh", "-c", "command -v nfhooks"], env=env, capture_output=True).returncode != 0, \
        "nfhooks is on the plain PATH: this test would prove nothing"
    up = _run("lab", "--duration", "0", "--keep", "--scenario", "forwarded", env=env, timeout=120)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        r = _run("lab", "exec", "router", "--", "nfhooks", "rules", "--save", env=env, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "-A NFH-" in r.stdout, r.stdout  # the kept engine's rules, read inside the router
        # the user's own command still finds the system's programs
        ip = _run("lab", "exec", "client", "--", "ip", "-br", "link", env=env, timeout=20)
        assert ip.returncode == 0 and "eth0" in ip.stdout, ip.stdout + ip.stderr
    finally:
        down = _run("lab", "down", env=env, timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
