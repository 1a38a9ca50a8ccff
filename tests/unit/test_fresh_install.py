"""First contact: installing nfhooks prints no setuptools deprecation warning, and the wheel
carries programs.txt (the table nfhooks.programs reads).

Builds a wheel of a stub package with this checkout's pyproject.toml in a temp dir (about 2 s;
pip's build isolation fetches setuptools, from its cache or index: skipped when that fails).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_build_prints_no_deprecation_warning_and_ships_programs_txt(tmp_path):
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    pkg = tmp_path / "nfhooks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy(ROOT / "nfhooks" / "programs.txt", pkg / "programs.txt")
    cp = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "out"), "."],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = cp.stdout + cp.stderr
    if cp.returncode and ("Could not find a version" in out or "No matching distribution" in out
                          or "NewConnectionError" in out or "Network is unreachable" in out):
        pytest.skip(f"pip cannot fetch the build dependencies (offline?): {out.strip().splitlines()[-1]}")
    assert cp.returncode == 0, out[-2000:]
    assert "deprecat" not in out.lower(), out
    wheel = next((tmp_path / "out").glob("nfhooks-*.whl"))
    assert "nfhooks/programs.txt" in zipfile.ZipFile(wheel).namelist()
