"""Every program the code executes is in nfhooks/programs.txt, which the Makefile installs from.

A brand-new Debian 12 box failed `make test` with `exec of "ping" failed`: the lab ran ping and
no Make target installed iputils-ping. This scans nfhooks/ and tests/ (with ast) for every
subprocess/os.exec*/shutil.which call and every Lab.exec/Lab.popen(node, program, ...), resolves
the program name (literal, or a variable assigned a literal list/tuple/dict/loop in the same
function or module) and fails when a name is not on the list -- or cannot be resolved and is not
explained in DYNAMIC below.
"""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

from nfhooks import programs

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("nfhooks", "tests", "tools")

#: Calls whose first argument is the command (a list, or the program for os.exec*/which).
SUBPROCESS = {"run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput"}
EXEC = {"execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnvp"}
#: Lab-style methods: (node, program, *args).
IN_NODE = {"exec", "popen"}

#: The interpreter itself (sys.executable) counts as found.
INTERPRETER = "<python>"

#: Program positions that cannot be resolved statically: (function, source of the expression) -> why.
#: Keyed without the file so that moving a function to another module keeps its entry.
DYNAMIC: dict[tuple[str, str], str] = {
    ("exec_in_node", "cmd"): "the user's own command (`nfhooks lab exec NODE -- CMD`)",
    ("exec", "self._argv(node, cmd)"): "Lab.exec wraps its caller's command; the callers are scanned (IN_NODE)",
    ("popen", "self._argv(node, cmd)"): "Lab.popen wraps its caller's command; the callers are scanned (IN_NODE)",
    ("start_engine", "argv"): "engine_argv() (sys.executable -m nfhooks run) or a test's fake _argv",
    ("build", "argv"): "tc commands from shaping.tree_commands (every one starts with tc, listed)",
}


class _Unresolved(Exception):
    pass


