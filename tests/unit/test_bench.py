"""nfhooks.bench: the pure parts (iperf3 JSON, /proc parsing, queue deltas, ratios, profile
summaries). The benchmark itself is `make bench`; nothing here is timed."""

from __future__ import annotations

import pytest

from nfhooks.bench import (
    IperfResult,
    Row,
    breakdown,
    cpu_ticks,
    parse_iperf,
    queue_handled,
    ratios,
    summarize_collapsed,
    vm_hwm_kib,
)
from nfhooks.metrics import QueueStat

# Trimmed from real iperf3 3.12 client documents (-J --get-server-output) in the bench lab.
UDP_DOC = {
    "start": {"test_start": {"protocol": "UDP", "num_streams": 1, "blksize": 64, "duration": 2}},
    "end": {
        # end.sum is the sender's view for UDP: packets sent, not received.
        "sum": {"seconds": 2.000089, "bytes": 78394240, "bits_per_second": 313573667.48,
                "lost_packets": 492641, "packets": 1224910, "sender": True},
        "sum_sent": {"seconds": 2.000021, "bytes": 78394240, "bits_per_second": 313573667.48,
                     "lost_packets": 0, "packets": 1224910, "sender": True},
        "sum_received": {"seconds": 2.000089, "bytes": 46864704, "bits_per_second": 187450474.45,
                         "lost_packets": 492641, "packets": 1224902, "sender": False},
    },
    "server_output_text": "...",
}
TCP_DOC = {
    "start": {"test_start": {"protocol": "TCP", "num_streams": 1, "blksize": 131072, "duration": 2}},
    "end": {
        "sum_sent": {"seconds": 2.000035, "bytes": 4790026240, "bits_per_second": 19159769664.03,
                     "retransmits": 9894, "sender": True},
        "sum_received": {"seconds": 2.000069, "bytes": 4789829256, "bits_per_second": 19158656050.37,
                         "sender": True},
    },
}


def test_udp_received_is_total_minus_lost():
    r = parse_iperf(UDP_DOC)
    assert r.protocol == "udp"
    assert r.packets == 1224902 - 492641
    assert r.packets * 64 == UDP_DOC["end"]["sum_received"]["bytes"]  # the same count, by bytes
    assert r.sent == 1224910
    assert r.pps == pytest.approx(732261 / 2.000089)
    assert r.tx_pps == pytest.approx(1224910 / 2.000089)
    assert r.lost_fraction == pytest.approx(492641 / 1224902)
    assert r.gbps == pytest.approx(0.18745, rel=1e-4)


def test_tcp_uses_receiver_rate():
    r = parse_iperf(TCP_DOC)
    assert r.protocol == "tcp"
    assert r.packets is None and r.pps is None and r.lost_fraction is None
    assert r.gbps == pytest.approx(19.1587, rel=1e-4)


def test_server_json_when_client_has_no_receiver_summary():
    doc = {"start": {"test_start": {"protocol": "UDP"}}, "end": {"sum": {"packets": 10, "lost_packets": 0}},
           "server_output_json": {"end": {"sum": {"seconds": 1.0, "packets": 100, "lost_packets": 40,
                                                  "bits_per_second": 1000.0}}}}
    r = parse_iperf(doc)
    assert (r.packets, r.lost, r.pps) == (60, 40, 60.0)


def test_iperf_errors_raise():
    with pytest.raises(ValueError, match="unable to connect"):
        parse_iperf({"start": {}, "end": {}, "error": "unable to connect to server"})
    with pytest.raises(ValueError, match="receiver summary"):
        parse_iperf({"start": {"test_start": {"protocol": "TCP"}}, "end": {}})


def test_proc_parsing():
    # comm with a space and a parenthesis: fields are counted after the last ')'
    stat = "4242 (python3 (x)) S 1 4242 4242 0 -1 4194560 5000 0 0 0 731 269 0 0 20 0 2 0 9 0 0"
    assert cpu_ticks(stat) == 731 + 269
    assert vm_hwm_kib("Name:\tpython3\nVmPeak:\t  60000 kB\nVmHWM:\t   53248 kB\nVmRSS:\t 50000 kB\n") == 53248
    assert vm_hwm_kib("Name:\tkthread\n") is None


