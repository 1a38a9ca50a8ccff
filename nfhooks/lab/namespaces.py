"""Which namespaces belong to a lab, which labs are alive, and removing the ones left behind.

Every lab namespace is ``nfhlab-<id>-<node>``: the fixed ``nfhlab-`` marker is what
`cleanup_stale` keys on, so it can never remove a namespace somebody else made. While a lab
is alive, ``/run/nfhlab/<id>.json`` (its owner record) names its owner process; a lab whose
owner still runs is left alone, so cleanup is safe while other test runs are going on.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pyroute2 import netns

__all__ = ["ID_PREFIX_ENV", "NETNS_DIR", "NS_MARKER", "NS_RE", "OWNER_DIR", "cleanup_stale",
           "list_lab_namespaces", "owner_alive", "owner_path", "pids_in_namespaces", "proc_start_time",
           "read_owner", "remove_namespace", "remove_tmpdir"]

#: Every lab namespace name starts with this; nothing else is ever removed by the lab.
NS_MARKER = "nfhlab-"
#: Where live labs record their owner process (so cleanup can tell live from crashed).
OWNER_DIR = Path("/run/nfhlab")
NETNS_DIR = Path("/run/netns")
#: Environment variable prepended to random lab ids (e.g. "C" for one engineer's runs).
ID_PREFIX_ENV = "NFHOOKS_LAB_PREFIX"
NS_RE = re.compile(rf"{re.escape(NS_MARKER)}([A-Za-z0-9]+)-([A-Za-z0-9_.]+)")


def proc_start_time(pid: int) -> int | None:
    """Kernel start time of a process: tells a live owner from a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def owner_path(lab_id: str) -> Path:
    return OWNER_DIR / f"{lab_id}.json"


def read_owner(lab_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(owner_path(lab_id).read_text())
    except (OSError, ValueError):
        return None


def owner_alive(record: Mapping[str, Any]) -> bool:
    pid, start = record.get("pid"), record.get("start")
    return isinstance(pid, int) and start is not None and proc_start_time(pid) == start


def list_lab_namespaces() -> list[str]:
    return sorted(n for n in netns.listnetns() if NS_RE.fullmatch(n))


def remove_namespace(name: str) -> None:
    """Unmount and unlink /run/netns/NAME; the kernel frees the namespace (and its veths)
    once no process is left in it."""
    if not NS_RE.fullmatch(name):  # never anything that is not ours
        raise ValueError(f"refusing to remove {name!r}: not a lab namespace")
    try:
        netns.remove(name)
    except FileNotFoundError:
        pass


def _ns_inode(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids_in_namespaces(names: Iterable[str]) -> dict[int, str]:
    """PID -> namespace for every process whose network namespace is one of `names`."""
    wanted = {ino: n for n in names if (ino := _ns_inode(n)) is not None}
    found: dict[int, str] = {}
    if not wanted:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        name = wanted.get((st.st_dev, st.st_ino))
        if name is not None:
            found[int(entry)] = name
    return found


def cleanup_stale(
    prefix_glob: str = NS_MARKER + "*", *, orphans: bool = True, kill: bool = False
) -> list[str]:
    """Remove lab namespaces left behind by crashed runs; return the names removed.

    Only namespaces named ``nfhlab-<id>-<node>`` that also match `prefix_glob` are
    considered (a pattern without wildcards is taken as a prefix, so "nfh" and "nfhlab-C"
    work). A lab whose owner process still runs is never touched. `orphans`: also remove
    matching lab namespaces that have no owner record at all. `kill`: SIGKILL (by PID)
    processes still inside the removed namespaces -- off by default, because after a crash
    they may belong to somebody else's run; left alone they only keep an invisible
    namespace alive until they exit.
    """
    pattern = prefix_glob if any(c in prefix_glob for c in "*?[") else prefix_glob + "*"
    removed: list[str] = []
    dead_ids: set[str] = set()
    for name in list_lab_namespaces():
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        m = NS_RE.fullmatch(name)
        assert m is not None
        lab_id = m.group(1)
        record = read_owner(lab_id)
        if record is None and not orphans:
            continue
        if record is not None and owner_alive(record):
            continue
        if kill:
            for pid in pids_in_namespaces([name]):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        remove_namespace(name)
        removed.append(name)
        if record is not None:
            dead_ids.add(lab_id)
    # Owner records of crashed labs whose namespaces are all gone now.
    if OWNER_DIR.is_dir():
        left = {m.group(1) for n in list_lab_namespaces() if (m := NS_RE.fullmatch(n))}
        for path in OWNER_DIR.glob("*.json"):
            lab_id = path.stem
            if lab_id in left or not fnmatch.fnmatchcase(f"{NS_MARKER}{lab_id}-x", pattern):
                continue
            record = read_owner(lab_id)
            if record is None or owner_alive(record):
                continue
            remove_tmpdir(record.get("tmp"))
            path.unlink(missing_ok=True)
    return removed


def remove_tmpdir(path: object) -> None:
    """Remove a lab temp dir -- only one that looks like ours (named nfhlab-*)."""
    if isinstance(path, str) and Path(path).name.startswith(NS_MARKER) and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
