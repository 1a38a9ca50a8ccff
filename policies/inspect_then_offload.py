"""Inspect, then offload: an HTTP Host filter that reads one packet per connection.

Every new TCP connection to ``port`` (this host's, at INPUT, and the hosts' it routes to, at
FORWARD) is looked at until its first data packet: the handshake is accepted packet by packet,
then the HTTP request's ``Host`` header decides the whole connection. An allowed connection is
``accept(connection=True)``: the verdict is kept in the connmark and every later packet of it
(both directions, at that hook) is accepted by a kernel rule, never queued. A Host in
``blocked`` is ``reject(connection=True)``: the client gets a TCP reset now, and every later
packet of that connection a reset from the kernel. Python sees about three packets per
connection whatever its length (nfhooks_connection_verdict_packets_total counts the rest).

Equivalent, roughly (what `nfhooks check policies/inspect_then_offload.py` prints):

    iptables -A FORWARD -m connmark --mark <allowed>/<field> -j ACCEPT
    iptables -A FORWARD -p tcp -m connmark --mark <blocked>/<field> -j REJECT --reject-with tcp-reset
    iptables -A FORWARD -p tcp --dport 80 -j NFQUEUE            # SYN, ACK, the first request

A request whose headers do not fit its first data packet is inspected until the Host header
arrives; data that is not an HTTP request is allowed (nothing to check). A keep-alive
connection is decided by its first request's Host. Options: port (80), blocked (a comma list
of host names, compared without case and port).
"""

from nfhooks import Policy, accept, reject

policy = Policy(name="inspect_then_offload",
                description="HTTP Host checked on the first data packet; the rest of a connection in the kernel")
port = policy.option("port", default=80, type="port", help="the HTTP port whose connections are inspected")
blocked = policy.option("blocked", default="blocked.example", type="str",
                        help="comma-separated Host names whose connections are reset")

METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE")


def request_host(data: bytes) -> "str | None | bool":
    """The Host of the HTTP request that starts with ``data`` (lower case, no port); None when
    ``data`` is not an HTTP request; False when the headers are not complete yet."""
    method = data.split(b" ", 1)[0]
    if method not in METHODS:
        return None
    head, complete, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            host = value.strip().decode("ascii", "replace").lower()
            return host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]
    return "" if complete else False


def blocked_hosts() -> set[str]:
    return {h.strip().lower() for h in str(blocked.value).split(",") if h.strip()}


@policy.forward(proto="tcp", dport=port, name="http_forward")
@policy.input(proto="tcp", dport=port)
def http(pkt):
    """The handshake packet by packet, then the first request's Host decides the connection."""
    if not pkt.payload:
        return accept()  # SYN, ACK: nothing to read yet
    host = request_host(pkt.payload)
    if host is False:
        return accept()  # the request's headers go on in the next packet
    if host and host in blocked_hosts():
        return reject(connection=True)
    return accept(connection=True)
