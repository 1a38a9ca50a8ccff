"""Loading a policy file: root runs exactly the source text it checked, nothing else.

A policy runs as root, so the loader does not go through ``importlib``'s file loader: that
loader prefers ``__pycache__/<name>.cpython-3X.pyc`` when its header carries the source's
mtime and size, and anyone who can create files beside the policy (a sticky world-writable
directory such as /tmp, which :func:`check_permissions` accepts for a root-owned file) could
plant bytecode that then runs instead of the source. It would also write bytecode there.

Instead: the real path is opened once (``O_NOFOLLOW``: the last component cannot be swapped
for a symlink after it was resolved), the permission checks run on ``fstat`` of that very file
descriptor (no check/use race on the file), its bytes are read from the descriptor, compiled
with ``compile()`` and executed in a fresh module object. ``linecache`` is given the exact
text that was compiled, so ``inspect.getsource`` (the verdict scan, flow checks) and
tracebacks show what runs, not what the file says later.

Anything the module raises while it executes -- ``SystemExit``, ``KeyboardInterrupt``, any
``BaseException`` -- is a :class:`PolicyError` naming file:line: ``check`` and ``run`` report
it, a hot reload keeps the running policy. Only the engine's own ``HandlerTimeout`` passes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import linecache
import os
import stat
import sys
import traceback
import types
from pathlib import Path

from .errors import PolicyError
from .policy import Policy
from .watchdog import HandlerTimeout

__all__ = ["check_permissions", "load_policy", "read_policy_source"]


def check_permissions(path: Path, opened: os.stat_result | None = None) -> None:
    """Refuse a policy others could have changed, like sshd's StrictModes.

    A policy is code that runs as root with CAP_NET_ADMIN: a file (or a directory holding it)
    writable by other users is a privilege escalation waiting to happen. Symlinks are followed,
    so a Kubernetes ConfigMap mount (root-owned read-only files behind ``..data`` symlinks, in a
    sticky directory) is accepted: a sticky directory is fine when the file is owned by root or
    by us, because nobody else can replace it there. ``opened`` is ``fstat`` of the file
    descriptor the source is read from: the file checked is then the file that runs.
    """
    real = path.resolve()
    me = os.geteuid()
    st = opened if opened is not None else real.stat()
    if st.st_uid not in (0, me):
        raise PolicyError(f"refusing a policy owned by uid {st.st_uid} (not root, not us): it runs as root; "
                          f"chown root:root {real}", str(path))
    if st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid != 0):
        raise PolicyError(f"refusing a policy writable by other users (mode {stat.filemode(st.st_mode)}): "
                          f"it runs as root; chmod go-w {real}", str(path))
    for d in real.parents:
        ds = d.stat()
        if ds.st_mode & stat.S_ISVTX:
            continue  # sticky: only the file's owner (root or us, checked above) may replace it
        if ds.st_mode & stat.S_IWOTH:
            raise PolicyError(f"refusing a policy in {d}, a directory every user can write to (mode "
                              f"{stat.filemode(ds.st_mode)}): anyone could swap the file; chmod o-w {d}",
                              str(path))
        if ds.st_mode & stat.S_IWGRP and ds.st_gid != 0:
            raise PolicyError(f"refusing a policy in {d}, a directory group {ds.st_gid} can write to (mode "
                              f"{stat.filemode(ds.st_mode)}): its members could swap the file; chmod g-w {d}",
                              str(path))
        if ds.st_uid not in (0, me):
            raise PolicyError(f"refusing a policy in {d}, a directory owned by uid {ds.st_uid} (not root, "
                              f"not us): its owner could swap the file; move the policy or chown root:root {d}",
                              str(path))


def read_policy_source(path: str | Path) -> bytes:
    """The bytes of a policy file, read through one descriptor whose ``fstat`` passed the
    permission checks (a regular file; the last path component is not followed if it is a
    symlink swapped in after the path was resolved)."""
    p = Path(path)
    shown = str(path)
    real = os.path.realpath(p)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PolicyError(f"policy file not found (looked for {real})", shown) from None
    except OSError as e:
        raise PolicyError(f"cannot open the policy: {e.strerror} ({real})", shown) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise PolicyError(f"policy file not found (looked for {real}: {what})", shown)
        check_permissions(p, st)
        try:
            now = os.stat(real)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise PolicyError(f"the policy file was replaced while it was being read ({real})", shown)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _error_location(exc: BaseException, path: str) -> int | None:
    if isinstance(exc, SyntaxError) and exc.lineno:
        return exc.lineno
    line = None
    want = Path(path).resolve()
    for fs in traceback.extract_tb(exc.__traceback__):
        if Path(fs.filename).resolve() == want:
            line = fs.lineno
    return line


def _what(exc: BaseException) -> str:
    text = str(exc)
    return type(exc).__name__ + (f": {text}" if text else "")


def _execute(code: types.CodeType, module: types.ModuleType, p: Path, shown: str) -> None:
    """Run the policy's code in ``module``; every way it can fail is a PolicyError."""
    sys.modules[module.__name__] = module  # dataclasses and typing look the module up by name
    try:
        exec(code, module.__dict__)  # noqa: S102 -- a policy is root's code, checked above
    except PolicyError as e:
        raise PolicyError(e.message, _rel(e.file, p, shown), e.line) from None
    except HandlerTimeout:
        raise
    except BaseException as e:  # noqa: BLE001 -- SystemExit, KeyboardInterrupt ...: the policy's error
        raise PolicyError(f"{_what(e)} while importing the policy", shown,
                          _error_location(e, str(p))) from None
    finally:
        sys.modules.pop(module.__name__, None)


