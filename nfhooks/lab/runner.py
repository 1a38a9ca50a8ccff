"""``nfhooks lab``: build the namespace lab, run the engine on its router, drive traffic across
every hook, and explain what happened.

The run is data-driven: each :class:`Scenario` names the hooks its traffic should cross and
a function that drives the traffic and reports what it observed. Which hooks were *really*
crossed, and with which verdicts, is not guessed: it is the difference of the engine's own
metrics (scraped inside the router namespace) before and after the scenario. Malformed raw
packets are judged the same way, plus the router's kernel counters (``nstat``), so the
summary says for each one whether the kernel dropped it before any hook or the engine got it.

Everything lives in lab namespaces (``nfhlab-<id>-*``) and is removed at the end, also on
failure or Ctrl-C, unless ``--keep``: then the lab is handed over to its engine process and
recorded in :data:`STATE_FILE` for ``nfhooks lab exec`` and ``nfhooks lab down``.

Layout (each module imports only those above it):

=================  ========================================================================
``topology``       :class:`~nfhooks.lab.topology.Lab` (``network``, ``namespaces``, ``processes``)
``config``         :class:`LabConfig`, :class:`LabError`, the lab policy and its ports
``evidence``       the engine's metrics (scraped in the router) and the kernel's counters
``scenario``       :class:`Scenario`, :class:`Ctx`, :class:`Check`, results, shared checks
``standard``       the standard scenarios' traffic; ``rawpackets``: the malformed frames
``registry``       the scenario registry, ``--scenario`` groups and plugins (vpn, route-shape)
``render``         the live table, the summary and ``--json``
``prepare``        the policy's ports, ``--set`` values, servers and warm-up before a run
``runner``         this module: :func:`run`, ``--keep``, :func:`exec_in_node`, :func:`down`
=================  ========================================================================

Writing a scenario: :mod:`nfhooks.lab.registry`. The names scenario modules import from here
(``Check``, ``Ctx``, ``Scenario``, ``register``, ...) are re-exported.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..hooks import HOOKS
from .config import DEFAULT_POLICY, RUN_TAG, LabConfig, LabError, check_root
from .evidence import Scraper, default_rule_counts, default_verdicts
from .prepare import lab_sets, loopback_handlers, metrics_url, new_lab_id, policy_ports, public_addr
from .prepare import start_servers, warm_up
from .registry import PLUGINS, SCENARIOS, groups, load_plugins, register, select
from .render import LiveView, make_console, print_summary, summary_json, topology_table
from .scenario import Check, Ctx, Result, Scenario, check_connect, family_name, run_one
from .topology import ID_PREFIX_ENV, NS_MARKER, EngineProc, Lab, TcpServer, cleanup_stale

__all__ = ["PLUGINS", "SCENARIOS", "STATE_DIR", "STATE_FILE", "Check", "Ctx", "LabConfig", "LabError", "Scenario",
           "down", "exec_in_node", "groups", "load_plugins", "read_state", "register", "run", "select"]

#: Old private names, still imported by nfhooks/lab/vpn.py; use check_connect / family_name.
_connect, _fam = check_connect, family_name

#: Where a kept lab (``--keep``) is recorded for ``lab exec`` / ``lab down``.
STATE_DIR = Path(os.environ.get("NFHOOKS_LAB_STATE_DIR", "/run/nfhooks-lab"))
#: One kept lab per NFHOOKS_LAB_PREFIX: people sharing a machine each have their own.
STATE_FILE = STATE_DIR / (f"current-{os.environ[ID_PREFIX_ENV]}.json"
                          if os.environ.get(ID_PREFIX_ENV) else "current.json")
_EXIT_SIGTERM = 128 + signal.SIGTERM


_MAIN_PID = os.getpid()


def _on_sigterm(_signum: int, _frame: Any) -> None:
    if os.getpid() != _MAIN_PID:
        # A fork of this process (pyroute2 forks a helper for each IPRoute(netns=...) and
        # stops it with SIGTERM): it inherited this handler, but it must never unwind into
        # the run's `finally` and tear the lab down (that SIGKILLed the lab's tunnels).
        os._exit(_EXIT_SIGTERM)
    raise SystemExit(_EXIT_SIGTERM)  # unwinds through the finally that removes the lab


def run(cfg: LabConfig, console: Console | None = None) -> int:
    """The whole lab run; returns the exit status (0 all scenarios passed, 1 not, 2 setup).

    With ``cfg.json`` everything human goes to stderr and stdout gets only the JSON summary.
    """
    console = console or make_console(stderr=cfg.json)
    check_root()
    policy = (cfg.policy or DEFAULT_POLICY).resolve()
    ports, pol = policy_ports(policy, cfg.sets)
    scenarios = select(cfg.scenarios)
    url = metrics_url(cfg.metrics_addr)
    if cfg.keep:
        _refuse_second_kept_lab()
    skip = loopback_handlers(pol)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    lab: Lab | None = None
    kept = False
    try:
        with console.status("building the lab (namespaces, veths, bridge, IPv4 + IPv6)"):
            lab = Lab.router_topology(new_lab_id())
            state: dict[str, Any] = {}
            for sc in scenarios:
                if sc.setup is not None and sc.ready:
                    state[sc.key] = sc.setup(lab, ports)
            servers = start_servers(lab, ports)
            warm_up(lab)
            sets = lab_sets(lab, pol, scenarios) + list(cfg.sets)
            engine = lab.start_engine(str(policy), *[a for s in sets for a in ("--set", s)],
                                      "--metrics-addr", cfg.metrics_addr,
                                      *(["--public-metrics"] if public_addr(cfg.metrics_addr) else []),
                                      *(["--pcap", str(Path(cfg.pcap).resolve())] if cfg.pcap else []))
        console.print(f"lab [bold]{lab.id}[/bold] up in {lab.build_seconds:.1f}s; engine pid {engine.pid} "
                      f"runs {policy.name} in {lab.ns_name('router')}; metrics {url}")
        if not cfg.json:
            console.print(topology_table(lab))
        scraper = Scraper(lab, url)
        scraper.scrape()
        defaults = {h: pol.default(h).kind for h in HOOKS}
        results = _run_scenarios(lab, engine, scraper, cfg, ports, servers, skip, defaults, console,
                                 scenarios, state)
        final = scraper.scrape()
        rules = default_verdicts({}, default_rule_counts(lab), defaults)
        if cfg.keep:
            _keep(lab, engine, url, policy)
            kept = True
        if cfg.json:
            print(json.dumps(summary_json(lab, results, final, rules, cfg, url, kept, engine), indent=2),
                  flush=True)
        else:
            print_summary(console, lab, results, final, rules, skip, cfg, url, kept, scenarios)
        return 0 if all(r.ok for r in results) and len(results) == len([s for s in scenarios if s.ready]) \
            else 1
    except LabError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any failure: the debug report, then the lab goes
        if lab is not None:
            console.print(Panel(lab.debug_report()[-6000:], title="lab debug report", title_align="left"))
        raise LabError(f"the lab run failed: {exc}") from exc
    finally:
        signal.signal(signal.SIGTERM, old)
        if lab is not None and not kept:
            lab.close()
            console.print(f"lab {lab.id} removed: namespaces {NS_MARKER}{lab.id}-*, its processes and logs")


def _run_scenarios(lab: Lab, engine: EngineProc, scraper: Scraper, cfg: LabConfig,
                   ports: dict[str, Any], servers: dict[str, TcpServer], skip: set[str],
                   defaults: dict[str, str], console: Console, scenarios: Sequence[Scenario],
                   state: dict[str, Any]) -> list[Result]:
    runnable = [s for s in scenarios if s.ready]
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                        console=console)
    task = progress.add_task("scenarios", total=len(runnable))
    ctx = Ctx(lab, engine, scraper, cfg, ports, servers, skip, defaults, state=state)
    results: list[Result] = []
    scraper.start()
    try:
        with Live(LiveView(progress, scraper), console=console, refresh_per_second=4, transient=True):
            for sc in runnable:
                progress.update(task, description=sc.title)
                ctx.progress = lambda text, sc=sc: progress.update(task, description=f"{sc.title}: {text}")
                r = run_one(ctx, sc, skip)
                results.append(r)
                mark = "[green]✓[/green]" if r.ok else "[bold red]✗[/bold red]"
                console.print(f"{mark} {sc.title}  [dim]handlers saw it at: {', '.join(r.crossed) or 'none'}  "
                              f"{r.seconds:.1f}s[/dim]")
                progress.advance(task)
                if not engine.running():
                    console.print(f"[bold red]the engine exited ({engine.returncode}); log tail:[/bold red]\n"
                                  + "\n".join(engine.log().splitlines()[-20:]))
                    break
    finally:
        scraper.stop()
    return results


# --------------------------------------------------------------------------- --keep, exec, down


def _proc_start(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def read_state() -> dict[str, Any] | None:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return None


def _namespaces_exist(state: Mapping[str, Any]) -> bool:
    return any((Path("/run/netns") / ns).exists() for ns in state.get("namespaces", {}).values())


def _refuse_second_kept_lab() -> None:
    state = read_state()
    if state and _namespaces_exist(state):
        raise LabError(f"a kept lab ({state['id']}) is still up; remove it first with `nfhooks lab down`")


def _keep(lab: Lab, engine: EngineProc, url: str, policy: Path) -> None:
    """Hand the lab to its engine (see Lab.detach) and record it for `lab exec` / `lab down`."""
    lab.detach(engine.pid)
    state = {
        "id": lab.id,
        "namespaces": {n: node.ns for n, node in lab.nodes.items()},
        "addresses": {n: node.addrs for n, node in lab.nodes.items()},
        "engine": {"pid": engine.pid, "start": _proc_start(engine.pid), "argv": engine.argv,
                   "log": str(engine.log_path)},
        "policy": str(policy),
        "metrics": url,
    }
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, STATE_FILE)


def exec_in_node(node: str, cmd: Sequence[str]) -> None:
    """Replace this process with CMD inside the kept lab's NODE (exit status passes through)."""
    state = read_state()
    if not state or not _namespaces_exist(state):
        raise LabError("no kept lab is up: start one with `nfhooks lab --keep`")
    namespaces = state["namespaces"]
    if node not in namespaces:
        raise LabError(f"no node {node!r} in lab {state['id']} (nodes: {', '.join(namespaces)})")
    if not cmd:
        raise LabError("no command given: nfhooks lab exec NODE -- CMD [ARGS...]")
    import sys
    import sysconfig

    # `.venv/bin/nfhooks lab exec router -- nfhooks rules` without an activated virtualenv:
    # put this interpreter's scripts dir first on PATH, so the command finds the same nfhooks
    # (and python) that is running now, as an activated virtualenv would.
    bindir = sysconfig.get_path("scripts") or os.path.dirname(sys.executable)
    rest = [p for p in os.environ.get("PATH", os.defpath).split(os.pathsep) if p and p != bindir]
    env = {**os.environ, "PATH": os.pathsep.join([bindir, *rest])}
    os.execvpe("ip", ["ip", "netns", "exec", namespaces[node], *cmd], env)


