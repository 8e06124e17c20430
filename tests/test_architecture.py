"""The house rules, read from the source: data flows one way, and the loop reads in one screen."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "clpd"

# The packages in the order data flows through them (docs/architecture.md): a module may import
# from its own layer and the layers before it, never from a later one. A layer is a package or a
# top-level module; every module of clpd belongs to exactly one.
LAYERS = [
    ["clpd.errors", "clpd.files", "clpd.cache", "clpd.environment", "clpd.progress"],  # foundations
    ["clpd.config"],
    ["clpd.data"],
    ["clpd.losses"],
    ["clpd.curriculum"],
    ["clpd.training"],
    ["clpd.models"],
    ["clpd.evaluation"],
    ["clpd.teachers"],
    ["clpd.report"],
    ["clpd.preflight", "clpd.launchers"],
    ["clpd.commands"],
    ["clpd.cli", "clpd.__main__"],
    ["clpd.bench"],  # benchmarks: they may use anything, nothing uses them
    ["clpd"],  # the package's own __init__
]
COMMANDS = "clpd.commands"


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


def layer_of(module: str) -> int:
    """The index in LAYERS of the layer that holds ``module`` (the longest matching prefix)."""
    matches = [(len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} belongs to no layer of LAYERS"
    return max(matches)[1]


def test_every_module_belongs_to_one_layer():
    assert all(isinstance(layer_of(name), int) for name in MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_from_a_later_layer(name):
    later = sorted(dep for dep in GRAPH[name] if layer_of(dep) > layer_of(name))
    assert later == []


def test_the_layer_rule_catches_an_import_from_a_later_layer(monkeypatch):
    monkeypatch.setitem(GRAPH, "clpd.training.step", GRAPH["clpd.training.step"] | {"clpd.teachers.live"})
    with pytest.raises(AssertionError):
        test_no_module_imports_from_a_later_layer("clpd.training.step")


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"clpd.cli", "clpd.__main__"}))
def test_no_module_imports_a_command_except_the_dispatcher(name):  # (and `python -m clpd`)
    commands = {dep for dep in GRAPH[name] if dep == COMMANDS or dep.startswith(COMMANDS + ".")}
    if name.startswith(COMMANDS + "."):  # a command may use the shared job wrapper, not another command
        commands -= {"clpd.commands.job", COMMANDS}
    if name == "clpd.commands.train":  # the Hydra app imports its pipeline once the config is valid
        commands -= {"clpd.commands.run_train"}
    assert commands == set()


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


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_function_fits_on_one_screen(path):
    too_long = [(name, n) for name, n, _ in functions(path) if n > 60]
    assert too_long == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_stays_under_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


def test_the_training_loop_takes_at_most_8_parameters():
    (params,) = [p for name, _, p in functions(PACKAGE / "training" / "loop.py") if name == "train"]
    assert params <= 8


def test_logic_lines_skip_blanks_comments_and_the_docstring():
    source = 'def f(x):\n    """Doc.\n\n    More."""\n    # why\n\n    y = x + 1  # note\n    return (y,\n            x)\n'
    (node,) = ast.parse(source).body
    assert logic_lines(node, source.splitlines()) == 4  # def, y =, return, its continuation
