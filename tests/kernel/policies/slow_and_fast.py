"""A slow handler under a flood beside a fast one: the fast one must still answer."""

import time

from nfhooks import Policy, accept

policy = Policy()


@policy.input(iif="lo")
def loopback(pkt):
    return accept()


@policy.input(proto="udp", dport=9000)
def slow(pkt):
    time.sleep(0.002)
    return accept()


@policy.input(proto="tcp", dport=7001)
def fast(pkt):
    return accept()
