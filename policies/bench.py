"""The benchmark policy of `make bench` (nfhooks/bench.py): the cheapest useful policy, so
what the benchmark measures is nfhooks' own per-packet cost, not the handler's.

Packets to the iperf3 port on the host itself (INPUT) are queued to a handler that accepts
them without looking at them; packets to the second port go to a handler that also reads
what a real policy reads first (source address, destination port, protocol), so the cost of
the lazy fields shows up as the difference between the two rows of the benchmark. One
handler per protocol because a port match needs one, so four queues in all.

    udp/tcp `port`          accept()                      "nfhooks" rows
    udp/tcp `fields_port`   read pkt.src, pkt.dport ...   "nfhooks fields" rows
                            then accept()
    udp `echo_port`         accept() (every packet)       latency rows (UDP echo RTT)

(The "nfhooks flow offload" rows use policies/bench_flow.py, a separate engine: `--workers`
refuses policies with flow handlers, and this one is also the "2 workers" rows' policy.)

Equivalent iptables commands (what nothing but a kernel rule would cost, the "kernel" row
of the benchmark, is these with ACCEPT and no Python at all):

    iptables -A INPUT -p udp --dport 5201 -j ACCEPT
    iptables -A INPUT -p tcp --dport 5201 -j ACCEPT

Everything else at INPUT falls to the default, accept, so the lab stays reachable.
Options: port (default 5201), fields_port (default 5202), echo_port (5204).
"""

from nfhooks import Policy, accept, drop

policy = Policy("bench", defaults={"INPUT": "accept"})
port = policy.option("port", default=5201, type="port", help="port whose packets are accepted unread")
fields_port = policy.option("fields_port", default=5202, type="port",
                            help="port whose packets are accepted after reading their fields")
echo_port = policy.option("echo_port", default=5204, type="port",
                          help="UDP port of the latency probe's echo server (every packet queued)")


@policy.input(proto="udp", dport=port)
def udp_accept(pkt):
    return accept()


@policy.input(proto="tcp", dport=port)
def tcp_accept(pkt):
    return accept()


def _fields(pkt):
    # What a typical policy reads: the source address (an ipaddress object, built lazily),
    # the destination port and the protocol (plain slots).
    if pkt.dport and pkt.proto and pkt.src.is_private:
        return accept()
    return drop()


@policy.input(proto="udp", dport=fields_port)
def udp_fields(pkt):
    return _fields(pkt)


@policy.input(proto="tcp", dport=fields_port)
def tcp_fields(pkt):
    return _fields(pkt)


@policy.input(proto="udp", dport=echo_port)
def udp_echo(pkt):
    return accept()
