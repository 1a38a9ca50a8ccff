"""A router with two uplinks: Python picks the uplink of each connection.

Bulk transfers (``bulk_ports``, iperf3's 5201 by default) leave by uplink 2; connections to
``balanced_ports`` alternate between the uplinks, one decision per connection; everything
else takes uplink 1. Forwarded traffic from the LAN is decided at PREROUTING, the router's
own traffic at OUTPUT (the kernel re-routes it after the mark changes). Each uplink is paired
with masquerading, so the far side sees the address of the uplink the connection took (a
re-routed local packet would otherwise keep uplink 1's source address).

    nfhooks run policies/uplinks.py --set gw1=10.0.11.2 --set gw2=10.0.12.2

What nfhooks installs, as the equivalent commands (route field 0x01800000 here: its exact bits
depend on the policy; ``nfhooks check policies/uplinks.py`` prints the layout and the rules):

    ip rule add priority 10000 lookup main suppress_prefixlength 0   # LAN routes (replies) first
    ip rule add priority 10001 fwmark 0x800000/0x1800000 lookup 4201
    ip rule add priority 10002 fwmark 0x1000000/0x1800000 lookup 4202   # same with ip -6 rule
    ip route add default via $gw1 dev up1 table 4201 ; ip -6 route add default via $gw1_6 dev up1 table 4201
    ip route add default via $gw2 dev up2 table 4202 ; ip -6 route add default via $gw2_6 dev up2 table 4202
    # connection stickiness: later packets and replies get the connection's table back
    iptables -t mangle -I PREROUTING -m connmark ! --mark 0/0x1800000 -j CONNMARK --restore-mark --nfmask 0x1800000 --ctmask 0x1800000
    iptables -t mangle -I OUTPUT     -m connmark ! --mark 0/0x1800000 -j CONNMARK --restore-mark --nfmask 0x1800000 --ctmask 0x1800000
    iptables -t mangle -I POSTROUTING -m mark ! --mark 0/0x1800000 -j CONNMARK --save-mark --nfmask 0x1800000 --ctmask 0x1800000
    # the decision, per new connection (what the handlers below compute in Python)
    iptables -t mangle -A PREROUTING -i lan -m conntrack --ctstate NEW -p tcp --dport 5201 -j MARK --set-xmark 0x1000000/0x1800000
    iptables -t mangle -A PREROUTING -i lan -m conntrack --ctstate NEW -j MARK --set-xmark 0x800000/0x1800000
    # each uplink paired with source NAT
    iptables -t nat -A POSTROUTING -o up1 -m mark --mark 0x800000/0x1800000 -j MASQUERADE
    iptables -t nat -A POSTROUTING -o up2 -m mark --mark 0x1000000/0x1800000 -j MASQUERADE
    (and the same with ip6tables)

rp_filter: a reply arriving on uplink 2 fails a strict reverse-path check (main routes its
source via uplink 1). Either keep rp_filter loose/off, or uncomment the ``policy.routing``
line: nfhooks then sets ``net.ipv4.conf.all.src_valid_mark=1`` (the check uses the restored
mark, so it looks in the connection's table) inside its own namespace, and restores it on exit.
"""

from itertools import count

from nfhooks import Policy, route

policy = Policy()
gw1 = policy.option("gw1", default="10.0.11.2", type="address", help="IPv4 next hop of uplink 1 (dev up1)")
gw2 = policy.option("gw2", default="10.0.12.2", type="address", help="IPv4 next hop of uplink 2 (dev up2)")
gw1_6 = policy.option("gw1_6", default="fd00:0:0:11::2", type="address", help="IPv6 next hop of uplink 1")
gw2_6 = policy.option("gw2_6", default="fd00:0:0:12::2", type="address", help="IPv6 next hop of uplink 2")
lan = policy.option("lan", default="lan", help="the LAN interface (forwarded traffic comes in there)")
bulk_ports = policy.option("bulk_ports", default="5201", type=lambda s: {int(p) for p in s.split(",")},
                           help="destination ports sent by uplink 2 (comma separated)")
balanced_ports = policy.option("balanced_ports", default="8081", type=lambda s: {int(p) for p in s.split(",")},
                               help="destination ports whose connections alternate between the uplinks")

policy.routing_table("uplink1", routes=[lambda: f"default via {gw1.value} dev up1",
                                        lambda: f"default via {gw1_6.value} dev up1"], masquerade=True)
policy.routing_table("uplink2", routes=[lambda: f"default via {gw2.value} dev up2",
                                        lambda: f"default via {gw2_6.value} dev up2"], masquerade=True)
# policy.routing(src_valid_mark=True)   # with strict rp_filter on the uplinks

_turn = count()


def uplink(pkt):
    """The uplink of a new connection (its first packet: later ones follow the connmark)."""
    if pkt.dport in bulk_ports.value:
        return "uplink2"
    if pkt.dport in balanced_ports.value:
        return "uplink1" if next(_turn) % 2 == 0 else "uplink2"
    return "uplink1"


@policy.prerouting(iif=lan)
def from_lan(pkt):
    """Forwarded traffic: decided before the routing decision."""
    return route(uplink(pkt))


@policy.output(oif="!lo")
def from_router(pkt):
    """The router's own traffic: the kernel re-routes it after the mark changes (traffic to
    the LAN still finds the LAN's route: main's specific routes come first)."""
    return route(uplink(pkt))
