"""``nfhooks run --pcap FILE`` where another user planted a symlink (issue 13).

In a sticky world-writable directory (like /tmp) a user plants ``FILE`` -- or ``FILE.1``, the
name a rotation moves FILE to -- as a symlink to a root-owned file. The engine (root) must not
write packet data through it: `run` stops with its one-line error before binding a queue or
installing a rule, and the target is unchanged.
"""

from __future__ import annotations

import os
import sys

import pytest

from .conftest import nfh_lines

POLICY = '''\
from nfhooks import Policy, accept

policy = Policy("rel-pcap")


@policy.input(proto="udp", dport=7321)
def udp_ok(pkt):
    return accept()
'''


@pytest.mark.timeout(120)
@pytest.mark.parametrize("planted", ["cap.pcapng", "cap.pcapng.1"])
def test_run_refuses_a_pcap_path_planted_as_a_symlink(nfh_lab, tmp_path, planted):
    lab = nfh_lab
    pol = tmp_path / "pol.py"
    pol.write_text(POLICY)
    pol.chmod(0o644)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    target = tmp_path / "root-owned.conf"
    target.write_text("precious root data\n")
    target.chmod(0o644)
    link = shared / planted
    link.symlink_to(target)
    if os.geteuid() == 0:
        os.lchown(link, 65534, 65534)  # planted by another user
    cap = shared / "cap.pcapng"
    cp = lab.exec("router", sys.executable, "-m", "nfhooks", "run", str(pol), "--pcap", str(cap),
                  "--metrics-addr", "off", check=False, timeout=60)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    errors = [line for line in cp.stderr.splitlines() if line.startswith("nfhooks: error:")]
    assert len(errors) == 1 and str(link) in errors[0] and "symbolic link" in errors[0], cp.stderr
    assert "Traceback" not in cp.stderr
    assert "nfhooks ready" not in cp.stderr
    assert target.read_text() == "precious root data\n" and (target.stat().st_mode & 0o777) == 0o644
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert nfh_lines(lab) == []  # refused before any rule was installed
