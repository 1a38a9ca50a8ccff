"""The layer contracts of .importlinter hold (import-linter, in `make test`): the packet and
policy vocabulary at the bottom, the compiler, the features (independent of each other), the
kernel adapters, the engine, the commands on top; python-iptables, NetfilterQueue and pyroute2
each imported in one adapter only. docs/architecture.md says why each layer is where it is."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _lint():
    from importlinter.application.use_cases import lint_imports
    from importlinter.configuration import configure

    configure()  # what the lint-imports command does first
    return lint_imports


def test_import_contracts_are_kept(capsys, monkeypatch):
    lint = _lint()
    monkeypatch.chdir(ROOT)
    ok = lint(config_filename=str(ROOT / ".importlinter"), cache_dir=None, no_logo=True)
    out = capsys.readouterr().out
    assert ok, out
    assert "0 broken" in out and "kept" in out


def test_the_contracts_can_fail(tmp_path, capsys, monkeypatch):
    """A contract that the code breaks is reported broken (the check is not vacuous)."""
    lint = _lint()
    bad = tmp_path / "bad.ini"
    bad.write_text("[importlinter]\nroot_package = nfhooks\n\n[importlinter:contract:x]\nname = engine below "
                   "policy\ntype = layers\nlayers =\n    nfhooks.policy\n    nfhooks.engine\n")
    monkeypatch.chdir(ROOT)
    assert not lint(config_filename=str(bad), cache_dir=None, no_logo=True)
    assert "BROKEN" in capsys.readouterr().out
    assert os.path.exists(ROOT / ".importlinter")


def test_every_module_has_a_layer():
    """A module outside every layer is checked by no layer contract: place each new one."""
    import re

    text = (ROOT / ".importlinter").read_text()
    block = text.split("layers =", 1)[1].split("\n\n", 1)[0]
    placed = {p.strip() for line in block.splitlines() for p in re.split(r"[|:]", line) if p.strip()}
    pkg = ROOT / "nfhooks"
    modules = {p.stem for p in pkg.glob("*.py") if p.stem not in ("__init__", "__main__")}
    modules |= {p.name for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").exists() and p.name != "features"}
    modules |= {f"features.{p.stem}" for p in (pkg / "features").glob("*.py") if p.stem != "__init__"}
    assert sorted(modules - placed) == []
