"""Traffic shaping decided in Python, done by an htb tree nfhooks owns.

A policy declares shaping classes on an interface::

    policy.shaping("up2", classes={"bulk": dict(rate="5mbit", ceil="5mbit", prio=2),
                                   "interactive": dict(rate="50mbit", prio=0)},
                   default="interactive")

and a handler returns ``shape("bulk")`` for a connection's first packet. The verdict writes the
class's index into the ``class`` mark field (saved on the connection, restored for the rest
of it: see routing.py); nfhooks' CLASSIFY rules in mangle POSTROUTING put the packet in its
htb class on the way out. The tree, for that declaration (``tc`` argv, never a shell)::

    tc qdisc replace dev up2 root handle 4e46: htb default 12       # the default class
    tc class add dev up2 parent 4e46: classid 4e46:1 htb rate 55mbit ceil 55mbit   # the link
    tc class add dev up2 parent 4e46:1 classid 4e46:11 htb rate 5mbit ceil 5mbit prio 2
    tc qdisc add dev up2 parent 4e46:11 handle 4e01: pfifo          # (or tbf) leaf per class
    tc class add dev up2 parent 4e46:1 classid 4e46:12 htb rate 50mbit ceil 55mbit prio 0
    tc qdisc add dev up2 parent 4e46:12 handle 4e02: pfifo
    iptables -t mangle -A NFH-SAVE -o up2 -m mark --mark <bulk>/<class mask> -j CLASSIFY --set-class 4e46:11

Why this shape: the kernel nfhooks targets has only the htb, tbf, pfifo and ingress qdiscs
and the u32/bpf classifiers (no fq_codel, sfq, prio, netem; no fw classifier), so htb does
rate, ceiling and priority, each class gets a plain pfifo (or a tbf) leaf, and the CLASSIFY
target (skb->priority = the class id, which htb honours before any filter) classifies by the
mark without a tc filter. What is missing is probed at start on a throw-away veth pair in the
engine's namespace, and reported by name.

The link rate (the root class) is ``rate=`` of the declaration, or else the sum of the class
rates; a class's ceiling defaults to the link rate, so an idle link lends its bandwidth.
htb counts link-layer bytes: a TCP flow's goodput is ~4 % under the class rate.

Ownership: the root qdisc handle ``4e46:`` ("NF") is nfhooks'. A start refuses an interface
whose root qdisc someone else configured (a handle other than the kernel's default ``0:``);
removing ours on exit gives the kernel's default back -- what was there before. A tree left
by a crashed engine (our handle) is replaced.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from typing import TYPE_CHECKING, Any

from .features.routing_decl import class_names
from .features.shaping_decl import (  # noqa: F401 -- re-exported: nfhooks.shaping keeps its names
    LEAVES, ShapeClass, Shaping, ShapingError, declare_shaping, parse_rate, rate_text,
)
from .match import Iface
from .rulebuild import MatchSpec, Rule, mark

if TYPE_CHECKING:
    from .marks import Field
    from .policy import Policy

__all__ = ["MAJOR", "ROOT_MINOR", "CLASS_MINOR_BASE", "LEAF_MAJOR_BASE", "LEAVES", "ShapeClass", "Shaping",
           "ShapingError", "declare_shaping", "parse_rate", "rate_text", "classid", "class_minor", "tree_commands",
           "classify_rules", "probe_kernel", "root_qdisc", "Shaper"]

log = logging.getLogger("nfhooks.shaping")

MAJOR = 0x4E46
ROOT_MINOR = 1
CLASS_MINOR_BASE = 0x10
LEAF_MAJOR_BASE = 0x4E00


def classid(minor: int) -> str:
    return f"{MAJOR:x}:{minor:x}"


def class_minor(index: int) -> int:
    return CLASS_MINOR_BASE + index


def tree_commands(decl: Shaping, index: dict[str, int]) -> list[list[str]]:
    """The tc argv lists that build ``decl`` (``index``: class name -> global class index)."""
    dev = decl.dev
    default = f"{class_minor(index[decl.default]):x}" if decl.default else "0"
    cmds = [["tc", "qdisc", "replace", "dev", dev, "root", "handle", f"{MAJOR:x}:", "htb", "default", default],
            ["tc", "class", "add", "dev", dev, "parent", f"{MAJOR:x}:", "classid", classid(ROOT_MINOR), "htb",
             "rate", rate_text(decl.rate), "ceil", rate_text(decl.rate)]]
    for name, c in decl.classes.items():
        i = index[name]
        cid = classid(class_minor(i))
        cmds.append(["tc", "class", "add", "dev", dev, "parent", classid(ROOT_MINOR), "classid", cid, "htb",
                     "rate", rate_text(c.rate), "ceil", rate_text(c.ceil), "prio", str(c.prio)])
        leaf = ["tc", "qdisc", "add", "dev", dev, "parent", cid, "handle", f"{LEAF_MAJOR_BASE + i:x}:", c.leaf]
        if c.leaf == "tbf":
            burst = max(3200, c.ceil // 8 // 100)  # 10 ms at the ceiling, at least two full frames
            leaf += ["rate", rate_text(c.ceil), "burst", str(burst), "latency", "50ms"]
        elif c.limit is not None:
            leaf += ["limit", str(c.limit)]
        cmds.append(leaf)
    return cmds


def classify_rules(chain: str, policy: "Policy", field: "Field", comment: "MatchSpec") -> list["Rule"]:
    """CLASSIFY rules for mangle POSTROUTING: the class mark, out of the shaped interface."""
    index = {n: i for i, n in enumerate(class_names(policy), 1)}
    out = []
    for decl in policy.shaping_decls.values():
        for name in decl.classes:
            i = index[name]
            out.append(Rule(chain, "CLASSIFY", (("set-class", f"{MAJOR:04x}:{class_minor(i):04x}"),),
                            oif=Iface(decl.dev),
                            matches=(mark(field.encode(i), field.mask), comment)))
    return out


def _tc(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=10)


def _explain(stderr: str, argv: list[str]) -> str:
    text = stderr.strip()
    kind = next((w for w in argv if w in ("htb", "tbf", "pfifo")), None)
    if kind and re.search(r"(qdisc kind is unknown|Unknown qdisc|No such file or directory)", text):
        return (f"the kernel has no {kind} qdisc (CONFIG_NET_SCH_{kind.upper()}; modprobe sch_{kind}): "
                f"`{' '.join(argv)}` says: {text}")
    return f"`{' '.join(argv)}` failed: {text}"


def probe_kernel() -> None:
    """Try htb, a class, and tbf and pfifo leaves on a throw-away veth pair in this namespace.

    If the pair cannot be made (no veth), the probe is skipped and a missing piece is reported
    by the build itself.
    """
    name = f"nfhq{os.getpid() % 10**9}"[:14]
    peer = name[:13] + "p"
    if subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", peer],
                      capture_output=True, text=True, timeout=10).returncode:
        log.debug("shaping probe skipped: cannot create a veth pair")
        return
    try:
        steps = [["tc", "qdisc", "add", "dev", name, "root", "handle", "1:", "htb"],
                 ["tc", "class", "add", "dev", name, "parent", "1:", "classid", "1:1", "htb", "rate", "1mbit"],
                 ["tc", "qdisc", "add", "dev", name, "parent", "1:1", "handle", "2:", "tbf", "rate", "1mbit",
                  "burst", "3200", "latency", "50ms"],
                 ["tc", "qdisc", "del", "dev", name, "parent", "1:1", "handle", "2:"],
                 ["tc", "qdisc", "add", "dev", name, "parent", "1:1", "handle", "2:", "pfifo"]]
        for argv in steps:
            cp = _tc(argv)
            if cp.returncode:
                raise ShapingError("shaping needs htb with tbf/pfifo leaves: " + _explain(cp.stderr, argv))
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=10)


def root_qdisc(dev: str) -> dict[str, Any] | None:
    cp = _tc(["tc", "-j", "qdisc", "show", "dev", dev])
    if cp.returncode:
        raise ShapingError(f"cannot read the qdiscs of {dev}: {cp.stderr.strip()} (is there an interface "
                           f"{dev!r} in this network namespace?)")
    for q in json.loads(cp.stdout or "[]"):
        if q.get("root"):
            return q
    return None


class Shaper:
    """Builds and removes one declaration's tree."""

    def __init__(self, decl: Shaping, index: dict[str, int]) -> None:
        self.decl = decl
        self.index = index
        self.built = False

    def _ours(self) -> bool:
        q = root_qdisc(self.decl.dev)
        return q is not None and q.get("handle") == f"{MAJOR:x}:"

    def build(self) -> None:
        dev = self.decl.dev
        try:
            q = root_qdisc(dev)
        except ShapingError as e:
            raise ShapingError(f"shaping({dev!r}) ({self.decl.file}:{self.decl.line}): {e}") from None
        if q is not None and q.get("handle") == f"{MAJOR:x}:":
            log.warning("replacing a stale nfhooks qdisc tree on %s", dev)
            _tc(["tc", "qdisc", "del", "dev", dev, "root"])
        elif q is not None and q.get("handle") not in ("0:", None):
            raise ShapingError(
                f"shaping({dev!r}) ({self.decl.file}:{self.decl.line}): {dev} already has a root qdisc "
                f"{q.get('kind')} {q.get('handle')} that nfhooks did not make; nfhooks would replace it and "
                f"could not give it back. Remove it first (tc qdisc del dev {dev} root) or shape another interface")
        self.built = True
        for argv in tree_commands(self.decl, self.index):
            cp = _tc(argv)
            if cp.returncode:
                raise ShapingError(f"shaping({dev!r}): " + _explain(cp.stderr, argv))

    def remove(self) -> list[str]:
        if not self.built:
            return []
        self.built = False
        try:
            ours = self._ours()
        except ShapingError:
            return []  # the interface is gone, and its qdiscs with it
        if not ours:
            return []
        cp = _tc(["tc", "qdisc", "del", "dev", self.decl.dev, "root"])
        if cp.returncode:
            raise ShapingError(f"removing the qdisc tree of {self.decl.dev}: {cp.stderr.strip()}")
        return [f"qdisc tree on {self.decl.dev}"]
