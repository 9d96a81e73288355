"""The operator tools, the maintenance loop and the HTTP API receive the adapters they use:
bootstrap.py builds those from the settings (the composition root), so none of these modules
builds an adapter of its own or sees the whole Settings. The http server module is the http
process's entry point: it reads the whole Settings (and hands them to granian's worker
processes, which rebuild the API from them) but builds its adapters through bootstrap.py too."""

from __future__ import annotations

import ast
from pathlib import Path

import inventory_worker

PACKAGE = Path(inventory_worker.__file__).parent
RECEIVERS = (
    "ops/audit.py",
    "ops/prune.py",
    "ops/cache_rebuild.py",
    "worker/background.py",
    "http/api.py",
    "http/ratelimit.py",
    "http/auth.py",
    "http/tally.py",
)
ENTRY_POINTS = ("http/server.py",)  # may read Settings, builds no adapter
# What builds an adapter: the classes, and the client libraries' own constructors.
BUILDERS = {
    "Store",
    "StockCache",
    "StorePool",
    "RateLimiter",
    "AsyncRedis",
    "make_client",
    "Redis",
    "BlockingConnection",
    "rabbitmq.connect",
    "psycopg2.connect",
}


def adapters_built(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in BUILDERS or name.rsplit(".", 1)[-1] in BUILDERS - {
                "rabbitmq.connect",
                "psycopg2.connect",
            }:
                found.append(f"{path.name}:{node.lineno} {name}()")
        elif isinstance(node, ast.ImportFrom) and any(a.name == "Settings" for a in node.names):
            found.append(f"{path.name}:{node.lineno} imports Settings")
    return found


def test_the_check_finds_what_bootstrap_builds() -> None:
    found = adapters_built(PACKAGE / "bootstrap.py")
    for what in (
        "Store()",
        "StockCache()",
        "StorePool()",
        "RateLimiter()",
        "AsyncRedis()",
        "imports Settings",
    ):
        assert any(what in f for f in found), what


def test_tools_receive_their_adapters() -> None:
    found = [f for name in RECEIVERS for f in adapters_built(PACKAGE / name)]
    assert found == [], "built or configured outside bootstrap.py:\n" + "\n".join(found)


def test_the_http_entry_point_builds_its_adapters_through_bootstrap() -> None:
    found = [
        f for name in ENTRY_POINTS for f in adapters_built(PACKAGE / name) if "imports Settings" not in f
    ]
    assert found == [], "built outside bootstrap.py:\n" + "\n".join(found)
