"""Routing and shaping at run time: the ip rules, routes, sysctls and qdisc trees a policy
declared, set up at start, handed over on a hot reload, removed on exit (pyroute2, tc), and
the per-packet encoding of route()/shape() verdicts into mark bits.

The design is in nfhooks/routing.py.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..shaping import Shaper, probe_kernel
from .routing_decl import DEFAULT_TABLE_BASE, RTPROT_NFHOOKS, RouteShapeError, RouteShapePlan, RouteSpec, RoutingSettings

if TYPE_CHECKING:
    from ..packet import Packet
    from ..policy import Policy
    from ..rulebuild import SideSet

__all__ = ["RouteShape", "remove_owned", "start", "signature", "reload", "install_nat", "stop"]

log = logging.getLogger("nfhooks.routing")

Restore = Callable[[int, list[str], str], None]  # Backend.restore(family, lines, what)

@dataclass
class RouteShape:
    """The routing feature's per-generation runtime, made by the engine (RouteShapeFeature.runtime)
    from the compiled plan: encodes verdicts into mark bits (per packet), and sets up / tears
    down the ip rules, routes, sysctls and qdisc trees (once). Never on the RuleSet: it does
    pyroute2 I/O (an on-demand route, setup, teardown)."""

    policy: "Policy"
    plan: RouteShapePlan
    side: "tuple[SideSet, ...]" = ()  # the uplink NAT chains it installs at start (install_nat)
    dynamic: dict[tuple[str | None, str | None], int] = field(default_factory=dict)
    failed: dict[tuple[str | None, str | None], str] = field(default_factory=dict)
    saved_sysctls: dict[str, str] = field(default_factory=dict)
    shapers: list[Any] = field(default_factory=list)
    started: bool = False

    def __post_init__(self) -> None:
        self.tables = self.policy.routing_tables
        self.settings: RoutingSettings = self.policy.routing_settings
        self.route_field = self.plan.route_field
        self.class_field = self.plan.class_field
        self.classes = {n: i for i, n in enumerate(self.plan.classes, 1)}
        self.slots = self.plan.slots

    # -- per packet ---------------------------------------------------------------------
    def clear_mask(self, kind: str) -> int:
        return self.plan.clear_mask(kind)

    def bits(self, pkt: "Packet", v: Any) -> int:
        """The mark field value for a route/shape verdict (a new via/dev table is set up first)."""
        if v.kind == "shape":
            if self.class_field is None:
                raise RouteShapeError(f"returned {v}, but the policy declares no shaping "
                                      "(policy.shaping(dev, classes=...))")
            idx = self.classes.get(v.cls)
            if idx is None:
                raise RouteShapeError(f"returned {v}: no shaping class {v.cls!r} is declared "
                                      f"(classes: {', '.join(self.classes) or 'none'})")
            return self.class_field.encode(idx)
        if self.route_field is None:
            raise RouteShapeError(f"returned {v}, but the policy declares no routing table "
                                  "(policy.routing_table(name, routes=[...]))")
        if v.table is not None:
            t = self.tables.get(v.table)
            if t is None:
                raise RouteShapeError(f"returned {v}: no routing table {v.table!r} is declared "
                                      f"(tables: {', '.join(self.tables) or 'none'})")
            return self.route_field.encode(t.index)
        return self.slot_bits(v, pkt.version)

    def on_demand(self, v: Any) -> bool:
        """Whether ``v``'s bits come from ``slot_bits`` (an on-demand via/dev route: one owner
        process) rather than from the plan (data, the same in every process)."""
        return v.kind == "route" and v.table is None and self.route_field is not None

    def slot_bits(self, v: Any, family: int) -> int:
        """The route field's bits of an on-demand route for a packet of ``family``."""
        assert self.route_field is not None
        return self.route_field.encode(self.slot(v, family))

    def slot(self, v: Any, family: int) -> int:
        """The table slot of an on-demand ``route(via=..., dev=...)`` (its route added on first
        use): the one part of encoding that must have a single owner process (under --workers
        the main one, asked by each worker: worker_routes.py). Slots are never freed: a key's
        answer, or its kernel refusal (``failed``), is final."""
        key = (v.via, v.dev)
        idx = self.dynamic.get(key)
        if idx is not None:
            return idx
        if key in self.failed:
            raise RouteShapeError(self.failed[key])
        if v.via is not None and ipaddress.ip_address(v.via).version != family:
            raise RouteShapeError(f"{v} is an IPv{ipaddress.ip_address(v.via).version} next hop for an "
                                  f"IPv{family} packet")
        idx = len(self.tables) + len(self.dynamic) + 1
        if idx > self.slots:
            raise RouteShapeError(
                f"{v} would be on-demand route {len(self.dynamic) + 1}, past the "
                f"{self.slots - len(self.tables)} policy.routing(dynamic_routes=...) reserves "
                "(declare the uplinks with policy.routing_table instead, or raise dynamic_routes)")
        fam = family if v.via is None else ipaddress.ip_address(v.via).version
        spec = RouteSpec("0.0.0.0/0" if fam == 4 else "::/0", fam, v.via, v.dev)
        try:
            with _ipr() as ipr:
                _add_route(ipr, self.plan.table_id(idx), spec)
        except Exception as e:  # noqa: BLE001 -- pyroute2's netlink errors
            self.failed[key] = f"the kernel refused the route for {v} ({spec.text}): {e}"
            raise RouteShapeError(self.failed[key]) from None
        self.dynamic[key] = idx
        return idx

    # -- lifecycle ----------------------------------------------------------------------
    def setup(self) -> None:
        """Remove a stale set, then install ip rules, routes, sysctls and qdisc trees."""
        stale = remove_owned()
        if stale:
            log.warning("removed stale routing state left by an engine that is gone: %s", "; ".join(stale))
        self.started = True
        if self.policy.shaping_decls:
            probe_kernel()
        if self.route_field is not None:
            with _ipr() as ipr:
                self._check_tables(ipr)
                self._install_rules(ipr)
                for t in self.tables.values():
                    for r in t.routes:
                        try:
                            _add_route(ipr, t.table_id, r)
                        except Exception as e:  # noqa: BLE001
                            raise RouteShapeError(f"routing table {t.name!r} ({t.file}:{t.line}): the kernel "
                                                  f"refused `ip route add {r.text} table {t.table_id}`: {e}") from None
        self._sysctls()
        for decl in self.policy.shaping_decls.values():
            s = Shaper(decl, self.classes)
            self.shapers.append(s)
            s.build()

    def _check_tables(self, ipr: Any) -> None:
        ids = {t.table_id for t in self.tables.values()} | {
            DEFAULT_TABLE_BASE + i for i in range(len(self.tables) + 1, self.slots + 1)}
        for fam in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.route("dump", family=fam):
                tid = r.get_attr("RTA_TABLE")
                if tid in ids and r["proto"] != RTPROT_NFHOOKS:
                    raise RouteShapeError(
                        f"routing table {tid} already holds routes nfhooks did not add (ip route show table "
                        f"{tid}); give the declaration another table_id=")

    def _install_rules(self, ipr: Any) -> None:
        f = self.route_field
        assert f is not None
        p = self.settings.priority
        for fam in (socket.AF_INET, socket.AF_INET6):
            if self.settings.main_first:
                ipr.rule("add", family=fam, priority=p, table=254, suppress_prefixlen=0, protocol=RTPROT_NFHOOKS)
            for idx in range(1, self.slots + 1):
                ipr.rule("add", family=fam, priority=p + idx, table=self.plan.table_id(idx),
                         fwmark=f.encode(idx), fwmask=f.mask, protocol=RTPROT_NFHOOKS)

    def _sysctls(self) -> None:
        want: dict[str, str] = {}
        st = self.settings
        if st.src_valid_mark is not None:
            want["net/ipv4/conf/all/src_valid_mark"] = "1" if st.src_valid_mark else "0"
        if st.rp_filter is not None:
            devs = sorted({d for t in self.tables.values() for d in t.devs})
            for d in ["all", "default", *devs]:
                want[f"net/ipv4/conf/{d}/rp_filter"] = str(st.rp_filter)
        for key, value in want.items():
            path = "/proc/sys/" + key
            try:
                with open(path) as fh:
                    old = fh.read().strip()
                with open(path, "w") as fh:
                    fh.write(value)
            except OSError as e:
                raise RouteShapeError(f"cannot set {key.replace('/', '.')}={value} in this namespace: {e}") from None
            self.saved_sysctls.setdefault(key, old)

    def teardown(self) -> list[str]:
        """Undo everything setup did (also after a failed setup); returns what was removed."""
        done: list[str] = []
        errors: list[str] = []
        for s in reversed(self.shapers):
            try:
                done += s.remove()
            except Exception as e:  # noqa: BLE001 -- keep tearing down
                errors.append(str(e))
        self.shapers.clear()
        if self.route_field is not None or self.started:  # tag-based: also a set this object never made
            try:
                done += remove_owned()
            except Exception as e:  # noqa: BLE001
                errors.append(str(e))
        for key, old in self.saved_sysctls.items():
            try:
                with open("/proc/sys/" + key, "w") as fh:
                    fh.write(old)
                done.append(f"{key.replace('/', '.')}={old} restored")
            except OSError as e:
                errors.append(f"restoring {key}: {e}")
        self.saved_sysctls.clear()
        self.dynamic.clear()
        self.started = False
        if errors:
            raise RouteShapeError("; ".join(errors))
        return done


