"""A TCP load balancer: each new connection to the service goes to one of N backends,
chosen in Python (round robin per address family), translated by the kernel's nat table.

Python sees only each connection's first packet; conntrack carries the choice for the rest
of the connection and translates the replies, so clients get answers from the address they
dialled. The equivalent iptables rules, for two backends, use the statistic match:

    iptables -t nat -A PREROUTING -p tcp --dport 80 -m statistic --mode nth --every 2 --packet 0 \\
             -j DNAT --to-destination 10.0.2.2:8080
    iptables -t nat -A PREROUTING -p tcp --dport 80 -j DNAT --to-destination 10.0.2.3:8080

Here the choice is ordinary Python: swap ``pick`` for least-connections, a hash of the
client address (sticky sessions), or a health check, and nothing else changes. Each backend
is one NAT target (``--nat-targets`` bounds them; the rules are installed on first use).

Options: ``port`` (the service port), ``vip`` (the service address; unset: any address
reaching this host's PREROUTING), ``backends`` (comma-separated ``addr:port``, IPv6 as
``[addr]:port``; both families may be mixed).
"""

import itertools

from nfhooks import Policy, dnat


def parse_backends(text: str) -> tuple:
    targets = tuple(dnat(item.strip()) for item in text.split(",") if item.strip())
    if not targets:
        raise ValueError("give at least one backend addr:port")
    return targets


policy = Policy()
port = policy.option("port", default=80, type="port", help="the service port clients dial")
vip = policy.option("vip", default=None, type="network", help="the service address (default any)")
backends = policy.option("backends", default="10.0.2.2:8080,10.0.2.3:8080", type=parse_backends,
                         help="comma-separated addr:port list")


class RoundRobin:
    """One rotation per address family, so IPv4 and IPv6 clients each spread evenly."""

    def __init__(self) -> None:
        self.turns = {4: itertools.count(), 6: itertools.count()}

    def pick(self, family: int, targets: tuple):
        same = [t for t in targets if t.family == family]
        return same[next(self.turns[family]) % len(same)] if same else None


balancer = RoundRobin()


@policy.prerouting(proto="tcp", dst=vip, dport=port)
def balance(pkt):
    backend = balancer.pick(pkt.version, backends.value)
    return dnat(backend) if backend is not None else None
