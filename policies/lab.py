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
    OUTPUT       the two classic iptables examples, on two different destinations: the router's own
                 HTTP to ``dnat_dst`` (port 80) is DNATed to the proxy's 8080, its HTTP to
                 ``drop_dst`` is dropped; the router's other own traffic is accepted
    POSTROUTING  connections to the NAT port are masqueraded (the server sees the router's
                 address); UDP to the mangle port leaves with TTL/hop limit ``mangle_ttl``
                 and DSCP ``mangle_dscp``; everything else leaving is seen and accepted
    port forward connections from the WAN to the router's ``forward_port`` are DNATed at
                 PREROUTING to ``inside`` (the client) and accepted at FORWARD
    tunnel       (``nfhooks lab --scenario vpn``) the inner packets routed into / out of
                 ``tun_if`` are counted at FORWARD (to_tunnel / from_tunnel), the UDP
                 carrying them at OUTPUT / POSTROUTING / INPUT (tunnel_out / tunnel_wire /
                 tunnel_in)

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
    iptables -t nat -A OUTPUT -d 192.0.2.80 -p tcp --dport 80 -j DNAT --to-destination 192.0.2.3:8080
    iptables -A OUTPUT -d 0.0.0.0/0 -p tcp --dport 80 -j DROP
    iptables -A OUTPUT ! -d 127.0.0.0/8 -m conntrack --ctstate NEW,ESTABLISHED -j ACCEPT
    iptables -t nat -A PREROUTING -i wan -p tcp --dport 8022 -j DNAT --to-destination 192.0.2.2:8022
    iptables -A FORWARD -o lan -p tcp --dport 8022 -j ACCEPT       # (also un-DNATed: see forwarded_in)
    iptables -A INPUT -p udp --dport 51820 -j ACCEPT                # the tunnel (vpn scenario)
    iptables -I FORWARD -o tun0 -j ACCEPT; iptables -I FORWARD -i tun0 -j ACCEPT
    iptables -I OUTPUT -p udp --dport 51820 -j ACCEPT
    iptables -t nat -A POSTROUTING -p tcp --dport 8081 -j MASQUERADE
    iptables -t mangle -A POSTROUTING -p udp --dport 5060 -j DSCP --set-dscp 46
    iptables -t mangle -A POSTROUTING -p udp --dport 5060 -j TTL --ttl-set 33
    iptables -t mangle -A POSTROUTING ! -d 127.0.0.0/8 -m conntrack --ctstate NEW,ESTABLISHED -j ACCEPT