def load_policy(path: str | Path, overrides: dict[str, str] | None = None) -> Policy:
    """Compile and run a policy file's checked source; its validated ``Policy``, options applied."""
    p = Path(path)
    shown = str(path)
    data = read_policy_source(p)
    filename = str(p)
    try:
        text = importlib.util.decode_source(data)  # PEP 263 coding cookie, BOM, newlines
        code = compile(text, filename, "exec", dont_inherit=True)
    except SyntaxError as e:
        raise PolicyError(f"syntax error: {e.msg}", shown, e.lineno) from None
    except (UnicodeDecodeError, ValueError) as e:  # bad encoding, NUL bytes
        raise PolicyError(f"cannot be compiled: {e}", shown) from None
    modname = "nfhooks_policy_" + hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:12]
    module = types.ModuleType(modname)
    module.__file__ = filename
    # mtime None: linecache.checkcache keeps the entry, so nothing re-reads the file on disk
    previous = linecache.cache.get(filename)
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    try:
        _execute(code, module, p, shown)
        pol = _finish(module, p, shown, overrides or {})
    except BaseException:
        if previous is not None:  # a failed reload: the running policy's source stays visible
            linecache.cache[filename] = previous
        else:
            linecache.cache.pop(filename, None)
        raise
    return pol


def _finish(module: types.ModuleType, p: Path, shown: str, overrides: dict[str, str]) -> Policy:
    pol = getattr(module, "policy", None)
    if not isinstance(pol, Policy):
        raise PolicyError("defines no `policy = Policy(...)` at module level", shown)
    pol.file = shown
    for h in pol.handlers:
        h.file = _rel(h.file, p, shown)
    for o in pol.options.values():
        o.file = _rel(o.file, p, shown)
    if pol.name is None:
        pol.name = p.stem
    doc = module.__dict__.get("__doc__")
    if not pol.description and isinstance(doc, str) and doc.strip():
        pol.description = doc.strip().splitlines()[0]
    try:
        pol.apply_overrides(overrides)
    except PolicyError:
        raise
    except HandlerTimeout:
        raise
    except BaseException as e:  # noqa: BLE001 -- an option's own converter raised
        raise PolicyError(f"{_what(e)} while applying the --set options", shown,
                          _error_location(e, str(p))) from None
    return pol


def _rel(file: str | None, real: Path, shown: str) -> str:
    if file and Path(file).resolve() == real.resolve():
        return shown
    return file or shown
