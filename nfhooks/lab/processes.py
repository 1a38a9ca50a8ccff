"""What a lab runs inside its nodes: the engine (:class:`EngineProc`), the logging TCP/UDP
servers, and how each is stopped -- always by its own PID, SIGKILL only after a grace time.

The servers write one JSON line per event, so a test reads what a real server saw (peer
address, port, payload) instead of trusting the client's side.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

__all__ = ["READY_LINE", "EngineProc", "LogServer", "Poller", "TcpServer", "UdpServer", "tail", "terminate"]

READY_LINE = "nfhooks ready"

T = TypeVar("T")


class Poller(Protocol):
    """What a server needs of its lab: polling with a deadline (``Lab.wait_for``)."""

    def wait_for(self, predicate: Callable[[], T], timeout: float = ..., interval: float = ...,
                 what: str = ...) -> T: ...


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def terminate(proc: subprocess.Popen[Any], grace: float = 3.0) -> int:
    """SIGTERM, then SIGKILL after `grace` seconds -- always by the process's own PID."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        except ProcessLookupError:
            proc.wait(10)
    return proc.returncode


class LogServer:
    """Common part of the tcp/udp servers: a tracked process writing JSON lines."""

    def __init__(
        self,
        lab: Poller,
        node: str,
        proc: subprocess.Popen[Any],
        addr: str,
        port: int,
        family: int,
        log_path: Path,
    ) -> None:
        self.lab, self.node, self.proc = lab, node, proc
        self.addr, self.port, self.family = addr, port, family
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def records(self) -> list[dict[str, Any]]:
        """Everything the server logged so far (a half-written last line is skipped)."""
        try:
            text = self.log_path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def stop(self) -> int:
        return terminate(self.proc)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node} {self.addr} port {self.port} pid {self.pid}>"


class TcpServer(LogServer):
    """TCP server in a node: records each accepted peer, answers a tiny HTTP/1.0 200."""

    def log_peers(self) -> list[str]:
        """Client addresses of the connections accepted so far, in order."""
        return [r["peer"] for r in self.records() if r.get("event") == "accept"]

    def connections(self) -> list[tuple[str, int]]:
        """(address, port) of each accepted connection -- the port shows SNAT port mapping."""
        return [(r["peer"], r["port"]) for r in self.records() if r.get("event") == "accept"]

    def received(self) -> list[bytes]:
        """The first chunk each connection sent (connections that sent nothing are absent)."""
        return [base64.b64decode(r["data"]) for r in self.records() if r.get("event") == "data"]

    def wait_peers(self, n: int = 1, timeout: float = 5.0) -> list[str]:
        """Peers once at least `n` connections were accepted (accept lags the handshake)."""
        return self.lab.wait_for(
            lambda: (p if len(p := self.log_peers()) >= n else None),
            timeout=timeout,
            what=f"{n} connection(s) logged by the TCP server in {self.node}",
        )


class UdpServer(LogServer):
    """UDP server in a node: records each datagram's sender and payload and echoes it."""

    def datagrams(self) -> list[tuple[str, bytes]]:
        return [
            (r["peer"], base64.b64decode(r["data"]))
            for r in self.records()
            if r.get("event") == "datagram"
        ]

    def log_peers(self) -> list[str]:
        return [peer for peer, _ in self.datagrams()]

    def wait_datagrams(self, n: int = 1, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        return self.lab.wait_for(
            lambda: (d if len(d := self.datagrams()) >= n else None),
            timeout=timeout,
            what=f"{n} datagram(s) logged by the UDP server in {self.node}",
        )


class EngineProc:
    """A running `python -m nfhooks run ...` inside a lab node, its output in a log file."""

    def __init__(
        self, proc: subprocess.Popen[Any], log_path: Path, argv: Sequence[str], node: str
    ) -> None:
        self.proc = proc
        self.log_path = log_path
        self.argv = list(argv)
        self.node = node

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def running(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until `text` appears in the engine's output; fail early if it exits."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if text in log:
                return log
            if self.proc.poll() is not None:
                log = self.log()
                if text in log:
                    return log
                raise RuntimeError(
                    f"engine exited with {self.proc.returncode} before printing {text!r}; "
                    f"log tail:\n{tail(log)}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"timed out after {timeout}s waiting for {text!r} in the engine log; "
                    f"log tail:\n{tail(log)}"
                )
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `sig` and wait; an engine that does not exit in time is killed and that
        is an error (a clean shutdown that hangs is a bug worth failing a test for)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise TimeoutError(
                f"engine pid {self.pid} did not exit within {timeout}s of signal {sig}; "
                f"killed. log tail:\n{tail(self.log())}"
            ) from None

    def kill9(self) -> int:
        """SIGKILL: what a crash looks like (no cleanup of rules or queues)."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(10)

    def __repr__(self) -> str:
        state = "running" if self.running() else f"exited {self.proc.returncode}"
        return f"<EngineProc pid {self.pid} in {self.node} {state}>"