def qs(num: int, queue_dropped: int, user_dropped: int, id_sequence: int) -> QueueStat:
    return QueueStat(num, 1234, 0, 2, 65535, queue_dropped, user_dropped, id_sequence)


def test_queue_handled_is_ids_minus_socket_drops():
    before = [qs(0, 10, 1, 1000), qs(1, 0, 0, 50), qs(7, 0, 0, 5)]
    after = [qs(0, 510, 3, 201000), qs(1, 0, 0, 60), qs(2, 0, 0, 30), qs(7, 0, 0, 9)]
    d = queue_handled(before, after, queues=[0, 1, 2])  # queue 7 is somebody else's
    assert d == {"handled": (200000 - 2) + 10 + 30, "queue_dropped": 500, "user_dropped": 2}


def test_row_cpu_per_packet_prefers_decided_packets():
    res = IperfResult("udp", 2.0, 1000, 0, 1e6, 1000)
    r = Row.build("bare", res, wall=2.5, cpu=0.005, queue={"handled": 2000, "queue_dropped": 9, "user_dropped": 0},
                  rss_kib=2048)
    assert r.cpu_us_per_packet == pytest.approx(2.5)
    assert r.cpu_core_pct == pytest.approx(0.2)
    retried = Row.build("bare", res, wall=40.0, cpu=0.005)  # iperf3 retried: the test's own 2 s count
    assert retried.cpu_core_pct == pytest.approx(0.25)
    assert r.max_rss_mib == 2.0
    k = Row.build("kernel", res)
    assert k.cpu_us_per_packet is None and k.pps == 500.0


def test_ratios():
    rows = [
        Row("kernel", "udp", pps=400_000.0),
        Row("bare", "udp", pps=120_000.0, cpu_us_per_packet=2.5),
        Row("nfhooks", "udp", pps=90_000.0, cpu_us_per_packet=7.5),
        Row("scapy", "udp", error="boom"),
        Row("kernel", "tcp", gbps=13.2),
        Row("nfhooks", "tcp", gbps=0.0),
    ]
    r = ratios(rows)
    assert r["udp_pps nfhooks/bare"] == pytest.approx(0.75)
    assert r["udp_pps nfhooks/kernel"] == pytest.approx(0.225)
    assert r["udp_cpu_per_packet nfhooks/bare"] == pytest.approx(3.0)
    assert "udp_pps scapy/bare" not in r  # a failed row gives no ratio
    assert r["tcp_gbps nfhooks/kernel"] == pytest.approx(0.0)
    assert "tcp_gbps nfhooks/bare" not in r


COLLAPSED = """\
main (cli.py:1);QueueSet.run (nfhooks/queue.py:95);recv (libc.so.6) 20
main (cli.py:1);QueueSet.run (nfhooks/queue.py:95);Dispatcher.callback.<locals>.on_packet (nfhooks/engine.py:148);parse (nfhooks/packet.py:377) 10
main (cli.py:1);QueueSet.run (nfhooks/queue.py:95);Dispatcher.callback.<locals>.on_packet (nfhooks/engine.py:160);udp_accept (bench.py:34) 5
main (cli.py:1);QueueSet.run (nfhooks/queue.py:95);Dispatcher.callback.<locals>.on_packet (nfhooks/engine.py:182);Dispatcher.callback.<locals>.apply (nfhooks/engine.py:112);VerdictCounter.count (nfhooks/metrics.py:107);MutexValue.inc (prometheus_client/values.py:28) 25
main (cli.py:1);QueueSet.run (nfhooks/queue.py:95);Dispatcher.callback.<locals>.on_packet (nfhooks/engine.py:182);Dispatcher.callback.<locals>.apply (nfhooks/engine.py:113);nfq_set_verdict (libnetfilter_queue.so.1);sendmsg (libc.so.6) 40
Thread.run (threading.py:982);BaseServer.serve_forever (socketserver.py:233);poll (libc.so.6) 30
garbage line
"""


