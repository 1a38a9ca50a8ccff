"""The bench's row per rule backend (issue 15): the same policy and port under --backend legacy
and --backend nft, and the ratio between them. Pure: nothing is run or timed here."""

from __future__ import annotations

from nfhooks.bench import Row, markdown, ratios
from nfhooks.bench.cases import BACKEND_CASES, CASES, NFHOOKS_CASES, backend_args


def row(case: str, proto: str, pps: float | None, gbps: float | None, cpu: float) -> Row:
    return Row(case, proto, pps=pps, gbps=gbps, cpu_us_per_packet=cpu)


def test_each_backend_row_pins_its_backend_and_the_others_use_the_bench_backend():
    assert dict(BACKEND_CASES) == {"nfhooks legacy": "legacy", "nfhooks nft": "nft"}
    assert backend_args("nfhooks legacy") == ["--backend", "legacy"]
    assert backend_args("nfhooks nft") == ["--backend", "nft"]
    for case in ("nfhooks", "nfhooks fields", "nfhooks 20 handlers", "nfhooks 2 workers"):
        assert backend_args(case) == []  # $NFHOOKS_BACKEND, exported by the bench's --backend
    assert set(BACKEND_CASES) <= set(NFHOOKS_CASES)  # compared with kernel and bare too
    assert CASES.index("nfhooks") < CASES.index("nfhooks legacy") < CASES.index("nfhooks nft")


def test_nft_over_legacy_ratios():
    rows = [row("kernel", "udp", 200_000, None, 0), row("bare", "udp", 100_000, None, 4.0),
            row("nfhooks legacy", "udp", 80_000, None, 5.0), row("nfhooks nft", "udp", 60_000, None, 6.0),
            row("kernel", "tcp", None, 20.0, 0), row("bare", "tcp", None, 2.0, 4.0),
            row("nfhooks legacy", "tcp", None, 1.0, 8.0), row("nfhooks nft", "tcp", None, 1.5, 6.0)]
    r = ratios(rows)
    assert r["udp_pps nfhooks nft/nfhooks legacy"] == 0.75
    assert r["tcp_gbps nfhooks nft/nfhooks legacy"] == 1.5
    assert r["udp_cpu_per_packet nfhooks nft/nfhooks legacy"] == 1.2
    assert r["tcp_cpu_per_packet nfhooks nft/nfhooks legacy"] == 0.75
    assert r["udp_pps nfhooks nft/bare"] == 0.6


def test_a_missing_backend_row_gives_no_ratio_and_the_table_says_which_backend():
    rows = [row("nfhooks legacy", "udp", 80_000, None, 5.0),
            Row("nfhooks nft", "udp", error="engine did not start: iptables-nft-save not found")]
    assert "udp_pps nfhooks nft/nfhooks legacy" not in ratios(rows)
    md = markdown(rows, {}, {"seconds": 2, "backend": "nft"})
    assert "Rule backend of the rows not named after one: nft" in md
    assert "| nfhooks nft | engine did not start: iptables-nft-save not found |" in md
    assert "Rule backend" not in markdown(rows, {}, {"seconds": 2})
