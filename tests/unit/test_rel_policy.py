"""Loading a policy runs root's code (issue 13): only the checked source text may run.

* a ``__pycache__/*.pyc`` planted beside a policy in a sticky world-writable directory (another
  user can create it there) must never be executed, and loading writes no bytecode beside it;
* anything the module raises at import -- SystemExit, KeyboardInterrupt, any BaseException -- is
  a PolicyError naming file:line, so ``check``, ``run`` and a hot reload report it instead of
  dying.
"""

from __future__ import annotations

import importlib.util
import inspect
import marshal
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nfhooks import PolicyError, load_policy

NFHOOKS = Path(sys.executable).with_name("nfhooks")

REAL = textwrap.dedent('''\
    """The real policy: telnet is dropped."""
    from nfhooks import Policy, drop

    policy = Policy(name="realpolicy")


    @policy.input(proto="tcp", dport=23)
    def block_telnet(pkt):
        return drop()
    ''')

EVIL = textwrap.dedent('''\
    import pathlib
    pathlib.Path({marker!r}).write_text("ran as root")
    from nfhooks import Policy
    policy = Policy(name="evilpolicy")
    ''')


def plant_pyc(policy: Path, evil_source: str, uid: int | None = None) -> Path:
    """Write, as a hostile user would, bytecode that Python's import accepts for ``policy``:
    the timestamp-pyc header (magic, flags 0, the source's mtime and size) and other code."""
    st = policy.stat()
    cache = Path(importlib.util.cache_from_source(str(policy)))
    cache.parent.mkdir(exist_ok=True)
    code = compile(evil_source, str(policy), "exec")
    header = importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little") \
        + (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    cache.write_bytes(header + marshal.dumps(code))
    if uid is not None:
        os.chown(cache.parent, uid, uid)
        os.chown(cache, uid, uid)
    return cache


def sticky_dir(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o1777)  # like /tmp: anyone may create files, only owners replace them
    return d


def test_planted_pyc_is_not_run_by_load_policy(tmp_path):
    d = sticky_dir(tmp_path)
    pol = d / "pol.py"
    pol.write_text(REAL)
    marker = tmp_path / "pwned"
    plant_pyc(pol, EVIL.format(marker=str(marker)))
    p = load_policy(pol)
    assert not marker.exists(), "the planted bytecode ran"
    assert p.name == "realpolicy" and [h.name for h in p.handlers] == ["block_telnet"]
    assert p.description == "The real policy: telnet is dropped."


def test_loading_writes_no_bytecode_beside_the_policy(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as without PYTHONDONTWRITEBYTECODE
    d = sticky_dir(tmp_path)
    pol = d / "pol.py"
    pol.write_text(REAL)
    load_policy(pol)
    assert sorted(x.name for x in d.iterdir()) == ["pol.py"]


def test_handler_source_is_the_text_that_was_compiled(tmp_path):
    """inspect (verdict_calls, flow checks, tracebacks) sees the compiled text, not what the
    file says later."""
    pol = tmp_path / "pol.py"
    pol.write_text(REAL)
    p = load_policy(pol)
    pol.write_text("# replaced on disk after loading\n" * 20)
    src = inspect.getsource(p.handlers[0].func)
    assert "return drop()" in src
    assert p.handlers[0].where == f"{pol}:7"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the pyc is chowned to another user and "
                    "the point is code running as root")
