"""kill -9 of the engine under traffic: what established and new connections do in each fail
mode, and that the next start or `nfhooks flush` leaves exactly one set or none."""

from __future__ import annotations

import sys
import textwrap

import pytest

from .conftest import POLICIES, nfh_lines

FIREWALL = str(POLICIES / "firewall.py")
PORT = 22  # policies/firewall.py: ssh from the trusted range is accepted, in Python, every packet

ECHO = textwrap.dedent('''\
    import socket, sys, threading
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(16)
    def serve(c):
        while (d := c.recv(4096)):
            c.sendall(d)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    ''')

# One established connection: a byte every 50 ms, one line per round trip ("ok"/"lost") in a file.
CHAT = textwrap.dedent('''\
    import socket, sys, time
    out = open(sys.argv[3], "a", buffering=1)
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    s.settimeout(0.3)
    while True:
        try:
            s.sendall(b"x")
            out.write("ok\\n" if s.recv(16) else "closed\\n")
        except OSError:
            out.write("lost\\n")
        time.sleep(0.05)
    ''')


@pytest.mark.parametrize("mode,established,new", [("--fail-open", "ok", "ok"),
                                                   ("--fail-closed", "lost", "timeout")])
def test_kill9_under_traffic(nfh_lab, mode, established, new):
    lab = nfh_lab
    router = lab.addr("router", facing="client")
    eng = lab.start_engine(FIREWALL, mode, "--set", f"trusted={lab.addr('client')}/32")
    echo = lab.popen("router", sys.executable, "-c", ECHO, str(PORT))
    lab.wait_for(lambda: lab.tcp_connect("client", router, PORT) == "ok", timeout=10, what="echo server up")
    log = lab.tmpdir / f"chat{mode}.log"
    chat = lab.popen("client", sys.executable, "-c", CHAT, router, str(PORT), str(log))
    try:
        def lines():
            return log.read_text().split() if log.exists() else []

        lab.wait_for(lambda: lines().count("ok") >= 5, timeout=10, what="the connection established")
        assert "lost" not in lines()
        eng.kill9()
        before = len(lines())
        # the next 10 round trips after the crash show what the kernel does without an engine
        lab.wait_for(lambda: len(lines()) >= before + 10, timeout=20, what="round trips after the crash")
        after = lines()[before + 2:before + 10]  # skip the round trip that was in flight
        assert set(after) == {established}, after
        assert lab.tcp_connect("client", router, PORT, timeout=1.5) == new
        assert nfh_lines(lab)  # the crashed engine's rules stay: bypass decides
        eng2 = lab.start_engine(FIREWALL, mode, "--set", f"trusted={lab.addr('client')}/32")
        assert "stale" in eng2.log()
        assert lab.tcp_connect("client", router, PORT) == "ok"  # decided by the new engine again
        eng2.stop()
        assert nfh_lines(lab) == []
    finally:
        for p in (chat, echo):
            p.kill()
            p.wait()
