"""The CLI's pure commands: check needs neither root nor python-iptables."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nfhooks", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_check_prints_rules_and_never_imports_python_iptables():
    code = ("import sys\nfrom nfhooks.cli import app\n"
            "try:\n app(['check', 'policies/firewall.py'])\nexcept SystemExit as e:\n assert not e.code, e.code\n"
            "assert 'iptc' not in sys.modules and 'netfilterqueue' not in sys.modules, 'imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "-j NFQUEUE --queue-num" in r.stdout and "# ip6tables" in r.stdout


def test_check_errors_exit_2_without_traceback():
    r = run("check", "policies/firewall.py", "--set", "trusted=nonsense")
    assert r.returncode == 2 and "trusted" in r.stderr and "Traceback" not in r.stderr
    r = run("check", "tests/unit/policies/reject_prerouting.py")
    assert r.returncode == 2 and "reject_prerouting.py:9" in r.stderr


def test_hooks_command_explains_placements():
    r = run("hooks")
    assert r.returncode == 0 and "masquerade" in r.stdout and "POSTROUTING" in r.stdout


def test_every_example_policy_checks():
    for p in sorted((ROOT / "policies").glob("*.py")):
        r = run("check", str(p.relative_to(ROOT)))
        assert r.returncode == 0, (p, r.stderr)
