"""The shape of the house (issue 13's guardrails), checked on every run.

import-linter (``lint-imports`` in scripts/test.sh) holds the import contracts; these
tests hold what it cannot see: module size, and SQLAlchemy staying in the store for
modules added after the contract was written.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lilota

PACKAGE = Path(lilota.__file__).parent
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))
MAX_LINES = 600  # a concern that needs more is two concerns: name the second one
SQL_MODULES = {"store", "dialects"}  # the two packages that speak SQL


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_module_is_over_600_lines() -> None:
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in MODULES}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_only_the_store_and_its_dialects_import_sqlalchemy() -> None:
    speaking = {
        p.relative_to(PACKAGE).parts[0] for p in MODULES if "sqlalchemy" in _imported_roots(p)
    }
    assert speaking <= SQL_MODULES
    assert "store" in speaking
