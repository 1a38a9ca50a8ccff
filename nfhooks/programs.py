"""The programs nfhooks executes and the Debian packages that provide them.

The table lives in ``programs.txt`` beside this module so that the Makefile can read it with
awk before any virtualenv (or even Python) exists; this module is its Python view, used by the
tests that keep code and table in step and by error messages that name the package to install.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType

__all__ = ["TARGETS", "Program", "load", "packages", "package_of", "missing_hint"]

#: Install targets, in the order the Makefile layers them (`make test` installs lab's too).
TARGETS = ("base", "build", "lab", "test", "pip", "docs", "optional", "self")

#: What each Make target installs with apt (the targets before it included).
_APT_LAYERS = MappingProxyType({"lab": ("base", "build", "lab"), "test": ("base", "build", "lab", "test")})


@dataclass(frozen=True)
class Program:
    """One row: `name` is "-" for a library/headers package."""

    name: str
    package: str
    target: str


def load(text: str | None = None) -> list[Program]:
    """Parse programs.txt (or `text`); ValueError names the bad line, so a typo fails the tests."""
    if text is None:
        text = resources.files("nfhooks").joinpath("programs.txt").read_text()
    rows: list[Program] = []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 3 or fields[2] not in TARGETS:
            raise ValueError(f"programs.txt line {n}: want 'program package target' "
                             f"with target one of {', '.join(TARGETS)}: {line!r}")
        rows.append(Program(*fields))
    return rows


def packages(target: str, rows: list[Program] | None = None) -> list[str]:
    """Debian packages `make <target>` installs (lab: base+build+lab; test: also test)."""
    layers = _APT_LAYERS.get(target, (target,))
    out: list[str] = []
    for p in rows if rows is not None else load():
        if p.target in layers and p.package not in out:
            out.append(p.package)
    return out


def package_of(program: str, rows: list[Program] | None = None) -> Program | None:
    """The row for `program` (by its base name), or None when it is not listed."""
    name = program.rsplit("/", 1)[-1]
    for p in rows if rows is not None else load():
        if p.name == name:
            return p
    return None


def missing_hint(program: str) -> str:
    """One line for an error message: what to install when `program` is not on PATH."""
    p = package_of(program)
    if p is None:
        return f"{program} not found"
    if p.target in ("pip", "optional"):
        return f"{program} not found: pip install {p.package} (into nfhooks' virtualenv)"
    where = {"lab": " (make lab installs it)", "test": " (make test installs it)"}.get(p.target, "")
    return f"{program} not found: apt-get install {p.package}{where}"
