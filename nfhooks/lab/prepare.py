"""Before the scenarios run: the policy's ports (loaded here first, so a bad policy fails
before any namespace exists), the ``--set`` values for the lab's addresses, the standard
servers, the warm-up pings, the metrics URL and a fresh lab id.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..metrics import parse_listen_addr
from ..loader import load_policy
from ..policy import PolicyError, parse_sets
from .config import HTTP_PORT, PROXY_PORT, RUN_TAG, WEB_PORT, LabError
from .scenario import Scenario
from .topology import ID_PREFIX_ENV, Lab, TcpServer

__all__ = ["lab_sets", "loopback_handlers", "metrics_url", "new_lab_id", "policy_ports", "public_addr",
           "start_servers", "warm_up"]


def policy_ports(policy: Path, sets: list[str]) -> tuple[dict[str, int | str], Any]:
    """Load the policy here too: bad policies fail before any namespace exists, and the
    scenarios use the ports the policy was configured with."""
    try:
        pol = load_policy(policy, parse_sets(sets))
    except PolicyError as e:
        raise LabError(str(e)) from None
    defaults: dict[str, int | str] = {"service_port": 2222, "reject_port": 23,
                                      "reject_udp_port": 514, "web_port": HTTP_PORT, "nat_port": 8081,
                                      "forward_port": 8022, "mangle_port": 5060, "mangle_ttl": 33,
                                      "mangle_dscp": 46, "tunnel_port": 51820, "tun_if": "tun0"}
    for k in defaults:
        if k in pol.options:
            defaults[k] = pol.options[k].value
    return defaults, pol


def lab_sets(lab: Lab, pol: Any, scenarios: Sequence[Scenario]) -> list[str]:
    """--set arguments for the lab's addresses, only for options the policy declares (the
    user's own --set come after them on the command line, so they win)."""
    a = lab.addr
    values: dict[str, str] = {
        "drop_dst": a("server", 4), "drop_dst6": a("server", 6),
        "dnat_dst": a("proxy", 4), "dnat_dst6": a("proxy", 6),
        "proxy": f"{a('proxy', 4)}:{PROXY_PORT}", "proxy6": f"[{a('proxy', 6)}]:{PROXY_PORT}",
        "inside": a("client", 4), "inside6": a("client", 6),
        "lan_if": lab.iface("router", "client"), "wan_if": lab.iface("router", "server"),
    }
    for sc in scenarios:
        if sc.options is not None:
            values.update(sc.options(lab))
    return [f"{k}={v}" for k, v in values.items() if k in pol.options]


def loopback_handlers(pol: Any) -> set[str]:
    """Handlers that only see loopback traffic: the lab's own scrapes, not scenario traffic."""
    out = set()
    for h in pol.handlers:
        m = h.match
        if any(i is not None and i.name == "lo" and not i.negate for i in (m.iif, m.oif)) or any(
                a is not None and a.net.is_loopback and not a.negate for a in (m.src, m.dst)):
            out.add(h.name)
    return out


def metrics_url(addr: str) -> str:
    host, port = parse_listen_addr(addr)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"


def public_addr(addr: str) -> bool:
    host, _ = parse_listen_addr(addr)
    return host not in ("127.0.0.1", "::1", "localhost")


def start_servers(lab: Lab, ports: Mapping[str, int | str]) -> dict[str, TcpServer]:
    """The services the scenarios talk to; the router listens on the reject ports too, so
    a refusal there can only come from the policy."""
    servers: dict[str, TcpServer] = {}
    for f in (4, 6):
        servers[f"server{f}"] = lab.tcp_server("server", WEB_PORT, f)
        servers[f"http{f}"] = lab.tcp_server("server", int(ports["web_port"]), f)
        servers[f"client{f}"] = lab.tcp_server("client", WEB_PORT, f)
        servers[f"service{f}"] = lab.tcp_server("router", int(ports["service_port"]), f)
        servers[f"refused{f}"] = lab.tcp_server("router", int(ports["reject_port"]), f)
        lab.udp_server("router", int(ports["reject_udp_port"]), f)
        servers[f"nat{f}"] = lab.tcp_server("server", int(ports["nat_port"]), f)
        servers[f"proxy{f}"] = lab.tcp_server("proxy", PROXY_PORT, f)
        servers[f"forward{f}"] = lab.tcp_server("client", int(ports["forward_port"]), f)
    return servers


def warm_up(lab: Lab) -> None:
    """Ping along every path before the engine starts: proves the network, and fills the
    neighbour caches so that neighbour discovery does not show up in the scenarios."""
    pairs = [(s, d, f) for f in (4, 6)
             for s, d in (("client", "router"), ("client", "server"), ("router", "server"),
                          ("router", "proxy"))]
    with ThreadPoolExecutor(len(pairs)) as ex:
        results = list(ex.map(lambda p: (p, lab.ping(p[0], lab.addr(p[1], p[2]), timeout=2)), pairs))
    broken = [f"{s} → {d} IPv{f}" for (s, d, f), ok in results if not ok]
    if broken:
        raise RuntimeError(f"the lab network does not work before the engine starts: {', '.join(broken)}")


def new_lab_id() -> str:
    return os.environ.get(ID_PREFIX_ENV, "") + RUN_TAG + secrets.token_hex(3)[:5]
