"""Slow and hung handlers on the real kernel: the budget replaces late verdicts with the hook's
default, the watchdog interrupts handlers that never return, and the engine keeps answering."""

from __future__ import annotations

import signal

from .conftest import TEST_POLICIES, metric

POLICY = str(TEST_POLICIES / "slow_and_hung.py")


def test_slow_and_hung_handlers_get_the_default_and_the_engine_stays_up(nfh_lab):
    lab = nfh_lab
    eng = lab.start_engine(POLICY, "--handler-budget", "50", "--handler-timeout", "0.5")
    router = lab.addr("router", facing="client")
    for port in (7001, 7002, 7003, 7004):
        lab.tcp_server("router", port, bind="0.0.0.0")

    assert lab.tcp_connect("client", router, 7001) == "ok"
    # slow: the handler's accept came after 200 ms, past the 50 ms budget -> INPUT default drop
    assert lab.tcp_connect("client", router, 7002, timeout=1.0) == "timeout"
    lab.wait_for(lambda: metric(lab, "nfhooks_handler_overruns_total", handler="slow") >= 1,
                 timeout=10, what="the overrun counted")
    assert metric(lab, "nfhooks_handler_packets_total", handler="slow", verdict="accept") == 0

    # hung (sleeps forever, swallows Exception) and busy (pure-Python loop): interrupted at
    # 0.5 s each time a SYN (or its retransmission) arrives; the fast handler answers meanwhile
    for port, name in ((7003, "hung"), (7004, "busy")):
        assert lab.tcp_connect("client", router, port, timeout=1.5) == "timeout"
        assert lab.tcp_connect("client", router, 7001) == "ok"
        lab.wait_for(lambda: metric(lab, "nfhooks_handler_errors_total", handler=name) >= 1,
                     timeout=10, what=f"the {name} handler interrupted and counted")
        assert metric(lab, "nfhooks_handler_overruns_total", handler=name) >= 1
    log = eng.log()
    assert "did not return within --handler-timeout 0.5 s" in log and "past --handler-budget 50 ms" in log
    assert eng.running()
    assert eng.stop(signal.SIGTERM) == 0
