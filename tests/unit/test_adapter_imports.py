"""No adapter imports another: each one speaks to one outside system, and what they share (the
message and result types) lives in inventory_worker.contract."""

from __future__ import annotations

import ast
from pathlib import Path

import inventory_worker.adapters

ADAPTERS = Path(inventory_worker.adapters.__file__).parent
PACKAGE = "inventory_worker.adapters"
# amqp_framing is the RabbitMQ adapter's own helper (pika patches), not an adapter of its own.
ALLOWED = {("rabbitmq", "amqp_framing")}


def adapter_imports(path: Path) -> set[str]:
    """The adapter modules `path` imports, at any depth of the file (functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from .x import y`
                base = node.module or ""
                names = [f"{PACKAGE}.{base}" if base else f"{PACKAGE}.{a.name}" for a in node.names]
            elif node.module == PACKAGE:
                names = [f"{PACKAGE}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        found.update(
            n.removeprefix(PACKAGE + ".").split(".")[0] for n in names if n.startswith(PACKAGE + ".")
        )
    return found


def test_no_adapter_imports_another():
    modules = sorted(p for p in ADAPTERS.glob("*.py") if p.name != "__init__.py")
    assert len(modules) >= 5, "the adapters were not found"
    offending = {
        (p.stem, imported)
        for p in modules
        for imported in adapter_imports(p)
        if imported != p.stem and (p.stem, imported) not in ALLOWED
    }
    assert offending == set(), f"adapters importing adapters (share through contract.py): {sorted(offending)}"


def test_the_check_sees_every_form_of_import(tmp_path):
    src = tmp_path / "x.py"
    src.write_text(
        "import inventory_worker.adapters.postgres\n"
        "from inventory_worker.adapters import redis_cache\n"
        "from inventory_worker.adapters.migrations import migrate\n"
        "from .redis_async import AsyncRedis\n"
        "from . import amqp_framing\n"
        "def f():\n    from inventory_worker.adapters.rabbitmq import connect\n"
        "import inventory_worker.contract\n"
    )
    assert adapter_imports(src) == {
        "postgres",
        "redis_cache",
        "migrations",
        "redis_async",
        "amqp_framing",
        "rabbitmq",
    }
