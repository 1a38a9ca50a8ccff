"""Which kernel rule store nfhooks writes to: legacy xtables or nf_tables (``--backend``).

``auto`` (the default, or ``NFHOOKS_BACKEND``) picks what the host uses: nft when the kernel
has no legacy tables, when the namespace's existing iptables rules are in nf_tables, or when
the host's ``iptables`` is the nft variant; legacy otherwise. Detection only reads: it never
loads a legacy module or creates a legacy table (``/proc/net/ip*_tables_names`` lists what
exists; ``iptables -V`` names the variant; ``iptables-nft-save`` lists nf_tables' rules).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable

from ..errors import KernelError
from .base import Backend
from .legacy import LegacyBackend
from .nft import NftBackend

__all__ = ["Backend", "BACKENDS", "CHOICES", "ENV", "Probes", "detect", "get_backend", "resolve",
           "other_backends_with_ours", "rule_tables", "LegacyBackend", "NftBackend"]

ENV = "NFHOOKS_BACKEND"
BACKENDS: dict[str, type[Backend]] = {"legacy": LegacyBackend, "nft": NftBackend}
CHOICES = ("auto", *BACKENDS)


def _read_names(path: str) -> list[str] | None:
    """Table names in a /proc list; None when the file is missing (no legacy module loaded)."""
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return None
    except OSError:
        return []  # not readable (no root): say nothing about it


def _legacy_tables() -> list[str] | None:
    v4, v6 = _read_names("/proc/net/ip_tables_names"), _read_names("/proc/net/ip6_tables_names")
    if v4 is None and v6 is None:
        return None
    return (v4 or []) + (v6 or [])


def _iptables_version() -> str:
    if not shutil.which("iptables"):
        return ""
    try:
        return subprocess.run(["iptables", "-V"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _nft_rule_tables() -> list[str]:
    """Tables of this namespace that hold rules or user chains in nf_tables (iptables' view)."""
    out: list[str] = []
    for fam in (4, 6):
        tool = "ip6tables-nft-save" if fam == 6 else "iptables-nft-save"
        if not shutil.which(tool):
            continue
        try:
            text = subprocess.run([tool], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        out += [f"{t} (IPv{fam})" for t in rule_tables(text)]
    return out


def rule_tables(saved: str) -> list[str]:
    """Tables of save text that hold something: a rule, a user chain, or a built-in chain
    whose policy is not ACCEPT."""
    out: list[str] = []
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        parts = line[1:].split(" ") if line.startswith(":") else []
        if table and table not in out and (line.startswith("-A ") or (len(parts) > 1 and parts[1] != "ACCEPT")):
            out.append(table)
    return out


def _ours_in() -> str | None:
    """The backend that holds nfhooks' rules here now (a running engine's, or a stale set), if
    exactly one does: `nfhooks rules`/`flush` then follow the engine whatever it was started with."""
    found = []
    for name, cls in BACKENDS.items():
        try:
            if cls().has_ours():
                found.append(name)
        except (KernelError, OSError, subprocess.SubprocessError):
            continue
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class Probes:
    """What detection looks at, injectable for tests."""

    legacy_tables: Callable[[], list[str] | None] = _legacy_tables
    iptables_version: Callable[[], str] = _iptables_version
    nft_rule_tables: Callable[[], list[str]] = _nft_rule_tables
    ours_in: Callable[[], str | None] = _ours_in


def detect(probes: Probes | None = None) -> tuple[str, str]:
    """(backend name, why) for ``auto``."""
    p = probes or Probes()
    ours = p.ours_in()
    if ours is not None:
        return ours, f"nfhooks' rules are in {'nf_tables' if ours == 'nft' else 'legacy xtables'} here already"
    legacy = p.legacy_tables()
    if legacy is None:
        return "nft", "the kernel has no legacy xtables loaded (/proc/net/ip_tables_names is missing)"
    nft_tables = p.nft_rule_tables()
    if nft_tables:
        return "nft", f"this namespace's iptables rules are in nf_tables ({', '.join(nft_tables)})"
    version = p.iptables_version()
    if "nf_tables" in version:
        return "nft", f"the host's iptables is the nft variant ({version})"
    if version:
        return "legacy", f"the host's iptables is the legacy variant ({version}) and no rules are in nf_tables"
    return "legacy", "no iptables variant found and no rules in nf_tables"


def resolve(name: str | None = None, probes: Probes | None = None) -> tuple[str, str]:
    """(backend name, why): ``name``, else ``$NFHOOKS_BACKEND``, else auto-detected."""
    given = name or os.environ.get(ENV) or "auto"
    if given == "auto":
        chosen, why = detect(probes)
        return chosen, f"auto: {why}"
    if given not in BACKENDS:
        src = f"{ENV}={given}" if not name else f"--backend {given}"
        raise ValueError(f"{src}: unknown backend; choose one of {', '.join(CHOICES)}")
    return given, "--backend" if name else f"{ENV}={given}"


def get_backend(name: str | None = None) -> Backend:
    """The backend ``name`` (None: ``$NFHOOKS_BACKEND``, else auto)."""
    return BACKENDS[resolve(name)[0]]()


def other_backends_with_ours(current: Backend) -> list[Backend]:
    """The other backends that hold nfhooks rules here (a stale set a kill -9 left under the
    other backend): a start or a flush removes ours from them too."""
    out: list[Backend] = []
    for name, cls in BACKENDS.items():
        if name == current.name:
            continue
        other = cls()
        try:
            if other.has_ours():
                out.append(other)
        except (KernelError, OSError, subprocess.SubprocessError):
            continue
    return out
