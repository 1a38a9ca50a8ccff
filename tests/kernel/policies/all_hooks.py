"""A handler at each of the five hooks (IPv4 and IPv6), all accepting: shows every hook decides."""

from nfhooks import Policy, accept

policy = Policy()


@policy.prerouting(proto="tcp", dport=8080)
def pre(pkt):
    return accept()


@policy.input(proto="tcp", dport=8080)
def inp(pkt):
    return accept()


@policy.forward(proto="tcp", dport=8080)
def fwd(pkt):
    return accept()


@policy.output(proto="tcp", dport=8080)
def out(pkt):
    return accept()


@policy.postrouting(proto="tcp", dport=8080)
def post(pkt):
    return accept()
