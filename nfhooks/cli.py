"""The ``nfhooks`` command: parse, call, print. No packet logic lives here.

Errors a user can fix (bad policy, missing kernel feature, not root, queue taken) print one
paragraph and exit with status 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .backends.choice import choose, remove_everywhere
from .hooks import explain
from .loader import load_policy
from .policy import PolicyError, parse_sets

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Write Linux packet policy in Python: NFQUEUE at all five netfilter hooks.")
out = Console()

POLICY_ARG = typer.Argument(..., help="policy file, e.g. policies/firewall.py")
SET_OPT = typer.Option([], "--set", "-s", help="set a policy option: key=value (repeatable)")
BACKEND_OPT = typer.Option(None, "--backend", help="where the rules go: auto (or $NFHOOKS_BACKEND), legacy, nft")


class UserError(Exception):
    """Anything the user can fix; printed as one paragraph, exit status 2."""


def say(message: str) -> None:
    """Plain stderr line (no markup: rule text is full of brackets)."""
    print(message, file=sys.stderr, flush=True)


def _fail(message: str) -> None:
    say(f"nfhooks: error: {message}")
    raise typer.Exit(2)


def _load(policy: Path, sets: List[str]):  # type: ignore[no-untyped-def]
    try:
        return load_policy(policy, parse_sets(sets))
    except PolicyError as e:
        _fail(str(e))


def _fail_mode(fail_open: bool, fail_closed: bool) -> Optional[str]:
    if fail_open and fail_closed:
        _fail("--fail-open and --fail-closed exclude each other")
    return "open" if fail_open else "closed" if fail_closed else None


def _mask(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        _fail(f"--mark-mask {text!r} is not a number (e.g. 0xffff0000)")
        raise


@app.command()
def check(policy: Path = POLICY_ARG, set_: List[str] = SET_OPT,
          fail_open: bool = typer.Option(False, "--fail-open", help="as `run --fail-open`: queue rules "
                                         "with --queue-bypass"),
          fail_closed: bool = typer.Option(False, "--fail-closed", help="as `run --fail-closed`"),
          queue_base: int = typer.Option(0, "--queue-base", help="first NFQUEUE number"),
          mark_mask: str = typer.Option("0xffff0000", "--mark-mask", help="mark bits nfhooks may use"),
          nat_targets: int = typer.Option(63, "--nat-targets", help="bound on distinct NAT targets"),
          backend: Optional[str] = BACKEND_OPT) -> None:
    """Validate POLICY and print the rules `run` would install (iptables-save format; the nft
    backend's restore tool named in a first comment). Touches nothing and needs no root."""
    from .engine import hooks_summary
    from .rules import compile_policy

    pol = _load(policy, set_)
    try:
        rs = compile_policy(pol, queue_base=queue_base, fail=_fail_mode(fail_open, fail_closed),
                            mark_mask=_mask(mark_mask), nat_targets=nat_targets)
    except PolicyError as e:
        _fail(str(e))
        return
    say(f"# policy {pol.name} ({pol.file}): {len(pol.handlers)} handler(s), OK")
    for line in hooks_summary(rs):
        say(f"#   {line}")
    say("# mark layout: " + "; ".join(rs.layout.describe()))
    from .features.registry import FEATURES

    for feature in sorted(FEATURES, key=lambda f: f.check_order):  # what each sets up besides the rules
        try:
            lines = feature.check_lines(pol, rs)
        except PolicyError as e:
            _fail(str(e))
            return
        for line in lines:
            say(line)
    sys.stdout.write(choose(backend, _fail)[0].save_header() + rs.render())


def _pcap_writer(path: Optional[Path], max_bytes: int, files: int, metrics):  # type: ignore[no-untyped-def]
    """The --pcap writer (nfhooks/pcap.py), or None without --pcap."""
    if path is None:
        return None
    from .pcap import PcapWriter

    try:
        tap = PcapWriter(path, max_bytes=max_bytes, files=files, registry=metrics.registry)
    except (OSError, ValueError) as e:
        _fail(f"--pcap {path}: {e}")
    say(f"nfhooks: recording queued packets and verdicts to {path} (pcapng, rotated at "
        f"{max_bytes} bytes, {files} file(s) kept)")
    return tap


def _serve_workers(engine, workers: int, cpu_fanout: bool, tap, metrics_addr: str,  # type: ignore[no-untyped-def]
                   public_metrics: bool) -> None:
    """`run --workers N` (workers.py): the main process owns the rules, N processes decide."""
    from .engine import hooks_summary
    from .errors import KernelError
    from .owner import OwnedElsewhere
    from .workers import run_workers

    for line in hooks_summary(engine.ruleset):
        say(f"  {line}")
    try:
        code = run_workers(engine.policy, engine.ruleset, workers, options=engine.queue_options,
                           cpu_fanout=cpu_fanout, metrics_addr=metrics_addr, backend=engine.backend,
                           allow_public=public_metrics, budget=getattr(engine, "handler_budget", 0.0),
                           timeout=getattr(getattr(engine, "watchdog", None), "timeout", None), say=say,
                           runtimes=engine.runtimes, audit=engine.audit, compile_next=engine.compile_next, pcap=tap)
    except (KernelError, OwnedElsewhere, ValueError, OSError) as e:
        _fail(str(e))
        return
    say("nfhooks: stopped, rules removed")
    raise typer.Exit(code)


def _queue_options(maxlen: int, rcvbuf: Optional[int], gso: Optional[bool], batch: bool):  # type: ignore[no-untyped-def]
    from .queue import QueueOptions
    try:  # --gso / --no-gso force it; neither: auto (docs/gso.md)
        return QueueOptions(maxlen=maxlen, rcvbuf=rcvbuf, gso="auto" if gso is None else gso, batch=batch)
    except ValueError as e:
        _fail(str(e))


@app.command()
def run(policy: Path = POLICY_ARG, set_: List[str] = SET_OPT,
        fail_open: bool = typer.Option(False, "--fail-open", help="queue rules use --queue-bypass everywhere"),
        fail_closed: bool = typer.Option(False, "--fail-closed", help="no engine: queued traffic is dropped"),
        queue_base: int = typer.Option(0, "--queue-base", help="first NFQUEUE number"),
        mark_mask: str = typer.Option("0xffff0000", "--mark-mask", help="mark bits nfhooks may use"),
        nat_targets: int = typer.Option(63, "--nat-targets",
                                        help="bound on distinct NAT targets (sizes the nat mark field)"),
        metrics_addr: str = typer.Option("127.0.0.1:9477", "--metrics-addr",
                                         help="HOST:PORT for Prometheus metrics; 'off' disables"),
        public_metrics: bool = typer.Option(False, "--public-metrics",
                                            help="allow a non-loopback --metrics-addr"),
        pcap: Optional[Path] = typer.Option(None, "--pcap", help="record every queued packet with its "
                                            "hook, handler and verdict in this pcapng file"),
        pcap_max_bytes: int = typer.Option(64 * 1024 * 1024, "--pcap-max-bytes",
                                           help="rotate the --pcap file before it exceeds this size"),
        pcap_files: int = typer.Option(3, "--pcap-files", help="--pcap files kept: FILE, FILE.1, ..."),
        queue_maxlen: int = typer.Option(4096, "--queue-maxlen", help="packets that may wait in each "
                                         "queue; beyond, the kernel drops (fail-closed) or accepts (fail-open)"),
        queue_rcvbuf: Optional[int] = typer.Option(None, "--queue-rcvbuf", help="netlink receive buffer "
                                                   "bytes per queue (SO_RCVBUFFORCE); default: room for a full queue"),
        gso: Optional[bool] = typer.Option(None, "--gso/--no-gso", help="GSO/GRO packets whole (NFQA_CFG_F_GSO) "
                                           "for header-only handlers; default: auto, guarded (docs/gso.md)"),
        verdict_batch: bool = typer.Option(True, "--verdict-batch/--no-verdict-batch", help="answer a pass's "
                                           "plain accepts with one batch verdict (docs/performance.md)"),
        workers: int = typer.Option(1, "--workers", help="processes deciding packets; each handler's "
                                    "traffic is spread over N queues by address (--queue-balance)"),
        queue_cpu_fanout: bool = typer.Option(False, "--queue-cpu-fanout", help="with --workers: pick the "
                                              "queue by CPU instead of by address hash"),
        handler_budget: float = typer.Option(200.0, "--handler-budget", help="ms a handler may take per packet; "
                                             "a later verdict is replaced by the hook's default (0: off)"),
        handler_timeout: float = typer.Option(1.0, "--handler-timeout", help="s after which a handler that has "
                                              "not returned is interrupted; the packet gets the default (0: off)"),
        keep_capabilities: bool = typer.Option(False, "--keep-capabilities",
                                               help="do not drop capabilities other than NET_ADMIN and NET_RAW"),
        audit: bool = typer.Option(False, "--audit", help="count and capture every verdict, accept every packet"),
        backend: Optional[str] = BACKEND_OPT,
        verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run POLICY: bind its queues, install its rules, decide packets until Ctrl-C/SIGTERM.

    SIGHUP (or `nfhooks reload`) loads POLICY again; a broken file leaves the running policy.
    """
    from .engine import Engine, _stderr_logging, hooks_summary
    from .errors import KernelError
    from .metrics import Metrics
    from .owner import OwnedElsewhere, live_owner, status_path

    _stderr_logging(logging.DEBUG if verbose else logging.INFO)
    rules_backend, why = choose(backend, _fail)
    say(f"nfhooks: backend {rules_backend.name} ({why})")
    try:
        rules_backend.check_kernel()  # root/CAP_NET_ADMIN and kernel support first: the clearest error
        owner = live_owner()
    except (KernelError, OSError) as e:
        _fail(str(e))
        return
    if owner is not None:  # before the metrics port is taken: say who owns this namespace
        _fail(str(OwnedElsewhere(*owner)))
    if not keep_capabilities:
        # before the policy's code runs and before any thread starts (capabilities are per thread)
        from .privileges import drop_capabilities
        try:
            drop_capabilities()
        except OSError as e:
            _fail(f"could not drop capabilities ({e}); run with --keep-capabilities to skip this")
    pol = _load(policy, set_)
    sets = parse_sets(set_)
    from prometheus_client import disable_created_metrics
    disable_created_metrics()  # process-wide, set once: a run process serves one endpoint (obs_series.py)
    try:
        metrics = Metrics()
        tap = _pcap_writer(pcap, pcap_max_bytes, pcap_files, metrics)
        engine = Engine(pol, metrics=metrics, queue_base=queue_base,
                        fail=_fail_mode(fail_open, fail_closed), mark_mask=_mask(mark_mask), audit=audit,
                        nat_targets=nat_targets, pcap=tap, backend=rules_backend,
                        loader=lambda: load_policy(policy, sets), status_file=status_path(),
                        queue_options=_queue_options(queue_maxlen, queue_rcvbuf, gso, verdict_batch),
                        handler_budget=handler_budget / 1000, handler_timeout=handler_timeout or None)
    except PolicyError as e:
        _fail(str(e))
        return
    if workers != 1:
        _serve_workers(engine, workers, queue_cpu_fanout, tap, metrics_addr, public_metrics)
    where = "off"
    try:
        if metrics_addr != "off":
            host, port = metrics.serve(metrics_addr, allow_public=public_metrics)
            where = f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"
        engine.start()
    except (KernelError, OwnedElsewhere, ValueError, OSError) as e:
        _fail(str(e))
    try:
        for line in hooks_summary(engine.ruleset):
            say(f"  {line}")
        qs = sorted(engine.ruleset.queues)
        say(f"nfhooks ready: policy {pol.name}, {len(qs)} handler queue(s) "
                  f"{qs[0] if qs else '-'}..{qs[-1] if qs else '-'}, metrics {where}")
        engine.serve()
    finally:
        engine.stop()
        if tap is not None:
            tap.close()  # flushes the buffered packets
        metrics.close()
        say("nfhooks: stopped on an error, rules left in place (see above)" if engine.left_installed
            else "nfhooks: stopped, rules removed")


@app.command()
def rules(save: bool = typer.Option(False, "--save", help="print iptables-save text instead of a table"),
          verbose: bool = typer.Option(False, "--verbose", "-v",
                                       help="also the plumbing rules (generation stamps, resume marks, ...)"),
          backend: Optional[str] = BACKEND_OPT) -> None:
    """Show the installed nfhooks rules with packet/byte counters (like iptables -L -v): per hook
    and table the default, one row per handler; the plumbing is folded away unless -v."""
    from .errors import KernelError
    from .rulesview import view

    b, _ = choose(backend, _fail)
    try:
        b.check_kernel()
        text, counted = b.installed(counters=True)
    except KernelError as e:
        _fail(str(e))
        return
    if save:
        sys.stdout.write(b.save_header() + text)
        return
    if not counted:
        out.print(f"no nfhooks rules installed in this network namespace (backend {b.name})")
        return
    out.print(view(counted, verbose))


@app.command()
def flush(force: bool = typer.Option(False, "--force", help="flush even while a live engine owns the rules"),
          backend: Optional[str] = BACKEND_OPT) -> None:
    """Remove every nfhooks rule and chain in this network namespace (IPv4 and IPv6, all tables, both backends)."""
    from .errors import KernelError
    from .owner import live_owner
    from .sets_ipset import destroy_ours as destroy_sets

    b, _ = choose(backend, _fail)
    try:
        b.check_kernel()
        owner = live_owner()
        if owner and not force:
            _fail(f"a live nfhooks engine (pid {owner[0]}, instance {owner[1]}) owns the rules here; "
                  f"stop it (kill -TERM {owner[0]}) or use --force")
        removed = remove_everywhere(b) + destroy_sets()  # the ipsets after the rules that use them
    except KernelError as e:
        _fail(str(e))
        return
    out.print("\n".join(removed) if removed else "nothing to remove: no nfhooks rules here")
    if owner and removed:
        say(f"nfhooks: the live engine (pid {owner[0]}) will notice and re-install its rules within "
            f"seconds: stop it (kill -TERM {owner[0]}) to remove them for good")


@app.command()
def top(url: str = typer.Option("http://127.0.0.1:9477/metrics", "--url", help="the engine's metrics endpoint"),
        interval: float = typer.Option(2.0, "--interval", "-n", help="seconds between refreshes"),
        once: bool = typer.Option(False, "--once", help="print the table once and exit")) -> None:
    """Live per-hook table of verdicts (packets and rates), read from the metrics endpoint.

    Not on a terminal (a pipe, a file), it prints one plain table per interval.
    """
    from .top import check_args, run as run_top

    try:
        check_args(url, interval)
        run_top(url, interval, once)
    except ValueError as e:  # a bad --url / --interval, or an endpoint that serves no metrics
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot read {url}: {e}. Is `nfhooks run` serving metrics there (and in this namespace)?")
    except KeyboardInterrupt:
        pass


@app.command()
def hooks() -> None:
    """Explain where each verdict works and how nfhooks carries it out."""
    from .hooks import PLACEMENTS

    if not out.is_terminal:  # piped: the plain text (stable for scripts and the README)
        print(explain())
        return
    t = Table(title="where each verdict works", show_lines=True)
    for col in ("verdict", "hooks", "queued from", "acted on by", "why"):
        t.add_column(col, overflow="fold")
    for p in PLACEMENTS.values():
        t.add_row(p.kind, ", ".join(p.hooks), ", ".join(p.queue_tables), p.acts_in, p.why)
    out.print(t)


lab_app = typer.Typer(help="A namespace lab: client, router (running nfhooks), server and proxy, "
                           "traffic across all five hooks, and a summary of what happened.")
app.add_typer(lab_app, name="lab")


@lab_app.callback(invoke_without_command=True)
def lab(ctx: typer.Context,
        policy: Optional[Path] = typer.Option(None, "--policy", help="policy for the router "
                                              "(default: policies/lab.py)"),
        set_: List[str] = SET_OPT,
        duration: float = typer.Option(5.0, "--duration", help="seconds of steady traffic"),
        metrics_addr: str = typer.Option("127.0.0.1:9477", "--metrics-addr",
                                         help="the engine's metrics address inside the router namespace"),
        keep: bool = typer.Option(False, "--keep", help="leave the lab running (see `lab exec`, `lab down`)"),
        pcap: Optional[Path] = typer.Option(None, "--pcap", help="passed to the engine: `nfhooks run --pcap FILE`"),
        json_: bool = typer.Option(False, "--json", help="print the summary as JSON on stdout (progress on stderr)"),
        scenario: List[str] = typer.Option([], "--scenario", help="a scenario or group: standard (default), "
                                           "vpn, all, or a scenario's name (repeatable)"),
        backend: Optional[str] = BACKEND_OPT) -> None:
    """Build the lab, run the policy on its router, drive traffic across every hook, explain it.

    Needs root; everything happens in network namespaces named nfhlab-*, removed at the end
    unless --keep.
    """
    if ctx.invoked_subcommand is not None:
        return
    from .lab.runner import LabConfig, LabError, run as run_lab

    choose(backend, _fail)  # exported: the lab's engines and its checks use it
    try:
        code = run_lab(LabConfig(policy=policy, sets=list(set_), duration=duration,
                                 metrics_addr=metrics_addr, keep=keep, pcap=pcap, json=json_,
                                 scenarios=list(scenario)))
    except LabError as e:
        _fail(str(e))
        return
    raise typer.Exit(code)


@lab_app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def lab_exec(node: str = typer.Argument(..., help="client, router, switch, server, proxy (vpn: also gw_b, host_b)"),
             cmd: List[str] = typer.Argument(..., help="the command, after --")) -> None:
    """Run a command in a node of the kept lab: nfhooks lab exec client -- ping -c1 SERVER."""
    from .lab.runner import LabError, exec_in_node

    try:
        exec_in_node(node, cmd)
    except LabError as e:
        _fail(str(e))


@lab_app.command("down")
def lab_down() -> None:
    """Stop the kept lab's engine and remove its namespaces, and any crashed run's leftovers."""
    from .lab.runner import LabError, down

    try:
        code = down()
    except LabError as e:
        _fail(str(e))
        return
    raise typer.Exit(code)


@app.command()
def tunnel(dev: str = typer.Option("tun0", "--dev", help="tun device to create"),
           listen: str = typer.Option(..., "--listen", help="local UDP ADDR:PORT (IPv6 address in brackets)"),
           peer: str = typer.Option(..., "--peer", help="the other end's UDP ADDR:PORT"),
           verbose: bool = typer.Option(False, "--verbose", "-v", help="print every packet")) -> None:
    """A tiny IP-in-UDP tunnel through a tun device (a teaching aid, no encryption; the lab's vpn).

    Give the device addresses and routes yourself (ip addr/route ... dev tun0); it goes
    away when this exits (Ctrl-C/SIGTERM).
    """
    from .tunnel import run as run_tunnel

    try:
        run_tunnel(dev, listen, peer, verbose)
    except (OSError, ValueError) as e:
        _fail(f"tunnel: {e}")


@app.command()
def reload(timeout: float = typer.Option(30.0, "--timeout", help="seconds to wait for the engine's answer"),
           backend: Optional[str] = BACKEND_OPT) -> None:
    """Reload the policy of the engine running in this network namespace (as SIGHUP does).

    The engine validates the file first: if it is broken, the running policy stays in force
    and this prints the error (file:line) and exits 1. Run it where the engine runs, e.g.
    `ip netns exec NS nfhooks reload`.
    """
    import json
    import os
    import signal
    import time

    from .owner import live_owner, status_path

    def status() -> dict:  # type: ignore[type-arg]
        try:
            with open(status_path()) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    try:
        owner = live_owner()
    except OSError as e:
        _fail(f"nfhooks reload needs root in the engine's namespace (it signals the engine): {e}")
        return
    if owner is None or owner[0] is None:
        _fail("no nfhooks engine runs in this network namespace (nothing to reload)")
        return
    pid = owner[0]
    before = status()
    seq = before.get("seq", -1) if before.get("pid") == pid else -1
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as e:
        _fail(f"cannot signal the engine (pid {pid}): {e}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = status()
        if now.get("pid") == pid and now.get("seq", -1) > seq:
            say(f"nfhooks: {now.get('message')}")
            raise typer.Exit(0 if now.get("ok") else 1)
        time.sleep(0.05)  # polling the engine's status file with a deadline
    _fail(f"the engine (pid {pid}) did not answer within {timeout:g} s; see its log")


def main(argv: Optional[List[str]] = None) -> None:
    """The console script. Usage errors (a missing value, an unknown option, a number that is
    not one) print in the same one-line form as nfhooks' own errors, exit status 2."""
    from typer.exceptions import TyperException

    try:
        code = app(args=argv, prog_name="nfhooks", standalone_mode=False)
    except TyperException as e:  # click's UsageError & co. (typer vendors click privately)
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `nfhooks`: the help (typer tells it so too)
            text = e.format_message()
            if text:
                print(text)
            raise SystemExit(2) from None
        ctx = getattr(e, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        say(f"nfhooks: error: {e.format_message().rstrip('.') if where else e.format_message()}{where}")
        raise SystemExit(e.exit_code) from None
    except typer.Abort:
        say("nfhooks: aborted")
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
