"""The shape of the house: imports go one way (main_* -> engine_jepat -> util -> models), with no
cycles and no project imports hidden inside functions, and no function of the project (tests and
benchmarks aside) is longer than about 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 85


def project_files() -> list[Path]:
    files = sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("util/**/*.py")) + sorted(ROOT.glob("models/**/*.py"))
    return [f for f in files if f.name != "__init__.py"]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def layer(module: str) -> int:
    """0: models, 1: util, 2: the engine, 3: the mains (and app.py)."""
    if module.startswith("models"):
        return 0
    if module.startswith("util"):
        return 1
    return 2 if module == "engine_jepat" else 3


def project_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported project module, whether the import sits inside a function) for every import."""
    tree = ast.parse(path.read_text())
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            top = name.split(".")[0]
            if top in ("models", "util") or top.startswith("main_") or top == "engine_jepat":
                out.append((name, id(node) in inside))
    return out


def resolve(name: str, modules: set[str]) -> str | None:
    """The project module an import names (``util.data.shapes`` for ``from util.data import shapes``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_imports_go_one_way_without_cycles_or_hidden_imports():
    files = project_files()
    modules = {module_name(f) for f in files}
    graph: dict[str, set[str]] = {}
    problems = []
    for f in files:
        me = module_name(f)
        graph[me] = set()
        for name, hidden in project_imports(f):
            target = resolve(name, modules)
            if target is None or target == me:
                continue
            graph[me].add(target)
            if hidden:
                problems.append(f"{me} imports {target} inside a function")
            if layer(target) > layer(me) or (layer(me) == 3 and layer(target) == 3):
                problems.append(f"{me} (layer {layer(me)}) imports {target} (layer {layer(target)})")
    assert not problems, problems

    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    assert {"util.runtime", "models.loss", "util.training.parallel"} <= set(graph)  # the checker sees the tree


def test_no_function_is_longer_than_about_80_lines():
    long = []
    for f in project_files():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{module_name(f)}.{node.name}: {n} lines")
    assert not long, long
