"""Which verdicts a handler can return, read from its source: the verdict series it gets.

Every handler used to get a series per verdict whatever it could return (issue 17.3: six
series at 0 for a handler that only ever drops). The handler's source, parsed once at
declaration (introspect.Source), usually says exactly: every ``return`` is a verdict factory
call (``drop()``), ``None``, or a conditional of those. Where it does not -- a verdict kept in
a variable, built by a helper, a lambda, a nested function, a generator -- nothing is known
and the handler keeps every series. A verdict the scan missed is still counted: its series
appears with its first packet (metrics.Metrics.lazy_verdict), so a wrong guess costs a late
series, never a lost count.
"""

from __future__ import annotations

import ast
from typing import Any

from .verdict import FACTORIES

__all__ = ["CONTINUE", "reads_packet", "returnable"]

CONTINUE = "continue"  # the label of a fall-through (None), as dispatch.NONE_LABEL


class _Unknown(Exception):
    """A return whose verdict the scan cannot name."""


def _kinds(node: ast.expr | None) -> set[str]:
    if node is None or (isinstance(node, ast.Constant) and node.value is None):
        return {CONTINUE}
    if isinstance(node, ast.IfExp):
        return _kinds(node.body) | _kinds(node.orelse)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # set_ttl(..) | set_dscp(..)
        kinds = _kinds(node.left) | _kinds(node.right)
        if kinds == {"mangle"}:
            return kinds
        raise _Unknown
    if isinstance(node, ast.Call):
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if name in FACTORIES:
            kind = FACTORIES[name]
            if kind == "mark":
                cm = next((k.value for k in node.keywords if k.arg == "connmark"), None)
                if cm is None:
                    return {"mark"}
                if isinstance(cm, ast.Constant):
                    return {"connmark" if cm.value else "mark"}
                return {"mark", "connmark"}
            return {kind}
    raise _Unknown


#: Calls that reach a function's locals without naming them.
_FRAME_CALLS = frozenset(("locals", "vars", "eval", "exec", "_getframe", "currentframe"))


def _function(handler: Any) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    src = getattr(handler, "source", None)
    return src.function() if src is not None and src.readable else None


def reads_packet(handler: Any) -> bool:
    """False only when ``handler``'s own body never names a parameter of its own (nor calls
    ``locals()``, ``eval`` and the like): ``return accept()`` behind a kernel match. True
    whenever the source does not say (unreadable, a lambda, a wrapped function). The lazy packet parses itself on
    any read, so a wrong False would cost speed -- and, on a guarded GSO queue, skip the
    payload guard (gso.py), which the dispatcher gives only handlers that read their packet."""
    fn = _function(handler)
    if fn is None or hasattr(getattr(handler, "func", None), "__wrapped__"):
        return True  # a decorator's wrapper is what runs, and the source read is the inner function's
    a = fn.args
    names = {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x is not None}
    if not names:
        return True
    for stmt in fn.body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and node.id in names:
                return True
            if isinstance(node, ast.Call):
                f = node.func
                if (f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "") in _FRAME_CALLS:
                    return True
    return False


def returnable(handler: Any) -> frozenset[str] | None:
    """The verdict labels ``handler`` can give (``continue`` for None), or None when its
    source does not say (then every verdict series is bound)."""
    fn = _function(handler)
    if fn is None:
        return None
    kinds: set[str] = set()
    for node in ast.walk(fn):
        if node is not fn and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return None  # a nested function's returns are not the handler's
        if isinstance(node, (ast.Yield, ast.YieldFrom, ast.Await)):
            return None
        if isinstance(node, ast.Return):
            try:
                kinds |= _kinds(node.value)
            except _Unknown:
                return None
    if not fn.body or not isinstance(fn.body[-1], (ast.Return, ast.Raise)):
        kinds.add(CONTINUE)  # falling off the end returns None
    return frozenset(kinds)