def _ipr() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _add_route(ipr: Any, table: int, r: RouteSpec) -> None:
    kw: dict[str, Any] = {"dst": r.dst, "table": table, "proto": RTPROT_NFHOOKS,
                          "family": socket.AF_INET if r.family == 4 else socket.AF_INET6}
    if r.via:
        kw["gateway"] = r.via
    if r.dev:
        idx = ipr.link_lookup(ifname=r.dev)
        if not idx:
            raise RouteShapeError(f"no interface {r.dev!r} in this network namespace")
        kw["oif"] = idx[0]
    if r.src:
        kw["prefsrc"] = r.src
    if r.metric is not None:
        kw["priority"] = r.metric
    ipr.route("add", **kw)


def remove_owned() -> list[str]:
    """Delete every ip rule and route carrying nfhooks' protocol number, both families."""
    removed: list[str] = []
    with _ipr() as ipr:
        for fam in (socket.AF_INET, socket.AF_INET6):
            n_rules = n_routes = 0
            for r in ipr.get_rules(family=fam):
                if r.get_attr("FRA_PROTOCOL") != RTPROT_NFHOOKS:
                    continue
                kw: dict[str, Any] = {"family": fam, "priority": r.get_attr("FRA_PRIORITY"),
                                      "table": r.get_attr("FRA_TABLE"), "protocol": RTPROT_NFHOOKS}
                if r.get_attr("FRA_FWMARK") is not None:
                    kw.update(fwmark=r.get_attr("FRA_FWMARK"), fwmask=r.get_attr("FRA_FWMASK"))
                ipr.rule("del", **kw)
                n_rules += 1
            for r in ipr.route("dump", family=fam):
                if r["proto"] != RTPROT_NFHOOKS:
                    continue
                dst = r.get_attr("RTA_DST") or ("0.0.0.0" if fam == socket.AF_INET else "::")
                ipr.route("del", family=fam, table=r.get_attr("RTA_TABLE"), dst=dst, dst_len=r["dst_len"],
                          proto=RTPROT_NFHOOKS, priority=r.get_attr("RTA_PRIORITY"))
                n_routes += 1
            if n_rules or n_routes:
                removed.append(f"ipv{4 if fam == socket.AF_INET else 6}: {n_rules} ip rule(s), {n_routes} route(s)")
    return removed


