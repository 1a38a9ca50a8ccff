"""Bind the policy's NFQUEUE queues and receive packets from all of them in one loop.

One NetfilterQueue object per queue number (the library binds one queue per handle), all
served from a single selector loop: a queue per handler means the queue number already says
which handler's kernel match was hit, so dispatch costs a closure call, not a re-match.
Fairness: NetfilterQueue's own ``run(block=False)`` drains one queue until it is empty, so a
slow handler under a flood would starve every other queue (including the one carrying the
metrics scrapes over loopback). Each ready queue is served at most ``BUDGET`` packets per pass:
the queue's callback wrapper raises :class:`_PassOver` once the budget's last packet has its
verdict (NetfilterQueue lets a callback's exception end ``run``; the packet is already
answered), or, on the counted path below, ``run_socket`` is handed a socket wrapper that
reports "would block" once the budget is spent.

Two ways to serve a ready queue (a pass):

* **fast**: ``run(block=False)``, NetfilterQueue's C loop: recv, the callback, and the
  EAGAIN that ends the pass all stay in C. At moderate rates every packet wakes the engine
  alone, so the per-wakeup path matters: measured at 10,000 packets/s with the consumer and
  the sender on one CPU (docs/performance.md, "Per-wakeup cost"), the loop alone went from
  13.0 to 8.0-8.3 us CPU per packet (bare NetfilterQueue 5.0-5.3), the whole engine from
  18.0-18.7 to 12.0-12.3. Used when the socket can hold the whole queue (the default
  sizing), where ENOBUFS cannot happen, and no socket error is pending.
* **counted**: ``run_socket`` with :class:`_Budgeted`, which sees every recv() and so counts
  ENOBUFS (the C loop swallows it): for a queue whose receive buffer is smaller than its
  queue (``--queue-rcvbuf``, or a kernel that granted less), and for any pass that starts
  with EPOLLERR set (a pending socket error).

The loop waits with ``select.epoll`` directly (one dict lookup per ready fd, no selector keys).

Signals only set a flag and wake the loop through a pipe (``signal.set_wakeup_fd``), so a
packet is never left half-decided by an exception raised in the middle of a callback.

Overload (what happens when packets come faster than the handlers decide):

* ``--queue-maxlen`` packets may wait in the kernel per queue (default 4096). A full queue
  drops (fail-closed, counted by the kernel as ``queue_dropped``) or, on a hook whose fail
  mode is open, accepts: the queue is bound with NFQA_CFG_F_FAIL_OPEN (netlink.py), and
  the kernel counts those accepts nowhere -- overload.py's ``OverloadCollector`` derives them.
* The netlink socket's receive buffer (``--queue-rcvbuf``, set with SO_RCVBUFFORCE; by
  default room for a full queue of maximal copies) overrunning makes recv() fail with
  ENOBUFS once (the kernel counts ``user_dropped``, or accepts on a fail-open queue);
  NetfilterQueue's ``run_socket`` swallows that error, the wrapper below counts it first.
* Copy range: NetfilterQueue's ``run_socket`` reads each message into a 4096-byte buffer,
  and the kernel adds up to 128 bytes of attributes (header, ifindexes, mark, hardware
  address, timestamp, cap_len, skb info, payload header) to the copied bytes. A larger
  datagram is cut short by recv(), libnetfilter_queue cannot parse it, and that packet
  would wait in the kernel forever without a verdict: so at most ``MAX_COPY`` bytes are
  copied (measured: a 5000-byte packet arriving on a veth with timestamps made a 4104-byte
  message at NetfilterQueue's own 4016). Longer packets arrive truncated, which packet.py
  sees (IP total length > captured bytes) and mangle.py refuses to rewrite.
* GSO (``--gso auto|on|off``, auto by default): a queue whose handler reads only headers
  takes GSO/GRO super-packets whole (NFQA_CFG_F_GSO), guarded at run time: see gso.py.
* Verdict batching (``--no-verdict-batch`` turns it off): a pass's plain accepts are held
  and answered with one batch verdict when the pass ends: see vbatch.py.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .errors import KernelError
from .gso import GSO_MODES, GsoCollector, GsoGuard, decide, gso_safe  # noqa: F401 -- gso_safe re-exported
from .kstats import DEFAULT_PROC_PATH, read_queue_stats
from .overload import OverloadCollector, bypassed, rule_packets  # noqa: F401 -- re-exported
from .vbatch import BatchCollector, VerdictBatch

log = logging.getLogger("nfhooks.queue")
PROC_QUEUES = DEFAULT_PROC_PATH
COPY_RANGE = 0xFFFF  # asked for; clamped to MAX_COPY (tests lower it to force truncation)
#: NetfilterQueue's recv buffer (4096) minus the most metadata the kernel adds (128 bytes).
MAX_COPY = 4096 - 128
BUDGET = 64  # packets per queue per pass of the loop
DEFAULT_MAXLEN = 4096
#: NetfilterQueue's SockCopySize (a 4 KB copy plus overhead). The default rcvbuf is
#: ``maxlen`` of these; the kernel doubles a SO_RCVBUF(FORCE) value for its bookkeeping, and
#: twice this covers the ~8.4 KB truesize of a maximal message, so a full queue, not the
#: socket, is what overflows first (counted, and fail-open aware). Memory is bounded by
#: ``maxlen`` either way: no more messages than queued packets can be in the socket.
MESSAGE_TRUESIZE = 4096 + 780


@dataclass(frozen=True)
class QueueOptions:
    """How every queue of an engine is bound (``nfhooks run --queue-maxlen/--queue-rcvbuf/--gso``)."""

    maxlen: int = DEFAULT_MAXLEN
    rcvbuf: int | None = None  # bytes; None: room for ``maxlen`` maximal messages
    #: NFQA_CFG_F_GSO (gso.decide): "auto" where the handler reads headers only, guarded at run
    #: time; "on" (``--gso``) the same, unguarded; "off" (``--no-gso``). A bool means on/off.
    gso: str | bool = "auto"
    #: hold each pass's plain accepts for one batch verdict (vbatch.py); ``--no-verdict-batch``
    batch: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.gso, bool):
            object.__setattr__(self, "gso", "on" if self.gso else "off")
        if self.gso not in GSO_MODES:
            raise ValueError(f"--gso {self.gso}: give one of {', '.join(GSO_MODES)}")
        if not 1 <= self.maxlen <= 1 << 20:
            raise ValueError(f"--queue-maxlen {self.maxlen}: give 1..1048576 packets")
        if self.rcvbuf is not None and not 4096 <= self.rcvbuf <= 1 << 30:
            raise ValueError(f"--queue-rcvbuf {self.rcvbuf}: give 4096..1073741824 bytes")

    @property
    def socket_buffer(self) -> int:
        return self.rcvbuf if self.rcvbuf is not None else self.maxlen * MESSAGE_TRUESIZE


class _PassOver(Exception):
    """Raised by a queue's callback wrapper after the budget's last verdict: ends ``run``."""


class _Budgeted:
    """A socket whose recv() says EAGAIN after ``budget`` datagrams (see the module docstring).

    Also counts what NetfilterQueue cannot tell: datagrams received (each one packet
    message, given its verdict before the next recv) and ENOBUFS overruns (run_socket
    swallows them; re-raised here so it still does). On the fast path (``by_callback``)
    recv() is not called: the queue's callback wrapper counts ``received`` and spends
    ``left`` instead.
    """

    __slots__ = ("sock", "left", "received", "enobufs", "fast", "by_callback", "batch")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.left = 0
        self.received = 0
        self.enobufs = 0
        self.fast = False  # the socket holds the whole queue: ENOBUFS cannot happen
        self.by_callback = False  # this pass runs in NetfilterQueue's C loop
        self.batch: VerdictBatch | None = None  # the callback's held accepts, settled after each pass

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "budget spent")
        self.left -= 1
        try:
            data = self.sock.recv(size)
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                self.enobufs += 1
            raise
        self.received += 1
        return data


def _budget_callback(callback: Callable[[Any], None], c: _Budgeted) -> Callable[[Any], None]:
    """``callback`` plus, on the fast path, the counting and the budget (see _Budgeted).

    Relies on NetfilterQueue (pinned 1.1.0) letting a callback's exception end ``run``:
    ``global_callback`` is ``except -1`` and ``nfq_handle_packet`` ``except? -1`` in _impl.
    """

    def counted(nfpkt: Any) -> None:
        if not c.by_callback:
            callback(nfpkt)  # the counted path: _Budgeted.recv counted it and keeps the budget
            return
        # counted before the verdict, as recv() counts: until the verdict the packet is also
        # in the kernel's queue_total, so a racing scrape can only undercount bypasses
        c.received += 1
        callback(nfpkt)
        c.left -= 1
        if c.left <= 0:
            raise _PassOver  # after the verdict: NetfilterQueue's run() ends with it

    return counted


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


@dataclass
class BoundQueue:
    """What the overload metrics need to know about one bound queue."""

    num: int
    hook: str
    handler: str
    fail_open: bool
    gso: bool
    maxlen: int
    rcvbuf: int  # what the kernel granted (SO_RCVBUF reads back twice the value set)
    counter: _Budgeted
    bypassed_high: int = 0  # the derived bypass count exported so far (never goes down)
    guard: GsoGuard | None = None  # a GSO queue verified at run time (gso.py)
    batch: VerdictBatch | None = None  # its accepts batched (vbatch.py)


class QueueSet:
    """The bound queues of one engine and the loop that serves them."""

    def __init__(self, options: QueueOptions | None = None) -> None:
        self.options = options or QueueOptions()
        self.queues: dict[int, Any] = {}
        self.bound: dict[int, BoundQueue] = {}
        self._epoll = select.epoll()
        self._ready: dict[int, tuple[Any, _Budgeted]] = {}  # socket fd -> (queue, counter)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self.stopping = False
        self.hurrying = False
        self._exported: list[tuple[Any, Any]] = []  # (registry, collector)

    @property
    def wakeup_fd(self) -> int:
        return self._wake_w

    def bind(self, num: int, callback: Callable[[Any], None], max_len: int | None = None, *,
             handler: Any = None, fail_open: bool = False) -> None:
        """Bind queue ``num`` and configure it before any rule can feed it.

        ``fail_open``: the kernel accepts instead of dropping when the queue is full.
        ``handler`` (policy.Handler): labels for the metrics and the GSO decision.
        """
        from netfilterqueue import NetfilterQueue  # noqa: PLC0415 -- needs root; check works without

        from .netlink import NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_GSO, NetlinkError, set_queue_config

        opts = self.options
        maxlen = max_len if max_len is not None else opts.maxlen
        gso, guarded, why = decide(str(opts.gso), handler) if handler is not None else (False, False, "no handler")
        guard = getattr(callback, "gso", None) if guarded else None  # Dispatcher.callback's GsoGuard
        if guarded and not isinstance(guard, GsoGuard):  # auto without the guard: today's segments
            gso, guarded, guard, why = False, False, None, "no run-time guard for this queue's callback"
        hook, name = getattr(handler, "hook", ""), getattr(handler, "name", "")
        q = NetfilterQueue(af=socket.AF_INET)
        budgeted = _Budgeted(None)  # type: ignore[arg-type] -- its socket is set once bound
        try:
            with warnings.catch_warnings():
                # NetfilterQueue warns when the kernel grants another rcvbuf size than it
                # computed; the size is checked below against what was asked for.
                warnings.simplefilter("ignore", RuntimeWarning)
                q.bind(num, _budget_callback(callback, budgeted), max_len=maxlen,
                       range=min(COPY_RANGE, MAX_COPY), sock_len=opts.socket_buffer)
        except OSError as e:
            raise KernelError(
                f"cannot bind NFQUEUE {num}: it is already bound by {queue_holder(num)}. "
                "Stop that program or give nfhooks other queue numbers with --queue-base N"
            ) from e
        self.queues[num] = q
        flags = (NFQA_CFG_F_FAIL_OPEN if fail_open else 0) | (NFQA_CFG_F_GSO if gso else 0)
        mask = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO
        try:
            try:
                set_queue_config(q.get_fd(), num, flags=flags, mask=mask, maxlen=maxlen)
            except NetlinkError:
                if not guarded:  # asked for (--gso) or not set: the error below says which
                    raise
                # --gso auto on a kernel without NFQA_CFG_F_GSO (< 3.10): today's segments
                gso, guard, why = False, None, "the kernel refused NFQA_CFG_F_GSO"
                set_queue_config(q.get_fd(), num, flags=flags & ~NFQA_CFG_F_GSO, mask=mask, maxlen=maxlen)
        except NetlinkError as e:
            what = ", ".join(x for x in ("fail-open" if fail_open else "", "gso" if gso else "",
                                         f"queue length {maxlen}") if x)
            raise KernelError(
                f"the kernel refused to configure NFQUEUE {num} ({what}): {e.strerror} "
                f"(errno {e.errno}). Fail-open queues need Linux >= 3.6 and GSO >= 3.10: run "
                "with --no-gso, or with --fail-closed"
            ) from e
        sock = socket.socket(fileno=os.dup(q.get_fd()))  # a dup: closing it leaves the queue's fd alone
        sock.setblocking(False)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if granted < opts.socket_buffer:
            log.warning("queue %d: socket receive buffer is %d bytes, asked for %d (SO_RCVBUFFORCE "
                        "needs CAP_NET_ADMIN; net.core.rmem_max caps SO_RCVBUF)", num, granted,
                        opts.socket_buffer)
        budgeted.sock = sock
        # SO_RCVBUF reads back twice the value set; twice MESSAGE_TRUESIZE per queued packet
        # holds a full queue of maximal messages (see MESSAGE_TRUESIZE): no ENOBUFS possible
        budgeted.fast = granted >= 2 * maxlen * MESSAGE_TRUESIZE
        self._ready[sock.fileno()] = (q, budgeted)
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        if guard is not None and gso:
            guard.arm(lambda packet_id: self._gso_off(num, packet_id))
        batch = getattr(callback, "batch", None) if opts.batch else None  # Dispatcher.callback's
        if isinstance(batch, VerdictBatch):
            batch.arm(sock, num)
            budgeted.batch = batch
        else:
            batch = None
        self._set_bound({**self.bound, num: BoundQueue(num, hook, name, fail_open, gso, maxlen, granted, budgeted,
                                                       guard=guard, batch=batch)})
        log.debug("queue %d bound: maxlen %d, rcvbuf %d, %s, gso %s (%s)", num, maxlen, granted,
                  "fail-open" if fail_open else "fail-closed", "on" if gso else "off", why)

    def _gso_off(self, num: int, packet_id: int) -> int | None:
        """GsoGuard's switch: NFQA_CFG_F_GSO off on a live queue (no ACK read: packet messages
        share the socket). Returns the highest id it may have queued whole, None if refused."""
        from .netlink import NFQA_CFG_F_GSO, send_queue_config

        q, b = self.queues.get(num), self.bound.get(num)
        if q is None or b is None:
            return None
        try:
            # netlink runs the config in this sendmsg(): every id handed out after it is segmented
            send_queue_config(q.get_fd(), num, flags=0, mask=NFQA_CFG_F_GSO)
        except OSError as e:
            log.error("queue %d: cannot switch GSO off: %s", num, e)
            return None
        self._set_bound({**self.bound, num: replace(b, gso=False)})
        st = read_queue_stats(PROC_QUEUES).get(num)
        # unknown: no id beyond the queue's length past this packet can predate the switch
        return st.id_sequence if st is not None else (packet_id + b.maxlen) & 0xFFFFFFFF

    def export(self, registry: Any) -> OverloadCollector:
        """Register this set's overload metrics on ``registry`` (unregistered by close())."""
        collector = OverloadCollector(self.bound)
        registry.register(collector)
        self._exported.append((registry, collector))
        for extra in (GsoCollector(self.bound), BatchCollector(self.bound)):
            registry.register(extra)
            self._exported.append((registry, extra))
        return collector

    def stop(self) -> None:
        self.stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def unbind(self, num: int) -> None:
        """Unbind one queue (hot reload retires an old generation's queues this way).

        Its rules must be gone first: the kernel drops what still waits in the queue."""
        for fd, (q, counter) in list(self._ready.items()):
            if q is self.queues.get(num):
                self._drop(fd, counter)
        q = self.queues.pop(num, None)
        if q is not None:
            q.unbind()
        if num in self.bound:
            self._set_bound({n: b for n, b in self.bound.items() if n != num})

    def _drop(self, fd: int, counter: _Budgeted) -> None:
        del self._ready[fd]
        self._epoll.unregister(fd)
        counter.sock.close()

    def _set_bound(self, bound: dict[int, BoundQueue]) -> None:
        """Replace the map whole (never mutated: a scrape thread may be reading it)."""
        self.bound = bound
        for _, collector in self._exported:
            collector.bound = bound

    def run(self, on_wake: Callable[[], None] | None = None,
            tick: Callable[[], float | None] | None = None) -> None:
        """Serve packets until stop() (or a signal written to the wakeup fd).

        ``tick()`` returns how long the loop may sleep before calling ``on_wake`` anyway
        (None: until woken); asked again on every pass. Under steady traffic select() never
        times out, so the deadline is kept by the clock, not by idle passes."""
        next_tick = 0.0
        poll, ready, wake_r = self._epoll.poll, self._ready, self._wake_r
        err = select.EPOLLERR
        while not self.stopping:
            timeout = tick() if tick is not None else None
            for fd, events in poll(-1 if timeout is None else timeout):
                entry = ready.get(fd)
                if entry is None:
                    if fd != wake_r:
                        continue  # pragma: no cover -- unbound while this list was built
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    if on_wake:
                        on_wake()
                    break  # on_wake may have unbound queues: the next poll reports the rest again
                self._pass(entry, events & err)
            if timeout is not None and on_wake and time.monotonic() >= next_tick:
                on_wake()
                next_tick = time.monotonic() + timeout

    @staticmethod
    def _pass(entry: tuple[Any, _Budgeted], error: int) -> None:
        """Serve one ready queue for at most BUDGET packets (see the module docstring)."""
        q, budgeted = entry
        budgeted.left = BUDGET
        try:
            if budgeted.fast and not error:
                budgeted.by_callback = True
                q.run(False)  # C loop until EAGAIN or _PassOver
            else:
                budgeted.by_callback = False
                q.run_socket(budgeted)
        except _PassOver:
            pass
        finally:
            if budgeted.batch is not None:
                budgeted.batch.settle()  # the pass's held accepts: one message (vbatch.py)

    def close_intake(self) -> None:
        """Stop, step 1: no new packet enters our queues, every rule stays.

        Each queue's length is set to 0, so the kernel treats it as full: a fail-closed
        queue drops what its rules send (counted as ``queue_dropped``), a fail-open one
        accepts it -- exactly what the hook's fail mode does without an engine. Packets
        already queued keep their place and still get their verdict from ``drain``, with
        every nfhooks rule (reject, NAT, fall-through) still in place to act on it.
        """
        from .netlink import NFQA_CFG_F_FAIL_OPEN, send_queue_config

        for num, b in self.bound.items():
            q = self.queues.get(num)
            if q is None:
                continue
            try:
                send_queue_config(q.get_fd(), num, flags=NFQA_CFG_F_FAIL_OPEN if b.fail_open else 0,
                                  mask=0, maxlen=0)
            except OSError as e:  # the drain's deadline still bounds the stop
                log.warning("queue %d: could not close it to new packets: %s", num, e)

    def drain(self, timeout: float, waiting: Callable[[], int]) -> int:
        """Stop, step 2: serve until the kernel holds no packet for us, or ``timeout``.

        ``waiting()`` counts the packets queued and not yet answered (the kernel's
        ``queue_total`` over our queues). Returns what is still waiting at the end (those
        are dropped when the queues are unbound). ``hurry()`` (a second signal) ends it."""
        deadline = time.monotonic() + timeout
        poll, ready, wake_r = self._epoll.poll, self._ready, self._wake_r
        self.hurrying = False
        while True:
            left = waiting()
            if not left or self.hurrying or time.monotonic() >= deadline:
                return left
            for fd, events in poll(0.05):
                entry = ready.get(fd)
                if entry is not None:
                    self._pass(entry, events & select.EPOLLERR)
                elif fd == wake_r:
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass

    def hurry(self) -> None:
        """Signal-safe: end a drain now (what is still queued is dropped at unbind)."""
        self.hurrying = True

    def waiting(self, proc_path: str = PROC_QUEUES) -> int:
        """Packets waiting in the kernel for a verdict on this set's queues (queue_total)."""
        return sum(st.queue_total for n, st in read_queue_stats(proc_path).items() if n in self.queues)

    def close(self) -> None:
        for registry, collector in self._exported:
            try:
                registry.unregister(collector)
            except KeyError:
                pass
        self._exported.clear()
        for fd, (_, counter) in list(self._ready.items()):
            self._drop(fd, counter)
        for q in self.queues.values():
            q.unbind()
        self.queues.clear()
        self._epoll.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
