"""pytest plugin for testing nfhooks policies (registered as the ``nfhooks`` pytest11 entry
point, so any project that installs nfhooks gets these fixtures).

Fixtures:

* ``nfh_lab`` -- a fresh `nfhooks.lab.Lab.router_topology()` per test (client, router,
  server, proxy in their own network namespaces), removed afterwards even if the test
  fails. Skips the test, with the reason, where namespaces cannot be made.
* ``nfh_netns_reason`` -- session-wide: why network namespaces are unavailable, or None.

pytest imports this module in every run of every project that has nfhooks installed, so it
imports nothing heavy at module level: the lab (and pyroute2) load only when a test asks
for a lab. ``fake_packet`` (from nfhooks.fake) is re-exported lazily.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from nfhooks.lab import Lab

__all__ = ["requires_netns", "nfh_lab", "nfh_netns_reason", "fake_packet"]

SKIP_PREFIX = "needs root with CAP_NET_ADMIN and network namespaces: "
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21  # creating and mounting a network namespace needs it too


def _effective_caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def requires_netns(probe: bool = True) -> str | None:
    """Why lab tests cannot run here (a skip reason), or None if they can.

    Cheap checks first (platform, capabilities, `ip`); with `probe`, also creates and
    removes a throw-away lab namespace and runs `true` in it, because containers often
    have the capabilities on paper but forbid the mounts or setns that namespaces need.
    """
    if not sys.platform.startswith("linux"):
        return SKIP_PREFIX + f"this is {sys.platform}, not Linux"
    caps = _effective_caps()
    missing = [
        name
        for bit, name in ((_CAP_NET_ADMIN, "CAP_NET_ADMIN"), (_CAP_SYS_ADMIN, "CAP_SYS_ADMIN"))
        if not caps >> bit & 1
    ]
    if missing:
        return SKIP_PREFIX + f"missing {', '.join(missing)} (euid {os.geteuid()})"
    if shutil.which("ip") is None:
        return SKIP_PREFIX + "the `ip` command (iproute2) is not installed"
    if not probe:
        return None
    try:
        from pyroute2 import netns

        from nfhooks.lab.topology import NS_MARKER
    except ImportError as exc:
        return SKIP_PREFIX + f"cannot import the lab ({exc})"
    name = f"{NS_MARKER}{os.environ.get('NFHOOKS_LAB_PREFIX', '')}probe{os.getpid()}-probe"
    try:
        netns.create(name)
    except Exception as exc:
        return SKIP_PREFIX + f"cannot create a network namespace ({exc!r})"
    try:
        cp = subprocess.run(
            ["ip", "netns", "exec", name, "true"], capture_output=True, text=True, timeout=10
        )
        if cp.returncode:
            return SKIP_PREFIX + f"`ip netns exec` fails: {cp.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as exc:
        return SKIP_PREFIX + f"`ip netns exec` fails: {exc!r}"
    finally:
        try:
            netns.remove(name)
        except OSError:
            pass
    return None


@pytest.fixture(scope="session")
def nfh_netns_reason() -> str | None:
    """Checked once per session; also clears labs of crashed earlier runs (only those whose
    owner process is gone -- labs of other live runs are left alone)."""
    reason = requires_netns()
    if reason is None:
        from nfhooks.lab import cleanup_stale

        cleanup_stale(orphans=False)
    return reason


@pytest.fixture
def nfh_lab(nfh_netns_reason: str | None) -> Iterator[Lab]:
    """The router topology (see nfhooks.lab.topology), closed after the test, pass or fail."""
    if nfh_netns_reason is not None:
        pytest.skip(nfh_netns_reason)
    from nfhooks.lab import Lab

    lab = Lab.router_topology()
    try:
        yield lab
    finally:
        lab.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failed test that used a lab, attach engine logs and the router's rules to the
    report while the lab still exists (teardown has not run yet)."""
    outcome: Any = yield
    rep = outcome.get_result()
    if rep.when != "call" or not rep.failed:
        return
    lab = getattr(item, "funcargs", {}).get("nfh_lab")
    if lab is None:
        return
    try:
        text = lab.debug_report()
    except Exception as exc:  # a report must never mask the failure itself
        text = f"(debug report failed: {exc!r})"
    rep.sections.append(("nfhooks lab", text))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "kernel: needs root, CAP_NET_ADMIN and network namespaces (real iptables, NFQUEUE, traffic)",
    )


def __getattr__(name: str) -> Any:
    """Lazy re-export of nfhooks.fake.fake_packet (imports scapy only when used)."""
    if name == "fake_packet":
        try:
            from nfhooks.fake import fake_packet
        except ImportError as exc:
            raise AttributeError(f"fake_packet is unavailable: {exc}") from exc
        return fake_packet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
