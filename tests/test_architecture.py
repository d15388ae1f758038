"""The import rules of docs/architecture.md, checked on the source: layers import downward only.

`KNOWN` lists the arrows that still run up (issue 16 removes them); a new one fails this test, and
so does an entry of `KNOWN` that is gone, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

TIDAL = Path(__file__).resolve().parents[1] / "tidal"

UPPER = {"deploy", "cluster", "sim", "entrypoints", "cli"}  # assemble processes: may import anything
FORBIDDEN = {
    "parallel": {"kernels", "models", "engine", "worker", "router", "frontend", "planner", "bench", "perf"} | UPPER,
    "kernels": {"models", "engine", "worker", "router", "frontend", "planner", "bench", "perf"} | UPPER,
    "models": {"engine", "worker", "router", "frontend", "planner", "bench", "perf"} | UPPER,
    "engine": {"worker", "router", "frontend", "planner", "bench"} | UPPER,
    "worker": {"router", "frontend", "planner", "bench", "perf"} | UPPER,
    "router": {"engine", "models", "kernels", "worker", "frontend", "planner", "bench", "perf"} | UPPER,
    "frontend": {"engine", "models", "kernels", "worker", "planner", "bench", "perf"} | UPPER,
    "planner": {"engine", "models", "kernels", "worker", "router", "frontend", "bench"} | UPPER,
    "runtime": {"engine", "models", "kernels", "worker", "router", "frontend", "planner", "bench", "perf"} | UPPER,
    "transfer": {"engine", "models", "worker", "router", "frontend", "planner", "bench", "perf"} | UPPER,
    "bench": {"engine", "models", "kernels", "worker", "router", "frontend", "planner", "perf"} | UPPER,
    # Below both router and planner (and frontend): what crosses those layers.
    "fleet_snapshot": {"kernels", "models", "engine", "worker", "router", "frontend", "planner", "runtime",
                       "transfer", "bench", "perf"} | UPPER,
    "errors": {"protocol", "fleet_snapshot", "kernels", "models", "engine", "worker", "router", "frontend",
               "planner", "runtime", "transfer", "bench", "perf"} | UPPER,
}
KNOWN: set[tuple[str, str]] = set()


def _package(path: Path) -> str:
    parts = path.relative_to(TIDAL).with_suffix("").parts
    return parts[0]


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tidal.") and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("tidal.")]
        found.update(name.split(".")[1] for name in names)
    return found


def _arrows_up() -> set[tuple[str, str]]:
    arrows = set()
    for path in TIDAL.rglob("*.py"):
        package = _package(path)
        for target in _imported_packages(path) & FORBIDDEN.get(package, set()):
            arrows.add((str(path.relative_to(TIDAL)), target))
    return arrows


def test_layers_import_downward_only():
    arrows = _arrows_up()
    assert arrows - KNOWN == set(), "new imports that run up the layers (docs/architecture.md)"
    assert KNOWN - arrows == set(), "these arrows are gone: take them out of KNOWN and the map"
