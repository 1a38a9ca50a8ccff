"""Network-namespace lab: real kernels, real packets, nothing touched outside the lab."""

from nfhooks.lab.topology import (
    EngineProc,
    Lab,
    LabCommandError,
    Node,
    TcpServer,
    UdpServer,
    cleanup_stale,
)

__all__ = [
    "EngineProc",
    "Lab",
    "LabCommandError",
    "Node",
    "TcpServer",
    "UdpServer",
    "cleanup_stale",
]
