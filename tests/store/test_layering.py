"""The layers point down: `store/` (all SQL) imports nothing from `service/` or `api/`."""

from __future__ import annotations

import ast
from pathlib import Path

import tokensvc.store

UPPER = ("tokensvc.service", "tokensvc.api")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_store_imports_nothing_from_service_or_api() -> None:
    """A store module reaching up (as `store/tokens.py` once did for `service.status`) is named here."""
    store_dir = Path(tokensvc.store.__file__).parent
    upward = {
        f"{path.name}: {name}"
        for path in sorted(store_dir.glob("*.py"))
        for name in imported_modules(path)
        if name.startswith(UPPER)
    }
    assert not upward, sorted(upward)
