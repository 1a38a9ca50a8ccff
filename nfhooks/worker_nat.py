"""NAT targets under ``--workers``: the main process allocates each target and installs its
rule (it owns the rules); a worker asks it once per new target over a pipe.

The pipe is generic (:class:`Asker`, requests ``(seq, topic, payload)``): the NAT server also
answers other topics a caller registers, e.g. routing's on-demand table slots
(worker_routes.py), so a worker has one request pipe whatever it asks.

Split out of workers.py so that a worker's body (supervise.py) and the main process
(workers.py) both use it without importing each other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .nat import Key, NatError, NatTargets

__all__ = ["NAT_TIMEOUT", "Asker", "NatClient", "NatServer"]

log = logging.getLogger("nfhooks.workers")
NAT_TIMEOUT = 10.0  # a worker waits this long for the main process to allocate a NAT target


class Asker:
    """A worker's end of its request pipe: ``ask(topic, payload)`` sends ``(seq, topic,
    payload)`` and blocks for ``(seq, kind, value)`` (replies with another ``seq``, late answers
    to a request that timed out, are skipped). One lock: several clients (NAT, routes) share
    the pipe, each request answered before the next is sent."""

    def __init__(self, conn: Any, timeout: float = NAT_TIMEOUT) -> None:
        self.conn = conn
        self.timeout = timeout
        self.seq = 0
        self.lock = threading.Lock()

    def ask(self, topic: str, payload: Any, what: str, error: type[Exception]) -> tuple[str, Any]:
        """The main process's ``(kind, value)``; ``error(text)`` on a timeout or a broken pipe
        (``what`` names the request in the text)."""
        with self.lock:
            self.seq += 1
            seq = self.seq
            try:
                self.conn.send((seq, topic, payload))
                deadline = time.monotonic() + self.timeout
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self.conn.poll(left):
                        raise error(f"the main process did not allocate {what} within {self.timeout:.0f}s")
                    rseq, kind, value = self.conn.recv()
                    if rseq == seq:
                        return kind, value
            except (OSError, EOFError) as e:
                raise error(f"cannot ask the main process for {what}: {e!r}") from None


class NatClient(NatTargets):
    """A worker's NatTargets: the index from a local cache, or asked of the main process.

    ``mark_bits`` (what the Dispatcher calls) checks the key here (a wrong-family target
    raises at once, as in the single engine); a key seen before costs a dict lookup; a new
    one is asked over ``conn`` (a pipe, or an :class:`Asker` shared with other clients) and
    the reply ``("index", n)`` or ``("error", text)`` awaited. Errors are cached too: indices
    are never freed, so a target past the bound or refused by the kernel stays so.
    """

    def __init__(self, conn: Any, layout: Any, limit: int, generation: int = 1,
                 timeout: float = NAT_TIMEOUT) -> None:
        super().__init__(layout, limit, installer=self._no_install, generation=generation)
        self.asker = conn if isinstance(conn, Asker) else Asker(conn, timeout)

    def _no_install(self, family: int, table: str, hook: str, rule: Any) -> None:
        raise NatError("a worker installs no rule: the main process does")  # never reached

    def index_for(self, k: Key) -> int:
        idx = self.index.get(k)
        if idx is not None:
            return idx
        if k in self.failed:
            raise NatError(self.failed[k])
        kind, value = self.asker.ask("nat", k, f"NAT target {k[2]}", NatError)
        if kind == "index":
            self.index[k] = value
            return value
        self.failed[k] = value
        raise NatError(value)


class NatServer:
    """The main process's side: the one real NatTargets (None: the policy has no NAT),
    serving every worker's pipe; ``topics`` answers the other requests (topic -> payload ->
    ``(kind, value)``, called under the same locks: one allocation at a time).

    One daemon thread per worker pipe; a lock around the allocation (two workers asking for
    the same new target get the same index and one rule). A thread ends, and closes its pipe,
    when its worker's end closes (the worker exited); ``add()`` serves a restarted worker's. ``close()`` (before
    the rules are removed) makes every later request an error, so no nat rule is added while
    or after the engine removes its rules. ``fork_lock`` (the pool's) is taken before the
    allocation lock: no worker is forked while a nat rule is being added (supervise.py).
    """

    def __init__(self, nat: NatTargets | None, conns: list[Any], fork_lock: Any = None,
                 topics: dict[str, Callable[[Any], tuple[str, Any]]] | None = None) -> None:
        self.nat = nat
        self.topics = dict(topics or {})
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
            return len(self.nat) if self.nat is not None else 0

    def answer(self, k: Key) -> tuple[str, Any]:
        with self.fork_lock, self.lock:
            if self.closed:
                return "error", f"NAT target {k[2]}: the engine is stopping"
            if self.nat is None:
                return "error", f"NAT target {k[2]}: the policy has no NAT verdicts"
            try:
                return "index", self.nat.index_for(k)
            except NatError as e:
                return "error", str(e)
            except Exception as e:  # noqa: BLE001 -- a worker must get an answer, never hang
                return "error", f"allocating NAT target {k[2]} failed: {e!r}"

    def answer_topic(self, topic: str, payload: Any) -> tuple[str, Any]:
        """A request of another topic (e.g. "slot": worker_routes.py). A refusal that may not
        last (the engine stopping, an unexpected failure) is ``("unavailable", text)``, which a
        client must not cache, unlike its ``("error", text)``."""
        if topic == "nat":
            return self.answer(payload)
        fn = self.topics.get(topic)
        if fn is None:
            return "unavailable", f"the main process answers no {topic!r} requests"
        with self.fork_lock, self.lock:
            if self.closed:
                return "unavailable", f"{topic} request: the engine is stopping"
            try:
                return fn(payload)
            except Exception as e:  # noqa: BLE001 -- a worker must get an answer, never hang
                return "unavailable", f"{topic} request failed: {e!r}"

    def serve(self, conn: Any) -> None:
        try:
            while True:
                try:
                    seq, topic, payload = conn.recv()
                except (EOFError, OSError, ValueError, TypeError):
                    return
                kind, value = self.answer_topic(topic, payload)
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
