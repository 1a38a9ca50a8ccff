"""Kernel tests: real namespaces, real iptables rules, real NFQUEUE, real traffic.

Helpers shared by the kernel tests; the namespace lab itself is the `nfh_lab` fixture that
nfhooks ships (nfhooks/testing.py) for anyone's tests.

Every kernel test that installs rules runs twice, once per rule backend (``[legacy]`` and
``[nft]`` in its name): the autouse ``nfh_backend`` fixture sets ``NFHOOKS_BACKEND`` for the
test process, and the lab passes ``os.environ`` to every engine and ``nfhooks`` command it
starts. The helpers below read the rules with that backend's own save tool, so a test asserts
what a user of that backend would see.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
POLICIES = ROOT / "policies"
TEST_POLICIES = Path(__file__).parent / "policies"

BACKENDS = ("legacy", "nft")
#: The save tool of each backend, per family: python-iptables writes legacy xtables,
#: iptables-nft-restore writes nf_tables (through nft_compat).
SAVE_TOOLS = {"legacy": {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"},
              "nft": {4: "iptables-nft-save", 6: "ip6tables-nft-save"}}
IPTABLES = {"legacy": {4: "iptables-legacy", 6: "ip6tables-legacy"},
            "nft": {4: "iptables-nft", 6: "ip6tables-nft"}}
#: Tests that never install a rule (refused before, no engine, no lab): run once, with the
#: environment's NFHOOKS_BACKEND (or none), to keep the doubled suite short.
NO_RULES = frozenset({
    "test_config_message_acked_and_refusals_reported",
    "test_reload_without_engine_says_so",
    "test_bad_policy_and_not_root_errors_are_one_paragraph",
    "test_route_refused_where_routing_is_decided",
    "test_nat_client_asks_the_main_process_once_per_target",
    "test_lab_down_only_touches_its_own_prefix",
    "test_run_refuses_a_pcap_path_planted_as_a_symlink",
})


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/kernel" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)


def _chosen_by_the_test(metafunc: pytest.Metafunc) -> bool:
    """Whether the test parametrizes ``nfh_backend`` itself (test_backend_isolation.py)."""
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if "nfh_backend" in ([n.strip() for n in names.split(",")] if isinstance(names, str) else names):
            return True
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Both backends for every kernel test that installs rules (ids ``legacy``/``nft``)."""
    if ("nfh_backend" in metafunc.fixturenames and metafunc.function.__name__ not in NO_RULES
            and not _chosen_by_the_test(metafunc)):
        metafunc.parametrize("nfh_backend", BACKENDS, ids=BACKENDS, indirect=True)


def backend_missing(name: str) -> str | None:
    """Why the ``name`` backend cannot run here (a skip reason), or None."""
    if importlib.util.find_spec("nfhooks.backends") is None:
        return "this nfhooks has no rule backends yet (nfhooks/backends/ is missing): NFHOOKS_BACKEND is ignored"
    missing = [t for t in (*SAVE_TOOLS[name].values(), f"{IPTABLES[name][4]}-restore") if shutil.which(t) is None]
    if missing:
        return f"the {name} backend needs {', '.join(missing)} (Debian package iptables)"
    return None


@pytest.fixture(autouse=True)
def nfh_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The rule backend of this test (NFHOOKS_BACKEND), or None for tests that install none."""
    name = getattr(request, "param", None)
    if name is None:
        return os.environ.get("NFHOOKS_BACKEND")
    reason = backend_missing(name)
    if reason is not None and name != "legacy":
        pytest.skip(reason)
    monkeypatch.setenv("NFHOOKS_BACKEND", name)
    return name


def current_backend() -> str:
    """The backend the test process runs nfhooks with ("legacy", "nft" or "auto")."""
    name = os.environ.get("NFHOOKS_BACKEND", "auto")
    return name if name in BACKENDS else "auto"


def save(lab, node: str = "router", family: int = 4, *args: str, backend: str | None = None) -> str:
    """``ip(6)tables-<backend>-save ARGS`` in a node, without the tools' warning lines
    (iptables-nft-save warns that legacy tables exist). For "auto": both views."""
    name = backend or current_backend()
    names = BACKENDS if name == "auto" else (name,)
    out = ""
    for b in names:
        cp = lab.exec(node, SAVE_TOOLS[b][family], *args, check=False)
        if cp.returncode and b == name:
            raise RuntimeError(f"{SAVE_TOOLS[b][family]} failed in {node}: {cp.stderr.strip()}")
        out += "".join(line + "\n" for line in cp.stdout.splitlines() if not line.startswith("# Warning"))
    return out


def saved(lab, node: str = "router", *args: str, backend: str | None = None) -> str:
    """Both families' save output of a node, read with the test's backend."""
    return save(lab, node, 4, *args, backend=backend) + save(lab, node, 6, *args, backend=backend)


def nfh_lines(lab, node: str = "router", backend: str | None = None) -> list[str]:
    return [line for line in saved(lab, node, backend=backend).splitlines() if "NFH-" in line or "nfhooks" in line]


def ipt(family: int = 4) -> str:
    """The iptables command of the test's backend, for another tool's rules next to ours."""
    b = current_backend()
    return IPTABLES["legacy" if b == "auto" else b][family]


def metric(lab, name: str, node: str = "router", port: int = 9477, **labels: str) -> float:
    """Sum of a metric's samples matching ``labels``, scraped over HTTP inside the node."""
    text = lab.exec(node, "curl", "-s", "-m", "2", f"http://127.0.0.1:{port}/metrics").stdout
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def rule_counter(lab, comment: str, node: str = "router", family: int = 4) -> int:
    """Packet counter of our rule tagged ``nfhooks <comment>`` (summed over tables)."""
    total = 0
    for line in save(lab, node, family, "-c").splitlines():
        if f'--comment "nfhooks {comment}"' in line:
            total += int(line.split("]")[0].strip("[").split(":")[0])
    return total


@pytest.fixture
def rs_lab(nfh_netns_reason):
    """The routing/shaping lab (nfhooks/lab/routeshape.py: client -- router == up1/up2 == far),
    for one engine's tests and --workers' alike."""
    from nfhooks.lab.routeshape import build_lab

    if nfh_netns_reason is not None:
        pytest.skip(nfh_netns_reason)
    lab = build_lab()
    try:
        yield lab
    finally:
        lab.close()
