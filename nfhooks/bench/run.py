"""Running the bench: :class:`Bench` builds the two-node lab (client -- router), starts the
iperf3 servers, the echo server and each consumer in turn, and measures every row.

Everything it starts is tracked by the lab, so a failure or Ctrl-C still removes it all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..lab.topology import pick_ranges
from ..metrics import parse_queue_stats
from .cases import (
    BACKEND_CASES,
    BARE_QUEUE,
    BENCH20_POLICY,
    CASES,
    CLK_TCK,
    CPORT_BASE,
    ECHO_PORT,
    FIELDS_PORT,
    FLOW_POLICY,
    FLOW_PORT,
    LATENCY_RATE,
    NOT_AVAILABLE,
    PORT,
    UDP_LEN,
    engine_args,
)
from .parse import IperfResult, breakdown, bucket_quantile, cpu_ticks, histogram_buckets, parse_iperf
from .parse import queue_handled, summarize_collapsed, vm_hwm_kib
from .report import describe_row, fmt
from .results import Row, latency_stats
from .scripts import CONSUMER_SCRIPT, ECHO_SCRIPT, PING_SCRIPT
from ..backends.tools import IPTABLES, SAVE_TOOLS

__all__ = ["Bench", "find_pyspy", "stop_process"]


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


class Bench:
    """The two-node lab and the measurements; everything it starts is tracked by the lab."""

    def __init__(self, lab: Any, seconds: float, policy: Path, log: Any = print) -> None:
        self.lab = lab
        self.seconds = seconds
        self.policy = policy
        self.log = log
        self._cport = CPORT_BASE
        self.server_addr = ""

    # -- setup -------------------------------------------------------------------------

    def build(self) -> None:
        lab = self.lab
        octet, _ = pick_ranges(lab.id)
        lab.add_node("client")
        lab.add_node("router")
        lab.connect("client", "eth0", "router", "lan")
        lab.segments["lan"] = {"client": "eth0", "router": "lan"}
        lab.networks["lan"] = {4: f"10.{octet}.1.0/24"}
        lab.add_address("router", "lan", f"10.{octet}.1.1/24")
        lab.add_address("client", "eth0", f"10.{octet}.1.2/24")
        lab.wait_links_up()
        self.server_addr = lab.addr("router")
        for port in (PORT, FIELDS_PORT, FLOW_PORT):
            self._start_iperf_server(port)
        ready = lab.tmpdir / "echo.ready"
        echo = lab.popen("router", sys.executable, "-c", ECHO_SCRIPT, self.server_addr, ECHO_PORT, ready)

        def echo_up() -> bool:
            if echo.poll() is not None:
                raise RuntimeError(f"UDP echo server exited with {echo.returncode}")
            return ready.exists()

        lab.wait_for(echo_up, timeout=10, what="UDP echo server")

    def _start_iperf_server(self, port: int) -> None:
        lab = self.lab
        err = open(lab.tmpdir / f"iperf3-server-{port}.log", "wb")
        proc = lab.popen("router", "iperf3", "-s", "-B", self.server_addr, "-p", port,
                         stdout=err, stderr=subprocess.STDOUT)
        err.close()

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"iperf3 server on port {port} exited with {proc.returncode}")
            out = lab.exec("router", "ss", "-Htln", f"sport = :{port}", check=False).stdout
            return bool(out.strip())

        lab.wait_for(listening, timeout=10, what=f"iperf3 server on port {port}")

    # -- probes ------------------------------------------------------------------------

    def queue_stats(self) -> list[Any]:
        cp = self.lab.exec("router", "cat", "/proc/net/netfilter/nfnetlink_queue", check=False)
        return parse_queue_stats(cp.stdout) if cp.returncode == 0 else []

    @staticmethod
    def cpu_seconds(pid: int) -> float | None:
        text = _read(f"/proc/{pid}/stat")
        return None if text is None else cpu_ticks(text) / CLK_TCK

    @staticmethod
    def rss_kib(pid: int) -> int | None:
        text = _read(f"/proc/{pid}/status")
        return None if text is None else vm_hwm_kib(text)

    # -- traffic -----------------------------------------------------------------------

    def iperf(self, proto: str, port: int, seconds: float | None = None, attempts: int = 3) -> IperfResult:
        """One iperf3 test from the client; retried when iperf3 fails to set the test up
        (3.12 now and then reports "unable to read from stream socket" right after the
        previous test on the same server)."""
        s = seconds or self.seconds
        for attempt in range(attempts):
            self._cport += 1  # a fresh fixed port per test: no TIME_WAIT clash for TCP
            argv: list[Any] = ["iperf3", "-c", self.server_addr, "-p", port, "--cport", self._cport,
                               "-t", f"{s:g}", "-J", "--get-server-output"]
            if proto == "udp":
                argv += ["-u", "-b", "0", "-l", UDP_LEN]
            cp = self.lab.exec("client", *argv, timeout=s + 40, check=False)
            try:
                return parse_iperf(json.loads(cp.stdout))
            except ValueError as e:
                err = str(e) if cp.stdout.strip().startswith("{") else (
                    f"iperf3 {proto} gave no JSON (exit {cp.returncode}): {(cp.stderr or cp.stdout)[-500:]}")
                if attempt + 1 == attempts:
                    raise RuntimeError(err) from None
                self.log(f"  (iperf3 {proto} failed, retrying: {err})")
                time.sleep(1.0)
        raise AssertionError("unreachable")

    def offloaded(self) -> int:
        """Packets nfhooks' offload rules accepted so far in the router (all rules, IPv4)."""
        from ..backends import resolve
        from ..saved import counted_rules

        text = self.lab.exec("router", SAVE_TOOLS[resolve()[0]][4], "-c", check=False).stdout
        return sum(r.packets for r in counted_rules(text) if '"nfhooks offload ' in r.text)

    def measure(self, case: str, proto: str, port: int, pid: int | None,
                queues: Iterable[int] | None, pids: Sequence[int] = ()) -> Row:
        """One iperf3 test through a consumer: ``pid`` (and ``pids``, e.g. worker processes)
        are the consumer's processes whose CPU time and peak RSS count."""
        procs = [pid, *pids] if pid else []
        q0 = self.queue_stats() if pid else []
        c0 = [self.cpu_seconds(p) for p in procs]
        off0 = self.offloaded() if case == "nfhooks flow offload" else 0
        t0 = time.monotonic()
        res = self.iperf(proto, port)
        wall = time.monotonic() - t0
        c1 = [self.cpu_seconds(p) for p in procs]
        q1 = self.queue_stats() if pid else []
        cpu = (sum(b - a for a, b in zip(c0, c1) if a is not None and b is not None)
               if procs and None not in c0 else None)
        queue = queue_handled(q0, q1, queues) if pid else None
        rss = sum(self.rss_kib(p) or 0 for p in procs) if procs else None
        row = Row.build(case, res, wall=wall, cpu=cpu, queue=queue, rss_kib=rss)
        if case == "nfhooks flow offload" and cpu is not None:
            # CPU per packet of the whole flow: decided in Python + accepted by the offload rule
            off = self.offloaded() - off0
            row.extra["offloaded_packets"] = off
            n = (row.rx_packets if proto == "udp" else None) or (row.handled or 0) + off
            row.cpu_us_per_packet = 1e6 * cpu / n if n else None
            # decided: by Python (the first packets) or by the offload rule (the rest): not bypassed
            decided = (row.handled or 0) + off
            row.decided_pps = decided / row.seconds if row.seconds else None
            if row.bypassed is not None and row.rx_packets is not None:
                row.bypassed = max(0, row.rx_packets - decided)
        self.log(describe_row(row))
        return row

    def latency(self, case: str, rate: float, seconds: float) -> dict[str, Any]:
        """Fixed-rate UDP echo probes from the client to the router's echo server."""
        self._cport += 1
        cp = self.lab.exec("client", sys.executable, "-c", PING_SCRIPT, self.server_addr, ECHO_PORT,
                           rate, seconds, self._cport, timeout=seconds + 30, check=False)
        try:
            doc = json.loads(cp.stdout)
        except ValueError:
            raise RuntimeError(f"latency probe failed (exit {cp.returncode}): {cp.stderr[-500:]}") from None
        st = latency_stats(doc["rtt_ns"], doc["sent"], rate)
        self.log(f"  latency {case:<10} {rate:,.0f}/s: p50 {fmt(st['p50_us'], '.0f')} us, "
                 f"p99 {fmt(st['p99_us'], '.0f')} us, {st['received']:,}/{st['sent']:,} answered")
        return st

    # -- consumers ---------------------------------------------------------------------

    def rule(self, op: str, proto: str, port: int, queue: int) -> None:
        # the iptables of the backend nfhooks writes to ($NFHOOKS_BACKEND, else auto); run with
        # `ip netns exec` inside the router namespace, never in the machine's own.
        from ..backends import resolve

        self.lab.exec("router", IPTABLES[resolve()[0]][4], "-w", op, "INPUT", "-p", proto, "--dport", port,
                      "-j", "NFQUEUE", "--queue-num", queue)

    @contextlib.contextmanager
    def consumer(self, mode: str, proto: str, port: int) -> Iterator[subprocess.Popen[Any]]:
        """The bare/scapy script bound to BARE_QUEUE, with its queue rule for ``port``."""
        lab = self.lab
        ready = lab.tmpdir / f"consumer-{mode}-{proto}-{port}.ready"
        log_path = lab.tmpdir / f"consumer-{mode}-{proto}-{port}.log"
        with open(log_path, "wb") as logf:
            proc = lab.popen("router", sys.executable, "-c", CONSUMER_SCRIPT, mode, BARE_QUEUE, ready,
                             stdout=logf, stderr=subprocess.STDOUT)

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{mode} consumer exited with {proc.returncode}: "
                                   f"{log_path.read_text(errors='replace')[-1500:]}")
            return ready.exists()

        try:
            lab.wait_for(up, timeout=30, what=f"{mode} consumer bound to queue {BARE_QUEUE}")
            self.rule("-A", proto, port, BARE_QUEUE)
            try:
                yield proc
            finally:
                self.rule("-D", proto, port, BARE_QUEUE)
        finally:
            stop_process(proc)

    def script_consumer(self, mode: str, proto: str) -> Row:
        with self.consumer(mode, proto, PORT) as proc:
            return self.measure(mode, proto, PORT, proc.pid, [BARE_QUEUE])

    def kernel(self, proto: str) -> Row:
        return self.measure("kernel", proto, PORT, None, None)

    def start_engine(self, *extra: str) -> Any:
        return self.lab.start_engine(str(self.policy), "--set", f"port={PORT}",
                                     "--set", f"fields_port={FIELDS_PORT}",
                                     "--set", f"echo_port={ECHO_PORT}", *engine_args("nfhooks"), *extra,
                                     node="router", ready_timeout=30)

    def engine_rows(self, protos: Sequence[str], fields: bool,
                    latency: dict[str, Any] | None = None, rate: float = LATENCY_RATE) -> list[Row]:
        """The policies/bench.py engine: nfhooks and nfhooks fields rows, and the engine's
        latency probe (into ``latency``)."""
        cases = [("nfhooks", PORT)] + ([("nfhooks fields", FIELDS_PORT)] if fields else [])
        try:
            engine = self.start_engine()
        except Exception as e:  # noqa: BLE001 -- the other rows are still worth reporting
            self.log(f"  nfhooks: engine did not start: {e}")
            if latency is not None:
                latency["nfhooks"] = {"error": f"engine did not start: {e}"}
            return [Row(c, p, error=f"engine did not start: {e}") for p in protos for c, _ in cases]
        rows = []
        try:
            for proto in protos:
                for case, port in cases:
                    rows.append(self._guard(case, proto, lambda: self.measure(
                        case, proto, port, engine.pid, None)))
            if latency is not None:
                latency["nfhooks"] = self._guard_latency("nfhooks", rate, engine=True, pid=engine.pid)
        finally:
            engine.stop()
        return rows

    def policy_rows(self, case: str, policy: Path, port: int, protos: Sequence[str]) -> list[Row]:
        """Rows of one more engine running ``policy`` (``--set port=<port>``)."""
        try:
            engine = self.lab.start_engine(str(policy), "--set", f"port={port}", *engine_args(case),
                                           node="router", ready_timeout=30)
        except Exception as e:  # noqa: BLE001
            self.log(f"  {case}: engine did not start: {e}")
            return [Row(case, p, error=f"engine did not start: {e}") for p in protos]
        try:
            return [self._guard(case, proto, lambda: self.measure(case, proto, port, engine.pid, None))
                    for proto in protos]
        finally:
            engine.stop()

    def workers_rows(self, protos: Sequence[str], workers: int = 2) -> list[Row]:
        """``nfhooks run --workers N`` if this nfhooks has it; otherwise rows saying so."""
        case = f"nfhooks {workers} workers"
        helptext = subprocess.run([sys.executable, "-m", "nfhooks", "run", "--help"], capture_output=True,
                                  text=True, env={**os.environ, "COLUMNS": "200"}).stdout
        if "--workers" not in helptext:
            self.log(f"  {case}: {NOT_AVAILABLE} (nfhooks run has no --workers)")
            return [Row(case, p, error=f"{NOT_AVAILABLE}: nfhooks run has no --workers yet") for p in protos]
        try:
            engine = self.start_engine("--workers", str(workers))
        except Exception as e:  # noqa: BLE001
            self.log(f"  {case}: engine did not start: {e}")
            return [Row(case, p, error=f"engine did not start: {e}") for p in protos]
        try:
            def children() -> list[int]:
                out = subprocess.run(["pgrep", "-P", str(engine.pid)], capture_output=True, text=True).stdout
                kids = [int(x) for x in out.split()]
                # `ip netns exec` may exec in place or fork: include grandchildren
                for k in list(kids):
                    out = subprocess.run(["pgrep", "-P", str(k)], capture_output=True, text=True).stdout
                    kids += [int(x) for x in out.split()]
                return kids

            return [self._guard(case, proto, lambda: self.measure(
                case, proto, PORT, engine.pid, None, pids=children())) for proto in protos]
        finally:
            engine.stop()

    def metrics_text(self) -> str:
        return self.lab.exec("router", "curl", "-s", "-m", "3", "http://127.0.0.1:9477/metrics",
                             check=False).stdout

    def _guard_latency(self, case: str, rate: float, seconds: float | None = None,
                       engine: bool = False, pid: int | None = None) -> dict[str, Any]:
        """The probe; with ``engine``, also the engine's own decision time over the probe
        (nfhooks_decision_seconds at INPUT: callback entry to verdict, bucket upper bounds);
        with ``pid``, the consumer's CPU time per answered probe (``cpu_us_per_probe``)."""
        try:
            h0 = histogram_buckets(self.metrics_text(), "nfhooks_decision_seconds", hook="INPUT") if engine else {}
            c0 = self.cpu_seconds(pid) if pid else None
            st = self.latency(case, rate, seconds or self.seconds)
            c1 = self.cpu_seconds(pid) if pid else None
            if c0 is not None and c1 is not None and st["received"]:
                st["cpu_us_per_probe"] = 1e6 * (c1 - c0) / st["received"]
                self.log(f"  latency {case:<10} CPU {st['cpu_us_per_probe']:.1f} us per probe")
            if engine:
                h1 = histogram_buckets(self.metrics_text(), "nfhooks_decision_seconds", hook="INPUT")
                for q in (50, 99):
                    le = bucket_quantile(h0, h1, q / 100)
                    st[f"decision_p{q}_le_us"] = None if le is None or le == float("inf") else le * 1e6
            return st
        except Exception as e:  # noqa: BLE001
            self.log(f"  latency {case}: FAILED: {e}")
            return {"error": f"{type(e).__name__}: {e}"}

    def bare_latency(self, rate: float) -> dict[str, Any]:
        try:
            with self.consumer("bare", "udp", ECHO_PORT) as proc:
                return self._guard_latency("bare", rate, pid=proc.pid)
        except Exception as e:  # noqa: BLE001
            return {"error": f"{type(e).__name__}: {e}"}

    def profile(self, out: Path, seconds: float, native: bool) -> dict[str, Any]:
        """py-spy on the engine while a UDP flood runs (a separate run: sampling slows it)."""
        pyspy = find_pyspy()
        if pyspy is None:
            raise RuntimeError("--profile needs py-spy (pip install py-spy)")
        engine = self.start_engine()
        try:
            argv = [pyspy, "record", "-p", str(engine.pid), "-d", f"{seconds:g}", "-r", "500",
                    "-f", "raw", "-o", str(out)]
            if native:
                argv.append("--native")
            spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                time.sleep(0.5)  # attach before the flood starts
                self.iperf("udp", PORT, seconds)
                _, err = spy.communicate(timeout=seconds + 30)
            finally:
                stop_process(spy)
            if spy.returncode:
                raise RuntimeError(f"py-spy exited with {spy.returncode}: {err[-800:]}")
        finally:
            engine.stop()
        text = out.read_text()
        return {**summarize_collapsed(text), "breakdown": breakdown(text)}

    def _guard(self, case: str, proto: str, fn: Any) -> Row:
        """One failing row is reported, not fatal: the other rows are still worth having."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            self.log(f"  {case} {proto}: FAILED: {e}")
            return Row(case, proto, error=f"{type(e).__name__}: {e}")

    def run(self, protos: Sequence[str], fields: bool, scapy: bool, *, more: bool = True,
            latency: dict[str, Any] | None = None, rate: float = LATENCY_RATE, rounds: int = 1) -> list[Row]:
        """Every row, ``rounds`` times over: round 1 measures every row, then round 2 every
        row, ... (so a slow minute of a shared machine hits one round of every row, not every
        round of one row); each Row says its round. ``more``: also the 20-handler, flow offload
        and workers rows. ``latency`` (a dict) receives the latency probes, taken once, in round
        1: kernel, bare, nfhooks."""
        rows: list[Row] = []
        if latency is not None:
            latency["kernel"] = self._guard_latency("kernel", rate)
            latency["bare"] = self.bare_latency(rate)
        if not protos:  # --only latency: the engine's probe, no throughput rows
            if latency is not None:
                self.engine_rows((), False, latency=latency, rate=rate)
            return rows
        for rnd in range(1, rounds + 1):
            self.log(f"round {rnd}/{rounds}")
            batch = self._round(protos, fields, scapy, more, latency if rnd == 1 else None, rate)
            for r in batch:
                r.round = rnd
            rows += batch
        return rows

    def _round(self, protos: Sequence[str], fields: bool, scapy: bool, more: bool,
               latency: dict[str, Any] | None, rate: float) -> list[Row]:
        """One round: every row once (each consumer started once, measured for each proto)."""
        rows: list[Row] = []
        for proto in protos:
            rows.append(self._guard("kernel", proto, lambda: self.kernel(proto)))
            rows.append(self._guard("bare", proto, lambda: self.script_consumer("bare", proto)))
            if scapy:
                rows.append(self._guard("scapy", proto, lambda: self.script_consumer("scapy", proto)))
        rows += self.engine_rows(protos, fields, latency=latency, rate=rate)
        for case in BACKEND_CASES:  # the same policy and port under each backend
            rows += self.policy_rows(case, self.policy, PORT, protos)
        if more:
            # what verdict batching gains: the same engine, a verdict message per packet as bare's
            rows += self.policy_rows("nfhooks no-batch", self.policy, PORT, protos)
            rows += self.policy_rows("nfhooks 20 handlers", BENCH20_POLICY, PORT, protos)
            if "tcp" in protos:  # what the default GSO gains: the same policy with --no-gso
                rows += self.policy_rows("nfhooks 20 handlers no-gso", BENCH20_POLICY, PORT, ("tcp",))
            rows += self.policy_rows("nfhooks flow offload", FLOW_POLICY, FLOW_PORT, protos)
            rows += self.workers_rows(protos)
        order = {c: i for i, c in enumerate(CASES)}
        rows.sort(key=lambda r: (protos.index(r.proto), order.get(r.case, 99)))
        return rows


def find_pyspy() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM by PID, SIGKILL after 3 s (the lab would do it at close; this frees the queue now)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

