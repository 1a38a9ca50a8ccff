"""The soak test's policy (`make soak`): handlers at four hooks, NAT, a reject, in both families.

Equivalent iptables (roughly; nfhooks decides in Python what these would decide in the kernel):

    iptables -t mangle -A PREROUTING -p tcp -j MARK --set-xmark 0x1/0x1          # tag TCP
    iptables -A FORWARD -p tcp --dport 8080 -j ACCEPT
    iptables -A FORWARD -p tcp --dport 8081 -j REJECT --reject-with tcp-reset
    iptables -A FORWARD -p udp --dport 7000 -j ACCEPT
    iptables -A INPUT -p icmp -j ACCEPT
    iptables -t nat -A POSTROUTING -o wan -j MASQUERADE                         # client -> outside

`make soak` runs a copy of this file and bumps its version before each reload, so
nfhooks_policy_info shows which generation is in force.
"""

from nfhooks import Policy, accept, mark, masquerade, reject

policy = Policy(name="soak", version="1")  # `make soak` bumps this in its copy on every reload


@policy.prerouting(proto="tcp")
def tag_tcp(pkt):
    return mark(0x1, 0x1)


@policy.forward(proto="tcp", dport=8080)
def web(pkt):
    return accept() if pkt.mark & 0x1 else reject()


@policy.forward(proto="tcp", dport=8081)
def closed(pkt):
    return reject()


@policy.forward(proto="udp", dport=7000)
def echo(pkt):
    return accept()


@policy.input(proto="icmp")
def ping4(pkt):
    return accept()


@policy.input(proto="icmpv6")
def ping6(pkt):
    return accept()


@policy.postrouting(oif="wan", ctstate="NEW")
def hide_lan(pkt):
    return masquerade()
