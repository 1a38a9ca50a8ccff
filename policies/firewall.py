"""A host firewall, as the classic iptables tutorial builds it, written as a Python policy.

Equivalent iptables commands (what `nfhooks check policies/firewall.py` compiles it to, in spirit):

    iptables -A OUTPUT -p tcp --dport 80 -j DROP          # the classic first example: no web from here
    iptables -A INPUT -i lo -j ACCEPT
    iptables -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    iptables -A INPUT -p icmp --icmp-type echo-request -j ACCEPT
    ip6tables -A INPUT -p ipv6-icmp -j ACCEPT             # neighbour/router discovery, echo
    iptables -A INPUT -p tcp --dport 22 -s $trusted -j ACCEPT
    iptables -A INPUT -j REJECT                           # the rest: refused, visibly

Options: trusted (network, who may use SSH; --set trusted=192.0.2.0/24),
ssh_port (port, default 22).
"""

from nfhooks import Policy, accept, drop

policy = Policy(defaults={"INPUT": "reject"})
trusted = policy.option("trusted", default="10.0.0.0/8", type="network",
                        help="network allowed to reach SSH")
ssh_port = policy.option("ssh_port", default=22, type="port", help="the SSH port")


@policy.output(proto="tcp", dport=80)
def no_web(pkt):
    """Locally generated HTTP to port 80 is dropped (the classic iptables example)."""
    return drop()


@policy.input(iif="lo")
def loopback(pkt):
    return accept()


@policy.input(ctstate={"ESTABLISHED", "RELATED"})
def established(pkt):
    return accept()


@policy.input(proto="icmp")
def icmp(pkt):
    # echo requests in; other ICMP (unreachables, ...) is RELATED and was accepted above
    return accept() if pkt.icmp_type == 8 else None


@policy.input(proto="icmpv6")
def icmpv6(pkt):
    # 128 echo request, 133-137 router/neighbour solicitation/advertisement, redirect:
    # without neighbour discovery IPv6 stops working altogether.
    return accept() if pkt.icmp_type in (128, 133, 134, 135, 136, 137) else None


@policy.input(proto="tcp", dport=ssh_port, src=trusted)
def ssh(pkt):
    return accept()
