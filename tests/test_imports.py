"""No import circles in fastvae/ (kernels/ included, installed as fastvae.kernels) or benchmarks/: each
module's imports, read from its source (function-level and TYPE_CHECKING imports too), form a graph
without cycles, so every layer can be read, and imported, before the ones above it."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fastvae": ROOT / "fastvae", "fastvae.kernels": ROOT / "kernels", "benchmarks": ROOT / "benchmarks"}


def modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the packages (a package is its __init__)."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [*package.split("."), *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` (source `path`) imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            stem = ".".join([*base, *(node.module.split(".") if node.module else [])])
            # `from a import b` imports the submodule a.b when there is one, else a name of a
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a module: that module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_is_read_from_the_sources():
    mods = modules()
    assert {"fastvae.graphs", "fastvae.trainer", "fastvae.kernels._common", "benchmarks.gpu_check", "benchmarks.gpu_steps"} <= set(mods)
    known = set(mods)
    assert "fastvae.graphs" in imports("fastvae.trainer", mods["fastvae.trainer"], known)
    assert "benchmarks.gpu_steps" in imports("benchmarks.gpu_check", mods["benchmarks.gpu_check"], known)  # a function-level import
    assert "fastvae.kernels._common" in imports("fastvae.kernels.loss", mods["fastvae.kernels.loss"], known)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    mods = modules()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    assert cycles(graph) == [], "modules that import each other (give each pair one direction: move the shared piece down)"
