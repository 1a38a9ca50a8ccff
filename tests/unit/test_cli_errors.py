"""No nfhooks command prints a traceback for bad input: a one-line `nfhooks: error: ...`, exit 2.

Every command is discovered from the typer app (a new one is covered without editing this),
then given an unknown option, each value-taking option without its value, and each numeric
option a word. All of these fail while the command line is parsed, before any command body
runs, so nothing is installed or removed anywhere. The semantic cases below (a bad --url, a
bad --mark-mask, ...) are chosen to fail before anything touches the system.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from nfhooks import cli

ROOT = Path(__file__).resolve().parents[2]


def _commands() -> list[tuple[tuple[str, ...], object]]:
    """(path, command) for every command and group of the app, depth first."""
    out: list[tuple[tuple[str, ...], object]] = []

    def walk(path: tuple[str, ...], cmd: object) -> None:
        out.append((path, cmd))
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            walk((*path, name), sub)

    walk((), typer.main.get_command(cli.app))
    return [(p, c) for p, c in out if p]


COMMANDS = _commands()


def _value_options(cmd: object) -> list[object]:
    return [p for p in getattr(cmd, "params", [])
            if getattr(p, "param_type_name", "") == "option" and not getattr(p, "is_flag", False)
            and not getattr(p, "hidden", False) and "--help" not in p.opts]


def _numeric(param: object) -> bool:
    return getattr(getattr(param, "type", None), "name", "") in ("integer", "float")


def _cases() -> list[tuple[str, list[str]]]:
    cases = []
    for path, cmd in COMMANDS:
        name = " ".join(path)
        cases.append((f"{name}: unknown option", [*path, "--no-such-option-xyz"]))
        for opt in _value_options(cmd):
            flag = max(opt.opts, key=len)
            cases.append((f"{name}: {flag} without a value", [*path, flag]))
            if _numeric(opt):
                cases.append((f"{name}: {flag} not a number", [*path, flag, "many", "--no-such-option-xyz"]))
    return cases


def invoke(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the console script's main in-process: anything but SystemExit is a traceback."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    captured = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 0 if code is None else 1), captured.out + captured.err


def test_every_command_is_found():
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"check", "run", "rules", "flush", "top", "hooks", "lab", "lab exec", "lab down", "tunnel",
            "reload"} <= names, names


@pytest.mark.parametrize("argv", [c[1] for c in _cases()], ids=[c[0] for c in _cases()])
def test_bad_arguments_give_one_line_and_exit_2(argv, capsys):
    code, out = invoke(argv, capsys)
    assert code == 2, out
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nfhooks: error: "), out


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_works_for_every_command(path, capsys):
    code, out = invoke([*path, "--help"], capsys)
    assert code == 0 and "Traceback" not in out and "Usage" in out, out


#: bad values that get past parsing; each fails before anything on the system is touched
SEMANTIC = [
    (["top", "--once", "--url", "garbage"], "--url 'garbage'"),
    (["top", "--once", "--url", "http://[::1"], "not a valid URL"),
    (["top", "--once", "--url", "http://127.0.0.1:notaport/metrics"], "not a valid URL"),
    (["top", "--interval", "0", "--url", "http://127.0.0.1:9/metrics"], "--interval"),
    (["check", "policies/firewall.py", "--set", "novalue"], "key=value"),
    (["check", "policies/firewall.py", "--mark-mask", "zz"], "--mark-mask"),
    (["check", "policies/no-such-file.py"], "not found"),
    (["check", "policies/firewall.py", "--fail-open", "--fail-closed"], "exclude each other"),
    (["tunnel", "--listen", "garbage", "--peer", "garbage"], "tunnel"),
]


@pytest.mark.parametrize("argv,says", SEMANTIC, ids=[" ".join(a) for a, _ in SEMANTIC])
def test_bad_values_give_one_line_and_exit_2(argv, says, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out = invoke(argv, capsys)
    assert code == 2, out
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nfhooks: error: ") and says in lines[0], out


def test_top_on_a_port_where_nothing_listens(capsys):
    code, out = invoke(["top", "--once", "--url", "http://127.0.0.1:9/metrics"], capsys)
    assert code == 2 and "cannot read" in out and "Traceback" not in out, out


def test_console_script_prints_one_line(tmp_path):
    """The real entry point (python -m nfhooks), as a user types it."""
    env = {**os.environ, "NFHOOKS_LAB_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "80"}
    for argv, says in ((["check", "policies/firewall.py", "--set"], "'--set' requires an argument"),
                       (["lab", "exec", "client", "--", "true"], "no kept lab")):
        cp = subprocess.run([sys.executable, "-m", "nfhooks", *argv], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=60)
        assert cp.returncode == 2, cp.stderr
        assert cp.stderr.strip().splitlines() == [cp.stderr.strip()] and says in cp.stderr, cp.stderr
        assert "Traceback" not in cp.stdout + cp.stderr