def start(rs: "RouteShape | None", restore: Restore | None = None) -> None:
    """Engine.start: set up routing/shaping when the policy has any (``rs`` None: a no-op).

    Runs before the iptables rules are installed, so the ip rules, routes and qdiscs exist
    before any packet can carry a route or class mark. ``restore``: the engine's backend's
    (see install_nat).
    """
    if rs is not None:
        rs.setup()
        install_nat(rs, restore)


def signature(rs: "RouteShape | None") -> Any:
    if rs is None:
        return None
    tables = [(t.name, t.index, t.table_id, t.routes, t.masquerade, t.snat) for t in rs.tables.values()]
    shaping = [(d.dev, d.classes, d.default, d.rate) for d in rs.policy.shaping_decls.values()]
    fields = [(f.shift, f.width) if f is not None else None for f in (rs.route_field, rs.class_field)]
    return tables, shaping, fields, rs.slots, vars(rs.settings), rs.classes


def reload(o: "RouteShape | None", n: "RouteShape | None", restore: Restore | None = None) -> None:
    """Hot reload, before the new generation is installed: its runtime ``n`` takes over the
    running routing and shaping of ``o`` when the policy changed neither (tables, routes,
    classes, settings, mark fields); otherwise RouteShapeError, and the reload should fail with
    the old policy kept (ip rules and qdiscs are not generation-aware: changing them needs a
    restart)."""
    if signature(o) != signature(n):
        raise RouteShapeError("the new policy changes its routing tables, shaping classes or their mark bits; "
                              "hot reload keeps those as they are: restart the engine to change them")
    if o is None or n is None:
        return
    n.dynamic, n.failed, n.saved_sysctls, n.shapers, n.started = o.dynamic, o.failed, o.saved_sysctls, o.shapers, o.started
    install_nat(n, restore)


def install_nat(rs: "RouteShape", restore: Restore | None) -> None:
    """The uplink NAT chains (``rs.side``: the RuleSet's side sets, compiled by routing_compile),
    through the backend's ``restore`` (``ip(6)tables-*-restore --noflush``, one commit per
    family): the legacy backend's python-iptables cannot create MASQUERADE/SNAT for both
    families in one process (see backends/legacy.py), so Backend.install never sees them. The
    chain is ``NFH-*`` and the jump tagged ``nfhooks``, so the backend's remove() removes them
    as usual. ``restore``: the engine's backend's (``Backend.restore``); a feature never picks
    a backend."""
    for side in rs.side:
        if restore is None:
            raise RouteShapeError(f"{side.what} need the engine's rule backend (restore=...)")
        restore(side.family, side.restore_lines(), side.what)


def stop(rs: "RouteShape | None", owned: bool = True) -> None:
    """Engine.stop: remove what start set up (safe when start failed or never ran). Never
    raises: the engine's own teardown must go on. ``owned`` False (another engine owns this
    namespace) touches nothing: the ip rules and routes carrying our tag would be its."""
    if rs is None or not owned:
        return
    try:
        removed = rs.teardown()
    except Exception as e:  # noqa: BLE001
        log.error("removing routing/shaping state: %s", e)
        return
    if removed:
        log.info("removed: %s", "; ".join(removed))
