"""Flow offload benchmark policy (`make bench`, the "nfhooks flow offload" rows).

The same accept-unread handlers as policies/bench.py, declared ``flow=True``: Python decides
each connection's first packet (per direction), nfhooks saves the decision in the connmark,
and an offload rule accepts every later packet of the connection in the kernel. What the
benchmark measures is how close that gets to the kernel-only row.

    iptables equivalent of what the kernel does after the first packet:
    iptables -A INPUT -p tcp --dport 5203 -m conntrack --ctdir ORIGINAL \\
             -m connmark --mark <generation|handler>/<mask> -j ACCEPT

Options: port (default 5203).
"""

from nfhooks import Policy, accept

policy = Policy("bench_flow", defaults={"INPUT": "accept"})
port = policy.option("port", default=5203, type="port", help="port whose connections are offloaded")


@policy.input(proto="udp", dport=port, flow=True)
def udp_flow(pkt):
    return accept()


@policy.input(proto="tcp", dport=port, flow=True)
def tcp_flow(pkt):
    return accept()