class Scanner(ast.NodeVisitor):
    """Collects (program, line, function) for one module."""

    def __init__(self, tree: ast.Module, path: Path | None = None) -> None:
        self.module = tree
        self.path = path
        self._imports: dict[str, Scanner | None] = {}
        self.stack: list[ast.AST] = [tree]
        self.found: list[tuple[str, int, str]] = []
        self.unresolved: list[tuple[int, str, str]] = []
        #: module functions that pass a parameter on as the command: name -> parameter index
        self.wrappers: dict[str, int] = {}
        #: every call with its scope stack, for the wrapper pass
        self.calls: list[tuple[ast.Call, list[ast.AST]]] = []

    # -- scopes
    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.stack.append(node)
        self.generic_visit(node)
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def func_name(self) -> str:
        for node in reversed(self.stack):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node.name
        return "<module>"

    # -- resolution
    def parameter_index(self, name: str) -> int | None:
        """Index of `name` among the innermost function's parameters (None: not a parameter)."""
        for node in reversed(self.stack):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.args]
                return names.index(name) if name in names and name not in _defaults(node) else None
        return None

    def bindings(self, name: str) -> list[ast.expr]:
        """Values assigned to `name` in the enclosing functions and the module (loops: the items)."""
        out: list[ast.expr] = []
        for scope in reversed(self.stack):
            for node in _walk_scope(scope):
                if isinstance(node, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id == name for t in node.targets):
                    out.append(node.value)
                elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name) \
                        and node.target.id == name and node.value is not None:
                    if isinstance(node, ast.AnnAssign):
                        out.append(node.value)
                elif isinstance(node, (ast.For, ast.comprehension)):
                    tgt = node.target
                    if isinstance(tgt, ast.Name) and tgt.id == name and isinstance(node.iter, (ast.Tuple, ast.List)):
                        out.extend(node.iter.elts)
                    elif isinstance(tgt, ast.Name) and tgt.id == name and isinstance(node.iter, ast.Name):
                        # for argv in steps: the items of the list bound to steps
                        for v in self.bindings(node.iter.id):
                            if isinstance(v, (ast.List, ast.Tuple)):
                                out.extend(v.elts)
                    elif isinstance(tgt, ast.Name) and tgt.id == name:
                        out.append(ast.Starred(value=node.iter))  # any other iterable: its items
                    elif isinstance(tgt, ast.Tuple) and isinstance(node.iter, ast.Call) \
                            and isinstance(node.iter.func, ast.Attribute) and node.iter.func.attr == "items":
                        # for k, argv in cmds.items(): the dict's values
                        if len(tgt.elts) == 2 and isinstance(tgt.elts[1], ast.Name) and tgt.elts[1].id == name:
                            out.extend(v for d in self.dicts(node.iter.func.value) for v in d.values)
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node is scope:
                    for a in node.args.args + node.args.kwonlyargs:
                        if a.arg == name:
                            defaults = _defaults(node)
                            if a.arg in defaults:
                                out.append(defaults[a.arg])
            if out:
                return out
            if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)) and name in _params(scope):
                return out  # a parameter shadows the module's names
        return out

    def dicts(self, expr: ast.expr) -> list[ast.Dict]:
        if isinstance(expr, ast.Dict):
            return [expr]
        if isinstance(expr, ast.Name):
            return [v for v in self.bindings(expr.id) if isinstance(v, ast.Dict)]
        return []

    def program(self, expr: ast.expr, depth: int = 0) -> list[str]:
        """Program names at a program position (a string, a Name bound to one, sys.executable...)."""
        if depth > 12:
            raise _Unresolved
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str) and "/" not in expr.value:
            return [expr.value.split()[0]] if expr.value.strip() else []
        if isinstance(expr, ast.Attribute) and expr.attr == "executable":
            return [INTERPRETER]
        if isinstance(expr, ast.IfExp):
            return self.program(expr.body, depth + 1) + self.program(expr.orelse, depth + 1)
        if isinstance(expr, ast.BoolOp):
            return [p for v in expr.values for p in self.program(v, depth + 1)]
        if isinstance(expr, ast.Call) and _call_name(expr) == "which" and expr.args:
            return self.program(expr.args[0], depth + 1)
        if isinstance(expr, ast.Call) and _call_name(expr) == "str" and expr.args:
            return self.program(expr.args[0], depth + 1)
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and not expr.args:
            return self.returned(expr.func.id, depth + 1)  # _promtool(): what it returns
        if isinstance(expr, ast.Subscript) and isinstance(expr.slice, ast.Constant) and expr.slice.value == 0:
            return self.command(expr.value, depth + 1)  # cmd[0]
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Div):  # ROOT / "deploy/x.sh"
            return self.program(expr.right, depth + 1)
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) \
                and expr.func.attr == "with_name" and expr.args:  # Path(sys.executable).with_name("nfhooks")
            return self.program(expr.args[0], depth + 1)
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return [expr.value.rsplit("/", 1)[-1]]
        if isinstance(expr, ast.Name):
            values = self.bindings(expr.id)
            if values:
                return [p for v in values for p in self.program(v, depth + 1)]
            index = self.parameter_index(expr.id)
            if index is not None and depth == 0 and self.func_name().startswith("_"):
                self.wrappers[self.func_name()] = index  # `_need(tool)`: its callers are scanned
                return []
        leaves = self.strings(expr, depth + 1)  # a table of tool names, a helper's return value...
        if leaves:
            return [v.rsplit("/", 1)[-1] for v in leaves]
        raise _Unresolved

    # -- every string an expression can be (for tables: {"legacy": {4: "iptables-legacy-save"}})
    def strings(self, expr: ast.expr, depth: int) -> set[str]:
        if depth > 16:
            raise _Unresolved
        d = depth + 1
        if isinstance(expr, ast.Constant):
            return {expr.value} if isinstance(expr.value, str) else set()
        if isinstance(expr, (ast.List, ast.Tuple, ast.Set)):
            return {v for e in expr.elts for v in self.strings(e, d)}
        if isinstance(expr, ast.Dict):
            return {v for e in expr.values for v in self.strings(e, d)}
        if isinstance(expr, ast.Starred):
            return self.strings(expr.value, d)
        if isinstance(expr, (ast.GeneratorExp, ast.ListComp, ast.SetComp)):
            self.stack.append(expr)
            try:
                return self.strings(expr.elt, d)
            finally:
                self.stack.pop()
        if isinstance(expr, ast.Subscript):
            return self.strings(expr.value, d)
        if isinstance(expr, ast.IfExp):
            return self.strings(expr.body, d) | self.strings(expr.orelse, d)
        if isinstance(expr, ast.BoolOp):
            return {v for e in expr.values for v in self.strings(e, d)}
        if isinstance(expr, ast.JoinedStr):
            combos = {""}
            for part in expr.values:
                got = self.strings(part.value, d) if isinstance(part, ast.FormattedValue) else self.strings(part, d)
                combos = {a + b for a in combos for b in got}
                if not combos or len(combos) > 64:
                    raise _Unresolved
            return combos
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) \
                and expr.func.attr in ("values", "get"):
            return self.strings(expr.func.value, d)
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name):
            passed = self.passed_through(expr, d)
            return passed if passed is not None else self.returned_strings(expr.func.id, d)
        if isinstance(expr, ast.Name):
            values = self.bindings(expr.id)
            if values:
                return {v for e in values for v in self.strings(e, d)}
            other = self.imported(expr.id)
            if other is not None:
                top = [n.value for n in other.module.body if isinstance(n, ast.Assign)
                       and any(isinstance(t, ast.Name) and t.id == expr.id for t in n.targets)]
                return {v for e in top for v in other.strings(e, d)}
        raise _Unresolved

    def passed_through(self, call: ast.Call, depth: int) -> set[str] | None:
        """For a helper that returns one of its parameters (``_need(tool) -> tool``): the strings
        of the argument given there; None when the helper is not one."""
        defs = [n for n in self.module.body if isinstance(n, ast.FunctionDef) and n.name == _call_name(call)]
        if not defs:
            return None
        params = [a.arg for a in defs[0].args.args]
        rets = [r.value for r in ast.walk(defs[0]) if isinstance(r, ast.Return) and r.value is not None]
        if not rets or not all(isinstance(r, ast.Name) and r.id in params for r in rets):
            return None
        out: set[str] = set()
        for r in rets:
            i = params.index(r.id)  # type: ignore[union-attr]
            if i >= len(call.args):
                raise _Unresolved
            out |= self.strings(call.args[i], depth)
        return out

    def returned_strings(self, func: str, depth: int) -> set[str]:
        """Every string a function (of this module or imported from a sibling) may return."""
        owner = self
        defs = [n for n in self.module.body if isinstance(n, ast.FunctionDef) and n.name == func]
        if not defs:
            other = self.imported(func)
            if other is None:
                raise _Unresolved
            owner = other
            defs = [n for n in other.module.body if isinstance(n, ast.FunctionDef) and n.name == func]
        returns = [r.value for f in defs for r in ast.walk(f) if isinstance(r, ast.Return) and r.value is not None]
        if not returns:
            raise _Unresolved
        saved, owner.stack = owner.stack, [owner.module, defs[0]]
        try:
            return {v for r in returns for v in owner.strings(r, depth)}
        finally:
            owner.stack = saved

    def imported(self, name: str) -> Scanner | None:
        """The module `name` was imported from (``from .conftest import ipt``), within this repo."""
        if name in self._imports:
            return self._imports[name]
        self._imports[name] = None
        for node in self.module.body:
            if not isinstance(node, ast.ImportFrom) or self.path is None \
                    or not any((a.asname or a.name) == name for a in node.names):
                continue
            if node.level:
                base = self.path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                target = base.joinpath(*(node.module or "").split(".")).with_suffix(".py")
            else:
                target = ROOT.joinpath(*(node.module or "").split(".")).with_suffix(".py")
            if target.is_file():
                self._imports[name] = Scanner(ast.parse(target.read_text()), target)
        return self._imports[name]

    def returned(self, func: str, depth: int) -> list[str]:
        """Programs a module-level helper without arguments returns (``return shutil.which(...)``)."""
        defs = [n for n in self.module.body if isinstance(n, ast.FunctionDef) and n.name == func]
        returns = [r.value for d in defs for r in ast.walk(d) if isinstance(r, ast.Return) and r.value is not None]
        if not returns:
            raise _Unresolved
        saved, self.stack = self.stack, [self.module, defs[0]]
        try:
            return [p for r in returns for p in self.program(r, depth)]
        finally:
            self.stack = saved

    def command(self, expr: ast.expr, depth: int = 0) -> list[str]:
        """Program names of a command (a list/tuple whose first item is the program)."""
        if depth > 12:
            raise _Unresolved
        if isinstance(expr, (ast.List, ast.Tuple)):
            if not expr.elts:
                raise _Unresolved
            first = expr.elts[0]
            if isinstance(first, ast.Starred):
                return self.command(first.value, depth + 1)
            if isinstance(first, (ast.List, ast.Tuple)):  # a list of commands
                return [p for e in expr.elts for p in self.command(e, depth + 1)]
            return self.program(first, depth + 1)
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            return self.command(expr.left, depth + 1)
        if isinstance(expr, ast.Call) and _call_name(expr) == "list" and expr.args:
            return self.command(expr.args[0], depth + 1)
        if isinstance(expr, ast.IfExp):
            return self.command(expr.body, depth + 1) + self.command(expr.orelse, depth + 1)
        if isinstance(expr, ast.Name):
            values = self.bindings(expr.id)
            if not values:
                index = self.parameter_index(expr.id)
                # a private wrapper (`_tc(argv)`): only its own module calls it, and those calls are
                # scanned; a public function's parameter could come from anywhere -> unresolved
                if index is not None and depth == 0 and self.func_name().startswith("_"):
                    self.wrappers[self.func_name()] = index
                    return []
                raise _Unresolved
            return [p for v in values for p in self.command(v, depth + 1)]
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):  # shell string
            return self.program(expr, depth + 1)
        raise _Unresolved

    # -- calls
    def visit_Call(self, node: ast.Call) -> None:
        self.calls.append((node, list(self.stack)))
        name = _call_name(node)
        base = _call_base(node)
        try:
            if name in SUBPROCESS and base == "subprocess" and node.args:
                self.add(node, self.command(node.args[0]))
            elif name in EXEC and base == "os" and node.args:
                self.add(node, self.program(node.args[0]))
            elif name == "which" and base == "shutil" and node.args:
                self.add(node, self.program(node.args[0]))
            elif name in IN_NODE and isinstance(node.func, ast.Attribute) and base not in ("subprocess", "os") \
                    and len(node.args) >= 2:
                second = node.args[1]
                progs = self.command(second.value) if isinstance(second, ast.Starred) else self.program(second)
                self.add(node, progs)
        except _Unresolved:
            self.unresolved.append((node.lineno, self.func_name(), self.position_source(node)))
        self.generic_visit(node)

    def position_source(self, node: ast.Call) -> str:
        """Source of the expression at the program position (the DYNAMIC key)."""
        arg = node.args[1] if _call_name(node) in IN_NODE and len(node.args) >= 2 else node.args[0]
        return ast.unparse(arg.value if isinstance(arg, ast.Starred) else arg)

    def visit_wrapper_calls(self) -> None:
        """Second pass: calls of this module's wrappers (`_tc(["tc", ...])`) name the program."""
        if not self.wrappers:
            return
        wrappers, self.wrappers = self.wrappers, {}
        for node, stack in self.calls:
            index = wrappers.get(_call_name(node))
            if index is None or len(node.args) <= index or isinstance(node.func, ast.Attribute):
                continue
            self.stack = stack
            arg = node.args[index]
            try:
                self.add(node, self.command(arg, depth=1))
            except _Unresolved:
                self.unresolved.append((node.lineno, self.func_name(), ast.unparse(arg)))
        self.stack = [self.module]

    def add(self, node: ast.Call, progs: list[str]) -> None:
        for p in progs:
            self.found.append((p, node.lineno, self.func_name()))


