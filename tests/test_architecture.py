"""The house rules, read from the source: data flows one way, and the loop reads in one screen."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "clpd"
COMMANDS = {"clpd.commands.train", "clpd.commands.eval", "clpd.commands.plan", "clpd.commands.report", "clpd.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: Dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> Set[str]:
    """The clpd modules that ``name`` imports, anywhere in the file (function bodies included)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES)
    found.discard(name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def find_cycle() -> List[str]:
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for start in sorted(GRAPH):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_the_import_graph_of_the_package_has_no_cycle():
    assert find_cycle() == []


def test_the_cycle_finder_finds_a_cycle_when_there_is_one(monkeypatch):
    monkeypatch.setitem(GRAPH, "clpd.teachers.live", GRAPH["clpd.teachers.live"] | {"clpd.commands.train"})
    cycle = find_cycle()
    assert cycle[0] == cycle[-1] and "clpd.commands.train" in cycle


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"clpd.cli", "clpd.__main__"}))
def test_no_module_imports_a_command_except_the_dispatcher(name):  # (and `python -m clpd`)
    # clpd.report re-exports the report command's functions for scripts: it is the command's package.
    allowed = {"clpd.commands.report"} if name == "clpd.report" else set()
    assert GRAPH[name] & COMMANDS - allowed == set()


def logic_lines(node: ast.AST, source_lines: List[str]) -> int:
    """Lines of a function that hold code: not blank, not a comment, not its docstring."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        docstring = set(range(body[0].lineno, body[0].end_lineno + 1))
    else:
        docstring = set()
    text = "\n".join(source_lines[node.lineno - 1:node.end_lineno])
    code_lines = {tok.start[0] + node.lineno - 1 for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                  if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                                      tokenize.DEDENT, tokenize.ENDMARKER)}
    return len(code_lines - docstring)


def functions(path: Path) -> Iterator[tuple[str, int, int]]:
    """(name, lines of logic, parameters) of every function in ``path``, methods and nested ones included."""
    source = path.read_text()
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
            yield node.name, logic_lines(node, lines), params


@pytest.mark.parametrize("module", ["training/loop.py", "commands/train.py"])
def test_the_loop_and_the_train_command_are_functions_that_fit_on_one_screen(module):
    too_long = [(name, n) for name, n, _ in functions(PACKAGE / module) if n > 60]
    assert too_long == []


def test_the_training_loop_takes_at_most_8_parameters():
    (params,) = [p for name, _, p in functions(PACKAGE / "training" / "loop.py") if name == "train"]
    assert params <= 8


def test_logic_lines_skip_blanks_comments_and_the_docstring():
    source = 'def f(x):\n    """Doc.\n\n    More."""\n    # why\n\n    y = x + 1  # note\n    return (y,\n            x)\n'
    (node,) = ast.parse(source).body
    assert logic_lines(node, source.splitlines()) == 4  # def, y =, return, its continuation
