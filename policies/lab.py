"""The lab router's policy (`nfhooks lab`): a small stateful router firewall with a handler
at each of the five hooks, IPv4 and IPv6.

What each hook does on the lab's router (client on ``lan``, server and proxy on ``wan``):

    PREROUTING   conntrack INVALID (malformed TCP, odd flags, bad checksums) is dropped;
                 everything else arriving on an interface is seen and accepted
    INPUT        loopback (the metrics endpoint is scraped over lo), established and ICMP
                 are accepted; the service port is open; the reject ports answer with a TCP
                 reset / ICMP port unreachable; the rest is dropped (the INPUT default)
    FORWARD      the LAN may go out, replies come back; the WAN cannot open connections
                 into the LAN (the FORWARD default: drop)
    OUTPUT       the seed's first example: locally generated HTTP to port 80 is dropped;
                 the router's other own traffic is accepted
    POSTROUTING  connections to the NAT port are masqueraded (the server sees the router's
                 address); everything else leaving on an interface is seen and accepted

Equivalent iptables commands (ip6tables alike, with ipv6-icmp for icmp):

    iptables -t mangle -A PREROUTING -m conntrack --ctstate INVALID -j DROP
    iptables -t mangle -A PREROUTING ! -s 127.0.0.0/8 -j ACCEPT   # ip6tables: ! -s ::1
    iptables -A INPUT -s 127.0.0.0/8 -j ACCEPT                    # ip6tables: -s ::1
    iptables -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    iptables -A INPUT -p icmp -j ACCEPT
    iptables -A INPUT -p tcp --dport 2222 -j ACCEPT
    iptables -A INPUT -p tcp --dport 23 -j REJECT --reject-with tcp-reset
    iptables -A INPUT -p udp --dport 514 -j REJECT --reject-with icmp-port-unreachable
    iptables -P INPUT DROP
    iptables -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    iptables -A FORWARD -i lan -j ACCEPT
    iptables -P FORWARD DROP
    iptables -A OUTPUT -p tcp --dport 80 -j DROP
    iptables -A OUTPUT ! -d 127.0.0.0/8 -m conntrack --ctstate NEW,ESTABLISHED -j ACCEPT
    iptables -t nat -A POSTROUTING -p tcp --dport 8081 -j MASQUERADE
    iptables -t mangle -A POSTROUTING ! -d 127.0.0.0/8 -m conntrack --ctstate NEW,ESTABLISHED -j ACCEPT

Loopback is told apart by address, not by ``-i lo``: python-iptables 1.2.0 installs IPv6
interface matches with a mask of 0x01 per byte instead of 0xff, so in ip6tables "lo" also
matches "lan" (their names differ only in bits that mask ignores).

Options: lan_if (the router's LAN interface, default lan), service_port (2222),
reject_port (tcp, 23), reject_udp_port (514), nat_port (masqueraded, 8081),
web_port (the OUTPUT drop, 80).
"""

from nfhooks import Policy, accept, drop, reject

try:
    from nfhooks.verdict import masquerade
except ImportError:  # an nfhooks without NAT verdicts: the lab runs without its NAT scenario
    masquerade = None

policy = Policy(defaults={"INPUT": "drop", "FORWARD": "drop"})

#: OUTPUT and POSTROUTING see NEW and ESTABLISHED only, never RELATED: the TCP resets and
#: ICMP errors REJECT sends share the refused packet's unconfirmed conntrack entry, and
#: since Linux 6.x nfnetlink_queue drops such packets instead of queueing them
#: (nf_ct_drop_unconfirmed) -- queued there, every reject would turn into a silent drop.
SEEN_OUT = {"NEW", "ESTABLISHED"}
lan_if = policy.option("lan_if", default="lan", help="the router's LAN interface")
service_port = policy.option("service_port", default=2222, type="port",
                             help="TCP port open on the router")
reject_port = policy.option("reject_port", default=23, type="port",
                            help="TCP port the router refuses with a reset")
reject_udp_port = policy.option("reject_udp_port", default=514, type="port",
                                help="UDP port the router refuses with ICMP port unreachable")
nat_port = policy.option("nat_port", default=8081, type="port",
                         help="forwarded connections to this port leave masqueraded")
web_port = policy.option("web_port", default=80, type="port",
                         help="the router's own connections to this port are dropped (OUTPUT)")


# -- PREROUTING (mangle): every packet that arrives on an interface ---------------------------

@policy.prerouting(ctstate="INVALID")
def invalid(pkt):
    """What conntrack cannot place in a connection never gets further: dropped before routing."""
    return drop()


@policy.prerouting(src="!127.0.0.0/8")
def arriving(pkt):
    return accept()


@policy.prerouting(src="!::1")
def arriving6(pkt):
    return accept()


# -- INPUT: packets for the router itself -------------------------------------------------------

@policy.input(src="127.0.0.0/8")
def loopback(pkt):
    return accept()  # the metrics endpoint on 127.0.0.1 is scraped over lo: keep it reachable


@policy.input(src="::1")
def loopback6(pkt):
    return accept()


@policy.input(ctstate={"ESTABLISHED", "RELATED"})
def established(pkt):
    return accept()


@policy.input(proto="icmp")
def icmp(pkt):
    return accept()


@policy.input(proto="icmpv6")
def icmpv6(pkt):
    return accept()  # echo, and neighbour discovery: without it IPv6 stops working


@policy.input(proto="tcp", dport=service_port)
def service(pkt):
    return accept()


@policy.input(proto="tcp", dport=reject_port)
def refused(pkt):
    return reject()  # TCP reset: the client sees "connection refused" at once


@policy.input(proto="udp", dport=reject_udp_port)
def refused_udp(pkt):
    return reject()  # ICMP / ICMPv6 port unreachable


# -- FORWARD: packets routed through the router --------------------------------------------------

@policy.forward(ctstate={"ESTABLISHED", "RELATED"})
def replies(pkt):
    return accept()


@policy.forward(iif=lan_if)
def from_lan(pkt):
    return accept()


# -- OUTPUT: packets the router itself sends ------------------------------------------------------

@policy.output(proto="tcp", dport=web_port)
def no_web(pkt):
    """Locally generated HTTP to port 80 is dropped (the seed's first example)."""
    return drop()


@policy.output(dst="!127.0.0.0/8", ctstate=SEEN_OUT)
def local_out(pkt):
    return accept()


@policy.output(dst="!::1", ctstate=SEEN_OUT)
def local_out6(pkt):
    return accept()


# -- POSTROUTING (mangle): every packet leaving on an interface ----------------------------------

if masquerade is not None:
    @policy.postrouting(proto="tcp", dport=nat_port)
    def nat_out(pkt):
        """Connections to nat_port leave with the router's address (the server never sees the
        client's); the kernel's nat table translates the replies back."""
        return masquerade()


@policy.postrouting(dst="!127.0.0.0/8", ctstate=SEEN_OUT)
def leaving(pkt):
    return accept()


@policy.postrouting(dst="!::1", ctstate=SEEN_OUT)
def leaving6(pkt):
    return accept()
