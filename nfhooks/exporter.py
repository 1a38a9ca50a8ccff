"""Where the metrics are served: listen addresses, the loopback-only default, the HTTP server.

One place for the rule "the metrics name the policy and its handlers, so they stay on
loopback unless asked": the engine (metrics.Metrics.serve) and the ``--workers`` main process
serve through :func:`serve_registry`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any, Final

from prometheus_client import start_http_server

__all__ = ["DEFAULT_METRICS_ADDR", "is_loopback", "parse_listen_addr", "serve_registry"]

#: Loopback only by default: the metrics name hooks, handlers and policy versions, which is
#: nobody else's business. 9477 sits in Prometheus' exporter range (9100-9999); the
#: project's port-allocation wiki lists it only for a Rubrik backup exporter announced as
#: "coming soon", so it clashes with no common exporter (node 9100, nftables 9630, ...).
DEFAULT_METRICS_ADDR: Final = "127.0.0.1:9477"


def parse_listen_addr(addr: str) -> tuple[str, int]:
    """Split a listen address into (host, port).

    Accepts ``HOST:PORT``, ``[V6ADDR]:PORT``, ``:PORT`` (every interface, like Go's
    listeners: "0.0.0.0") and a bare ``PORT`` (loopback, 127.0.0.1).
    """
    addr = addr.strip()
    if addr.isdigit():
        host, port_s = "127.0.0.1", addr
    elif addr.startswith("["):
        m = re.fullmatch(r"\[([^\]]+)\]:(\d+)", addr)
        if not m:
            raise ValueError(f"bad metrics address {addr!r}: expected [IPV6]:PORT")
        host, port_s = m.group(1), m.group(2)
    else:
        host, sep, port_s = addr.rpartition(":")
        if not sep or not port_s.isdigit() or ":" in host:
            raise ValueError(
                f"bad metrics address {addr!r}: expected HOST:PORT, [IPV6]:PORT, :PORT or PORT"
            )
        host = host or "0.0.0.0"
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"bad metrics address {addr!r}: port {port} out of range")
    return host, port


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        mapped = getattr(ip, "ipv4_mapped", None)
        return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(is_loopback(str(info[4][0])) for info in infos)


def serve_registry(registry: Any, addr: str = DEFAULT_METRICS_ADDR, *,
                   allow_public: bool = False) -> tuple[Any, str, int]:
    """Serve ``registry`` on ``addr`` from a daemon thread: (server, bound host, bound port).

    Port 0 picks a free port (the real one is returned). A host that is not loopback
    (including ``:PORT``, every interface) must be asked for with ``allow_public=True``:
    the metrics reveal the policy, and nfhooks is often what guards this very host.
    """
    host, port = parse_listen_addr(addr)
    if not allow_public and not is_loopback(host):
        raise ValueError(
            f"refusing to serve metrics on non-loopback address {addr!r}: they name the "
            "policy and its handlers; ask for it explicitly (allow_public=True, "
            "`nfhooks run --public-metrics`) to expose them beyond this host"
        )
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address
    return server, str(bound[0]), int(bound[1])
