"""Every verdict of the core, one handler each, on a router (its tests drive real traffic).

Ports on the router's own address (INPUT), from a client:

    tcp 7001  accept()                   the connection works
    tcp 7002  drop()                     the SYN vanishes: the client times out
    tcp 7003  reject()                   TCP reset: "connection refused" at once
    udp 7004  reject("admin-prohibited") ICMP administratively prohibited
    tcp 7005  mark(0x5)                  accepted; the packet carries mark 0x5 afterwards
    tcp 7006  connmark(0x6)              accepted; the connection's mark is 0x6 (conntrack -L)
    tcp 7007  handler returns None       falls through to the next handler (7007-7008 accept)
    tcp 7009  handler raises             the INPUT default (drop here), counted as an error

Equivalent iptables commands, for the first three:
    iptables -A INPUT -p tcp --dport 7001 -j ACCEPT
    iptables -A INPUT -p tcp --dport 7002 -j DROP
    iptables -A INPUT -p tcp --dport 7003 -j REJECT --reject-with tcp-reset
"""

from nfhooks import Policy, accept, connmark, drop, mark, reject

policy = Policy(defaults={"INPUT": "drop"})
low = policy.option("low", default=7001, type="port", help="first port of the demo range")


@policy.input(iif="lo")
def loopback(pkt):
    return accept()  # the metrics endpoint on 127.0.0.1 is reached over lo


@policy.input(ctstate={"ESTABLISHED", "RELATED"})
def established(pkt):
    return accept()


@policy.input(proto="tcp", dport=7001)
def accepted(pkt):
    return accept()


@policy.input(proto="tcp", dport=7002)
def dropped(pkt):
    return drop()


@policy.input(proto="tcp", dport=7003)
def rejected(pkt):
    return reject()


@policy.input(proto="udp", dport=7004)
def prohibited(pkt):
    return reject("admin-prohibited")


@policy.input(proto="tcp", dport=7005)
def marked(pkt):
    return mark(0x5)


@policy.input(proto="tcp", dport=7006)
def connmarked(pkt):
    return connmark(0x6)


@policy.input(proto="tcp", dport=7007)
def not_mine(pkt):
    return None


@policy.input(proto="tcp", dport="7007:7008")
def range_accept(pkt):
    return accept()


@policy.input(proto="tcp", dport=7009)
def broken(pkt):
    raise RuntimeError("a bug in the policy")


@policy.input(proto="icmp")
def ping(pkt):
    return accept()


@policy.input(proto="icmpv6")
def ping6(pkt):
    return accept()
