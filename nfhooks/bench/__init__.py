"""`make bench`: what nfhooks costs per packet, next to what it is compared with, on equal terms.

Run as root: ``python -m nfhooks.bench [--rounds 3] [--seconds 4] [--quick] [--json PATH] [--profile PATH]``.

Equal terms: every queue consumer is fail-closed (the bare script's queue, and every nfhooks
engine runs ``--fail-closed``): a full queue drops, so what arrives is what the consumer
decided; UDP throughput is packets *decided* per second (the queue's ids handed over), and
what arrived undecided (``bypassed``, none when fail-closed) is reported apart. Every row runs
in ``--rounds`` interleaved rounds (round 1: every row, round 2: every row, ...) and the
tables show the median with min–max; every ratio is formed within one round, then its median
(min–max) over the rounds is shown -- never a ratio of two medians from different minutes of
a shared machine.

Two lab namespaces joined by a veth (client -- router). iperf3 servers listen on the router,
iperf3 clients in the client namespace send the same traffic through each consumer:

==============  ==================================================================================
kernel          no queue rule at all: what the veth, the stack and iperf3 do alone
bare            a minimal NetfilterQueue script: ``lambda p: p.accept()``, bound with the queue
                length nfhooks uses, and ``-A INPUT -p udp|tcp --dport P -j NFQUEUE``
scapy           the common approach: the same script, ``IP(p.get_payload())`` then accept
nfhooks         ``nfhooks run policies/bench.py``: a handler that accepts unread
nfhooks legacy  the same engine, policy and port with ``--backend legacy`` / ``--backend nft``
nfhooks nft     (every other row uses the bench's ``--backend``): what each rule backend costs,
                as a ratio of one run
nfhooks         the "nfhooks" row with ``--no-verdict-batch``: a verdict message per packet,
no-batch        as the bare script sends (the default batches a pass's accepts: vbatch.py)
nfhooks fields  the same engine, the handler reads pkt.src / pkt.dport / pkt.proto first
nfhooks 20      ``nfhooks run policies/bench20.py``: a realistic 20-handler INPUT policy; for the
handlers        flood 19 kernel matches do not fire, one does (its handler accepts); default
                options, so TCP goes through GSO whole (docs/gso.md)
nfhooks 20 h.   the same with ``--no-gso`` (TCP only): every GSO packet segmented before it
no-gso          is queued, the default before GSO by default
nfhooks flow    ``nfhooks run policies/bench_flow.py``, port 5203: ``flow=True`` handlers; Python
offload         sees each connection's first packet, the kernel's offload rule accepts the rest
nfhooks 2       ``nfhooks run --workers 2 policies/bench.py`` when ``run`` has ``--workers``
workers         (otherwise the row says "not available")
==============  ==================================================================================

Latency (``--latency-rate``, default 10,000 pps): a UDP echo server on the router (port 5204)
and a pinger in the client namespace sending fixed-rate 12-byte probes from one fixed port
and timing each reply (``perf_counter_ns`` in the probe): round-trip p50/p90/p99 with no
queue rule (kernel), through a bare NetfilterQueue consumer, and through nfhooks' engine
(``udp_echo``: every probe is queued at INPUT). "Added" = a consumer's percentile minus the
kernel's, both from the same run.

Traffic: iperf3 UDP with 64-byte payloads at full speed (``-u -b 0 -l 64``) and iperf3 TCP, each
from a fixed client port (``--cport``): the conntrack table is machine-wide, so a flood is one
5-tuple, never thousands of entries. All packets to the iperf3 port are queued at INPUT.

Measured per row: packets the receiver got per second (iperf3's server-side count, received =
packets - lost) and Gbit/s for TCP; the consumer's CPU time (utime+stime from /proc/PID/stat,
before/after) divided by the packets it decided (the kernel's queue statistics: id_sequence
minus user_dropped), and the share of one core it used; packets the kernel dropped because the
queue was full; the consumer's peak RSS (VmHWM). On a 2-core machine the sender, the softirq
work and the consumer share the cores, so CPU per packet is the number to compare between
consumers, and pps ratios only within one run (the machine is noisy).

Everything happens inside the lab's namespaces (rules included); the lab is a context
manager, so processes it started and its namespaces are removed on failure too.

Layout (import direction: top to bottom, nothing imports upward):

==============  ==================================================================
``cases``       what is compared: the consumers, ports, policies, queue numbers
``scripts``     the small programs run inside the lab (echo server, pinger, bare consumer)
``parse``       reading iperf3 JSON, /proc, queue stats, Prometheus text, py-spy stacks
``results``     one :class:`Row` per consumer and traffic; ratios, latency percentiles
``report``      the rich table, the markdown (and docs block) and the PNG chart
``run``         :class:`Bench`: the two-node lab and the measurements
``cli``         ``main``: arguments, the run, writing the results
==============  ==================================================================
"""

from .cli import main
from .parse import (
    IperfResult,
    breakdown,
    bucket_quantile,
    cpu_ticks,
    histogram_buckets,
    parse_iperf,
    queue_handled,
    summarize_collapsed,
    vm_hwm_kib,
)
from .report import DOCS_BEGIN, DOCS_END, chart, markdown, render, replace_block
from .results import Row, added_latency, latency_stats, percentile, ratios, round_ratios, summarize
from .run import Bench

__all__ = ["Bench", "DOCS_BEGIN", "DOCS_END", "IperfResult", "Row", "added_latency", "breakdown",
           "bucket_quantile", "chart", "cpu_ticks", "histogram_buckets", "latency_stats", "main",
           "markdown", "parse_iperf", "percentile", "queue_handled", "ratios", "render",
           "replace_block", "round_ratios", "summarize", "summarize_collapsed", "vm_hwm_kib"]
