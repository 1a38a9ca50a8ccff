"""NAT verdicts on the real kernel path: what the peers of a translated connection see."""

from __future__ import annotations

import sys

from .conftest import POLICIES, metric, nfh_lines, save, saved

# Connect, send a request, read the answer: prints the address the socket is connected to
# (what the client dialled) and the server's banner (who really answered).
FETCH = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.settimeout(3)
s.connect((host, port))
peer = s.getpeername()[0]
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(peer, data.decode().rsplit("\n", 2)[-2])
"""


def gauge(lab, name: str, node: str = "router") -> float:
    """An unlabelled metric (conftest.metric reads labelled ones)."""
    text = lab.exec(node, "curl", "-s", "-m", "2", "http://127.0.0.1:9477/metrics").stdout
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


def fetch(lab, node: str, addr: str, port: int) -> tuple[str, str]:
    """(address the client is connected to, banner of the node that answered)."""
    out = lab.exec(node, sys.executable, "-c", FETCH, addr, port, timeout=15).stdout.split(" ", 1)
    return out[0], out[1].strip()


def test_masquerade_port_forward_and_output_dnat(nfh_lab):
    lab = nfh_lab
    web = lab.tcp_server("server", 8080)
    ssh = lab.tcp_server("client", 22)
    proxy = lab.tcp_server("proxy", 8080)
    eng = lab.start_engine(str(POLICIES / "nat.py"), "--set", f"inside={lab.addr('client')}:22",
                           "--set", f"proxy={lab.addr('proxy')}:8080")
    router_wan = lab.addr("router", facing="server")
    # masquerade: the server sees the router's outside address, the client gets its answer
    assert fetch(lab, "client", lab.addr("server"), 8080) == (lab.addr("server"), "nfhooks-lab server")
    assert web.wait_peers(1) == [router_wan]
    # port forward: outside -> router:2222 -> the client's port 22; the reply comes from
    # the address the outside host dialled
    assert fetch(lab, "server", router_wan, 2222) == (router_wan, "nfhooks-lab client")
    assert ssh.wait_peers(1) == [lab.addr("server")]
    # locally generated HTTP to port 80 goes to the proxy (nothing listens on server:80)
    assert fetch(lab, "router", lab.addr("server"), 80) == (lab.addr("server"), "nfhooks-lab proxy")
    assert proxy.wait_peers(1) == [router_wan]
    # the rest of each connection never reached Python: one packet per connection (the
    # router's own connection to the proxy leaves by wan too, so it is masqueraded as well)
    for handler, verdict, n in (("masquerade_outside", "masquerade", 2), ("port_forward", "dnat", 1),
                                ("http_to_proxy", "dnat", 1)):
        assert metric(lab, "nfhooks_handler_packets_total", handler=handler, verdict=verdict) == n, handler
    assert gauge(lab, "nfhooks_nat_targets") == 3
    nat_rules = [line for line in saved(lab).splitlines() if line.startswith("-A NFH-") and "nfhooks nat" in line]
    assert any("-j MASQUERADE" in r for r in nat_rules), nat_rules
    assert any(f"--to-destination {lab.addr('client')}:22" in r and "-p tcp" in r for r in nat_rules), nat_rules
    eng.stop()
    assert nfh_lines(lab) == []  # the nat chains and the on-demand rules are gone too


def test_ipv6_masquerade_and_dnat(nfh_lab):
    lab = nfh_lab
    web = lab.tcp_server("server", 8080, family=6)
    ssh = lab.tcp_server("client", 22, family=6)
    lab.start_engine(str(POLICIES / "nat.py"), "--set", f"inside=[{lab.addr('client', 6)}]:22",
                     "--set", f"proxy=[{lab.addr('proxy', 6)}]:8080")
    router_wan = lab.addr("router", 6, facing="server")
    assert lab.tcp_connect("client", lab.addr("server", 6), 8080) == "ok"
    assert web.wait_peers(1) == [router_wan]
    assert fetch(lab, "server", router_wan, 2222) == (router_wan, "nfhooks-lab client")
    assert ssh.wait_peers(1) == [lab.addr("server", 6)]
    assert "-j MASQUERADE" in save(lab, "router", 6, "-t", "nat")


def test_load_balancer_spreads_connections(nfh_lab):
    lab = nfh_lab
    backends = {n: (lab.tcp_server(n, 8080), lab.tcp_server(n, 8080, family=6)) for n in ("server", "proxy")}
    spec = ",".join([f"{lab.addr(n)}:8080" for n in backends] + [f"[{lab.addr(n, 6)}]:8080" for n in backends])
    lab.start_engine(str(POLICIES / "loadbalance.py"), "--set", f"backends={spec}")
    vip, vip6 = lab.addr("router"), lab.addr("router", 6)
    answers = [fetch(lab, "client", vip, 80) for _ in range(6)]
    assert {a for a, _ in answers} == {vip}  # every reply comes from the address dialled
    assert sorted(b for _, b in answers) == ["nfhooks-lab proxy"] * 3 + ["nfhooks-lab server"] * 3
    for n, (v4, _) in backends.items():
        assert v4.wait_peers(3) == [lab.addr("client")] * 3, n
    for _ in range(4):
        assert lab.tcp_connect("client", vip6, 80) == "ok"
    for n, (_, v6) in backends.items():
        assert len(v6.wait_peers(2)) == 2, n
    assert gauge(lab, "nfhooks_nat_targets") == 4  # one rule per backend, reused after


REDIRECT_SNAT = '''
from nfhooks import Policy, dnat, redirect, snat

policy = Policy()
server = policy.option("server", default="10.0.2.2", type="address")
hidden = policy.option("hidden", default="10.0.2.99", type="address")


@policy.prerouting(proto="tcp", dport=8081)
def to_local(pkt):
    return redirect(8080)


@policy.input(proto="tcp", dport=8083)
def hide_source(pkt):
    return snat(hidden.value)


@policy.prerouting(proto="tcp", dport="9001:9003")
def per_port(pkt):
    return dnat(server.value, pkt.dport - 1000)
'''


def test_redirect_snat_at_input_and_the_target_bound(nfh_lab, tmp_path):
    lab = nfh_lab
    local = lab.tcp_server("router", 8080)
    hidden_srv = lab.tcp_server("router", 8083)
    servers = {p: lab.tcp_server("server", p) for p in (8001, 8002, 8003)}
    pol = tmp_path / "redirect_snat.py"
    pol.write_text(REDIRECT_SNAT)
    # SNAT at INPUT needs an address the router can route to (the SYN-ACK is routed before
    # the nat table translates it back), as with iptables: an unused one on the WAN segment
    unused = lab.addr("server").rsplit(".", 1)[0] + ".99"
    eng = lab.start_engine(str(pol), "--set", f"server={lab.addr('server')}", "--set", f"hidden={unused}",
                           "--nat-targets", "3")
    # REDIRECT: the connection to port 8081 reaches the router's own port 8080
    assert fetch(lab, "client", lab.addr("router"), 8081) == (lab.addr("router"), "nfhooks-lab router")
    assert local.wait_peers(1) == [lab.addr("client")]
    # SNAT at INPUT: the local server sees the translated source; the client its answer
    assert fetch(lab, "client", lab.addr("router"), 8083)[1] == "nfhooks-lab router"
    assert hidden_srv.wait_peers(1) == [unused]
    # targets 3 of 3: redirect and snat took two, one more fits; the next is refused clearly
    assert lab.tcp_connect("client", lab.addr("router"), 9001) == "ok"
    assert lab.tcp_connect("client", lab.addr("router"), 9001) == "ok"  # reused, no new rule
    assert servers[8001].wait_peers(2) == [lab.addr("client")] * 2
    assert lab.tcp_connect("client", lab.addr("router"), 9002) == "refused"  # PREROUTING default: accept
    assert servers[8002].log_peers() == []
    assert "past the bound of 3 (--nat-targets" in eng.wait_log("past the bound")
    assert gauge(lab, "nfhooks_nat_targets") == 3
    assert metric(lab, "nfhooks_handler_errors_total", handler="per_port") >= 1



HELPER = '''
from nfhooks import Policy, dnat

policy = Policy()
proxy = policy.option("proxy", default="10.0.2.3:8080", type=dnat)


@policy.prerouting(proto="tcp", dport=2222)
def unused(pkt):
    return dnat("10.0.0.1:22")  # makes the policy reserve the nat mark field


def choose():
    return proxy.value


@policy.output(table="mangle", proto="tcp", dport=80)
def via_helper(pkt):
    return choose()  # a NAT verdict the source scan cannot see: no nat chain at OUTPUT yet
'''


def test_nat_chain_created_on_demand_for_a_verdict_the_scan_missed(nfh_lab, tmp_path):
    lab = nfh_lab
    proxy = lab.tcp_server("proxy", 8080)
    pol = tmp_path / "helper.py"
    pol.write_text(HELPER)
    eng = lab.start_engine(str(pol), "--set", f"proxy={lab.addr('proxy')}:8080")
    assert not any(line.startswith(":NFH-OUTPUT") for line in
                   save(lab, "router", 4, "-t", "nat").splitlines())
    assert fetch(lab, "router", lab.addr("server"), 80) == (lab.addr("server"), "nfhooks-lab proxy")
    assert proxy.wait_peers(1) == [lab.addr("router", facing="proxy")]
    nat = save(lab, "router", 4, "-t", "nat")
    assert "-A OUTPUT -m comment --comment nfhooks -j NFH-OUTPUT" in nat and "-A NFH-OUTPUT -p tcp" in nat
    eng.stop()
    assert nfh_lines(lab) == []
