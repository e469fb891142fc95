"""The shape of the code, read from the source (nothing is imported): pipelines/ has no import cycle (module-level
and function-level imports both count, and importing a package's submodule runs the package's __init__ first),
no module imports another's `_private` names, pipelines/core imports no method, and pipelines/ never imports gradio."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pipelines"
CALLERS = ("pipelines", "app", "benchmarks", "training")   # whose imports of pipelines' private names are refused


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(folder: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / folder).rglob("*.py"))}


PIPELINES = _modules(PACKAGE)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """The absolute module name an ImportFrom reads from (None for a relative import that leaves the tree)."""
    if node.level == 0:
        return node.module
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 > len(package) - 1:
        return None
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path):
    """(imported module, names taken from it, line) for every import anywhere in the file (functions included);
    `from package import submodule` gives the submodule."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, path.name == "__init__.py", node)
            if source is None:
                continue
            names = []
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in PIPELINES:
                    yield sub, [], node.lineno
                else:
                    names.append(alias.name)
            if names:
                yield source, names, node.lineno


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in PIPELINES}
    for module, path in PIPELINES.items():
        running = set(_ancestors(module)) | {module}   # already being imported when `module` runs
        for target, _, _ in _imports(module, path):
            if target not in PIPELINES or target in running:
                continue
            graph[module].add(target)
            # importing pipelines.a.b runs pipelines.a first, unless `module` itself lives inside pipelines.a
            graph[module].update(a for a in _ancestors(target) if a in PIPELINES and a not in running)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == GREY:
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == WHITE:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_the_modules():
    graph = _graph()
    assert f"{PACKAGE}.studio" in graph and f"{PACKAGE}.generate" in graph["pipelines.studio"]
    assert sum(len(v) for v in graph.values()) > 50


def test_pipelines_have_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def _private_uses(module: str, is_package: bool, text: str, label: str):
    """Private names of pipelines modules that `module` imports, or reads as attributes of a module it imported."""
    tree = ast.parse(text, filename=label)
    aliases: dict[str, str] = {}   # local name -> the pipelines module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node)
            if source is None or not (source == PACKAGE or source.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in PIPELINES:
                    aliases[alias.asname or alias.name] = sub
                elif _private(alias.name) and source != module:
                    yield f"{label}:{node.lineno}: from {source} import {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in PIPELINES and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and _private(node.attr) and aliases[node.value.id] != module):
            yield f"{label}:{node.lineno}: {aliases[node.value.id]}.{node.attr}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize("folder", CALLERS)
def test_no_private_names_cross_modules(folder):
    found = [use for module, path in _modules(folder).items()
             for use in _private_uses(module, path.name == "__init__.py", path.read_text(encoding="utf-8"),
                                      str(path.relative_to(ROOT)))]
    assert not found, "private names used from another module:\n" + "\n".join(found)


def test_private_finder_sees_both_forms():
    text = ("from pipelines.core.ddim import _alpha\nfrom pipelines.core import ddim\nx = ddim._alpha\n"
            "from pipelines.core.ddim import __doc__, sample\nfrom .p2p import _as_words\n")
    found = [u.split(": ", 1)[1] for u in _private_uses("pipelines.edit", False, text, "probe")]
    assert found == ["from pipelines.core.ddim import _alpha", "from pipelines.p2p import _as_words",
                     "pipelines.core.ddim._alpha"]
    assert list(_private_uses("pipelines.core.ddim", False, "from .ddim import _alpha\n", "probe")) == []


def test_pipelines_never_import_gradio():
    found = [f"{path.relative_to(ROOT)}:{line}" for module, path in PIPELINES.items()
             for target, _, line in _imports(module, path) if target.split(".")[0] == "gradio"]
    assert not found, "pipelines/ must stay UI-free: " + ", ".join(found)


def test_the_core_imports_no_method():
    """pipelines/core/ is what every method builds on: it never imports a method module (or the studio)."""
    core = {m: p for m, p in PIPELINES.items() if m == "pipelines.core" or m.startswith("pipelines.core.")}
    assert "pipelines.core.ddim" in core and "pipelines.core.models" in core
    found = [f"{path.relative_to(ROOT)}:{line} imports {target}" for module, path in core.items()
             for target, _, line in _imports(module, path)
             if target.startswith("pipelines")
             and not (target == "pipelines.core" or target.startswith("pipelines.core."))]
    assert not found, "\n".join(found)
