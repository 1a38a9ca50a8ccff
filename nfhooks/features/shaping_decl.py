"""Shaping declarations: what ``policy.shaping(dev, classes=...)`` declares, checked when the
policy loads (pure data and validation; nfhooks/shaping.py builds the htb tree from it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import PolicyError
from ..introspect import is_option, option_value
from .routing_decl import RouteShapeError

__all__ = ["LEAVES", "ShapingError", "parse_rate", "rate_text", "ShapeClass", "Shaping", "declare_shaping"]

LEAVES = ("pfifo", "tbf")
_UNITS = {"bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000,
          "bps": 8, "kbps": 8_000, "mbps": 8_000_000, "gbps": 8_000_000_000}


class ShapingError(RouteShapeError):
    """A shaping tree the kernel cannot build; the text says what is missing."""


def parse_rate(value: Any) -> int:
    """'5mbit', '512kbit', '1gbit', '2mbps' (bytes), or an int (bit/s) -> bit/s."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a rate")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"rate {value!r} must be positive")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*", str(value).lower())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"{value!r} is not a rate (e.g. '5mbit', '512kbit', '1gbit', or bit/s as an int)")
    bps = int(float(m.group(1)) * _UNITS[m.group(2)])
    if bps <= 0:
        raise ValueError(f"rate {value!r} must be positive")
    return bps


def rate_text(bps: int) -> str:
    """bit/s as tc's argument (exact: tc takes 'bit')."""
    for unit, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bps % mult == 0:
            return f"{bps // mult}{unit}"
    return f"{bps}bit"


@dataclass(frozen=True)
class ShapeClass:
    name: str
    rate: int  # bit/s
    ceil: int
    prio: int
    leaf: str = "pfifo"
    limit: int | None = None  # leaf queue length in packets (pfifo)


@dataclass(frozen=True)
class Shaping:
    """One interface's declared tree (``dev`` may be a policy Option, resolved after --set)."""

    declared_dev: Any
    classes: dict[str, ShapeClass]
    default: str | None
    rate: int
    file: str | None = None
    line: int | None = None

    @property
    def dev(self) -> str:
        d = self.declared_dev
        return str(option_value(d)) if is_option(d) else d


def declare_shaping(decls: dict[str, Shaping], dev: str, classes: dict[str, dict[str, Any]], *,
                    default: str | None, rate: Any, file: str, line: int) -> Shaping:
    """Check a ``policy.shaping(...)`` declaration and add it to ``decls`` (the policy's)."""
    declared_dev = dev
    key = dev.option_name if is_option(dev) else dev
    dev = option_value(dev)

    def err(msg: str) -> PolicyError:
        return PolicyError(f"shaping({dev!r}): {msg}", file, line)

    if not isinstance(dev, str) or not dev or len(dev) > 15 or "/" in dev or " " in dev or dev.endswith("+"):
        raise err("give one interface name (up to 15 characters, no wildcard)")
    if key in decls or dev in {s.dev for s in decls.values()}:
        raise err("declared twice")
    if not isinstance(classes, dict) or not classes:
        raise err("give classes={'name': dict(rate='5mbit', ceil='5mbit', prio=2), ...}")
    raw: dict[str, tuple[int, int | None, int, str, int | None]] = {}
    for name, spec in classes.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
            raise err(f"class name {name!r}: letters, digits, - and _")
        if not isinstance(spec, dict):
            raise err(f"class {name!r}: a dict of rate, ceil, prio, leaf, limit")
        unknown = set(spec) - {"rate", "ceil", "prio", "leaf", "limit"}
        if unknown:
            raise err(f"class {name!r}: unknown key(s) {', '.join(sorted(unknown))} (rate, ceil, prio, leaf, limit)")
        if "rate" not in spec:
            raise err(f"class {name!r}: give its rate (e.g. rate='5mbit')")
        try:
            r = parse_rate(spec["rate"])
            c = parse_rate(spec["ceil"]) if spec.get("ceil") is not None else None
        except ValueError as e:
            raise err(f"class {name!r}: {e}") from None
        prio = spec.get("prio", 0)
        if type(prio) is not int or not 0 <= prio <= 7:
            raise err(f"class {name!r}: prio {prio!r} must be 0 (first) .. 7 (htb's priorities)")
        leaf = spec.get("leaf", "pfifo")
        if leaf not in LEAVES:
            raise err(f"class {name!r}: leaf {leaf!r}: pfifo or tbf (this kernel has no fq_codel/sfq)")
        limit = spec.get("limit")
        if limit is not None and (type(limit) is not int or limit <= 0):
            raise err(f"class {name!r}: limit {limit!r} must be a positive number of packets")
        if c is not None and c < r:
            raise err(f"class {name!r}: ceil {spec['ceil']} is below its rate {spec['rate']}")
        raw[name] = (r, c, prio, leaf, limit)
    try:
        link = parse_rate(rate) if rate is not None else sum(v[0] for v in raw.values())
    except ValueError as e:
        raise err(str(e)) from None
    if sum(v[0] for v in raw.values()) > link:
        raise err(f"the class rates add up to {rate_text(sum(v[0] for v in raw.values()))}, more than the "
                  f"link rate {rate_text(link)}: htb could not guarantee them")
    out = {}
    for name, (r, c, prio, leaf, limit) in raw.items():
        ceil = c if c is not None else link
        if ceil > link:
            raise err(f"class {name!r}: ceil {rate_text(ceil)} is above the link rate {rate_text(link)}")
        out[name] = ShapeClass(name, r, ceil, prio, leaf, limit)
    if default is not None and default not in out:
        raise err(f"default={default!r} is not one of its classes ({', '.join(out)})")
    decl = Shaping(declared_dev, out, default, link, file, line)
    decls[key] = decl
    return decl
