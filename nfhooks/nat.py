"""NAT targets chosen in Python, carried out by the kernel's nat table.

A handler queued from mangle returns ``dnat(...)``/``snat(...)``/``masquerade()``/
``redirect(...)`` for a connection's first packet. Python never rewrites an address: the
verdict writes the target's *index* into the ``nat`` mark field and accepts, and the nat
table, which runs right after mangle at the same hook, matches that index in the chain
nfhooks owns there (``-m mark --mark <index>/<nat mask> -j DNAT --to-destination ...``).
Conntrack then translates the replies and every later packet of the connection, exactly
as if the equivalent iptables rule had matched.

Targets may be computed per connection (a load balancer picks a backend), so the rules
are installed on demand: the first packet that needs a new target pays one commit of one
table, inside its own callback, before its verdict (the rule must exist when the packet
reaches the nat table); later packets pay a dict lookup. Indices are never reused for
another target while the engine runs, and the bound (``--nat-targets``) is checked before
anything is installed, with an error that says what to change. Removal on exit is the
engine's ``remove_all()`` (every ``NFH-*`` chain, the nat ones included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .marks import MarkLayout
from .packet import Packet
from .rulebuild import COMMENT, Rule, chain_name, comment, generation_rules, mark
from .verdict import NAT_KINDS, Nat

if TYPE_CHECKING:
    from .policy import Handler

__all__ = ["PORT_PROTOS", "NatError", "NatTargets", "backend_installer", "does_nat", "nat_rule"]

#: Protocols whose ports a NAT target may name (what iptables' DNAT/SNAT accept with ports).
PORT_PROTOS = {6: "tcp", 17: "udp", 132: "sctp", 33: "dccp"}

Installer = Callable[[int, str, str, Rule], None]  # (family, table, hook, rule)
Key = tuple[int, str, Nat, str | None]  # (family, hook, verdict, proto when it has ports)


def does_nat(h: "Handler") -> bool:
    """The handler's source calls a NAT verdict factory (policy.verdict_calls found it)."""
    return not NAT_KINDS.isdisjoint(h.verdict_kinds)


def nat_rule(hook: str, index: int, verdict: Nat, layout: MarkLayout, proto: str | None = None,
             generation: int = 1) -> Rule:
    """The rule in the nat table's ``NFH-<hook>`` that applies target ``index``.

    ``proto`` (tcp/udp/sctp/dccp) is needed when the target names ports: iptables refuses a
    port mapping on a rule that does not say which transport header holds the port.
    """
    f = layout["nat"]
    return Rule(chain_name(hook, generation), verdict.target, verdict.target_opts(),
                proto=proto if verdict.ports else None,
                matches=(mark(f.encode(index), f.mask), comment(f"{COMMENT} nat {index}")))


def backend_installer(backend: Any, layout: MarkLayout, generation: int) -> Installer:
    """A NatTargets installer appending through ``backend`` (a backends.Backend), with the
    generation guard as the prelude of a chain it has to create."""
    def install(family: int, table: str, hook: str, rule: Rule) -> None:
        backend.append_rule(family, table, hook, rule, prelude=generation_rules(rule.chain, layout, generation))
    return install


class NatError(RuntimeError):
    """A NAT verdict that cannot be carried out; the text says why and what to do."""


class NatTargets:
    """target -> index in the ``nat`` mark field, installing the nat rule of a new target.

    Owned by one engine; ``installer`` and ``on_change`` are injected so unit tests need
    neither root nor a metrics registry.
    """

    def __init__(self, layout: MarkLayout, limit: int, installer: Installer | None = None,
                 on_change: Callable[[int], None] | None = None, generation: int = 1) -> None:
        self.field = layout["nat"]
        self.layout = layout
        self.limit = min(limit, (1 << self.field.width) - 1)
        self.generation = generation
        self.installer = installer or self._install
        self.on_change = on_change
        self.index: dict[Key, int] = {}
        self.failed: dict[Key, str] = {}  # a target the kernel refused is not retried per packet

    def __len__(self) -> int:
        return len(self.index)

    def _install(self, family: int, table: str, hook: str, rule: Rule) -> None:
        """Without an injected ``installer`` nothing can reach the kernel: a feature never picks
        a rule backend; the engine injects its backend's (``backend_installer``)."""
        raise NatError(f"no rule installer for the nat rule `{rule.render()}`: NatTargets needs "
                       "installer=backend_installer(backend, layout, generation)")

    def key(self, pkt: Packet, v: Nat) -> Key:
        if v.family is not None and v.family != pkt.version:
            raise NatError(f"{v} is an IPv{v.family} target for an IPv{pkt.version} packet; "
                           f"match family='ipv{v.family}' or return None for the other family")
        proto = None
        if v.ports is not None:
            proto = PORT_PROTOS.get(pkt.proto)
            if proto is None:
                raise NatError(f"{v} names ports, but this packet is {pkt.proto_name}, which has "
                               "none; match proto='tcp' or 'udp', or give the target without a port")
        return (pkt.version, pkt.hook, v, proto)

    def mark_bits(self, pkt: Packet, v: Nat) -> int:
        """The ``nat`` field value for ``v`` on ``pkt`` (install its rule first if new)."""
        return self.field.encode(self.index_for(self.key(pkt, v)))

    def index_for(self, k: Key) -> int:
        """The index of target ``k`` (a :meth:`key`), installing its nat rule first if new.

        Also what ``--workers`` serves the workers' requests with (workers.NatServer).
        """
        idx = self.index.get(k)
        if idx is not None:
            return idx
        v = k[2]
        if k in self.failed:
            raise NatError(self.failed[k])
        if len(self.index) >= self.limit:
            raise NatError(
                f"{v} would be distinct NAT target {len(self.index) + 1}, past the bound of "
                f"{self.limit} (--nat-targets; the nat mark field has {self.field.width} bits). "
                "Start the engine with a larger --nat-targets (and --mark-mask if the bits run "
                "out), or choose among fewer targets")
        idx = len(self.index) + 1
        family, hook, _, proto = k
        try:
            self.installer(family, "nat", hook, nat_rule(hook, idx, v, self.layout, proto, self.generation))
        except Exception as e:  # noqa: BLE001 -- python-iptables raises its own types
            msg = f"the kernel refused the nat rule for {v} at {hook} (IPv{family}): {e}"
            self.failed[k] = msg
            raise NatError(msg) from None
        self.index[k] = idx
        if self.on_change:
            self.on_change(len(self.index))
        return idx

    def reinstall(self) -> None:
        """Install every chosen target's nat rule again, same index (the engine found its
        rules removed under it and re-installed the rest: integrity.py)."""
        for (family, hook, v, proto), idx in sorted(self.index.items(), key=lambda kv: kv[1]):
            self.installer(family, "nat", hook, nat_rule(hook, idx, v, self.layout, proto, self.generation))

    def describe(self) -> list[str]:
        return [f"{idx:>3} ipv{fam} {hook} {v}{' ' + proto if proto else ''}"
                for (fam, hook, v, proto), idx in sorted(self.index.items(), key=lambda kv: kv[1])]

