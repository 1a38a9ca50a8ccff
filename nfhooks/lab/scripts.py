"""Small programs a lab runs with its interpreter inside a node (``ip netns exec NS python -c``):
the logging TCP/UDP server, a TCP connect probe, a UDP send-and-receive and a raw-socket ping.

Inline so that the lab needs nothing on the machine beyond iproute2 and Python.
"""

from __future__ import annotations

__all__ = ["CONNECT_SCRIPT", "PING_SCRIPT", "SERVER_SCRIPT", "UDP_SEND_SCRIPT"]

SERVER_SCRIPT = r"""
import base64, json, socket, sys, threading
mode, fam, host, port, log_path, ready_path, banner = sys.argv[1:8]
af = socket.AF_INET6 if fam == "6" else socket.AF_INET
s = socket.socket(af, socket.SOCK_STREAM if mode == "tcp" else socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if af == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind((host, int(port)))
lock = threading.Lock()
log = open(log_path, "a", buffering=1)
def record(**kw):
    with lock:
        log.write(json.dumps(kw) + "\n")
        log.flush()
def serve(conn, peer):
    conn.settimeout(1.0)
    data = b""
    try:
        data = conn.recv(65536)
    except OSError:
        pass
    if data:
        record(event="data", peer=peer[0], port=peer[1], data=base64.b64encode(data).decode())
    body = (banner + "\n").encode()
    try:
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d"
                     b"\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    except OSError:
        pass
    conn.close()
if mode == "tcp":
    s.listen(128)
open(ready_path, "w").close()
while True:
    if mode == "tcp":
        conn, peer = s.accept()
        record(event="accept", peer=peer[0], port=peer[1])
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
    else:
        data, peer = s.recvfrom(65535)
        record(event="datagram", peer=peer[0], port=peer[1], data=base64.b64encode(data).decode())
        try:
            s.sendto(data, peer)
        except OSError:
            pass
"""

CONNECT_SCRIPT = r"""
import errno, socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(timeout)
try:
    s.connect((host, port))
    print("ok")
except TimeoutError:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print(errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__)
finally:
    s.close()
"""

UDP_SEND_SCRIPT = r"""
import base64, socket, sys
host, port, timeout, data = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(timeout)
try:
    s.sendto(base64.b64decode(data), (host, port))
    reply = s.recv(65535)
    print(base64.b64encode(reply).decode())
except OSError:
    pass
"""

# Raw-socket ping, because iputils-ping is not necessarily installed.
PING_SCRIPT = r"""
import os, select, socket, struct, sys, time
host, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
v6 = ":" in host
if v6:
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident = os.getpid() & 0xFFFF
def csum(b):
    if len(b) % 2:
        b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xFFFF)
    t += t >> 16
    return ~t & 0xFFFF
got = 0
for seq in range(1, count + 1):
    payload = b"nfhooks-lab-ping" + struct.pack("!d", time.time())
    kind = 128 if v6 else 8
    pkt = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + payload
    if not v6:
        pkt = struct.pack("!BBHHH", kind, 0, csum(pkt), ident, seq) + payload
    try:
        s.sendto(pkt, (host, 0))
    except OSError:
        continue
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            break
        data = s.recv(65535)
        if not v6:
            data = data[(data[0] & 0x0F) * 4:]
        if len(data) < 8:
            continue
        typ, _code, _sum, rid, rseq = struct.unpack("!BBHHH", data[:8])
        if typ == (129 if v6 else 0) and rid == ident and rseq == seq:
            got += 1
            break
print(got)
"""
