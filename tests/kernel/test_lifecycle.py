"""Rule ownership on the real kernel: install, exit, kill -9, restart, flush, others' rules."""

from __future__ import annotations

import signal
import sys

import pytest

from .conftest import POLICIES, ipt, nfh_lines, saved

FIREWALL = str(POLICIES / "firewall.py")


def nfhooks(lab, *args, node="router", check=False):
    return lab.exec(node, sys.executable, "-m", "nfhooks", *args, check=check, timeout=30)


def test_check_prints_exactly_what_run_installs(nfh_lab):
    lab = nfh_lab
    want = nfhooks(lab, "check", FIREWALL, "--set", "trusted=10.9.0.0/16", check=True).stdout
    lab.start_engine(FIREWALL, "--set", "trusted=10.9.0.0/16")
    got = nfhooks(lab, "rules", "--save", check=True).stdout
    assert got == want and "NFQUEUE" in got


def test_exit_removes_exactly_ours_and_leaves_others(nfh_lab):
    lab = nfh_lab
    lab.exec("router", ipt(4), "-w", "-A", "INPUT", "-p", "tcp", "--dport", "9999", "-j", "ACCEPT")
    lab.exec("router", ipt(6), "-w", "-N", "OTHERTOOL")
    lab.exec("router", "nft", "add table inet othertool { chain c { type filter hook input priority 0; } }",
             check=False)
    nft_before = lab.exec("router", "nft", "list", "ruleset", check=False).stdout
    before = saved(lab)
    eng = lab.start_engine(FIREWALL)
    assert len(nfh_lines(lab)) > 10
    assert eng.stop(signal.SIGTERM) == 0
    assert nfh_lines(lab) == []
    assert saved(lab).count("--dport 9999 -j ACCEPT") == before.count("--dport 9999 -j ACCEPT") == 1
    assert ":OTHERTOOL" in saved(lab)
    assert lab.exec("router", "nft", "list", "ruleset", check=False).stdout == nft_before


def test_sigint_also_cleans_up(nfh_lab):
    eng = nfh_lab.start_engine(FIREWALL)
    eng.stop(signal.SIGINT)
    assert nfh_lines(nfh_lab) == []


def test_kill9_then_restart_installs_exactly_one_set(nfh_lab):
    lab = nfh_lab
    eng = lab.start_engine(FIREWALL)
    installed = sorted(nfh_lines(lab))
    eng.kill9()
    assert sorted(nfh_lines(lab)) == installed  # the stale set stays: nobody removed it
    eng2 = lab.start_engine(FIREWALL)
    assert "stale" in eng2.log()
    assert sorted(nfh_lines(lab)) == installed  # exactly one set, not two
    eng2.stop()
    assert nfh_lines(lab) == []


def test_flush_after_crash_and_refusal_while_owner_lives(nfh_lab):
    lab = nfh_lab
    eng = lab.start_engine(FIREWALL)
    r = nfhooks(lab, "flush")
    assert r.returncode == 2 and "live nfhooks engine" in r.stderr and str(eng.pid) in r.stderr
    assert nfh_lines(lab)
    eng.kill9()
    r = nfhooks(lab, "flush", check=True)
    assert "NFH-INPUT" in r.stdout
    assert nfh_lines(lab) == []
    assert "nothing to remove" in nfhooks(lab, "flush", check=True).stdout


def test_second_engine_in_same_namespace_refused(nfh_lab):
    lab = nfh_lab
    eng = lab.start_engine(FIREWALL)
    r = nfhooks(lab, "run", FIREWALL, "--metrics-addr", "127.0.0.1:9478")
    assert r.returncode == 2 and "owns the rules" in r.stderr and str(eng.pid) in r.stderr
    assert "Traceback" not in r.stderr


def test_queue_taken_by_another_process(nfh_lab):
    lab = nfh_lab
    holder = lab.popen("router", sys.executable, "-c",
                       "import netfilterqueue,sys,time\n"
                       "q=netfilterqueue.NetfilterQueue(); q.bind(0, lambda p: p.accept())\n"
                       "print('bound', flush=True); time.sleep(60)\n")
    lab.wait_for(lambda: any(line.split()[0] == "0" for line in
                             lab.exec("router", "cat", "/proc/net/netfilter/nfnetlink_queue").stdout.splitlines()),
                 what="queue 0 bound")
    r = nfhooks(lab, "run", FIREWALL)
    assert r.returncode == 2
    assert "NFQUEUE 0" in r.stderr and "--queue-base" in r.stderr and str(holder.pid) in r.stderr
    assert nfh_lines(lab) == []  # nothing left behind by the failed start
    ok = lab.start_engine(FIREWALL, "--queue-base", "10")
    assert "queue(s) 10..15" in ok.log()


def test_bad_policy_and_not_root_errors_are_one_paragraph(nfh_lab, tmp_path):
    lab = nfh_lab
    bad = tmp_path / "bad.py"
    bad.write_text("from nfhooks import Policy\npolicy = Policy()\n@policy.input(proto='tcp')\ndef h(p)\n  pass\n")
    r = nfhooks(lab, "run", str(bad))
    assert r.returncode == 2 and f"{bad}:4" in r.stderr and "Traceback" not in r.stderr
    # no capabilities at all (the venv's Python lives under /root, so no other uid can run it)
    nocaps = ("setpriv", "--inh-caps=-all", "--bounding-set=-all")
    r = lab.exec("router", *nocaps, sys.executable, "-m", "nfhooks", "run", FIREWALL, check=False)
    assert r.returncode == 2 and "root or CAP_NET_ADMIN" in r.stderr, r.stderr
    r = lab.exec("router", *nocaps, sys.executable, "-m", "nfhooks", "check", FIREWALL, check=False)
    assert r.returncode == 0 and "NFQUEUE" in r.stdout, r.stderr


@pytest.mark.parametrize("mode,expect", [("--fail-open", "ok"), ("--fail-closed", "timeout")])
def test_fail_mode_when_no_engine_is_bound(nfh_lab, mode, expect):
    """kill -9 leaves the rules; with no engine bound, bypass decides what traffic does."""
    lab = nfh_lab
    lab.tcp_server("router", 22)
    eng = lab.start_engine(FIREWALL, mode, "--set", f"trusted={lab.addr('client')}/32")
    assert lab.tcp_connect("client", lab.addr("router"), 22) == "ok"
    eng.kill9()
    assert lab.tcp_connect("client", lab.addr("router"), 22, timeout=1.5) == expect


def test_engine_keeps_only_net_admin_and_net_raw(nfh_lab):
    from nfhooks.privileges import capabilities

    eng = nfh_lab.start_engine(FIREWALL)
    caps = capabilities(eng.pid)
    want = (1 << 12) | (1 << 13)
    assert caps["CapEff"] == want and caps["CapPrm"] == want and caps["CapBnd"] == want, caps
    assert nfhooks(nfh_lab, "reload").returncode == 0  # still able to change its rules
    eng.stop()
    assert nfh_lines(nfh_lab) == []
