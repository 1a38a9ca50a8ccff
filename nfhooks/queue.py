"""Bind the policy's NFQUEUE queues and receive packets from all of them in one loop.

One NetfilterQueue object per queue number (the library binds one queue per handle), all
served from a single selector loop: a queue per handler means the queue number already says
which handler's kernel match was hit, so dispatch costs a closure call, not a re-match.
Fairness: NetfilterQueue's own ``run(block=False)`` drains one queue until it is empty, so a
slow handler under a flood would starve every other queue (including the one carrying the
metrics scrapes over loopback). Each ready queue is served at most ``BUDGET`` packets per pass,
by handing ``run_socket`` a socket wrapper that reports "would block" once the budget is spent.

Signals only set a flag and wake the loop through a pipe (``signal.set_wakeup_fd``), so a
packet is never left half-decided by an exception raised in the middle of a callback.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
from typing import Any, Callable

from .install import KernelError

log = logging.getLogger("nfhooks.queue")
PROC_QUEUES = "/proc/net/netfilter/nfnetlink_queue"
COPY_RANGE = 0xFFFF
BUDGET = 64  # packets per queue per pass of the loop


class _Budgeted:
    """A socket whose recv() says EAGAIN after ``budget`` datagrams (see the module docstring)."""

    __slots__ = ("sock", "left")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.left = 0

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "budget spent")
        self.left -= 1
        return self.sock.recv(size)


def queue_holder(num: int) -> str:
    """Who holds queue ``num`` (from the kernel's queue table), for the error message."""
    try:
        with open(PROC_QUEUES) as f:
            for line in f:
                cols = line.split()
                if cols and int(cols[0]) == num:
                    pid = int(cols[1])
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as c:
                            cmd = c.read().replace(b"\0", b" ").decode(errors="replace").strip()
                        return f"netlink port {pid}, which is process {pid} ({cmd})"
                    except OSError:
                        return f"netlink port {pid} (a process in this namespace)"
    except OSError:
        pass
    return "another process"


class QueueSet:
    """The bound queues of one engine and the loop that serves them."""

    def __init__(self) -> None:
        self.queues: dict[int, Any] = {}
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self.stopping = False

    @property
    def wakeup_fd(self) -> int:
        return self._wake_w

    def bind(self, num: int, callback: Callable[[Any], None], max_len: int = 4096) -> None:
        from netfilterqueue import NetfilterQueue  # noqa: PLC0415 -- needs root; check works without

        q = NetfilterQueue(af=socket.AF_INET)
        try:
            q.bind(num, callback, max_len=max_len, range=COPY_RANGE)
        except OSError as e:
            raise KernelError(
                f"cannot bind NFQUEUE {num}: it is already bound by {queue_holder(num)}. "
                "Stop that program or give nfhooks other queue numbers with --queue-base N"
            ) from e
        self.queues[num] = q
        sock = socket.socket(fileno=os.dup(q.get_fd()))  # a dup: closing it leaves the queue's fd alone
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, (q, _Budgeted(sock)))

    def stop(self) -> None:
        self.stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def run(self, on_wake: Callable[[], None] | None = None) -> None:
        """Serve packets until stop() (or a signal written to the wakeup fd)."""
        while not self.stopping:
            for key, _ in self.selector.select():
                if key.data is None:
                    try:
                        while os.read(self._wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    if on_wake:
                        on_wake()
                    continue
                q, budgeted = key.data
                budgeted.left = BUDGET
                q.run_socket(budgeted)

    def close(self) -> None:
        for key in list(self.selector.get_map().values()):
            if key.data is not None:
                self.selector.unregister(key.fileobj)
                key.data[1].sock.close()
        for q in self.queues.values():
            q.unbind()
        self.queues.clear()
        self.selector.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
