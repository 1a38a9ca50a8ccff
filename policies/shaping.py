"""Shape the uplink: bulk transfers limited to 5 Mbit/s, interactive traffic first.

Python looks at each new TCP connection crossing the router and puts it in a class: bulk
(``bulk_ports``: iperf3, rsync, ...) is held to 5 Mbit/s with the lowest priority; the rest,
and everything Python is not asked about (ICMP, DNS ...), is interactive: priority 0, 50
Mbit/s guaranteed, so a ping through the link stays fast while a bulk flow fills its class.

    nfhooks run policies/shaping.py --set dev=wan

What nfhooks installs, as the equivalent commands (class field 0x00800000 here; ``nfhooks
check policies/shaping.py`` prints the layout and rules of your policy):

    tc qdisc replace dev wan root handle 4e46: htb default 12
    tc class add dev wan parent 4e46: classid 4e46:1 htb rate 55mbit ceil 55mbit
    tc class add dev wan parent 4e46:1 classid 4e46:11 htb rate 5mbit ceil 5mbit prio 2
    tc qdisc add dev wan parent 4e46:11 handle 4e01: pfifo
    tc class add dev wan parent 4e46:1 classid 4e46:12 htb rate 50mbit ceil 55mbit prio 0
    tc qdisc add dev wan parent 4e46:12 handle 4e02: pfifo
    # the class of a connection: decided once (Python), kept in the connmark, applied on the way out
    iptables -t mangle -I PREROUTING -m connmark ! --mark 0/0x1800000 -j CONNMARK --restore-mark --nfmask 0x1800000 --ctmask 0x1800000
    iptables -t mangle -I OUTPUT     -m connmark ! --mark 0/0x1800000 -j CONNMARK --restore-mark --nfmask 0x1800000 --ctmask 0x1800000
    iptables -t mangle -A FORWARD -p tcp -m conntrack --ctstate NEW -m multiport --dports 5201,873 -j MARK --set-xmark 0x800000/0x1800000
    iptables -t mangle -I POSTROUTING -m mark ! --mark 0/0x1800000 -j CONNMARK --save-mark --nfmask 0x1800000 --ctmask 0x1800000
    iptables -t mangle -A POSTROUTING -o wan -m mark --mark 0x800000/0x1800000 -j CLASSIFY --set-class 4e46:11
    iptables -t mangle -A POSTROUTING -o wan -m mark --mark 0x1000000/0x1800000 -j CLASSIFY --set-class 4e46:12
    (and the same with ip6tables; on exit: tc qdisc del dev wan root -- the kernel's default comes back)
"""

from nfhooks import Policy, shape

policy = Policy()
dev = policy.option("dev", default="wan", help="the interface whose egress is shaped")
bulk_ports = policy.option("bulk_ports", default="5201,873", type=lambda s: {int(p) for p in s.split(",")},
                           help="destination ports of bulk transfers (comma separated)")

policy.shaping(dev, classes={
    "bulk": dict(rate="5mbit", ceil="5mbit", prio=2),
    "interactive": dict(rate="50mbit", prio=0),
}, default="interactive")


@policy.forward(proto="tcp")
def classify(pkt):
    """One decision per new connection; the connmark carries it to the rest (and the replies)."""
    return shape("bulk") if pkt.dport in bulk_ports.value else shape("interactive")
