"""SQL is issued only by the PostgreSQL adapter (adapters/postgres.py, and adapters/migrations.py, which applies
sql/), so the statements the worker runs are reviewed in one place. Everything else calls
Store methods: no cursor, no `.execute(`, no `.transaction()` block, no reaching into `_conn`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import inventory_worker

PACKAGE = Path(inventory_worker.__file__).parent
ADAPTER = {"adapters/postgres.py", "adapters/migrations.py"}


def sql_access(path: Path) -> list[str]:
    """Each place in the module that runs SQL or handles a database connection itself."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            receiver = ast.unparse(node.func.value)
            if node.func.attr in ("cursor", "transaction"):
                found.append(f"{where} {receiver}.{node.func.attr}()")
            # The Redis clients' execute() sends a Redis command, not SQL.
            elif node.func.attr == "execute" and "redis" not in receiver.lower():
                found.append(f"{where} {receiver}.execute()")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "cursor":
            found.append(f"{where} cursor()")
        elif (isinstance(node, ast.Attribute) and node.attr == "_conn") or (
            isinstance(node, ast.Name) and node.id == "_conn"
        ):
            found.append(f"{where} _conn")
    return found


def test_the_check_finds_sql_in_the_adapter() -> None:
    # What the next test asserts is absent elsewhere is found where it belongs.
    found = sql_access(PACKAGE / "adapters/postgres.py")
    for what in (".execute()", ".cursor()", ".transaction()", "_conn"):
        assert any(what in f for f in found), what


def test_only_the_postgresql_adapter_issues_sql() -> None:
    modules = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).as_posix() not in ADAPTER)
    assert len(modules) > 10
    found = [f for p in modules for f in sql_access(p)]
    assert found == [], (
        "SQL outside adapters/postgres.py and adapters/migrations.py; add a Store method instead:\n"
        + "\n".join(found)
    )
