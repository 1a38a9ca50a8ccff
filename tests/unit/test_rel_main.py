"""`python -m nfhooks` run from a directory other users can write to does not import modules
planted there (python -m puts the current directory first on sys.path)."""

from __future__ import annotations

import subprocess
import sys


def test_python_m_ignores_modules_planted_in_the_current_directory(tmp_path):
    marker = tmp_path / "planted-ran"
    for name in ("typer", "rich", "iptc", "scapy"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    cp = subprocess.run([sys.executable, "-m", "nfhooks", "hooks"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert not marker.exists(), marker.read_text()