def _stop_engine(engine: Mapping[str, Any], timeout: float = 10.0) -> str:
    """SIGTERM the kept engine -- only if that PID is still the engine we started."""
    pid, start, argv = engine.get("pid"), engine.get("start"), engine.get("argv") or []
    if not isinstance(pid, int) or _proc_start(pid) is None:
        return "engine: not running"
    if _proc_start(pid) != start or _cmdline(pid) != list(argv):
        return f"engine: pid {pid} is now another process; left alone"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _proc_start(pid) == start:
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            return f"engine: pid {pid} did not stop in {timeout:g}s; killed"
        time.sleep(0.05)
    return f"engine: pid {pid} stopped (its rules removed)"


def down(console: Console | None = None) -> int:
    """Remove the kept lab and the leftovers of crashed `nfhooks lab` runs."""
    console = console or make_console()
    check_root()
    state = read_state()
    removed: list[str] = []
    mine = f"{os.environ.get(ID_PREFIX_ENV, '')}{RUN_TAG}"
    if state and not str(state.get("id", "")).startswith(mine):
        console.print(f"the kept lab {state.get('id')} is not one of {ID_PREFIX_ENV}="
                      f"{os.environ.get(ID_PREFIX_ENV, '')!r}'s runs: left alone")
        state = None
    if state:
        console.print(_stop_engine(state.get("engine") or {}))
        # Its owner (the engine) is gone now, so cleanup_stale takes it; the processes left
        # in its namespaces are the lab's own servers.
        removed += cleanup_stale(f"{NS_MARKER}{state['id']}-", kill=True)
        STATE_FILE.unlink(missing_ok=True)
    # Crashed runs: lab ids carry RUN_TAG; labs whose owner still runs are left alone.
    # Processes still in them were started by that run (its servers, its engine).
    removed += cleanup_stale(f"{NS_MARKER}{os.environ.get(ID_PREFIX_ENV, '')}{RUN_TAG}", kill=True)
    if removed:
        console.print("removed: " + " ".join(removed))
    else:
        console.print("nothing to remove: no kept lab and no leftovers of `nfhooks lab` runs")
    left = [ns for ns in (state or {}).get("namespaces", {}).values() if (Path("/run/netns") / ns).exists()]
    if left:
        console.print(f"[red]still there: {' '.join(left)}[/red]")
        return 1
    return 0
