"""`nfhooks lab` end to end: the whole run as a user starts it, then --keep / exec / down,
--json, --scenario, runs in a row, a run after a killed run, and nothing left behind.

Runs the CLI as a subprocess (its exit status and output are the interface). Every
scenario's observable effect is asserted from what the lab *observed* (peer addresses the
servers logged, pages fetched, TTLs the receiver's kernel reported, metric deltas, captured
packets), compared with addresses taken from the topology -- not from the lab's own verdict.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nfhooks.testing import requires_netns

from .conftest import ROOT, SAVE_TOOLS

pytestmark = pytest.mark.kernel
_REASON = requires_netns(probe=False)
needs_netns = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
HOOKS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
PREFIX = os.environ.get("NFHOOKS_LAB_PREFIX", "")
#: interface names the lab creates: none of them may ever appear in the root namespace
LAB_IFNAMES = re.compile(r"^(lan|wan|tun\d+|br0|sw-\S+)$")


def _env(tmp_path, **extra: str) -> dict[str, str]:
    """A run-private state dir, so a kept lab of a developer is never touched."""
    return {**os.environ, "NFHOOKS_LAB_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200",
            "PYTHONUNBUFFERED": "1", **extra}


def nfhooks(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nfhooks", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def lab_id(out: str) -> str:
    m = re.search(r"^lab (\S+) up in", out, re.M)
    assert m, out
    return m.group(1)


def engine_pid(out: str) -> int:
    m = re.search(r"engine pid (\d+)", out)
    assert m, out
    return int(m.group(1))


def namespaces(lab: str) -> list[str]:
    return [n for n in os.listdir("/run/netns") if n.startswith(f"nfhlab-{lab}-")] \
        if os.path.isdir("/run/netns") else []


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def root_nfhooks_rules() -> list[str]:
    """nfhooks rules in the machine's own namespace (read-only dump): must always be none."""
    lines: list[str] = []
    for tool in (t for tools in SAVE_TOOLS.values() for t in tools.values()):
        cp = subprocess.run([tool], capture_output=True, text=True)
        lines += [l for l in cp.stdout.splitlines() if "NFH-" in l or "nfhooks" in l]
    return lines


def processes_of(lab: str) -> list[str]:
    """Processes whose command line names the lab (its servers' logs live in nfhlab-<id>-*)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"nfhlab-{lab}-" in cmd:
            found.append(f"{entry}: {cmd[:200]}")
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_nothing_left(lab: str, pids: list[int], links_before: set[str]) -> None:
    assert namespaces(lab) == [], namespaces(lab)
    assert not processes_of(lab), processes_of(lab)
    assert not [p for p in pids if alive(p)], [p for p in pids if alive(p)]
    new = {l for l in root_links() - links_before if LAB_IFNAMES.match(l)}
    assert not new, f"lab interfaces in the root namespace: {new}"
    assert not Path(f"/run/nfhlab/{lab}.json").exists()


def hook_counts(out: str) -> dict[str, int]:
    """Packets per hook from the summary's per-hook table (rows: hook table verdict pkts ...)."""
    table = out.split("per-hook verdicts")[-1]
    counts: dict[str, int] = {}
    for hook, pkts in re.findall(rf"^\s*({'|'.join(HOOKS)})\s+\w+\s+\w+\s+(\d+)", table, re.M):
        counts[hook] = counts.get(hook, 0) + int(pkts)
    return counts


