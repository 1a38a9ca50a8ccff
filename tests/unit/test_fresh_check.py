"""`make fresh-check`'s pieces that can be checked in seconds: the script parses, the Make
target exists, and NFHOOKS_FRESH_CHECK=1 skips the compose-lab tests with their reason (the
full check itself, ~10 min as root, is `make fresh-check`, run by .ci/run)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "fresh_check.sh"


def test_script_parses_and_cleans_up_on_exit():
    cp = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    text = SCRIPT.read_text()
    assert "trap cleanup EXIT" in text and "rm -rf --one-file-system" in text
    assert "git -C \"$SRC\" archive HEAD" in text  # only the committed checkout goes in


def test_make_target_runs_the_script():
    cp = subprocess.run(["make", "-n", "-C", str(ROOT), "fresh-check"], capture_output=True, text=True,
                        timeout=30)
    assert "tools/fresh_check.sh" in cp.stdout, cp.stdout + cp.stderr


def test_fresh_check_env_skips_the_compose_lab_with_its_reason():
    env = {**os.environ, "NFHOOKS_FRESH_CHECK": "1"}
    cp = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                         "tests/containers/test_compose.py"], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "skipped" in cp.stdout and "passed" not in cp.stdout, cp.stdout
    assert "fresh-check chroot: the compose lab needs a dockerd of its own" in cp.stdout, cp.stdout
