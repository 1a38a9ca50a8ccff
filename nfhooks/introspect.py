"""What nfhooks reads from a handler's own source, parsed once per handler.

Several load-time checks look at the code of a handler: the verdict factories it calls
(policy.verdict_calls), the per-packet fields a flow handler reads (offload), the payload it
reads (queue.gso_safe), the route()/shape() arguments (routing), whether it uses scapy (the
engine's warm-up). Each used to call ``inspect.getsourcelines`` and ``ast.parse`` itself; a
:class:`Source` is that parse, made once when the handler is declared and kept on the
``Handler`` (``Handler.source``), so every check sees the same tree and line numbers.

Also :func:`option_value`: a policy ``Option`` passed where a value is expected (a match, a
verdict argument, a declaration) resolves to its current value -- one rule instead of a
``hasattr(x, "option_name")`` test at every place that accepts one.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Iterator

__all__ = ["Source", "parse", "option_value", "is_option"]


@dataclass(frozen=True)
class Source:
    """A handler's source text and its AST (None when unreadable or unparsable).

    ``start`` is the file line of the source's first line, so ``start + node.lineno - 1``
    is a node's line in the policy file (what every error message names).
    """

    text: str = ""
    tree: ast.Module | None = None
    start: int = 0
    file: str | None = None
    readable: bool = False
    name: str = ""  # the function's __name__

    def line(self, node: ast.AST) -> int:
        return self.start + getattr(node, "lineno", 1) - 1

    def walk(self) -> Iterator[ast.AST]:
        return ast.walk(self.tree) if self.tree is not None else iter(())

    def calls(self, names: set[str] | frozenset[str]) -> list[tuple[str, ast.Call, int]]:
        """(called name, call node, file line) of every call to one of ``names``."""
        out = []
        for node in self.walk():
            if isinstance(node, ast.Call):
                f = node.func
                n = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if n in names:
                    out.append((n, node, self.line(node)))
        return out

    def function(self) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        return next((n for n in self.walk() if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)


def parse(func: Callable[..., Any] | None) -> Source:
    """The :class:`Source` of ``func`` (an empty one when its source cannot be read)."""
    name = getattr(func, "__name__", "")
    try:
        lines, start = inspect.getsourcelines(func)  # type: ignore[arg-type]
        file = inspect.getsourcefile(func)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return Source(name=name)
    text = "".join(lines)
    try:
        tree: ast.Module | None = ast.parse(textwrap.dedent(text))
    except SyntaxError:
        tree = None
    return Source(text, tree, start, file, tree is not None, name)


def is_option(value: Any) -> bool:
    """A policy ``Option`` (policy.Option; recognised by its name attribute, no import)."""
    return hasattr(value, "option_name")


def option_value(value: Any) -> Any:
    """``value``, or an Option's current value (after ``--set``)."""
    return getattr(value, "value", value) if is_option(value) else value
