"""What the bench compares: the consumers (cases), their ports, policies and queue numbers.

Shared by the run (which ports and policies to use), the results (which ratios to form)
and the report (row order, labels), so the three agree on one list.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType

__all__ = ["BACKEND_CASES", "BARE_QUEUE", "BENCH20_POLICY", "CASES", "CLK_TCK", "CPORT_BASE",
           "DEFAULT_POLICY", "ECHO_PORT", "FIELDS_PORT", "FLOW_POLICY", "FLOW_PORT", "LATENCY_RATE",
           "NFHOOKS_CASES", "NOT_AVAILABLE", "NO_BATCH_CASES", "NO_GSO_CASES", "PORT", "ROOT", "UDP_LEN", "backend_args",
           "engine_args"]

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_POLICY = ROOT / "policies" / "bench.py"
PORT = 5201  # policies/bench.py: accept unread
FIELDS_PORT = 5202  # policies/bench.py: read fields, then accept
FLOW_PORT = 5203  # policies/bench_flow.py: flow=True handlers (offloaded after the first packet)
ECHO_PORT = 5204  # policies/bench.py: udp_echo, the latency probe's port (every packet queued)
BENCH20_POLICY = ROOT / "policies" / "bench20.py"
FLOW_POLICY = ROOT / "policies" / "bench_flow.py"
BARE_QUEUE = 100  # queue of the bare/scapy scripts (nfhooks uses 0..3)
CPORT_BASE = 41000  # fixed client ports: one 5-tuple per flood
UDP_LEN = 64
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
CASES = ("kernel", "bare", "scapy", "nfhooks", "nfhooks legacy", "nfhooks nft", "nfhooks no-batch", "nfhooks fields",
         "nfhooks 20 handlers", "nfhooks 20 handlers no-gso", "nfhooks flow offload", "nfhooks 2 workers")
#: Rows run with --no-gso: what the default (GSO where safe, docs/gso.md) is compared with.
NO_GSO_CASES = frozenset({"nfhooks 20 handlers no-gso"})
#: Rows run with --no-verdict-batch: a verdict message per packet, as the bare script gives.
NO_BATCH_CASES = frozenset({"nfhooks no-batch"})
#: Cases compared with kernel and bare in the ratios, the markdown table and the chart.
NFHOOKS_CASES = CASES[3:]
LATENCY_RATE = 10_000.0
#: One row per rule backend, each pinned with --backend: the "nfhooks" row's policy and port,
#: so what each backend costs is a ratio measured in one run ("udp_pps nfhooks nft/nfhooks
#: legacy"). Every other nfhooks row, and the bare/scapy queue rule, use the bench's backend
#: (--backend, else $NFHOOKS_BACKEND, else auto).
BACKEND_CASES = MappingProxyType({"nfhooks legacy": "legacy", "nfhooks nft": "nft"})
NOT_AVAILABLE = "not available"


def engine_args(case: str) -> list[str]:
    """Every nfhooks engine of the bench runs ``--fail-closed``, as the bare consumer's queue is:
    a full queue drops in both, so a row's throughput is what its consumer decided (fail-open,
    the kernel would accept the overflow unasked and it would count as delivered). Default
    options otherwise (GSO where safe), ``--no-gso`` for the NO_GSO_CASES, the backend rows'
    ``--backend``, ``--no-verdict-batch`` for the NO_BATCH_CASES."""
    return ["--fail-closed", *(["--no-gso"] if case in NO_GSO_CASES else []),
            *(["--no-verdict-batch"] if case in NO_BATCH_CASES else []), *backend_args(case)]


def backend_args(case: str) -> list[str]:
    """``--backend NAME`` for a backend row's engine; nothing for the others (the bench's backend,
    exported in NFHOOKS_BACKEND, applies)."""
    return ["--backend", BACKEND_CASES[case]] if case in BACKEND_CASES else []
