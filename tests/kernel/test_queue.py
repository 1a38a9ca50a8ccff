"""Queue configuration on the real kernel: the hand-written NFQNL_MSG_CONFIG is acknowledged,
refusals come back as clear errors, each queue gets the flags its hook and handler call for,
and a packet bigger than the copy range still gets its verdict."""

from __future__ import annotations

import errno
import re
import sys

import pytest

from .conftest import metric, save

_NETLINK = r"""
import errno, socket
from netfilterqueue import NetfilterQueue
from nfhooks.netlink import NetlinkError, NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_GSO, set_queue_config
a, b = NetfilterQueue(af=socket.AF_INET), NetfilterQueue(af=socket.AF_INET)
a.bind(5, lambda p: p.accept())
b.bind(6, lambda p: p.accept())
def attempt(fd, queue, flags, mask):
    try:
        set_queue_config(fd, queue, flags=flags, mask=mask, maxlen=77)
        return "ok"
    except NetlinkError as e:
        return str(e.errno)
print(attempt(a.get_fd(), 5, NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO, 0x05))
print(attempt(a.get_fd(), 5, 1 << 20, 1 << 20))   # a flag this kernel does not know
print(attempt(a.get_fd(), 7, 1, 1))               # nobody bound queue 7
print(attempt(b.get_fd(), 5, 1, 1))               # queue 5 belongs to another socket
print(open("/proc/net/netfilter/nfnetlink_queue").read())
"""


def test_config_message_acked_and_refusals_reported(nfh_lab):
    out = nfh_lab.exec("router", sys.executable, "-c", _NETLINK).stdout.splitlines()
    assert out[:4] == ["ok", str(errno.EOPNOTSUPP), str(errno.ENODEV), str(errno.EPERM)], out
    row = next(line.split() for line in out[4:] if line.split()[:1] == ["5"])
    assert row[2] == "0"  # still bound, nothing waiting: the refusals changed nothing


_POLICY = """
from nfhooks import Policy, accept
policy = Policy(defaults={"FORWARD": "drop"})

@policy.input(proto="udp", dport=9001)
def headers_only(pkt):
    return accept() if pkt.dport == 9001 else None

@policy.input(proto="udp", dport=9002)
def reads_payload(pkt):
    return accept() if pkt.payload else None

@policy.forward(proto="udp", dport=9003)
def forwarded(pkt):
    return accept()
"""


