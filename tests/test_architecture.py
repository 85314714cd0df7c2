"""The import graph of the package points one way: ops/config <- models, loss, data, postprocess <- weights,
engine, export <- inference <- api, serve <- cli. Read from the source with `ast`, so a new upward import fails
here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rtdetr"

# Floor of each top-level part of the package (a module or a sub-package).
FLOORS = {
    "ops": 0, "config": 0,
    "models": 1, "loss": 1, "data": 1, "postprocess": 1, "viz": 1,
    "weights": 2, "engine": 2, "export": 2,
    "inference": 3,
    "api": 4, "serve": 4,
    "cli": 5,
}  # fmt: skip
# What the network and the criterion may see: nothing of training, data or the facade.
ALLOWED = {"models": {"ops", "config", "models"}, "loss": {"ops", "config", "loss"}, "ops": {"ops"}}


def part_of(module: str) -> str:
    """'rtdetr.engine.trainer' -> 'engine'; 'rtdetr.api' -> 'api'."""
    return module.split(".")[1]


def imports_of(path: Path) -> set[str]:
    """The rtdetr modules `path` imports (relative imports resolved), at any depth of the file."""
    module = ".".join(("rtdetr", *path.relative_to(PACKAGE).with_suffix("").parts))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names] if not node.module else [target]
            found.update(n for n in names if n.startswith("rtdetr."))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("rtdetr."))
    return found


def modules() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "__init__.py"]


def test_every_part_has_a_floor():
    parts = {part_of(".".join(("rtdetr", *p.relative_to(PACKAGE).with_suffix("").parts))) for p in modules()}
    assert parts <= set(FLOORS), f"parts without a floor in FLOORS: {parts - set(FLOORS)}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path):
    own = part_of(".".join(("rtdetr", *path.relative_to(PACKAGE).with_suffix("").parts)))
    targets = {part_of(m) for m in imports_of(path)}
    upward = sorted(t for t in targets if FLOORS[t] > FLOORS[own])
    assert not upward, f"{path.relative_to(PACKAGE)} ({own}, floor {FLOORS[own]}) imports {upward} from above"
    if own in ALLOWED:
        assert targets <= ALLOWED[own], f"{path.relative_to(PACKAGE)} imports {sorted(targets - ALLOWED[own])}"


def test_parts_on_one_floor_do_not_import_each_other_both_ways():
    edges = set()
    for path in modules():
        own = part_of(".".join(("rtdetr", *path.relative_to(PACKAGE).with_suffix("").parts)))
        edges |= {(own, part_of(m)) for m in imports_of(path) if part_of(m) != own}
    cycles = sorted((a, b) for a, b in edges if (b, a) in edges and a < b)
    assert not cycles, f"parts that import each other: {cycles}"


def test_the_walker_sees_relative_imports():
    """The check itself can fail: the trainer's imports are seen, resolved to their parts."""
    found = {part_of(m) for m in imports_of(PACKAGE / "engine" / "trainer.py")}
    assert {"config", "data", "loss", "models", "weights", "engine"} <= found
