"""NAT on a router, decided in Python and carried out by the kernel's nat table.

Each handler sees only a connection's first packet (nfhooks adds ``--ctstate NEW`` to the
queue rule of a handler that returns NAT); the kernel translates the replies and the rest
of the connection, exactly as the equivalent rules below would:

    # masquerade everything leaving the outside interface (IPv4 and IPv6)
    iptables  -t nat -A POSTROUTING -o wan -j MASQUERADE
    ip6tables -t nat -A POSTROUTING -o wan -j MASQUERADE

    # port forward: outside connections to port 2222 reach an inside host's ssh
    iptables -t nat -A PREROUTING -i wan -p tcp --dport 2222 -j DNAT --to-destination 192.168.1.10:22

    # locally generated HTTP goes to a proxy instead (the classic OUTPUT example, as DNAT)
    iptables -t nat -A OUTPUT -p tcp --dport 80 -j DNAT --to-destination 10.0.2.10:8080

Options (``--set name=value``): ``wan``, ``forward_port``, ``inside`` and ``proxy``; the
last two are NAT destinations, checked when the policy loads (``[fd00::10]:22`` for IPv6).
A destination of one family leaves connections of the other alone (the handler returns
None, so the packet goes on untranslated).
"""

from nfhooks import Policy, dnat, masquerade

policy = Policy()
wan = policy.option("wan", default="wan", help="the outside interface")
forward_port = policy.option("forward_port", default=2222, type="port", help="outside port to forward")
inside = policy.option("inside", default="192.168.1.10:22", type=dnat, help="host:port it reaches")
proxy = policy.option("proxy", default="10.0.2.10:8080", type=dnat, help="where local HTTP goes")


@policy.postrouting(oif=wan)
def masquerade_outside(pkt):
    return masquerade()


@policy.prerouting(iif=wan, proto="tcp", dport=forward_port)
def port_forward(pkt):
    target = dnat(inside)
    return target if target.family == pkt.version else None


@policy.output(proto="tcp", dport=80)
def http_to_proxy(pkt):
    target = dnat(proxy)
    return target if target.family == pkt.version else None