Loopback is told apart by address, not by ``-i lo`` (a habit from before nfhooks corrected
python-iptables 1.2.0's IPv6 interface mask, see install.py; either works now).

Options: lan_if / wan_if (the router's interfaces, lan / wan), service_port (2222),
reject_port (tcp, 23), reject_udp_port (514), nat_port (masqueraded, 8081),
web_port (80: the OUTPUT drop and DNAT), drop_dst / drop_dst6 (where the router's HTTP is
dropped: anywhere by default), dnat_dst / dnat_dst6 (whose HTTP goes to the proxy),
proxy / proxy6 (the DNAT target), forward_port (8022) and inside / inside6 (the port
forward's target host), mangle_port (udp 5060), mangle_ttl (33), mangle_dscp (46),
tunnel_port (udp 51820) and tun_if (tun0). The addresses default to documentation ranges;
``nfhooks lab`` sets them to the lab's with ``--set``.
"""

from nfhooks import Policy, accept, drop, reject
from nfhooks.verdict import dnat, masquerade, set_dscp, set_ttl

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
                         help="the router's own HTTP port: dropped to drop_dst, DNATed from dnat_dst")
wan_if = policy.option("wan_if", default="wan", help="the router's WAN interface")
drop_dst = policy.option("drop_dst", default="0.0.0.0/0", type="network",
                         help="the router's own HTTP to here is dropped at OUTPUT")
drop_dst6 = policy.option("drop_dst6", default="::/0", type="network", help="drop_dst for IPv6")
dnat_dst = policy.option("dnat_dst", default="192.0.2.80", type="address",
                         help="the router's own HTTP to this address goes to the proxy (DNAT at OUTPUT)")
dnat_dst6 = policy.option("dnat_dst6", default="2001:db8::80", type="address", help="dnat_dst for IPv6")
proxy = policy.option("proxy", default="192.0.2.3:8080", type=dnat, help="the DNAT target (IPv4)")
proxy6 = policy.option("proxy6", default="[2001:db8::3]:8080", type=dnat, help="the DNAT target (IPv6)")
forward_port = policy.option("forward_port", default=8022, type="port",
                             help="WAN connections to the router's port are forwarded to inside")
inside = policy.option("inside", default="192.0.2.2", type="address",
                       help="the port forward's target host (IPv4), same port")
inside6 = policy.option("inside6", default="2001:db8::2", type="address", help="inside for IPv6")
mangle_port = policy.option("mangle_port", default=5060, type="port",
                            help="UDP to this port leaves with mangle_ttl and mangle_dscp")
mangle_ttl = policy.option("mangle_ttl", default=33, type="int", help="TTL / hop limit set")
mangle_dscp = policy.option("mangle_dscp", default=46, type="int", help="DSCP set (46: EF)")
tunnel_port = policy.option("tunnel_port", default=51820, type="port",
                            help="UDP port of the lab's tunnel (nfhooks tunnel)")
tun_if = policy.option("tun_if", default="tun0", help="the tunnel's interface")


# -- PREROUTING (mangle): every packet that arrives on an interface ---------------------------

@policy.prerouting(ctstate="INVALID")
def invalid(pkt):
    """What conntrack cannot place in a connection never gets further: dropped before routing."""
    return drop()


@policy.prerouting(iif=wan_if, proto="tcp", dport=forward_port)
def port_forward(pkt):
    """A port forward: WAN connections to the router's forward_port reach the inside host."""
    return dnat(str(inside6.value if pkt.version == 6 else inside.value), forward_port.value)


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


@policy.input(proto="udp", dport=tunnel_port)
def tunnel_in(pkt):
    return accept()  # the tunnel's UDP from the other office (the encapsulated packets)


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

@policy.forward(oif=tun_if)
def to_tunnel(pkt):
    """Inner packets: office A -> office B, routed into the tunnel's interface."""
    return accept()


@policy.forward(iif=tun_if)
def from_tunnel(pkt):
    return accept()  # inner packets coming out of the tunnel


@policy.forward(ctstate={"ESTABLISHED", "RELATED"})
def replies(pkt):
    return accept()


@policy.forward(iif=lan_if)
def from_lan(pkt):
    return accept()


@policy.forward(oif=lan_if, proto="tcp", dport=forward_port)
def forwarded_in(pkt):
    # The port forward's connections (already DNATed at PREROUTING). The match cannot tell
    # a DNATed connection from a direct one to the client's forward_port (no conntrack-DNAT
    # match in nfhooks), so both are accepted; the client's other ports stay closed.
    return accept()


# -- OUTPUT: packets the router itself sends ------------------------------------------------------

@policy.output(proto="tcp", dport=web_port, dst=dnat_dst)
def to_proxy(pkt):
    """The second classic example: the router's own HTTP to dnat_dst goes to the proxy."""
    return dnat(proxy)


@policy.output(proto="tcp", dport=web_port, dst=dnat_dst6)
def to_proxy6(pkt):
    return dnat(proxy6)


@policy.output(proto="tcp", dport=web_port, dst=drop_dst)
def no_web(pkt):
    """Locally generated HTTP to port 80 is dropped (the classic iptables example)."""
    return drop()


@policy.output(proto="tcp", dport=web_port, dst=drop_dst6)
def no_web6(pkt):
    return drop()


@policy.output(proto="udp", dport=tunnel_port)
def tunnel_out(pkt):
    return accept()  # the tunnel's UDP: the encapsulated inner packets leave here


@policy.output(dst="!127.0.0.0/8", ctstate=SEEN_OUT)
def local_out(pkt):
    return accept()


@policy.output(dst="!::1", ctstate=SEEN_OUT)
def local_out6(pkt):
    return accept()


# -- POSTROUTING (mangle): every packet leaving on an interface ----------------------------------

@policy.postrouting(proto="tcp", dport=nat_port)
def nat_out(pkt):
    """Connections to nat_port leave with the router's address (the server never sees the
    client's); the kernel's nat table translates the replies back."""
    return masquerade()


@policy.postrouting(proto="udp", dport=mangle_port)
def marked(pkt):
    """Header rewrite: TTL (hop limit) and DSCP, seen by the receiver."""
    return set_ttl(mangle_ttl.value) | set_dscp(mangle_dscp.value)


@policy.postrouting(proto="udp", dport=tunnel_port)
def tunnel_wire(pkt):
    return accept()  # the encapsulated packets on the wire


@policy.postrouting(dst="!127.0.0.0/8", ctstate=SEEN_OUT)
def leaving(pkt):
    return accept()


@policy.postrouting(dst="!::1", ctstate=SEEN_OUT)
def leaving6(pkt):
    return accept()
