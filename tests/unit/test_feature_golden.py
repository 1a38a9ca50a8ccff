"""`nfhooks check` output of every shipped policy, byte for byte, against golden files.

Pins what a refactoring of the compiler must not move: the mark layout (field order and
bits), chain names, rule order and comments, the routing/shaping commands `check` prints.
Regenerate (only when a change of that output is intended) with
``NFHOOKS_GOLDEN_UPDATE=1 .venv/bin/python -m pytest tests/unit/test_feature_golden.py``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nfhooks.cli import app

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden"

POLICY_FILES = sorted([*(ROOT / "policies").glob("*.py"), *(ROOT / "tests/kernel/policies").glob("*.py"),
                       GOLDEN / "kitchen_sink.py"])
#: Variants of the command line every policy is checked with (besides the defaults).
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "open-q100": ["--fail-open", "--queue-base", "100"],
    "closed-narrow": ["--fail-closed", "--mark-mask", "0xffffff00", "--nat-targets", "7"],
    "low-mask": ["--mark-mask", "0x0000ffff", "--nat-targets", "1000"],
    "wide": ["--mark-mask", "0xfffffff0", "--nat-targets", "3"],
}
#: Per-policy --set variants (options whose value reaches a rule or a routing/shaping command).
SETS: dict[str, list[str]] = {
    "firewall": ["trusted=192.168.0.0/16", "ssh_port=2200"],
    "nat": ["wan=eth9", "forward_port=8022", "inside=[2001:db8::10]:22"],
    "uplinks": ["gw2=10.0.12.9", "lan=br0", "balanced_ports=8081,8082"],
    "shaping": ["dev=eth3"],
    "lab": ["wan_if=eth1", "lan_if=eth0", "dnat_dst=192.0.2.99"],
    "loadbalance": ["vip=10.0.0.80/32", "port=8000"],
    "kitchen_sink": ["lan=br0", "gw=10.0.12.7"],
    "mangle": ["mss=1300", "voice_port=5070"],
}


def cases() -> list[tuple[str, Path, list[str]]]:
    out = []
    for p in POLICY_FILES:
        prefix = "k_" if p.parent.name == "policies" and p.parent.parent.name == "kernel" else ""
        for v, args in VARIANTS.items():
            out.append((f"{prefix}{p.stem}.{v}", p, args))
        if p.stem in SETS:
            wide = VARIANTS["wide"] if p.stem == "kitchen_sink" else []  # it needs more than 16 bits
            out.append((f"{prefix}{p.stem}.set", p, [*wide, *(a for s in SETS[p.stem] for a in ("--set", s))]))
    return out


def run_check(path: Path, args: list[str]) -> str:
    """What a user sees: exit code, stderr, stdout (the repository's path made relative)."""
    r = CliRunner().invoke(app, ["check", str(path), *args], catch_exceptions=False)
    text = f"# exit {r.exit_code}\n# --- stderr\n{r.stderr}# --- stdout\n{r.stdout}"
    return text.replace(str(ROOT) + "/", "")


@pytest.fixture(autouse=True)
def _legacy_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NFHOOKS_BACKEND", "legacy")


@pytest.mark.parametrize("name,path,args", cases(), ids=[c[0] for c in cases()])
def test_check_output_matches_golden(name: str, path: Path, args: list[str]) -> None:
    got = run_check(path, args)
    golden = GOLDEN / f"{name}.txt"
    if os.environ.get("NFHOOKS_GOLDEN_UPDATE"):
        golden.write_text(got)
    assert golden.exists(), f"no golden file {golden.name}: run with NFHOOKS_GOLDEN_UPDATE=1 once"
    assert got == golden.read_text()


def test_golden_cases_cover_features() -> None:
    """The goldens must exercise every feature's mark fields, or they pin nothing."""
    text = "".join((GOLDEN / f"{n}.txt").read_text() for n, _, _ in cases())
    for field in ("nat ", "flowgen", "flow:INPUT:orig", "flow:FORWARD:reply", "route ", "class "):
        assert re.search(rf"# mark layout: .*{re.escape(field)}", text), field
    assert "# exit 2" in text and "# exit 0" in text