@needs_netns
@pytest.mark.timeout(150)
def test_lab_run_passes_explains_every_hook_and_leaves_nothing(tmp_path):
    links = root_links()
    rules_before = root_nfhooks_rules()
    r = nfhooks("lab", "--duration", "1", env=_env(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    lab = lab_id(out)
    counts = hook_counts(out)
    assert all(counts.get(h, 0) > 0 for h in HOOKS), (counts, out)
    # topology: names and both families' addresses printed
    assert re.search(rf"client\s+nfhlab-{lab}-client\s+10\.\d+\.1\.2 fd[0-9a-f:]+:1::2", out), out
    # malformed frames: each with its real outcome and the evidence for it
    assert "dropped by the kernel before any hook: IpInHdrErrors +1" in out, out
    assert "PREROUTING invalid: drop" in out, out
    assert "counted in nfhooks_malformed_packets_total" in out, out
    assert "engine still running after the raw packets: True" in out, out
    assert "classic example" in out and "no_web:drop" in out and "to_proxy:dnat" in out, out
    assert "refused:reject" in out and "ECONNREFUSED (ICMP port unreachable)" in out, out
    assert "port_forward:dnat" in out and "marked:mangle" in out and "nat_out:masquerade" in out, out
    assert "nfhooks lab exec router -- curl -s 127.0.0.1:9477/metrics" in out, out
    assert "TODO: not yet" not in out, out
    assert_nothing_left(lab, [engine_pid(out)], links)
    assert root_nfhooks_rules() == rules_before


def _check(sc: dict, pattern: str) -> re.Match:
    for c in sc["checks"]:
        m = re.search(pattern, c["text"])
        if m:
            return m
    raise AssertionError(f"{sc['key']}: no check matches {pattern!r}: {json.dumps(sc['checks'], indent=1)}")


@needs_netns
@pytest.mark.timeout(180)
def test_json_all_scenarios_observable_effects(tmp_path):
    from nfhooks.lab.runner import groups

    links = root_links()
    r = nfhooks("lab", "--json", "--scenario", "all", "--duration", "0", env=_env(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(r.stdout)  # stdout is the JSON and nothing else
    assert [s["key"] for s in data["scenarios"]] == groups()["all"]
    assert data["ok"] and data["passed"] == data["total"] == len(groups()["all"])
    sc = {s["key"]: s for s in data["scenarios"]}
    nodes = data["topology"]["nodes"]
    client4, client6 = nodes["client"]["ipv4"][0], nodes["client"]["ipv6"][0]
    server4, server6 = nodes["server"]["ipv4"][0], nodes["server"]["ipv6"][0]
    proxy4 = nodes["proxy"]["ipv4"][0]
    router_wan4 = [a for a in nodes["router"]["ipv4"] if a.rsplit(".", 1)[0] == server4.rsplit(".", 1)[0]][0]
    router_wan6 = nodes["router"]["ipv6"][1]
    for s in data["scenarios"]:
        assert set(s["hooks_expected"]) <= set(s["hooks_crossed"]), s
        assert s["verdicts"], s

    # forwarded: the server saw the client itself; with masquerade it saw the router
    _check(sc["forwarded"], rf"IPv4 server saw the connection from {re.escape(client4)}\b")
    _check(sc["masquerade"], rf"IPv4 server port 8081 saw {re.escape(router_wan4)} ")
    _check(sc["masquerade"], rf"IPv6 server port 8081 saw {re.escape(router_wan6)} ")
    assert any(v["handler"] == "nat_out" and v["verdict"] == "masquerade" for v in sc["masquerade"]["verdicts"])
    # to and from the router
    _check(sc["to-router"], r"IPv4 client → router .*:2222: ok")
    assert {"PREROUTING", "INPUT"} <= set(sc["to-router"]["hooks_crossed"])
    assert {"OUTPUT", "POSTROUTING"} <= set(sc["from-router"]["hooks_crossed"])
    # the seed's two examples: drop at OUTPUT times out, the DNATed fetch returns the proxy's page
    _check(sc["output-drop"], rf"IPv4 router → server {re.escape(server4)}:80: timeout$")
    _check(sc["dnat-local"], rf"IPv4 router fetches http://{re.escape(proxy4)}:80/ → 'nfhooks-lab proxy'")
    _check(sc["dnat-local"], r"IPv6 router fetches http://\[.*\]:80/ → 'nfhooks-lab proxy'")
    _check(sc["dnat-local"], rf"IPv4 proxy port 8080 saw {re.escape(router_wan4)}$")
    _check(sc["dnat-local"], rf"IPv4 router → server {re.escape(server4)}:80: timeout$")
    # the port forward reached the client, which saw the server's own address
    _check(sc["port-forward"], rf"IPv4 server → router {re.escape(router_wan4)}:8022: ok$")
    _check(sc["port-forward"], rf"IPv4 client port 8022 \(behind the router\) saw {re.escape(server4)} ")
    _check(sc["port-forward"], rf"IPv6 client port 8022 \(behind the router\) saw {re.escape(server6)} ")
    # reject: seen by the client as refused / ICMP port unreachable
    _check(sc["reject"], r"IPv4 client → router .*:23: refused$")
    _check(sc["reject"], r"IPv6 client → router .*:23: refused$")
    _check(sc["reject"], r"IPv4 client → router udp .*: ECONNREFUSED")
    # mangling: TTL/DSCP as the receiver's kernel reported them, and an untouched control
    rows = {(row[0], row[1]): row[2:] for t in sc["mangle"]["tables"] for row in t["rows"]}
    assert rows[("IPv4", "udp 5060 (marked)")][:2] == ["33", "46"], rows
    assert rows[("IPv6", "udp 5060 (marked)")][:2] == ["33", "46"], rows
    assert rows[("IPv4", "udp 5061 (control)")][:2] == ["63", "0"], rows
    # forwarding off: PREROUTING counted the packets, FORWARD stayed at zero
    m = _check(sc["forwarding-off"], r"ip_forward=0: PREROUTING \+(\d+) packets, FORWARD \+(\d+) ")
    assert int(m.group(1)) > 0 and int(m.group(2)) == 0
    _check(sc["forwarding-off"], r"ip_forward=0: IPv4 client → server .*: (timeout|EHOSTUNREACH)")
    _check(sc["forwarding-off"], r"ip_forward=1 again: client → server: ok, FORWARD \+[1-9]")
    # malformed frames: kernel drops and the engine's INVALID drops
    raw = {row[0]: row[2] for t in sc["malformed"]["tables"] for row in t["rows"]}
    assert "IpInHdrErrors" in raw["ipv4-short-ihl"] and "invalid: drop" in raw["tcp-syn-fin"], raw
    # vpn: the inner packet counted at FORWARD, the UDP carrying it at OUTPUT / POSTROUTING
    vpn = sc["vpn"]
    by = {(v["handler"], v["hook"]): v["packets"] for v in vpn["verdicts"]}
    assert by.get(("to_tunnel", "FORWARD"), 0) > 0 and by.get(("from_tunnel", "FORWARD"), 0) > 0, by
    assert by.get(("tunnel_out", "OUTPUT"), 0) > 0 and by.get(("tunnel_wire", "POSTROUTING"), 0) > 0, by
    host_b4 = nodes["host_b"]["ipv4"][0]
    gw_b_wan4 = [a for a in nodes["gw_b"]["ipv4"] if a.rsplit(".", 1)[0] == server4.rsplit(".", 1)[0]][0]
    cap = [row for t in vpn["tables"] for row in t["rows"]]
    assert any(row[0].startswith("FORWARD") and row[2].startswith(f"IPv4 tcp {client4}:")
               and f"-> {host_b4}:8080" in row[2] for row in cap), cap
    assert any(row[0].startswith("OUTPUT") and row[2].startswith(f"IPv4 udp {router_wan4}:51820 -> {gw_b_wan4}:51820")
               and row[3].startswith(f"IPv4 tcp {client4}:") for row in cap), cap
    _check(vpn, rf"IPv4 host_b \(office B\) saw {re.escape(client4)}:")
    assert_nothing_left(data["lab"], [data["engine"]["pid"]], links)


@needs_netns
@pytest.mark.timeout(120)
def test_two_runs_in_a_row_and_scenario_selection(tmp_path):
    env = _env(tmp_path)
    for _ in range(2):
        r = nfhooks("lab", "--json", "--scenario", "forwarded", "--scenario", "reject", "--duration", "0", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        data = json.loads(r.stdout)
        assert [s["key"] for s in data["scenarios"]] == ["forwarded", "reject"]
        assert namespaces(data["lab"]) == []
    bad = nfhooks("lab", "--scenario", "nope", env=env, timeout=30)
    assert bad.returncode == 2 and "unknown scenario 'nope'" in bad.stderr and "vpn" in bad.stderr


@needs_netns
@pytest.mark.timeout(180)
def test_run_after_a_killed_run(tmp_path):
    """kill -9 a `lab --keep` run mid-way: `lab down` removes its namespaces and kills what
    it left running (engine, servers); a new run then succeeds."""
    env = _env(tmp_path)
    links = root_links()
    proc = subprocess.Popen([sys.executable, "-m", "nfhooks", "lab", "--keep", "--duration", "30",
                             "--scenario", "steady"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if re.match(r"^lab \S+ up in", line):
                seen.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert seen.wait(60), "".join(lines)
        out = "".join(lines)
        lab, engine = lab_id(out), engine_pid(out)
        assert len(namespaces(lab)) == 5 and alive(engine)
        os.kill(proc.pid, signal.SIGKILL)  # the lab run we started, by its PID
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(5)
    assert namespaces(lab) and alive(engine)  # left behind, as a crash leaves it
    d = nfhooks("lab", "down", env=env, timeout=60)
    assert d.returncode == 0, d.stdout + d.stderr
    assert f"nfhlab-{lab}-router" in d.stdout, d.stdout
    deadline = time.monotonic() + 10
    while alive(engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_nothing_left(lab, [engine], links)
    again = nfhooks("lab", "--json", "--scenario", "forwarded", "--duration", "0", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout)["ok"]


@needs_netns
@pytest.mark.timeout(60)
def test_lab_down_only_touches_its_own_prefix(tmp_path):
    """`lab down` with NFHOOKS_LAB_PREFIX=P removes crashed runs of P only."""
    from pyroute2 import netns

    mine, other = f"nfhlab-{PREFIX}Dlab1-x", f"nfhlab-{PREFIX}Elab1-x"
    for n in (mine, other):
        netns.create(n)
    try:
        d = nfhooks("lab", "down", env=_env(tmp_path, NFHOOKS_LAB_PREFIX=f"{PREFIX}D"), timeout=60)
        assert d.returncode == 0, d.stdout + d.stderr
        present = set(os.listdir("/run/netns"))
        assert mine not in present and other in present
    finally:
        for n in (mine, other):
            if n in os.listdir("/run/netns"):
                netns.remove(n)


@needs_netns
@pytest.mark.timeout(120)
def test_pcap_is_passed_to_the_engine(tmp_path):
    """`nfhooks lab --pcap FILE`: the engine runs with --pcap, and FILE holds the scenario's
    packets -- the client's connection to the server, both families, at every hook it crossed,
    each with the handler and verdict that decided it."""
    from nfhooks.packet import parse
    from nfhooks.pcap import read_packets

    pcap = tmp_path / "lab.pcapng"
    r = nfhooks("lab", "--json", "--scenario", "forwarded", "--duration", "0", "--pcap", str(pcap),
                env=_env(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(r.stdout)
    argv = data["engine"]["argv"]
    assert argv[argv.index("--pcap") + 1] == str(pcap.resolve())
    nodes = data["topology"]["nodes"]
    (scenario,) = data["scenarios"]
    records = list(read_packets(pcap))
    assert records, "the capture holds no packet"
    for fam in (4, 6):
        client, server = nodes["client"][f"ipv{fam}"][0], nodes["server"][f"ipv{fam}"][0]
        client, server = (a.split("/")[0] for a in (client, server))
        hooks_seen = set()
        for _, raw, comment in records:
            pkt = parse(raw)
            if (str(pkt.src), str(pkt.dst), pkt.proto, pkt.dport) != (client, server, 6, 8080):
                continue
            fields = dict(kv.split("=", 1) for kv in comment.split())
            assert fields["verdict"] != "drop", comment  # the scenario's connection works
            hooks_seen.add(fields["hook"])
        assert hooks_seen == set(scenario["hooks_expected"]), (fam, hooks_seen)


@needs_netns
@pytest.mark.timeout(150)
def test_keep_exec_down(tmp_path):
    env = _env(tmp_path)
    r = nfhooks("lab", "--duration", "0", "--keep", "--scenario", "forwarded", env=env)
    out = r.stdout + r.stderr
    lab = lab_id(out)
    try:
        assert r.returncode == 0, out
        assert len(namespaces(lab)) == 5
        ex = nfhooks("lab", "exec", "client", "--", "ip", "-br", "addr", env=env, timeout=20)
        assert ex.returncode == 0, ex.stderr
        assert re.search(r"^eth0\S*\s+UP\s+10\.", ex.stdout, re.M), ex.stdout
        # the kept engine still decides: its metrics answer inside the router namespace
        m = nfhooks("lab", "exec", "router", "--", "curl", "-s", "127.0.0.1:9477/metrics",
                    env=env, timeout=20)
        assert "nfhooks_packets_total" in m.stdout, m.stderr
    finally:
        d = nfhooks("lab", "down", env=env, timeout=60)
    assert d.returncode == 0, d.stdout + d.stderr
    assert "stopped" in d.stdout and namespaces(lab) == [], d.stdout
    gone = nfhooks("lab", "exec", "client", "--", "true", env=env, timeout=20)
    assert gone.returncode == 2 and "no kept lab" in gone.stderr
