"""The core is a library: no import cycle between its modules (function-level imports included)
and nothing imported from the layers above it (fishtune, tasks, flows, Prefect, the CLI)."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "fish_speech_core"
PACKAGE = CORE.name
FORBIDDEN = ("fishtune", "tasks", "flows", "prefect", "typer")


def module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(CORE.rglob("*.py"))}


def imported(name: str, path: Path) -> list[tuple[str, int]]:
    """Every module ``name`` imports (anywhere in the file), as ``(module, line)``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
    return found


GRAPH = {name: {m for m, _ in imported(name, path) if m in MODULES and m != name} for name, path in MODULES.items()}


def cycles() -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
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
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_and_relative_imports():
    assert len(MODULES) > 30 and f"{PACKAGE}.weights" in GRAPH[f"{PACKAGE}.lm.checkpoint"]
    assert f"{PACKAGE}.finetune.lora" in GRAPH[f"{PACKAGE}.synthesis"]  # imported inside a function


def test_no_import_cycle_in_the_core():
    found = cycles()
    detail = [" <-> ".join(c) + ": " + "; ".join(f"{a} imports {sorted(GRAPH[a] & set(c))}" for a in c) for c in found]
    assert not found, "import cycles in the core:\n" + "\n".join(detail)


def test_the_core_imports_nothing_from_the_layers_above():
    bad = [
        f"{path.relative_to(CORE.parent)}:{line} imports {module}"
        for name, path in MODULES.items()
        for module, line in imported(name, path)
        if module.split(".")[0] in FORBIDDEN
    ]
    assert not bad, "\n".join(bad)