def test_check_cli_ignores_a_pyc_planted_by_another_user(tmp_path):
    d = sticky_dir(tmp_path)
    pol = d / "pol.py"
    pol.write_text(REAL)
    os.chown(pol, 0, 0)
    pol.chmod(0o644)
    marker = tmp_path / "pwned"
    cache = plant_pyc(pol, EVIL.format(marker=str(marker)), uid=65534)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    cp = subprocess.run([str(NFHOOKS), "check", str(pol)], capture_output=True, text=True, timeout=60,
                        env=env, cwd=tmp_path)
    assert not marker.exists(), "the planted bytecode ran as root"
    assert cp.returncode == 0, cp.stderr
    assert "# policy realpolicy" in cp.stderr and "1 handler(s), OK" in cp.stderr, cp.stderr
    assert "block_telnet" in cp.stdout
    cache.unlink()
    cache.parent.rmdir()
    cp = subprocess.run([str(NFHOOKS), "check", str(pol)], capture_output=True, text=True, timeout=60,
                        env=env, cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    assert sorted(x.name for x in d.iterdir()) == ["pol.py"], "loading wrote bytecode beside the policy"


class Custom(BaseException):
    pass


@pytest.mark.parametrize("stmt, name", [
    ("raise SystemExit(3)", "SystemExit"),
    ("raise KeyboardInterrupt", "KeyboardInterrupt"),
    ("raise GeneratorExit('x')", "GeneratorExit"),
    ("class Custom(BaseException):\n    pass\nraise Custom('boom')", "Custom"),
    ("import sys\nsys.exit('bye')", "SystemExit"),
])
def test_any_base_exception_at_import_is_a_policy_error(tmp_path, stmt, name):
    pol = tmp_path / "pol.py"
    pol.write_text("from nfhooks import Policy\n\npolicy = Policy()\n" + stmt + "\n")
    line = 4 + stmt.count("\n")
    with pytest.raises(PolicyError) as ei:
        load_policy(pol)
    assert ei.value.file == str(pol) and ei.value.line == line, str(ei.value)
    assert name in str(ei.value) and str(ei.value).startswith(f"{pol}:{line}: ")
    assert not any(m.startswith("nfhooks_policy_") for m in sys.modules)


def test_base_exception_in_policy_construction_is_a_policy_error(tmp_path):
    pol = tmp_path / "pol.py"
    pol.write_text(textwrap.dedent('''\
        from nfhooks import Policy


        def conv(text):
            raise SystemExit(9)


        policy = Policy()
        port = policy.option("port", default="22", type=conv)
        '''))
    with pytest.raises(PolicyError) as ei:
        load_policy(pol)
    assert "SystemExit" in str(ei.value) and ei.value.file == str(pol) and ei.value.line in (5, 9)
    pol.write_text(pol.read_text().replace('default="22", ', 'default=22, '))
    with pytest.raises(PolicyError) as ei:  # the --set value goes through the same conversion
        load_policy(pol, {"port": "2222"})
    assert "SystemExit" in str(ei.value) and ei.value.file == str(pol), str(ei.value)


def test_check_cli_reports_system_exit_at_import(tmp_path):
    pol = tmp_path / "pol.py"
    pol.write_text("from nfhooks import Policy\npolicy = Policy()\nraise SystemExit(0)\n")
    cp = subprocess.run([str(NFHOOKS), "check", str(pol)], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and f"{pol}:3" in cp.stderr and "SystemExit" in cp.stderr, cp.stderr


def test_policy_source_encoding_and_dataclasses_still_work(tmp_path):
    """What importlib's loader did and the loader must still do: PEP 263 coding cookies and a
    BOM, ``__file__``, and a module registered while it runs (dataclasses look it up)."""
    pol = tmp_path / "pol.py"
    pol.write_bytes(textwrap.dedent('''\
        # -*- coding: latin-1 -*-
        """Caf\xe9 policy."""
        from __future__ import annotations
        from dataclasses import dataclass
        from nfhooks import Policy, accept

        @dataclass
        class Limit:
            port: int

        LIMIT = Limit(22)
        HERE = __file__
        policy = Policy()

        @policy.input(proto="tcp", dport=LIMIT.port)
        def ssh(pkt):
            return accept()
        ''').encode("latin-1"))
    p = load_policy(pol)
    assert p.description == "Caf\xe9 policy." and [h.name for h in p.handlers] == ["ssh"]
    pol.write_bytes(b"\xef\xbb\xbf" + b"from nfhooks import Policy\npolicy = Policy(name='bom')\n")
    assert load_policy(pol).name == "bom"


def test_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "pol.py"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match="not a regular file"):
        load_policy(fifo)
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "missing.py")
