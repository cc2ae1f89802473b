"""The package's layering, enforced: data flows one way and no module imports its way back.

Layers, lowest first: base (errors, sizes, indices, metrics, version) → model → chat → fixtures → inspect →
intervene → analysis → views → ui → session (the facade) → the package itself. A module may import its own
layer and the layers below it, never above; imports inside functions count too (a lazy import is still a
dependency). The whole import graph must be acyclic.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).parent.parent / "workbench"
BASE = ("errors", "sizes", "indices", "metrics", "version", "arguments")
ORDER = ["base", "model", "chat", "fixtures", "inspect", "intervene", "analysis", "views", "ui", "session", "package"]


def module_name(path: pathlib.Path) -> str:
    parts = ("workbench",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in BASE:
        return "base"
    if parts[1] == "session":
        return "session"
    return parts[1]


def imports(module: str) -> set[str]:
    """Workbench modules `module` imports, anywhere in its body. `from workbench.x import y` names the
    submodule workbench.x.y when there is one, else workbench.x itself."""
    tree = ast.parse(MODULES[module].read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("workbench")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("workbench"):
            assert node.level == 0, f"{module}: relative import; the package uses absolute imports"
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
    return {m for m in out if m != module}


def test_every_module_is_in_a_known_layer():
    unknown = sorted(m for m in MODULES if layer(m) not in ORDER)
    assert not unknown, f"modules outside the layers {ORDER}: {unknown} (add the layer to docs/architecture.md)"


def test_no_module_imports_a_higher_layer():
    upward = upward_imports({m: imports(m) for m in MODULES})
    assert not upward, "lower layers importing higher ones: " + "; ".join(
        f"{m} ({layer(m)}) -> {n} ({layer(n)})" for m, n in upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if state.get(n) is None and (found := visit(n, path + [n])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if state.get(m) is None and (found := visit(m, [m])):
            return found
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, n) for m, ns in graph.items() for n in ns if ORDER.index(layer(n)) > ORDER.index(layer(m)))


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle({m: imports(m) for m in MODULES})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_can_fail():
    """Both rules catch what they are for, on made-up graphs: a cycle, and a view importing a widget."""
    assert find_cycle({"workbench.inspect.capture": {"workbench.inspect.trace"},
                       "workbench.inspect.trace": {"workbench.inspect.capture"}}) == [
        "workbench.inspect.capture", "workbench.inspect.trace", "workbench.inspect.capture"]
    assert find_cycle({"workbench.model.a": {"workbench.errors"}, "workbench.errors": set()}) is None
    assert upward_imports({"workbench.views.attention": {"workbench.ui.inspector", "workbench.inspect.trace"}}) == [
        ("workbench.views.attention", "workbench.ui.inspector")]
    assert "workbench.inspect.routing" in imports("workbench.inspect.capture")  # the real parser sees real imports


def test_a_long_module_says_why_it_is_one_module():
    """A module over ~400 lines states at its top why it is not split (the issue's rule for readable modules)."""
    long = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()
            if len(path.read_text().splitlines()) > 420}
    silent = [f"{name} ({n} lines)" for name, n in long.items()
              if "Why one module" not in (ast.get_docstring(ast.parse(MODULES[name].read_text())) or "")]
    assert not silent, f"modules over 420 lines without a 'Why one module' paragraph in their docstring: {silent}"
