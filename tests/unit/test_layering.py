"""The rooms' imports stay one-way: the model imports no room, the pipeline knows storage
only through its committer protocol, storage never imports upstream, and the HTTP room
reads the shared records from the model, never from ingest or the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "rtmonitor"


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; the package uses no relative imports)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            found.add(node.module or "")
    return found


def modules(room: str) -> list[Path]:
    target = PACKAGE / room
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


@pytest.mark.parametrize(
    ("room", "forbidden"),
    [
        ("model.py", ("rtmonitor.",)),  # (but its own compiled helper, below)
        ("pipeline", ("rtmonitor.storage", "rtmonitor.ingest", "rtmonitor.api", "redis")),
        ("storage", ("rtmonitor.ingest", "rtmonitor.pipeline", "rtmonitor.api")),
        ("api", ("rtmonitor.ingest", "rtmonitor.pipeline")),
    ],
)
def test_rooms_do_not_import_upstream(room: str, forbidden: tuple[str, ...]) -> None:
    for path in modules(room):
        bad = {
            name
            for name in imports_of(path)
            if any(name == f.rstrip(".") or name.startswith(f.rstrip(".") + ".") for f in forbidden)
            and name != "rtmonitor._model"  # a compiled leaf (_model.c) that imports nothing
        }
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"
