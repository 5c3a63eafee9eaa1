"""Imports point one way: net -> pubsub -> wire; auth, config, errors, metrics and speedups
are leaves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BROKER = Path(__file__).resolve().parent.parent / "broker"
# What each layer may import from the broker package (besides itself).
ALLOWED = {
    "wire": {"errors", "speedups"},
    "pubsub": {"wire", "errors", "config", "metrics", "auth", "speedups"},
    # server: types only
    "net": {"pubsub", "wire", "errors", "config", "metrics", "auth", "server", "speedups"},
    "auth": {"errors", "config"},  # sans-IO security: tokens, permissions, perimeter
    "config": set(),
    "errors": set(),
    "metrics": {"errors"},
    "speedups": set(),
}
IO_MODULES = {"socket", "select", "signal", "selectors", "asyncio"}


def broker_imports(path: Path) -> tuple[set[str], set[str]]:
    """(broker subpackages imported, stdlib I/O modules imported) by one file."""
    tree = ast.parse(path.read_text())
    layers, io = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "broker" and len(parts) > 1:
                layers.add(parts[1])
            if parts[0] in IO_MODULES:
                io.add(parts[0])
    return layers, io


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports(layer: str) -> None:
    target = BROKER / layer
    files = sorted(target.glob("*.py")) if target.is_dir() else [BROKER / f"{layer}.py"]
    assert files
    for path in files:
        layers, io = broker_imports(path)
        layers.discard(layer)
        assert layers <= ALLOWED[layer], f"{path.name} imports {layers - ALLOWED[layer]}"
        if layer in ("wire", "pubsub", "auth"):
            assert not io, f"sans-IO module {path.name} imports {io}"


def test_server_code_does_not_import_the_bench() -> None:
    for path in BROKER.rglob("*.py"):
        if "bench" not in path.parts:
            assert "bench" not in broker_imports(path)[0], path
