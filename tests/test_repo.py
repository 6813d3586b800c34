"""The repository's contracts: CI runs the README's test command, the package's modules import
each other without cycles, files stay small, and the words in the tree speak of the project."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "flaxlm"
MAX_LINES = 400


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^(pip install -e \"\.\[test\]\".*)$", readme, flags=re.M)
    assert len(commands) == 1, commands
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert commands[0] in ci


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _targets(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """The package modules one import statement loads, as dotted names.

    `from pkg import name` is an edge to the submodule `pkg.name` when there is one, else to
    `pkg` itself (its `__init__`). Importing a submodule does not count as an edge to the parent
    packages it implicitly initialises: only a parent that the import names is an edge.
    """
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".")
        # In a package's __init__, level 1 is the package itself; in a module, its parent.
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source not in modules:
        return []
    found = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        found.append(sub if sub in modules else source)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported package module: line}, counting imports inside functions too."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, dict[str, int]] = {}
    for module, path in paths.items():
        edges = graph.setdefault(module, {})
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _targets(node, module, is_package, set(paths)):
                    if target != module:
                        edges.setdefault(target, node.lineno)
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_no_import_cycles_inside_the_package():
    graph = import_graph()
    cycles = import_cycles(graph)
    described = [
        "; ".join(
            f"{a} -> {b} (line {line})"
            for a in cycle
            for b, line in sorted(graph[a].items())
            if b in cycle
        )
        for cycle in cycles
    ]
    assert not cycles, "import cycles:\n" + "\n".join(described)


def test_the_cycle_finder_sees_function_level_and_relative_imports(tmp_path):
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from . import schema\n    from .loading import load\n")
    names = {"flaxlm.config", "flaxlm.config.schema", "flaxlm.config.loading"}
    found = [
        t
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for t in _targets(node, "flaxlm.config.validation", False, names)
    ]
    assert found == ["flaxlm.config.schema", "flaxlm.config.loading"]


def test_no_package_file_is_over_the_line_limit():
    long = {
        str(p.relative_to(REPO)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


# Words about the project's own bookkeeping rather than the code: history belongs in git.
_BOOKKEEPING = re.compile(r"\b(issue|target) \d|closing note", re.IGNORECASE)
_SOURCE_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg", ""}


def test_sources_and_docs_speak_of_the_project_only():
    paths = [REPO / "README.md"]
    for folder in ("flaxlm", "configs", "launch", "benchmarks"):
        paths += [
            p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in _SOURCE_SUFFIXES
        ]
    hits = [
        f"{p.relative_to(REPO)}:{n}: {line.strip()}"
        for p in paths
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if _BOOKKEEPING.search(line)
    ]
    assert not hits, "bookkeeping words in the tree:\n" + "\n".join(hits)
