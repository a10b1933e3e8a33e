"""The package's import graph follows its layers, and docs/architecture.md shows the real one."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mptkit"
DOC = PACKAGE.parent / "docs" / "architecture.md"

# Bottom to top: an area imports only areas of lower layers. The trainer is a leaf that only the
# entry points reach, so that reading a model never pulls in the training stack.
LAYERS = (
    ("model", "files"),
    ("data", "adapters"),
    ("loading",),
    ("export", "inference", "eval", "train", "vllm_plugin"),
    ("serve",),
    ("cli", "demo", "__init__"),
    ("__main__",),
)
ENTRY_POINTS = {"cli", "demo", "__main__"}


def _area(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imported_modules(path: Path) -> set[str]:
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    """area -> the other areas of mptkit it imports (eagerly or inside functions)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        area = _area(path)
        graph[area]
        for module in _imported_modules(path):
            parts = module.split(".")
            if parts[0] == "mptkit" and len(parts) > 1 and parts[1] != area:
                graph[area].add(parts[1])
    return dict(graph)


def _layer(area: str) -> int:
    for index, members in enumerate(LAYERS):
        if area in members:
            return index
    raise AssertionError(f"mptkit/{area} is in no layer of tests/test_layering.py: place it")


def test_every_import_goes_down_the_layers():
    wrong = []
    for area, targets in import_graph().items():
        for target in targets:
            if _layer(target) >= _layer(area):
                wrong.append(f"{area} -> {target} (same or higher layer)")
            elif target == "train" and area not in ENTRY_POINTS:
                wrong.append(f"{area} -> train (only {sorted(ENTRY_POINTS)} may import the trainer)")
    assert not wrong, wrong


def test_the_check_sees_a_wrong_import(tmp_path, monkeypatch):
    """The graph is read from source: an upward import (inside a function, too) is found."""
    fake = tmp_path / "mptkit"
    for area in ("model", "train"):
        (fake / area).mkdir(parents=True)
    (fake / "model" / "x.py").write_text("def f():\n    from ..train import loop\n")
    (fake / "train" / "y.py").write_text("from mptkit.model import MPTConfig\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", fake)
    assert import_graph() == {"model": {"train"}, "train": {"model"}}


def test_architecture_doc_shows_the_real_imports():
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\| `mptkit/([\w_]+)(?:/|\.py)` \|[^|]*\| ([^|]*) \|$", line)
        if match:
            rows[match.group(1)] = set(re.findall(r"`(\w+)`", match.group(2)))
    graph = import_graph()
    assert set(rows) == set(graph) - {"__init__", "__main__"}
    for area, imports in rows.items():
        assert imports == graph[area], f"docs/architecture.md: {area} imports {sorted(graph[area])}"
