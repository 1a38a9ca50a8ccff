"""The kernel side of address sets: the ``ipset`` program (Debian package ``ipset``).

Two ways in, measured (tests/kernel/test_sets_kernel.py prints the figures):

* ``ipset -exist restore`` fed text: one call per change batch (create, the declared entries,
  destroy) -- 100,000 entries in about 0.3 s;
* one long-lived ``ipset -exist -`` (ipset's interactive mode) per engine for what handlers
  do per packet (add, del, test, list -t): a command is one line on a pipe and its answer
  ends with ipset's prompt, about 15 us a round trip, so ``add()`` returns once the entry is
  in the kernel. ipset prints the prompt through stdio, which buffers on a pipe; ``stdbuf -o0``
  makes each prompt arrive when its command is done -- the acknowledgement we wait for.
  (pyroute2's IPSet netlink took ~150 us per add here, and a subprocess per add ~0.9 ms.)

Only literal addresses reach ipset (sets.parse_entry), so it never resolves a name.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import threading
import time
from typing import Iterable

from .errors import KernelError

__all__ = ["PREFIX", "IpsetShell", "available", "destroy_ours", "list_ours", "restore"]

PREFIX = "nfh-"
PROMPT = b"ipset> "


def available() -> bool:
    return shutil.which("ipset") is not None


def _need() -> None:
    if not available():
        raise KernelError("address sets need the ipset program: install Debian's ipset package (make deps)")


def restore(lines: Iterable[str]) -> None:
    """One ``ipset -exist restore`` of ``lines`` (create, add, del, flush, destroy)."""
    _need()
    text = "".join(line + "\n" for line in lines)
    if not text:
        return
    cp = subprocess.run(["ipset", "-exist", "restore"], input=text, capture_output=True, text=True, timeout=120)
    if cp.returncode:
        raise KernelError(f"ipset restore failed: {cp.stderr.strip()}")


def list_ours() -> list[str]:
    """The names of nfhooks' sets in this namespace (``ipset list -n``, our prefix)."""
    if not available():
        return []
    cp = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, timeout=30)
    if cp.returncode:
        raise KernelError(f"ipset list failed: {cp.stderr.strip()}")
    return [n for n in cp.stdout.split() if n.startswith(PREFIX)]


def destroy_ours(keep: Iterable[str] = ()) -> list[str]:
    """Destroy our sets except ``keep``; what was destroyed (``ipset destroy NAME`` each), and
    raises KernelError naming a set the kernel would not destroy (a rule still uses it)."""
    keep = set(keep)
    done, failed = [], []
    for name in list_ours():
        if name in keep:
            continue
        cp = subprocess.run(["ipset", "destroy", name], capture_output=True, text=True, timeout=30)
        if cp.returncode:
            failed.append(f"{name}: {cp.stderr.strip()}")
        else:
            done.append(name)
    if failed:
        raise KernelError(f"could not destroy ipset {'; '.join(failed)} (destroyed: {', '.join(done) or 'none'})")
    return [f"ipset destroy {n}" for n in done]


class IpsetShell:
    """One ``ipset -exist -`` process; ``run(line)`` returns its answer, thread-safe (the
    engine loop and a metrics scrape share it). Started on first use, ended by ``close()``.

    Per process: a ``--workers`` worker is forked with the main process's shell object, and two
    processes writing one shell's stdin would read each other's answers. So a process that did
    not start the shell it holds starts its own (with a fresh lock: the inherited one may have
    been held by a thread that does not exist in the child) and never ends the other's."""

    TIMEOUT = 5.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = os.getpid()

    def _mine(self) -> None:
        """Forget a shell (and lock) inherited from the process this one was forked from."""
        if self._owner != os.getpid():
            self._lock, self._proc, self._owner = threading.Lock(), None, os.getpid()

    def _start(self) -> subprocess.Popen[bytes]:
        _need()
        argv = ["stdbuf", "-o0", "ipset", "-exist", "-"]  # stdbuf: coreutils
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             bufsize=0, close_fds=True)
        self._proc = p
        self._read(p)  # the first prompt
        return p

    def _read(self, p: subprocess.Popen[bytes]) -> str:
        assert p.stdout is not None
        fd, buf = p.stdout.fileno(), b""
        deadline = time.monotonic() + self.TIMEOUT
        while not buf.endswith(PROMPT):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._kill()
                raise KernelError(f"ipset did not answer within {self.TIMEOUT:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                self._kill()
                raise KernelError(f"ipset exited ({buf.decode(errors='replace').strip() or 'no message'})")
            buf += chunk
        return buf[: -len(PROMPT)].decode(errors="replace").strip()

    def run(self, line: str) -> str:
        """The answer to one command: '' for a quiet success, ipset's message otherwise."""
        if "\n" in line:
            raise ValueError("one ipset command per line")
        self._mine()
        with self._lock:
            p = self._proc if self._proc is not None and self._proc.poll() is None else self._start()
            assert p.stdin is not None
            try:
                p.stdin.write(line.encode() + b"\n")
            except BrokenPipeError:
                self._kill()
                raise KernelError("ipset exited") from None
            return self._read(p)

    def _kill(self) -> None:
        p, self._proc = self._proc, None
        if p is not None:
            p.kill()
            p.wait()

    def close(self) -> None:
        self._mine()
        with self._lock:
            p, self._proc = self._proc, None
        if p is None:
            return
        try:
            assert p.stdin is not None
            p.stdin.write(b"quit\n")
            p.stdin.close()
            p.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            p.kill()
            p.wait()
