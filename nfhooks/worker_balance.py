"""``--workers``: which policies and options N workers can serve, and the rule set whose queue
rules spread packets over their queues (``-j NFQUEUE --queue-balance``; workers.py explains
the design). Split out of workers.py, which was at the module size limit."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from .rules import MAX_QUEUE

__all__ = ["MAX_WORKERS", "WorkersError", "balance", "check_supported"]

MAX_WORKERS = 64


class WorkersError(ValueError):
    """The policy or the options cannot be served by several workers (the text says why)."""


def check_supported(rs: Any, workers: int, policy: Any = None) -> None:
    if not 2 <= workers <= MAX_WORKERS:
        raise WorkersError(f"--workers {workers}: give 2..{MAX_WORKERS} (1 is the ordinary engine)")
    if not rs.queues:
        raise WorkersError("the policy has no handlers: there is nothing for --workers to decide")


def balance(rs: Any, workers: int, cpu_fanout: bool = False) -> tuple[Any, list[dict[int, Any]]]:
    """A copy of ``rs`` whose queue rules balance over ``workers`` queues per handler.

    Handler queue ``q`` (``base + index``) becomes queues ``base + index*N .. + N-1``.
    Returns the new rule set (``queues`` maps every new queue to its handler) and, per
    worker, the queues it binds.
    """
    base = min(rs.queues) if rs.queues else 0
    new_num = {q: base + (q - base) * workers for q in rs.queues}
    last = max(new_num.values(), default=base) + workers - 1
    if last > MAX_QUEUE:
        raise WorkersError(f"{len(rs.queues)} handlers x {workers} workers need queues {base}..{last}, "
                           f"beyond {MAX_QUEUE}: lower --queue-base or --workers")
    out = copy.copy(rs)
    out.rules = {}
    for key, rules in rs.rules.items():
        lst = []
        for r in rules:
            opts = dict(r.target_opts)
            if r.target == "NFQUEUE" and "queue-num" in opts:
                first = new_num[int(opts["queue-num"])]
                topts: tuple[tuple[str, str], ...] = (("queue-balance", f"{first}:{first + workers - 1}"),)
                if "queue-bypass" in opts:
                    topts += (("queue-bypass", ""),)
                if cpu_fanout:
                    topts += (("queue-cpu-fanout", ""),)
                r = dataclasses.replace(r, target_opts=topts)
            lst.append(r)
        out.rules[key] = lst
    out.queues = {new_num[q] + w: h for q, h in rs.queues.items() for w in range(workers)}
    per_worker = [{new_num[q] + w: h for q, h in rs.queues.items()} for w in range(workers)]
    return out, per_worker
