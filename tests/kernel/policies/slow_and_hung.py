"""Handlers that take too long: INPUT's default is drop, so a replaced verdict shows as a drop."""

import time

from nfhooks import Policy, accept

policy = Policy(defaults={"INPUT": "drop"})


@policy.input(iif="lo")
def loopback(pkt):
    return accept()


@policy.input(proto="tcp", dport=7001)
def fast(pkt):
    return accept()


@policy.input(proto="tcp", dport=7002)
def slow(pkt):
    time.sleep(0.2)  # past --handler-budget 50 ms
    return accept()


@policy.input(proto="tcp", dport=7003)
def hung(pkt):
    while True:  # never returns; an `except Exception` does not stop the watchdog
        try:
            time.sleep(10)
        except Exception:
            pass


@policy.input(proto="tcp", dport=7004)
def busy(pkt):
    n = 0
    while True:  # a pure-Python busy loop, interrupted between bytecodes
        n += 1
