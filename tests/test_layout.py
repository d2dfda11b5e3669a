"""The package's modules import each other without cycles (lazy and type-checking imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import dipreg

PACKAGE = Path(dipreg.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """Module -> the dipreg modules it imports anywhere in its source."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dipreg."):
                imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "dipreg":
                imported.update(alias.name for alias in node.names if alias.name in modules)
        graph[path.stem] = imported - {path.stem}
    return graph


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert {"registration", "reports", "evaluation", "cli"} <= set(graph)

    def reachable(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for module in graph.get(stack.pop(), ()):
                if module not in seen:
                    seen.add(module)
                    stack.append(module)
        return seen

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in reachable(b)})
    assert cycles == []
