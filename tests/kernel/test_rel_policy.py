"""A hot reload of a policy that raises SystemExit / KeyboardInterrupt at import (issue 13).

Before, the loader caught ``Exception`` only: the BaseException went up through the engine's
reload and ended the engine (`nfhooks reload` then waited and said "did not answer"). Now the
reload fails like any broken policy: exit 1 with file:line, the engine keeps running, the old
policy keeps deciding -- checked with real datagrams over IPv4 and IPv6, one the old policy
accepts, one it drops by default -- and the reload-failure counter rises.
"""

from __future__ import annotations

import sys

import pytest

from .conftest import metric

OPEN, CLOSED = 7311, 7312
GOOD = f'''\
from nfhooks import Policy, accept

policy = Policy("rel-policy-good", defaults={{"INPUT": "drop"}})


@policy.input(proto="udp", dport={OPEN})
def udp_open(pkt):
    return accept()


@policy.input(iif="lo")
def loopback(pkt):  # the metrics scrape (curl to 127.0.0.1 in the router)
    return accept()


@policy.input(proto="icmpv6")
def ndp(pkt):  # neighbour discovery: without it IPv6 stops altogether
    return accept()
'''

BAD = '''\
from nfhooks import Policy, accept

policy = Policy("rel-policy-bad")  # INPUT accepts everything, if this ever got installed
{stmt}
'''


def reload(lab):
    return lab.exec("router", sys.executable, "-m", "nfhooks", "reload", "--timeout", "15",
                    check=False, timeout=60)


def outcomes(lab) -> dict[tuple[int, int], bool]:
    """(family, port) -> whether a datagram from the client to the router came back."""
    out = {}
    for fam in (4, 6):
        router = lab.addr("router", fam, facing="client")
        for port in (OPEN, CLOSED):
            out[fam, port] = lab.udp_send("client", router, port, f"probe {fam} {port}", timeout=1.0) is not None
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stmt", ["raise SystemExit(3)", "raise KeyboardInterrupt"])
def test_reload_of_a_policy_raising_base_exception_keeps_the_old_policy(nfh_lab, tmp_path, stmt):
    lab = nfh_lab
    pol = tmp_path / "pol.py"
    pol.write_text(GOOD)
    pol.chmod(0o644)
    servers = [lab.udp_server("router", port, fam, bind=lab.addr("router", fam, facing="client"))
               for fam in (4, 6) for port in (OPEN, CLOSED)]
    eng = lab.start_engine(str(pol))
    expected = {(4, OPEN): True, (4, CLOSED): False, (6, OPEN): True, (6, CLOSED): False}
    assert outcomes(lab) == expected

    for attempt in (1, 2):
        pol.write_text(BAD.format(stmt=stmt))
        r = reload(lab)
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert "reload failed" in r.stderr and f"{pol}:4" in r.stderr, r.stderr
        assert stmt.split()[1].split("(")[0] in r.stderr, r.stderr  # SystemExit / KeyboardInterrupt
        assert eng.running(), eng.log()
        assert outcomes(lab) == expected  # the old policy decides: still default drop
        assert metric(lab, "nfhooks_policy_reload_errors_total") == attempt
        assert metric(lab, "nfhooks_policy_info", policy="rel-policy-good") == 1

    closed = [s for s in servers if s.port == CLOSED]
    assert all(s.datagrams() == [] for s in closed), "a datagram the old policy drops arrived"
    assert eng.stop() == 0
    assert "Traceback" not in eng.log()
