"""NAT targets under ``--workers``: the main process allocates each target and installs its
rule (it owns the rules); a worker asks it once per new target over a pipe.

Split out of workers.py so that a worker's body (supervise.py) and the main process
(workers.py) both use it without importing each other.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .nat import Key, NatError, NatTargets

__all__ = ["NAT_TIMEOUT", "NatClient", "NatServer"]

log = logging.getLogger("nfhooks.workers")
NAT_TIMEOUT = 10.0  # a worker waits this long for the main process to allocate a NAT target


class NatClient(NatTargets):
    """A worker's NatTargets: the index from a local cache, or asked of the main process.

    ``mark_bits`` (what the Dispatcher calls) checks the key here (a wrong-family target
    raises at once, as in the single engine); a key seen before costs a dict lookup; a new
    one is sent as ``(seq, key)`` over ``conn`` and the reply ``(seq, "index", n)`` or
    ``(seq, "error", text)`` awaited (replies with another ``seq``, late answers to a
    request that timed out, are skipped). Errors are cached too: indices are never freed,
    so a target past the bound or refused by the kernel stays so.
    """

    def __init__(self, conn: Any, layout: Any, limit: int, generation: int = 1,
                 timeout: float = NAT_TIMEOUT) -> None:
        super().__init__(layout, limit, installer=self._no_install, generation=generation)
        self.conn = conn
        self.timeout = timeout
        self.seq = 0
        self.lock = threading.Lock()

    def _no_install(self, family: int, table: str, hook: str, rule: Any) -> None:
        raise NatError("a worker installs no rule: the main process does")  # never reached

    def index_for(self, k: Key) -> int:
        idx = self.index.get(k)
        if idx is not None:
            return idx
        if k in self.failed:
            raise NatError(self.failed[k])
        with self.lock:
            self.seq += 1
            seq = self.seq
            try:
                self.conn.send((seq, k))
                deadline = time.monotonic() + self.timeout
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self.conn.poll(left):
                        raise NatError(f"the main process did not allocate NAT target {k[2]} within "
                                       f"{self.timeout:.0f}s")
                    rseq, kind, value = self.conn.recv()
                    if rseq == seq:
                        break
            except (OSError, EOFError) as e:
                raise NatError(f"cannot ask the main process for NAT target {k[2]}: {e!r}") from None
        if kind == "index":
            self.index[k] = value
            return value
        self.failed[k] = value
        raise NatError(value)


class NatServer:
    """The main process's side: the one real NatTargets, serving every worker's pipe.

    One daemon thread per worker pipe; a lock around the allocation (two workers asking for
    the same new target get the same index and one rule). A thread ends, and closes its pipe,
    when its worker's end closes (the worker exited); ``add()`` serves a restarted worker's. ``close()`` (before
    the rules are removed) makes every later request an error, so no nat rule is added while
    or after the engine removes its rules. ``fork_lock`` (the pool's) is taken before the
    allocation lock: no worker is forked while a nat rule is being added (supervise.py).
    """

    def __init__(self, nat: NatTargets, conns: list[Any], fork_lock: Any = None) -> None:
        self.nat = nat
        self.conns = list(conns)
        self.lock = threading.Lock()
        self.fork_lock = fork_lock if fork_lock is not None else threading.Lock()
        self.closed = False
        self.threads: list[threading.Thread] = []

    def close(self) -> None:
        with self.lock:
            self.closed = True

    def __len__(self) -> int:
        with self.lock:
            return len(self.nat)

    def answer(self, k: Key) -> tuple[str, Any]:
        with self.fork_lock, self.lock:
            if self.closed:
                return "error", f"NAT target {k[2]}: the engine is stopping"
            try:
                return "index", self.nat.index_for(k)
            except NatError as e:
                return "error", str(e)
            except Exception as e:  # noqa: BLE001 -- a worker must get an answer, never hang
                return "error", f"allocating NAT target {k[2]} failed: {e!r}"

    def serve(self, conn: Any) -> None:
        try:
            while True:
                try:
                    seq, k = conn.recv()
                except (EOFError, OSError, ValueError, TypeError):
                    return
                kind, value = self.answer(k)
                try:
                    conn.send((seq, kind, value))
                except OSError:
                    return
        finally:
            conn.close()  # this thread's pipe: nobody else closes it

    def add(self, i: int, conn: Any) -> None:
        """Serve worker ``i``'s pipe (at start, and for a restarted worker)."""
        t = threading.Thread(target=self.serve, args=(conn,), name=f"nfhooks-nat-{i}", daemon=True)
        t.start()
        self.threads.append(t)

    def start(self) -> None:
        for i, conn in enumerate(self.conns):
            self.add(i, conn)


# --------------------------------------------------------------------------- one endpoint
