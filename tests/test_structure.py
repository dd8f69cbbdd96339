"""The package's shape, read from its source (nothing imported): files stay small, imports never run in a circle,
and nothing `softprompt.model` is built on reaches back up to it (calls go down: a lower module is handed what it
needs instead of calling the model)."""

from __future__ import annotations

import ast
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
MAX_LINES = 500


def _module_files() -> dict[str, Path]:
    """Every module by its dotted name: softprompt/ and the root kernels/ folder, installed as softprompt.kernels."""
    files = {}
    for folder, package in ((REPOSITORY / "softprompt", "softprompt"), (REPOSITORY / "kernels", "softprompt.kernels")):
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _imports(files: dict[str, Path]) -> dict[str, set[str]]:
    """The softprompt modules each module imports, anywhere in its file (a function-level import counts too)."""

    def known(name: str) -> str | None:  # a module, or the module that defines the imported name
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {known(alias.name) for alias in node.names if alias.name.startswith("softprompt")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: up from this module's package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.startswith("softprompt"):
                    imported |= {known(f"{base}.{alias.name}") for alias in node.names}
        graph[name] = imported - {None, name}
    return graph


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as the list of its modules (first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the path being walked, "done" after

    def walk(name: str, path: list[str]) -> list[str] | None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            if imported not in state and (found := walk(imported, path + [imported])):
                return found
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (found := walk(name, [name])):
            return found
    return None


def test_no_file_over_500_lines():
    too_long = {str(path.relative_to(REPOSITORY)): count for path in _module_files().values()
                if (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"over {MAX_LINES} lines (split by job): {too_long}"


def test_no_import_circle():
    circle = _circle(_imports(_module_files()))
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_nothing_below_the_model_reaches_back_to_it():
    files = _module_files()
    graph = _imports(files)
    below, waiting = set(), list(graph["softprompt.model"])
    while waiting:
        name = waiting.pop()
        if name not in below:
            below.add(name)
            waiting.extend(graph[name])
    assert "softprompt.model" not in below, [name for name in below if "softprompt.model" in graph[name]]
    # Nor through a stand-in: a Protocol below the model is how a lower module would call back up without importing.
    protocols = [f"{name}.{node.name}" for name in sorted(below)
                 for node in ast.walk(ast.parse(files[name].read_text())) if isinstance(node, ast.ClassDef)
                 and any(getattr(base, "id", getattr(base, "attr", "")) == "Protocol" for base in node.bases)]
    assert not protocols, f"Protocols below softprompt.model: {protocols}"
    assert len(below) > 15  # the walk found the engine's modules (rows, routes, frozen, methods, ...), not nothing
