"""Slow and hung handlers: a per-packet time budget and a watchdog that interrupts a handler
that does not return.

The engine decides packets in one thread, so a handler that never returns would stop every
hook. Two limits, both per packet:

* ``--handler-budget`` (default 200 ms): a handler that returns later than this has its verdict
  replaced by the hook's default and the overrun counted (``nfhooks_handler_overruns_total``).
  A verdict that arrives that late is suspect -- the policy probably waited on something
  (DNS, a file, a lock) -- and the default is what the operator chose for "no decision".
  Checked after the handler returns: one clock read per packet.
* ``--handler-timeout`` (default 1 s): a watchdog thread looks every quarter of the timeout at
  the start time of the handler in progress; past the timeout it sends SIGALRM to the engine's
  main thread, whose signal handler raises :class:`HandlerTimeout` inside the handler (Python
  runs signal handlers between bytecodes, and a blocking call such as ``time.sleep`` or a
  socket read returns EINTR into it). The error guard gives that packet the default verdict,
  and the engine goes on with the next one. HandlerTimeout derives from BaseException, so a
  handler's ``except Exception`` does not swallow it. The signal handler checks again that
  the same handler is still running, so an alarm that arrives late hits nothing.

What the watchdog cannot interrupt: C code that holds the GIL and never returns to the
interpreter (a pathological regular expression, a C extension stuck in a loop). Then the
kernel's queue fills and the hook's fail mode decides: fail-open hooks accept (queue bypass,
NFQA_CFG_F_FAIL_OPEN), fail-closed hooks drop -- the same as when the engine is dead.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

__all__ = ["HandlerTimeout", "Watchdog", "DEFAULT_BUDGET", "DEFAULT_TIMEOUT"]

DEFAULT_BUDGET = 0.2
DEFAULT_TIMEOUT = 1.0


class HandlerTimeout(BaseException):
    """Raised inside a handler that ran past ``--handler-timeout`` (BaseException on purpose)."""


class Watchdog:
    """Interrupts the handler in progress once it has run longer than ``timeout`` seconds.

    ``current[0]`` is the perf_counter() time the running handler started, 0.0 when none
    runs: the dispatcher writes it around each handler call (two list stores per packet).
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        if timeout <= 0:
            raise ValueError(f"--handler-timeout {timeout}: give a positive number of seconds")
        self.timeout = timeout
        self.current: list[float] = [0.0]
        self.fired = 0
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._old: Any = None

    def _on_alarm(self, signum: int, frame: Any) -> None:
        started = self.current[0]
        if started and time.perf_counter() - started > self.timeout:
            self.current[0] = 0.0
            raise HandlerTimeout(f"did not return within --handler-timeout {self.timeout:g} s")

    def _watch(self) -> None:
        interval = self.timeout / 4
        while not self._stop.wait(interval):
            started = self.current[0]
            if started and time.perf_counter() - started > self.timeout and self._main is not None:
                self.fired += 1
                signal.pthread_kill(self._main, signal.SIGALRM)

    def start(self) -> None:
        """From the main thread (it installs the SIGALRM handler)."""
        self._old = signal.signal(signal.SIGALRM, self._on_alarm)
        self._thread = threading.Thread(target=self._watch, name="nfhooks-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        if self._old is not None:
            signal.signal(signal.SIGALRM, self._old)
            self._old = None