def test_summarize_collapsed():
    s = summarize_collapsed(COLLAPSED)
    assert s["samples"] == 130
    assert s["self"][0] == ("sendmsg (libc.so.6)", pytest.approx(100 * 40 / 130))
    total = dict(s["total"])
    assert total["QueueSet.run (nfhooks/queue.py:95)"] == pytest.approx(100 * 100 / 130)
    assert summarize_collapsed("") == {"self": [], "total": [], "samples": 0}


def test_breakdown_shares_of_the_packet_loop():
    b = breakdown(COLLAPSED)
    assert (b["loop_samples"], b["other_samples"]) == (100, 30)
    p = b["percent"]
    assert p["metrics: verdict counters"] == pytest.approx(25.0)
    assert p["parse (packet.py)"] == pytest.approx(10.0)
    assert p["handler (policies/bench.py)"] == pytest.approx(5.0)
    assert p["verdict: nfq_set_verdict/sendmsg (kernel re-injects the packet)"] == pytest.approx(40.0)
    assert p["receive: recv (kernel hands over packets)"] == pytest.approx(20.0)
    assert sum(p.values()) == pytest.approx(100.0)


def test_percentile_is_nearest_rank():
    from nfhooks.bench import percentile

    v = list(range(1, 101))
    assert percentile(v, 50) == 50 and percentile(v, 99) == 99 and percentile(v, 100) == 100
    assert percentile([7], 99) == 7 and percentile([], 50) is None


def test_latency_stats_and_added():
    from nfhooks.bench import added_latency, latency_stats

    rtt = [10_000_000] * 5 + [i * 1000 for i in range(1, 101)]  # 5 slow warm-up replies, then 1..100 us
    st = latency_stats(rtt, sent=110, rate=1000.0, warmup=5)
    assert (st["p50_us"], st["p99_us"], st["max_us"]) == (50.0, 99.0, 100.0)
    assert st["received"] == 105 and st["lost_pct"] == pytest.approx(100 * 5 / 110)
    kernel = {"p50_us": 30.0, "p99_us": 80.0}
    add = added_latency({"kernel": kernel, "nfhooks": st, "bare": {"error": "boom"}})
    assert add == {"nfhooks": {"p50_us": 20.0, "p99_us": 19.0}}


def test_ratios_cover_the_nfhooks_variants():
    rows = [Row("kernel", "tcp", gbps=10.0), Row("bare", "tcp", gbps=2.0, cpu_us_per_packet=2.0),
            Row("nfhooks flow offload", "tcp", gbps=9.0, cpu_us_per_packet=0.1),
            Row("nfhooks 20 handlers", "tcp", gbps=1.0, cpu_us_per_packet=8.0),
            Row("nfhooks 2 workers", "tcp", error="not available: no --workers")]
    r = ratios(rows)
    assert r["tcp_gbps nfhooks flow offload/kernel"] == pytest.approx(0.9)
    assert r["tcp_gbps nfhooks 20 handlers/bare"] == pytest.approx(0.5)
    assert r["tcp_cpu_per_packet nfhooks 20 handlers/bare"] == pytest.approx(4.0)
    assert not any("workers" in k for k in r)