def _config(lab) -> dict[str, dict[str, str]]:
    text = lab.exec("router", "curl", "-s", "-m", "2", "http://127.0.0.1:9477/metrics").stdout
    out = {}
    for line in text.splitlines():
        if line.startswith("nfhooks_queue_config_info{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            out[labels["handler"]] = labels
    return out


def test_each_queue_gets_its_hooks_fail_mode_and_gso_where_safe(nfh_lab, tmp_path):
    lab = nfh_lab
    pol = tmp_path / "flags.py"
    pol.write_text(_POLICY)
    eng = lab.start_engine(str(pol), "--gso", "--queue-maxlen", "256", "--queue-rcvbuf", "65536", "-v")
    cfg = _config(lab)
    assert {h: (c["fail_mode"], c["gso"]) for h, c in cfg.items()} == {
        "headers_only": ("open", "on"),      # INPUT default accept: fail-open
        "reads_payload": ("open", "off"),    # reads pkt.payload: whole segments, not super-packets
        "forwarded": ("closed", "on"),       # FORWARD default drop: fail-closed
    }
    assert {c["maxlen"] for c in cfg.values()} == {"256"}
    assert all(int(c["rcvbuf"]) >= 65536 for c in cfg.values())  # the kernel doubles SO_RCVBUF
    assert "gso off (it reads pkt.payload)" in eng.log()
    # the queues work: the config exchange took no packet away from them
    lab.udp_server("router", 9001)
    assert lab.udp_send("client", lab.addr("router"), 9001, b"hi") == b"hi"
    assert metric(lab, "nfhooks_queue_received_packets_total", handler="headers_only") == 1


_TIMESTAMPS = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 29, 1)  # SO_TIMESTAMP: the kernel now stamps every packet
print("on", flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(60)
def test_a_packet_longer_than_the_copy_range_still_gets_its_verdict(nfh_lab, tmp_path):
    """Regression: a 5000-byte packet arriving with a hardware address and a timestamp made
    a 4104-byte message at NetfilterQueue's own copy range (4016), which its 4096-byte recv
    cut short; libnetfilter_queue dropped it and the packet waited forever. MAX_COPY fixes it."""
    lab = nfh_lab
    for node, dev in (("client", "eth0"), ("router", "lan")):
        lab.exec(node, "ip", "link", "set", dev, "mtu", "9000")
    import subprocess
    stamper = lab.popen("router", sys.executable, "-c", _TIMESTAMPS, stdout=subprocess.PIPE, text=True)
    assert stamper.stdout.readline().strip() == "on"
    pol = tmp_path / "big.py"
    pol.write_text("from nfhooks import Policy, accept\npolicy = Policy()\n"
                   "@policy.input(proto='udp', dport=9001)\ndef big(pkt):\n"
                   "    return accept() if pkt.truncated and pkt.length == 5028 else None\n")
    lab.start_engine(str(pol))
    lab.udp_server("router", 9001)
    big = b"B" * 5000
    assert lab.udp_send("client", lab.addr("router"), 9001, big, timeout=3) == big
    assert metric(lab, "nfhooks_handler_packets_total", handler="big", verdict="accept") == 1
    assert metric(lab, "nfhooks_queue_waiting_packets", handler="big") == 0


_SPREAD = """
import socket, sys
dst, port, addrs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for a in addrs:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((a, 40000))  # fixed source port: --queue-balance hashes addresses only
    s.sendto(b"spread", (dst, port))
    s.close()
print(len(addrs))
"""


@pytest.mark.timeout(90)
def test_workers_share_a_handler_by_address_and_metrics_add_up(nfh_lab, tmp_path):
    lab = nfh_lab
    n_workers, n_addrs = 2, 200
    pol = tmp_path / "spread.py"
    pol.write_text("from nfhooks import Policy, accept\npolicy = Policy()\n"
                   "@policy.input(proto='udp', dport=9001)\ndef spread(pkt):\n    return accept()\n")
    eng = lab.start_engine(str(pol), "--workers", str(n_workers), "--queue-base", "10")
    saved = save(lab)
    assert f"--queue-balance 10:{10 + n_workers - 1}" in saved, saved
    # the client gets 200 more addresses in its LAN (inside its namespace only)
    client = lab.addr("client")
    prefix = client.rsplit(".", 1)[0]
    addrs = [f"{prefix}.{i}" for i in range(20, 20 + n_addrs)]
    lab.exec("client", "ip", "-batch", "-", input="".join(f"addr add {a}/32 dev eth0\n" for a in addrs))
    lab.exec("client", sys.executable, "-c", _SPREAD, lab.addr("router"), 9001, *addrs, timeout=30)

    def per_queue() -> dict[str, float]:
        text = lab.exec("router", "curl", "-s", "-m", "5", "http://127.0.0.1:9477/metrics").stdout
        out = {}
        for line in text.splitlines():
            if line.startswith("nfhooks_queue_received_packets_total{"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                out[labels["queue"]] = float(line.rsplit(" ", 1)[1])
        return out

    counts = lab.wait_for(lambda: (c if sum((c := per_queue()).values()) >= n_addrs else None),
                          timeout=20, what=f"{n_addrs} packets received over the workers")
    assert sorted(counts) == [str(10 + w) for w in range(n_workers)]
    fair = n_addrs / n_workers
    assert all(abs(c - fair) <= 0.3 * fair for c in counts.values()), counts  # binomial sd is 7
    # one endpoint, the sum of the workers' counters
    assert metric(lab, "nfhooks_handler_packets_total", handler="spread", verdict="accept") == n_addrs
    assert metric(lab, "nfhooks_worker_up") == n_workers
    # each queue is bound by a different process (its netlink port id)
    table = lab.exec("router", "cat", "/proc/net/netfilter/nfnetlink_queue").stdout.split("\n")
    ports = {f.split()[1] for f in table if f.split() and f.split()[0] in counts}
    assert len(ports) == n_workers, table
    # SIGTERM: rules removed, workers gone, queues unbound
    eng.proc.terminate()
    assert eng.proc.wait(15) == 0, eng.log()[-2000:]
    assert "NFH-" not in save(lab)
    table = lab.exec("router", "cat", "/proc/net/netfilter/nfnetlink_queue").stdout.split("\n")
    assert not [f for f in table if f.split() and f.split()[0] in counts], table
    print(f"workers: {counts} of {n_addrs}")


_GSO_POLICY = """
from nfhooks import Policy, accept, mark
policy = Policy()

@policy.output(proto="tcp", dport=5201)
def bulk(pkt):
    # headers only: a GSO super-packet is longer than any frame on the wire
    return accept() if pkt.length <= 1500 else mark(0x1, 0x1)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("gso", [True, False], ids=["gso", "segmented"])
def test_gso_queues_super_packets_whole_and_they_arrive_intact(nfh_lab, tmp_path, gso):
    """Locally generated TCP is a GSO packet at OUTPUT (segmented later, by the device).
    With --gso the queue gets it whole -- truncated copy, CHECKSUM_PARTIAL -- and the accepted
    packet still leaves correctly segmented and checksummed (the transfer completes);
    without it the kernel segments (and checksums) each packet before queueing it."""
    import json
    import subprocess

    lab = nfh_lab
    pol = tmp_path / "gso.py"
    pol.write_text(_GSO_POLICY)
    lab.start_engine(str(pol), "--gso" if gso else "--no-gso")
    server = lab.addr("server")
    lab.popen("server", "iperf3", "-s", "-1", "-B", server, stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
    lab.wait_for(lambda: f"{server}:5201" in lab.exec("server", "ss", "-ltnH").stdout,
                 what="iperf3 server listening")
    cp = lab.exec("router", "iperf3", "-c", server, "-n", "8M", "--cport", "40998", "-J",
                  timeout=60, check=False)
    assert cp.returncode == 0, cp.stdout[-2000:]
    end = json.loads(cp.stdout)["end"]
    # completed: TCP delivered 8 MB (a bad checksum would have stalled it in retransmissions)
    assert end["sum_sent"]["bytes"] >= 8 * 1024 * 1024 and end["sum_received"]["bytes"] > 0
    whole = metric(lab, "nfhooks_handler_packets_total", handler="bulk", verdict="mark")
    segments = metric(lab, "nfhooks_handler_packets_total", handler="bulk", verdict="accept")
    assert (whole > 0) is gso, (whole, segments)
    assert metric(lab, "nfhooks_malformed_packets_total") == 0
    print(f"gso={gso}: {whole:.0f} super-packets, {segments:.0f} segments queued")


def test_workers_cpu_fanout_rule_installs_and_serves(nfh_lab, tmp_path):
    lab = nfh_lab
    pol = tmp_path / "fan.py"
    pol.write_text("from nfhooks import Policy, accept\npolicy = Policy()\n"
                   "@policy.input(proto='udp', dport=9001)\ndef fan(pkt):\n    return accept()\n")
    lab.start_engine(str(pol), "--workers", "2", "--queue-cpu-fanout")
    saved = save(lab)
    assert "--queue-balance 0:1" in saved and "--queue-cpu-fanout" in saved, saved
    lab.udp_server("router", 9001)
    assert lab.udp_send("client", lab.addr("router"), 9001, b"fan") == b"fan"
    assert metric(lab, "nfhooks_handler_packets_total", handler="fan", verdict="accept") == 1
