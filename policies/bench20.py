"""A realistic 20-handler INPUT policy for `make bench` (the "nfhooks 20 handlers" rows).

What a server's policy looks like: SSH from an admin network, a web front, DNS/NTP, a database
and a cache only from the application network, monitoring scrapes, blocklists, a management
interface, ICMP, the odd legacy service. Every handler has a kernel match, so each costs a rule
the kernel evaluates per packet -- but only the one whose match fires reaches Python.

The benchmark flood is one flow to port 5201 (UDP, then TCP). For it, 19 of the 20 handlers'
kernel matches do not fire (other ports, other protocols, other sources, another interface),
and exactly one does: ``app_udp`` for the UDP flood, ``app_tcp`` for the TCP one. They are
declared last, so every flood packet first walks the 18 other queue rules (and their resume
rules) in the kernel: the honest worst case for the kernel side, while Python runs exactly
one handler per packet, as with policies/bench.py. (Not included: a "ctstate ESTABLISHED ->
accept" handler first, which real iptables policies have -- it would catch the TCP flood after
its first packet and turn this into a one-handler benchmark again.)
"""

from nfhooks import Policy, accept, drop, reject

policy = Policy("bench20", defaults={"INPUT": "accept"})
port = policy.option("port", default=5201, type="port", help="the benchmark flow's port")
admin = policy.option("admin", default="192.168.77.0/24", type="network", help="admin network (SSH)")
app_net = policy.option("app_net", default="10.77.0.0/16", type="network", help="application servers")

BLOCKED = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")


@policy.input(src=BLOCKED[0])
def blocklist_1(pkt):
    return drop()


@policy.input(src=BLOCKED[1])
def blocklist_2(pkt):
    return drop()


@policy.input(src=BLOCKED[2])
def blocklist_3(pkt):
    return drop()


@policy.input(proto="tcp", dport=22, src=admin)
def ssh(pkt):
    return accept()


@policy.input(proto="tcp", dport=22)
def ssh_others(pkt):
    return reject()


@policy.input(proto="tcp", dport=[80, 443])
def web(pkt):
    return accept() if pkt.src.version == 4 or pkt.src.is_global else drop()


@policy.input(proto="udp", dport=53)
def dns(pkt):
    return accept()


@policy.input(proto="tcp", dport=53)
def dns_tcp(pkt):
    return accept()


@policy.input(proto="udp", dport=123)
def ntp(pkt):
    return accept() if pkt.length < 200 else drop()


@policy.input(proto="tcp", dport=5432, src=app_net)
def postgres(pkt):
    return accept()


@policy.input(proto="tcp", dport=6379, src=app_net)
def redis(pkt):
    return accept()


@policy.input(proto="tcp", dport=[9100, 9090, 9477])
def metrics_scrape(pkt):
    return accept() if pkt.src.is_private else reject()


@policy.input(proto="udp", dport="67:68")
def dhcp(pkt):
    return accept()


@policy.input(proto="udp", dport=[161, 162])
def snmp(pkt):
    return drop()


@policy.input(iif="mgmt+")
def management(pkt):
    return accept()


@policy.input(proto="icmp")
def icmp(pkt):
    return accept() if pkt.icmp_type in (0, 3, 8, 11) else drop()


@policy.input(proto="tcp", dport="6000:6063")
def x11(pkt):
    return reject()


@policy.input(proto="tcp", dport=[25, 587, 993])
def mail(pkt):
    return accept()


@policy.input(proto="udp", dport=port)
def app_udp(pkt):
    return accept()


@policy.input(proto="tcp", dport=port)
def app_tcp(pkt):
    return accept()