def test_markdown_and_docs_block():
    from nfhooks.bench import DOCS_BEGIN, DOCS_END, markdown, replace_block

    rows = [Row("kernel", "udp", pps=400_000.0), Row("bare", "udp", pps=100_000.0, cpu_us_per_packet=2.0),
            Row("nfhooks", "udp", pps=80_000.0, cpu_us_per_packet=5.0, handled=1000, max_rss_mib=50.0),
            Row("nfhooks 2 workers", "udp", error="not available: nfhooks run has no --workers yet")]
    lat = {"kernel": {"rate": 1e4, "sent": 10, "received": 10, "p50_us": 30.0, "p90_us": 40.0, "p99_us": 80.0,
                      "max_us": 90.0}}
    lat["nfhooks"] = {**lat["kernel"], "p50_us": 50.0, "p99_us": 150.0}
    md = markdown(rows, lat, {"seconds": 5, "cpus": 2})
    line = next(x for x in md.splitlines() if x.startswith("| UDP 64 B | nfhooks |"))
    assert "| 80,000 | - | 0.20x | 0.80x | - | 5.00 | 2.50x |" in line
    assert "one round; every queue fail-closed" in md
    assert "| nfhooks 2 workers | not available" in md
    assert "| nfhooks | 10 | 10 | 50 | 40 | 150 | 90 | +20 | +70 |" in md
    doc = replace_block("# Perf\n\ntext\n", md)
    assert doc.count(DOCS_BEGIN) == 1 and doc.startswith("# Perf\n\ntext\n")
    again = replace_block(doc + "\nafter\n", "new table")
    assert "new table" in again and "| UDP 64 B |" not in again and again.endswith("after\n")
    assert again.count(DOCS_END) == 1


def test_decision_quantiles_from_two_scrapes():
    from nfhooks.bench import bucket_quantile, histogram_buckets

    def text(counts):
        les = ("5e-06", "1e-05", "2.5e-05", "+Inf")
        lines = [f'nfhooks_decision_seconds_bucket{{hook="INPUT",le="{le}"}} {c}' for le, c in zip(les, counts)]
        lines.append('nfhooks_decision_seconds_bucket{hook="OUTPUT",le="+Inf"} 99.0')
        return "\n".join(lines)

    h0 = histogram_buckets(text((10, 10, 10, 10)), "nfhooks_decision_seconds", hook="INPUT")
    h1 = histogram_buckets(text((10, 70, 108, 110)), "nfhooks_decision_seconds", hook="INPUT")
    assert h1[1e-05] == 70 and h1[float("inf")] == 110
    assert bucket_quantile(h0, h1, 0.5) == 1e-05  # 60 of the 100 new observations are <= 10 us
    assert bucket_quantile(h0, h1, 0.99) == float("inf")  # 98 <= 25 us, the 99th is beyond
    assert bucket_quantile(h0, h1, 0.98) == 2.5e-05
    assert bucket_quantile(h1, h1, 0.5) is None


def test_udp_throughput_is_what_the_consumer_decided_and_bypasses_are_apart():
    """A fail-open queue "delivers" what the kernel accepted unasked; the row's throughput is
    the decided count (queue ids handed over), the difference is reported as bypassed."""
    res = IperfResult("udp", 2.0, 3000, 0, 1e6, 3000)  # 3000 arrived
    r = Row.build("nfhooks", res, cpu=0.01, queue={"handled": 2000, "queue_dropped": 0, "user_dropped": 0})
    assert r.decided_pps == 1000.0 and r.pps == 1500.0 and r.bypassed == 1000
    bare = Row.build("bare", res, cpu=0.01, queue={"handled": 4000, "queue_dropped": 9, "user_dropped": 0})
    assert bare.bypassed == 0  # fail-closed: more decided than arrived (some were dropped)
    assert ratios([r, bare])["udp_pps nfhooks/bare"] == pytest.approx(0.5)  # 1000 / 2000 decided per s
    kernel = Row.build("kernel", res)
    # the kernel decides nothing: against it, what was delivered on both sides
    assert kernel.decided_pps is None and ratios([r, kernel])["udp_pps nfhooks/kernel"] == pytest.approx(1.0)


