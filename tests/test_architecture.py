"""The import rules of docs/architecture.md, checked on the source.

Each package (or top-level module) may import only the packages `ALLOWED` names, which is the
"may import" column of the map; the packages that assemble processes may import anything. Imports
inside functions count too. No module may take part in an import circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

TIDAL = Path(__file__).resolve().parents[1] / "tidal"

BASE = {"config", "protocol", "hashing", "errors", "fleet_snapshot", "curve", "logs"}
ASSEMBLY = {"deploy", "cluster", "sim", "entrypoints", "cli", "__init__"}  # may import anything
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "errors": set(),
    "hashing": set(),
    "curve": set(),
    "logs": {"config"},
    "protocol": {"config"},
    "fleet_snapshot": {"protocol"},
    "kernels": BASE,
    "parallel": BASE,
    "transfer": BASE,
    "runtime": BASE,
    "models": BASE | {"kernels", "parallel"},
    "tokenizer": BASE | {"models"},
    "grammar": BASE | {"tokenizer"},
    "engine": BASE | {"models", "kernels", "parallel", "transfer", "tokenizer", "grammar"},
    "worker": BASE | {"engine", "transfer", "runtime"},
    "router": BASE | {"runtime"},
    "frontend": BASE | {"router", "runtime", "tokenizer", "grammar"},
    "perf": BASE | {"engine", "models", "kernels", "parallel", "transfer", "tokenizer"},
    "planner": BASE | {"perf"},
    "bench": BASE | {"tokenizer", "runtime"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(TIDAL.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The tidal modules (or packages) `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tidal."):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("tidal."))
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(path): path for path in TIDAL.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in paths and m != name} for name, path in paths.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_is_on_the_map():
    layers = {_layer(module) for module in _graph()}
    assert layers - ALLOWED.keys() - ASSEMBLY == set(), "put the new package in ALLOWED and on the map"


def test_layers_import_downward_only():
    arrows = set()
    for module, targets in _graph().items():
        layer = _layer(module)
        if layer in ASSEMBLY:
            continue
        for target in targets:
            if _layer(target) != layer and _layer(target) not in ALLOWED[layer]:
                arrows.add(f"{module} -> {target}")
    assert arrows == set(), "imports that run up the layers (docs/architecture.md)"


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_no_import_circles():
    assert _circles(_graph()) == []


def test_the_circle_finder_finds_circles():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []
