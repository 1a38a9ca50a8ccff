"""Kernel tests: real namespaces, real iptables rules, real NFQUEUE, real traffic.

Helpers shared by the kernel tests; the namespace lab itself is the `nfh_lab` fixture that
nfhooks ships (nfhooks/testing.py) for anyone's tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
POLICIES = ROOT / "policies"
TEST_POLICIES = Path(__file__).parent / "policies"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/kernel" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)


def saved(lab, node: str = "router") -> str:
    """Both families' iptables-legacy-save output of a node (the view python-iptables writes to)."""
    return (lab.exec(node, "iptables-legacy-save").stdout + lab.exec(node, "ip6tables-legacy-save").stdout)


def nfh_lines(lab, node: str = "router") -> list[str]:
    return [line for line in saved(lab, node).splitlines() if "NFH-" in line or "nfhooks" in line]


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
    tool = "ip6tables-legacy-save" if family == 6 else "iptables-legacy-save"
    total = 0
    for line in lab.exec(node, tool, "-c").stdout.splitlines():
        if f'--comment "nfhooks {comment}"' in line:
            total += int(line.split("]")[0].strip("[").split(":")[0])
    return total
