"""The compose lab for real: build the image, run client -> router (nfhooks) -> server and
Prometheus in docker, check the policy's verdicts and that Prometheus sees the router's metrics.

Needs root and docker (Debian's docker.io, docker-compose, debootstrap: `make deps` installs them).
dockerd is started in restricted mode if none runs (--iptables=false --ip-forward=false
--bridge=none: the host's firewall and sysctls are left alone) and stopped by its PID afterwards;
a dockerd that was already running is used and left running. Deselect with -m "not containers".
The first run builds the base image (debootstrap, ~30 s) and the images (~70 s); they stay as cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.containers, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
LAB = COMPOSE_DIR / "lab.sh"
NET = "10.78"  # not the default 10.77 of `make lab-containers`, so both can run at once
SERVER = f"{NET}.2.10"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _poll(fn, timeout: float, what: str, interval: float = 0.5):
    """Call fn until it returns something truthy; fail with the last error after the deadline."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = fn()
            if result:
                return result
            last = result
        except Exception as e:  # noqa: BLE001 -- polled: keep the last error for the message
            last = e
        time.sleep(interval)
    pytest.fail(f"{what}: not within {timeout:.0f} s (last: {last!r})")


class Lab:
    def __init__(self, tmp: Path):
        self.project = f"nfhtest{os.getpid()}"
        self.prom_port = _free_port()
        self.pidfile = tmp / "dockerd.pid"
        self.env = dict(os.environ, NFH_DOCKERD_PIDFILE=str(self.pidfile),
                        NFH_DOCKERD_LOG=str(tmp / "dockerd.log"), NFHLAB_NET=NET,
                        NFHLAB_PROJECT=self.project, NFHLAB_PROMETHEUS_PORT=str(self.prom_port),
                        NFHOOKS_IMAGE="nfhooks:dev")
        self.started_pid: int | None = None

    def sh(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(LAB), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        cp = subprocess.run(["docker-compose", "-p", self.project, "-f", str(COMPOSE_DIR / "docker-compose.yml"),
                             *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and cp.returncode:
            raise AssertionError(f"docker-compose {' '.join(args)} failed:\n{_tail(cp.stdout + cp.stderr)}")
        return cp

    def probe(self, port: int, timeout: float = 2.0) -> str:
        cp = self.compose("exec", "-T", "client", "python3", "/lab/probe.py", SERVER, str(port), str(timeout))
        return cp.stdout.strip()

    def prom(self, query: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)["data"]["result"]

    def stop_daemon(self) -> None:
        if self.started_pid is None:
            return
        pid, self.started_pid = self.started_pid, None
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            try:  # dockerd is our grandchild (lab.sh exited): reaped by init, or by us if reparented
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)
        subprocess.run(["umount", "/run/docker/netns/default"], capture_output=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip(f"the compose lab needs root (euid {os.geteuid()}): dockerd, NET_ADMIN containers")
    if not shutil.which("docker"):
        pytest.skip("no docker client on PATH")
    lab = Lab(tmp_path_factory.mktemp("containers"))
    cp = lab.sh("deps")
    if cp.returncode or not (shutil.which("dockerd") and shutil.which("docker-compose")):
        pytest.skip(f"cannot install docker.io/docker-compose/debootstrap: {_tail(cp.stdout + cp.stderr, 5)}")
    cp = lab.sh("daemon", timeout=120)
    if lab.pidfile.exists():
        lab.started_pid = int(lab.pidfile.read_text())
    try:
        if cp.returncode:
            pytest.skip(f"cannot start dockerd: {_tail(cp.stdout + cp.stderr, 8)}")
        cp = lab.sh("base-image")
        if cp.returncode:
            pytest.skip(f"cannot make the debian:bookworm-slim base image (debootstrap): "
                        f"{_tail(cp.stdout + cp.stderr, 8)}")
        t0 = time.monotonic()
        cp = lab.sh("build")
        assert cp.returncode == 0, f"image build failed:\n{_tail(cp.stdout + cp.stderr, 30)}"
        print(f"\nbuild: {time.monotonic() - t0:.0f} s; {_tail(cp.stdout, 1)}")
        lab.compose("up", "-d", "--no-build")
        _poll(lambda: lab.compose("exec", "-T", "router", "python3", "-c",
                                  "import urllib.request as u; u.urlopen('http://127.0.0.1:9477/metrics', timeout=2)",
                                  check=False).returncode == 0,
              90, "the router's engine serving /metrics")
        _poll(lambda: lab.compose("exec", "-T", "server", "python3", "-c",
                                  "import socket; socket.create_connection(('127.0.0.1', 8080), 2).close()",
                                  check=False).returncode == 0,
              60, "the server listening")
        yield lab
    finally:
        try:
            if shutil.which("docker-compose") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
                cp = lab.compose("logs", "--no-color", "--tail", "20", "router", check=False)
                print(_tail(cp.stdout, 20))
                lab.compose("down", "-v", "--remove-orphans", "-t", "20", check=False)
        finally:
            lab.stop_daemon()


def test_router_policy_verdicts_take_effect(lab):
    assert lab.probe(8080) == "ok hello 8080"      # served: accepted at FORWARD
    assert lab.probe(8081) == "refused"            # refused: reject() -> TCP reset from the router
    assert lab.probe(8082, timeout=1.5) == "timeout"  # dropped: no answer at all


def test_prometheus_scrapes_the_routers_verdicts(lab):
    for port in (8080, 8081, 8082):
        lab.probe(port, timeout=1.0)

    def forward_verdicts():
        res = lab.prom('sum by (verdict) (nfhooks_packets_total{job="nfhooks",hook="FORWARD"}) > 0')
        got = {r["metric"]["verdict"]: float(r["value"][1]) for r in res}
        return got if {"accept", "reject", "drop"} <= got.keys() else None

    got = _poll(forward_verdicts, 90, "Prometheus reporting FORWARD accept/reject/drop from the router", 1.0)
    assert all(v > 0 for v in got.values())
    up = lab.prom('up{job="nfhooks"}')
    assert [r["value"][1] for r in up] == ["1"]
    handlers = {r["metric"].get("handler") for r in lab.prom("nfhooks_handler_packets_total > 0")}
    assert {"served", "refused", "dropped"} <= handlers


def test_router_container_is_healthy_and_hardened(lab):
    cid = lab.compose("ps", "-q", "router").stdout.strip()

    def health():
        cp = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", cid],
                            capture_output=True, text=True)
        return cp.stdout.strip() == "healthy"

    _poll(health, 60, "the image's HEALTHCHECK (urllib to 127.0.0.1:9477/metrics) passing", 1.0)
    info = json.loads(subprocess.run(["docker", "inspect", cid], capture_output=True, text=True,
                                     check=True).stdout)[0]["HostConfig"]
    assert info["CapDrop"] == ["ALL"] and sorted(info["CapAdd"]) == ["NET_ADMIN", "NET_RAW"]
    assert info["ReadonlyRootfs"] is True
