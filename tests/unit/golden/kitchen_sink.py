"""Golden fixture: every feature at once (NAT, flow offload at two hooks, routing with dynamic
routes, shaping, mangle), so the golden test pins the order of every mark field."""

from nfhooks import Policy, accept, dnat, drop, route, set_ttl, shape

policy = Policy("kitchen-sink", defaults={"FORWARD": "drop"})
lan = policy.option("lan", default="lan", help="the LAN interface")
gw = policy.option("gw", default="10.0.12.2", type="address", help="uplink 2's next hop")

policy.routing_table("up1", ["default via 10.0.11.2 dev up1", "::/0 via fd00:0:0:11::2 dev up1"], masquerade=True)
policy.routing_table("up2", lambda: f"default via {gw.value} dev up2", snat=["10.0.12.1", "fd00:0:0:12::1"])
policy.routing(dynamic_routes=2, src_valid_mark=True, rp_filter="loose")
policy.shaping("up2", classes={"bulk": dict(rate="5mbit", ceil="5mbit", prio=2),
                               "interactive": dict(rate="50mbit", prio=0, leaf="tbf")}, default="interactive")


@policy.input(proto="tcp", dport=22, flow=True)
def ssh(pkt):
    return accept()


@policy.input(proto="udp", dport=53, flow=True)
def dns(pkt):
    return accept() if pkt.src.startswith("10.") else drop()


@policy.forward(proto="tcp", dport=80, flow=True)
def web(pkt):
    return accept()


@policy.prerouting(proto="tcp", dport=8080)
def proxy(pkt):
    return dnat("192.0.2.3:8080")


@policy.prerouting(iif=lan, proto="tcp", dport=[5201, 873])
def pick_uplink(pkt):
    if pkt.dport == 873:
        return route(via="10.0.13.2", dev="up3")
    return route("up2")


@policy.forward(oif="up2")
def classify(pkt):
    return shape("bulk") if pkt.dport == 5201 else shape("interactive")


@policy.forward(proto="udp", dport=5060)
def voice(pkt):
    return set_ttl(64)
