"""One engine per network namespace owns the nfhooks rules there.

The owner holds an flock on ``/run/nfhooks/<netns inode>.lock`` for as long as it runs; the
kernel drops the lock when the process dies, even by kill -9. So "stale rules" has a precise
meaning: nfhooks chains exist and nobody holds the lock. A new engine then removes them before
installing its own; ``nfhooks flush`` refuses while the owner lives, unless forced.
(/run is shared by all namespaces of the machine, hence the namespace inode in the name.)
"""

from __future__ import annotations

import fcntl
import os
import uuid
from dataclasses import dataclass

LOCK_DIR = os.environ.get("NFHOOKS_RUN_DIR", "/run/nfhooks")


class OwnedElsewhere(RuntimeError):
    def __init__(self, pid: int | None, instance: str) -> None:
        self.pid, self.instance = pid, instance
        super().__init__(
            f"another nfhooks engine owns the rules in this network namespace (pid {pid}, instance "
            f"{instance}); stop it first (kill -TERM {pid}), or run this one in another namespace"
        )


def netns_id() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def lock_path() -> str:
    return os.path.join(LOCK_DIR, f"netns-{netns_id()}.lock")


def status_path() -> str:
    """Where the owner reports its start and each reload (JSON), for `nfhooks reload`."""
    return os.path.join(LOCK_DIR, f"netns-{netns_id()}.status")


def write_status(path: str, seq: int, ok: bool, message: str, **extra: object) -> None:
    """The owner's answer to `nfhooks reload`: one JSON document, replaced atomically."""
    import json
    import time

    doc = {"pid": os.getpid(), "seq": seq, "ok": ok, "message": message, "time": time.time(), **extra}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


@dataclass
class Ownership:
    fd: int
    path: str
    instance: str

    @classmethod
    def acquire(cls) -> "Ownership":
        """Lock this namespace's file. The owner removes the file when it is done (no lock
        files pile up in /run), so a lock taken on a file that was removed meanwhile is
        retried on the file now at the path (classic flock-and-unlink protocol)."""
        os.makedirs(LOCK_DIR, exist_ok=True)
        path = lock_path()
        for _ in range(100):
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, inst = _read(fd)
                os.close(fd)
                raise OwnedElsewhere(pid, inst) from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous owner removed this file after we opened it: again
        else:  # pragma: no cover - would need a hundred owners racing
            raise OwnedElsewhere(None, "?")
        instance = uuid.uuid4().hex[:12]
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {instance}\n".encode(), 0)
        return cls(fd, path, instance)

    def release(self) -> None:
        try:
            os.unlink(self.path)  # while still locked: see acquire()
        except OSError:
            pass
        finally:
            os.close(self.fd)


def _read(fd: int) -> tuple[int | None, str]:
    try:
        parts = os.pread(fd, 100, 0).decode().split()
        return int(parts[0]), parts[1]
    except (OSError, ValueError, IndexError):
        return None, "?"


def live_owner() -> tuple[int | None, str] | None:
    """(pid, instance) of the engine owning this namespace, or None if nobody does."""
    path = lock_path()
    if not os.path.exists(path):
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
