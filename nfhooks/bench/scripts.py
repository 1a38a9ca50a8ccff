"""The small programs the bench runs inside the lab (``python -c`` in a namespace).

Inline, so the bench needs nothing on the machine beyond iperf3, iproute2 and Python.
"""

from __future__ import annotations

__all__ = ["CONSUMER_SCRIPT", "ECHO_SCRIPT", "PING_SCRIPT"]

ECHO_SCRIPT = r"""
import socket, sys
host, port, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, port))
open(ready, "w").close()
while True:
    d, a = s.recvfrom(2048)
    s.sendto(d, a)
"""

# Fixed-rate UDP probes from one fixed port; each reply's round trip (ns) is timed by the same
# process that stamped it. Prints {"sent": N, "rtt_ns": [...]} as JSON.
PING_SCRIPT = r"""
import json, select, socket, struct, sys, time
host, port, rate, seconds, cport = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", cport))
s.connect((host, port))
s.setblocking(False)
now, clock = time.perf_counter_ns, time.perf_counter
rtts = []
def drain():
    while True:
        try:
            d = s.recv(64)
        except (BlockingIOError, ConnectionRefusedError):
            return
        t = now()
        rtts.append(t - struct.unpack("!Iq", d[:12])[1])
n, interval = int(rate * seconds), 1.0 / rate
sent, nxt = 0, clock()
while sent < n:
    t = clock()
    if t >= nxt:
        s.send(struct.pack("!Iq", sent, now()))
        sent += 1
        nxt = max(nxt + interval, t - 0.01)  # behind by more than 10 ms: do not burst to catch up
        continue
    if select.select([s], [], [], nxt - t)[0]:
        drain()
end = clock() + 0.5
while clock() < end and len(rtts) < sent:
    if select.select([s], [], [], end - clock())[0]:
        drain()
print(json.dumps({"sent": sent, "rtt_ns": rtts}))
"""

# A minimal NetfilterQueue consumer, as a user would write it (plus the queue length nfhooks
# binds with, so the comparison is consumer against consumer, not queue size against queue
# size). The default SIGTERM action ends it; the kernel unbinds the queue with the socket.
CONSUMER_SCRIPT = r"""
import sys
from netfilterqueue import NetfilterQueue
mode, num, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == "scapy":
    from scapy.layers.inet import IP
    def callback(p):
        IP(p.get_payload())
        p.accept()
else:
    callback = lambda p: p.accept()
q = NetfilterQueue()
q.bind(num, callback, max_len=4096)
open(ready, "w").close()
q.run()
"""
