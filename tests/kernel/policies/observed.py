"""A router policy watched by a real Prometheus (tests/kernel/test_prometheus.py).

Healthy traffic moves every dashboard panel; three handlers exist to cause the faults the
alerts are about, for real:

    lo                  accept   Prometheus scrapes 127.0.0.1:9477 and the test queries
                                 Prometheus on 127.0.0.1:9090, both over lo (INPUT)
    udp 9999  flood     accept after 0.5 ms: a UDP flood overruns its kernel queue
    tcp 7001  accepted  accept   healthy INPUT traffic; its sources go into the set `seen`
                                 (the address-set panels)
    tcp 7002  dropped   drop     so the drop/reject panel has a real drop series too
    tcp 7009  broken    raises   NfhooksHandlerErrors (the INPUT default, drop, applies)
    tcp 7010  slow      accept after 20 ms: NfhooksSlowDecisions (p99 > 10 ms)
    icmp      ping      accept
    FORWARD tcp 8080    accept   healthy forwarded traffic (client -> server), flow=True: a
                                 connection's later packets are offloaded (the offload panels)
"""

import time

from nfhooks import Policy, accept, drop

policy = Policy(defaults={"INPUT": "drop"})
seen = policy.set("seen", kind="ip", timeout=600)


@policy.input(iif="lo")
def loopback(pkt):
    return accept()


@policy.input(proto="udp", dport=9999)
def flood(pkt):
    time.sleep(0.0005)  # ~2000 packets/s: a flood fills the 4096-packet queue at once
    return accept()


@policy.input(ctstate={"ESTABLISHED", "RELATED"})
def established(pkt):
    return accept()


@policy.input(proto="tcp", dport=7001)
def accepted(pkt):
    seen.add(pkt.src)
    return accept()


@policy.input(proto="tcp", dport=7002)
def dropped(pkt):
    return drop()


@policy.input(proto="tcp", dport=7009)
def broken(pkt):
    raise RuntimeError("a bug in the policy, on purpose")


@policy.input(proto="tcp", dport=7010)
def slow(pkt):
    time.sleep(0.02)
    return accept()


@policy.input(proto="icmp")
def ping(pkt):
    return accept()


@policy.forward(proto="tcp", dport=8080, flow=True)
def web(pkt):
    return accept()