def test_tcp_cpu_per_megabyte_compares_super_packets_with_segments():
    """With GSO a decision is a super-packet: CPU per decided packet is up, CPU per byte down."""
    seg = Row.build("bare", IperfResult("tcp", 2.0, None, None, 2e9, None), cpu=1.0,
                    queue={"handled": 300_000, "queue_dropped": 0, "user_dropped": 0})
    gso = Row.build("nfhooks", IperfResult("tcp", 2.0, None, None, 16e9, None), cpu=1.0,
                    queue={"handled": 60_000, "queue_dropped": 0, "user_dropped": 0})
    assert seg.cpu_us_per_mb == pytest.approx(1e6 / 500) and gso.cpu_us_per_mb == pytest.approx(1e6 / 4000)
    r = ratios([seg, gso])
    assert r["tcp_cpu_per_packet nfhooks/bare"] == pytest.approx(5.0)
    assert r["tcp_cpu_per_mb nfhooks/bare"] == pytest.approx(0.125)


def test_every_engine_row_is_fail_closed_and_the_no_gso_row_says_so():
    from nfhooks.bench.cases import CASES, engine_args

    for case in CASES[3:]:
        assert engine_args(case)[0] == "--fail-closed"
    assert "--no-gso" in engine_args("nfhooks 20 handlers no-gso")
    assert "--no-gso" not in engine_args("nfhooks 20 handlers")  # default options: GSO where safe
    assert engine_args("nfhooks nft") == ["--fail-closed", "--backend", "nft"]
    assert engine_args("nfhooks no-batch") == ["--fail-closed", "--no-verdict-batch"]
    assert "--no-verdict-batch" not in engine_args("nfhooks")


def _rounds():
    # three rounds; round 2 is a noisy minute for everyone
    out = []
    for rnd, (k, b, n) in enumerate(((400e3, 100e3, 80e3), (200e3, 50e3, 45e3), (380e3, 110e3, 77e3)), 1):
        out += [Row("kernel", "udp", pps=k, round=rnd),
                Row("bare", "udp", decided_pps=b, cpu_us_per_packet=2.0, round=rnd),
                Row("nfhooks", "udp", decided_pps=n, cpu_us_per_packet=2.0 + rnd, handled=int(n), round=rnd)]
    out.append(Row("scapy", "udp", error="boom", round=1))
    return out


def test_summarize_gives_median_and_range_per_row():
    from nfhooks.bench import summarize

    s = {(r.case, r.proto): r for r in summarize(_rounds())}
    n = s[("nfhooks", "udp")]
    assert n.decided_pps == 77e3 and n.extra["range"]["decided_pps"] == [45e3, 80e3]
    assert n.cpu_us_per_packet == 4.0 and n.extra["rounds"] == 3 and n.handled == 77000
    assert isinstance(n.handled, int)
    assert s[("scapy", "udp")].error == "boom" and s[("scapy", "udp")].extra["rounds"] == 0
    assert [r.case for r in summarize(_rounds())] == ["kernel", "bare", "nfhooks", "scapy"]  # first-seen order


def test_ratios_are_formed_within_a_round_then_their_median():
    from nfhooks.bench import round_ratios

    med, span = round_ratios(_rounds())
    per_round = [80 / 100, 45 / 50, 77 / 110]
    assert med["udp_pps nfhooks/bare"] == pytest.approx(sorted(per_round)[1])  # 0.8
    assert span["udp_pps nfhooks/bare"] == pytest.approx([min(per_round), max(per_round)])
    # not the ratio of the medians (77e3 / 100e3 = 0.77): the rows' medians come from different rounds
    assert med["udp_pps nfhooks/bare"] != pytest.approx(0.77)
    assert med["udp_cpu_per_packet nfhooks/bare"] == pytest.approx(2.0)  # 1.5, 2.0, 2.5


def test_markdown_shows_median_with_range_and_round_ratios():
    from nfhooks.bench import markdown, round_ratios, summarize

    measured = _rounds()
    med, span = round_ratios(measured)
    md = markdown(summarize(measured), {}, {"seconds": 2, "cpus": 2, "rounds": 3}, med, span)
    assert "3 interleaved rounds, median (min–max), ratios formed within each round" in md
    line = next(x for x in md.splitlines() if x.startswith("| UDP 64 B | nfhooks |"))
    assert "| 77,000 (45,000–80,000) |" in line and "| 0.80x (0.70–0.90) |" in line
    assert "| 4.00 (3.00–5.00) |" in line