def _walk_scope(scope: ast.AST):  # type: ignore[no-untyped-def]
    """ast.walk, but not into functions nested in `scope` (their names are their own)."""
    todo = [scope]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                todo.append(child)
            elif child is not scope:
                yield child  # the def itself (its defaults), not its body


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    a = fn.args
    return {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg)))}


def _defaults(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, ast.expr]:
    pos = fn.args.args[len(fn.args.args) - len(fn.args.defaults):]
    out = {a.arg: d for a, d in zip(pos, fn.args.defaults)}
    out.update({a.arg: d for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is not None})
    return out


def _call_name(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _call_base(node: ast.Call) -> str:
    f = node.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return f.value.id
    return ""


def scan(paths: tuple[str, ...] = SCANNED) -> tuple[dict[str, list[str]], list[str]]:
    """{program: ["file:line", ...]} and the unresolved calls not explained in DYNAMIC."""
    used: dict[str, list[str]] = {}
    unresolved: list[str] = []
    for top in paths:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            try:
                tree = ast.parse(path.read_text(), rel)
            except SyntaxError:  # the deliberately broken test policies
                continue
            s = Scanner(tree, path)
            s.visit(s.module)
            s.visit_wrapper_calls()
            for prog, line, _ in s.found:
                used.setdefault(prog, []).append(f"{rel}:{line}")
            unresolved += [f"{rel}:{line} in {fn}: {src}" for line, fn, src in s.unresolved
                           if (fn, src) not in DYNAMIC]
    return used, unresolved


def test_every_executed_program_is_listed_with_its_package():
    used, unresolved = scan()
    listed = {p.name for p in programs.load()}
    missing = {prog: where for prog, where in used.items()
               if prog != INTERPRETER and prog.rsplit("/", 1)[-1] not in listed}
    assert not missing, (
        "programs executed by the code but missing from nfhooks/programs.txt (add 'program package target'; "
        f"the Makefile installs from it): {missing}")
    assert not unresolved, ("program names the scanner cannot resolve: make them literal, or explain them "
                            f"in DYNAMIC: {unresolved}")


def test_the_scan_finds_what_the_lab_runs():
    """A scanner that finds nothing passes anything: these calls exist and must be seen."""
    used, _ = scan()
    for prog in ("ping", "iperf3", "ip", "tc", "curl", "iptables-legacy-save", "ip6tables-legacy-restore",
                 "nstat", "prometheus", "tshark", "docker-compose"):
        assert prog in used, f"the scanner did not see {prog}"


def test_scanner_resolves_variables_and_reports_the_rest():
    src = '''
import subprocess, shutil, os, sys
def f(lab, fam, user_cmd):
    tool = "ip6tables-legacy-save" if fam == 6 else "iptables-legacy-save"
    args = [tool] + ["-c"]
    subprocess.run(args)
    cmds = {"a": ["tc", "qdisc"], "b": ["ss", "-t"]}
    out = {k: lab.exec("r", *argv) for k, argv in cmds.items()}
    for t in ("nstat", "pgrep"):
        lab.exec("r", t, "-c")
    lab.popen("r", sys.executable, "-c", "x")
    lab.exec("r", "ping", "-c", 1)
    os.execvp("ip", ["ip", "netns"])
    lab.exec("r", *user_cmd)
SAVE = {"legacy": {4: "iptables-legacy-save"}, "nft": {4: "iptables-nft-save"}}
def _need(tool):
    if not shutil.which(tool):
        raise OSError(tool)
    return tool
def g(b, fam):
    subprocess.run([SAVE[b][fam], "-c"])
    subprocess.run([_need("ip6tables-nft-restore"), "-w"])
'''
    s = Scanner(ast.parse(src))
    s.visit(s.module)
    s.visit_wrapper_calls()
    got = sorted({p for p, _, _ in s.found})
    assert got == sorted({"ip6tables-legacy-save", "iptables-legacy-save", "tc", "ss", "nstat", "pgrep",
                          INTERPRETER, "ping", "ip", "iptables-nft-save", "ip6tables-nft-restore"})
    assert [fn for _, fn, _ in s.unresolved] == ["f"]


def test_table_parses_and_names_real_targets():
    rows = programs.load()
    names = [p.name for p in rows if p.name != "-"]
    assert len(names) == len(set(names)), "a program is listed twice"
    assert programs.package_of("/usr/bin/ping").package == "iputils-ping"
    assert "iputils-ping" in programs.packages("lab")
    assert set(programs.packages("lab")) < set(programs.packages("test"))
    with pytest.raises(ValueError, match="line 1"):
        programs.load("ping iputils-ping nowhere\n")


@pytest.mark.parametrize("target", ["lab", "test"])
def test_makefile_installs_the_table(target):
    """The Makefile reads the same file (with awk, before any Python): its package lists match."""
    var = "APT_PACKAGES" if target == "lab" else "TEST_PACKAGES"
    cp = subprocess.run(["make", "-s", "-C", str(ROOT), f"print-{var}"], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    got = cp.stdout.split()
    want = programs.packages("lab")
    if target == "test":
        want = [p for p in programs.packages("test") if p not in want]
    assert sorted(got) == sorted(want)


def test_readme_names_what_make_test_adds():
    readme = (ROOT / "README.md").read_text()
    para = readme[readme.index("Each installs what it needs"):][:900]
    text = re.sub(r"\s+", " ", para)
    for pkg in programs.packages("test"):
        if pkg not in programs.packages("lab"):
            assert pkg in text, f"README's install paragraph does not mention {pkg}"
    assert "iputils-ping" in text
