"""The shape of the package, read from its source: imports go one way (no cycles, the layers respected),
and the crash-safe write and the index's file names each live in one place."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "clipengine"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(path: Path, known: set[str]) -> set[str]:
    """The clipengine modules `path` imports, at the top or inside a function (a lazy import is still a
    dependency); only imports under `if TYPE_CHECKING:` are left out, since they never run."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for node in ast.walk(block)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # from clipengine.index import ann
    return {n for n in names if n in known}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`, each as a path that comes back to its start."""
    found, done = [], set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            found.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*stack, node])
        done.add(node)

    for start in sorted(graph):
        visit(start, [])
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "clipengine.index.faiss_view" in graph["clipengine.index.search"]  # the graph is read for real
    assert cycles(graph) == []


# the layers, inner to outer: a module may import its own layer and the ones before it, never one after
LAYERS = [
    ("core", lambda m: m.count(".") == 1 and m not in ("clipengine.cli", "clipengine.__main__")),
    ("apps", lambda m: m.startswith(("clipengine.index", "clipengine.training", "clipengine.evaluation"))),
    ("front doors", lambda m: m.startswith(("clipengine.cli", "clipengine.serve", "clipengine.__main__"))),
]


def _layer(module: str) -> int:
    return next(i for i, (_, member) in enumerate(LAYERS) if member(module))


def test_imports_point_inwards():
    graph = import_graph()
    wrong = [(m, d) for m, deps in graph.items() if m != "clipengine"
             for d in deps if d != "clipengine" and _layer(d) > _layer(m)]
    assert wrong == []
    apps = ("clipengine.index", "clipengine.training", "clipengine.evaluation")
    # the apps stand side by side: the model library and the engine never import training; training never
    # imports evaluation (evaluation may read an index, which is its gallery)
    crossing = [(m, d) for m, deps in graph.items() for d in deps
                if m.startswith(apps[:2]) and d.startswith(apps[1:]) and d.split(".")[1] != m.split(".")[1]]
    assert crossing == []


def _calls(name: str) -> list[str]:
    """Modules calling `os.<name>`."""
    return sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                  if any(isinstance(n, ast.Attribute) and n.attr == name and isinstance(n.value, ast.Name)
                         and n.value.id == "os" for n in ast.walk(ast.parse(path.read_text()))))


@pytest.mark.parametrize("call,callers", [("replace", ["durable.py"]), ("fsync", ["durable.py"]), ("rename", [])])
def test_every_durable_write_goes_through_one_routine(call, callers):
    assert _calls(call) == callers


def test_an_index_file_name_is_written_in_one_place():
    names = ("manifest.json", "meta.sqlite", "vectors.faiss", "texts.faiss", "service.json")
    holders = {name: sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                            if f'"{name}"' in p.read_text()) for name in names}
    assert holders == {name: ["index/location.py"] for name in names}


def test_the_command_line_starts_without_anything_heavy():
    """Every command pays for the CLI's own imports before it does anything: the area modules keep theirs
    inside the commands, so starting costs typer and the light core only."""
    import subprocess
    import sys

    code = ("import sys, clipengine.cli; from clipengine.cli import app; "
            "print(sorted(m for m in ('torch', 'open_clip', 'faiss', 'numpy', 'PIL', 'rich', 'onnxruntime', 'fastapi') "
            "if m in sys.modules)); print(len(app.registered_commands), len(app.registered_groups))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "13 1"  # every command registered on the one app, and bench as its group
