"""Applies sql/: numbered migrations once each, then the procedure files whenever they change.

Versioned files `sql/migrations/NNN_name.sql` hold the tables and run exactly once, in order.
Files in `sql/procedures/` hold the stock rules as CREATE OR REPLACE and are re-applied when
their checksum changes, so the database always runs the rules in this checkout. Concurrent
`migrate` runs (several replicas starting at once) are serialized by an advisory lock.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from psycopg2 import sql

from inventory_worker.config import DatabaseSettings

# Any fixed number works; it only has to be the same in every process.
MIGRATION_LOCK_KEY = 0x1A7E_0001


def sql_dir() -> Path:
    env = os.environ.get("INVENTORY_SQL_DIR")
    candidates = [Path(env)] if env else []
    candidates += [
        Path(__file__).resolve().parents[2] / "sql",  # a checkout or editable install
        Path(sys.prefix) / "share" / "inventory-worker" / "sql",  # a wheel install
    ]
    for c in candidates:
        if (c / "migrations").is_dir():
            return c
    raise FileNotFoundError("cannot find the sql/ folder; set INVENTORY_SQL_DIR")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def versioned_migrations(root: Path) -> list[Migration]:
    found = []
    for path in sorted((root / "migrations").glob("*.sql")):
        m = re.fullmatch(r"(\d+)_([\w-]+)\.sql", path.name)
        if not m:
            raise ValueError(f"migration file name must be NNN_name.sql: {path.name}")
        found.append(Migration(int(m.group(1)), m.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError("two migration files share a version number")
    return found


def ensure_database(db: DatabaseSettings) -> bool:
    """Creates the configured database if it does not exist. Returns True if it created it."""
    conn = psycopg2.connect(**db.dsn(dbname="postgres"))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db.dbname,))
            if cur.fetchone():
                return False
            try:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db.dbname)))
            except psycopg2.errors.DuplicateDatabase:
                return False  # another replica created it first
            return True
    finally:
        conn.close()


def migrate(db: DatabaseSettings, root: Path | None = None) -> list[str]:
    """Brings the database up to date. Returns what it applied (empty when nothing was due)."""
    root = root or sql_dir()
    ensure_database(db)
    applied: list[str] = []
    conn = psycopg2.connect(**db.dsn())
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            cur.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY, name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now());
                   CREATE TABLE IF NOT EXISTS schema_procedures (
                       file text PRIMARY KEY, checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now());"""
            )
            cur.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in cur.fetchall()}
            for m in versioned_migrations(root):
                if m.version in done:
                    continue
                cur.execute(m.path.read_text())
                cur.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name)
                )
                applied.append(m.path.name)
            cur.execute("SELECT file, checksum FROM schema_procedures")
            known = dict(cur.fetchall())
            for path in sorted((root / "procedures").glob("*.sql")):
                data = path.read_bytes()
                checksum = hashlib.sha256(data).hexdigest()
                if known.get(path.name) == checksum:
                    continue
                cur.execute(data.decode())
                cur.execute(
                    """INSERT INTO schema_procedures (file, checksum) VALUES (%s, %s)
                       ON CONFLICT (file) DO UPDATE SET checksum = EXCLUDED.checksum, applied_at = now()""",
                    (path.name, checksum),
                )
                applied.append(f"procedures/{path.name}")
    finally:
        conn.close()
    return applied


def pending(db: DatabaseSettings, root: Path | None = None) -> list[str]:
    """What `migrate` would apply; the worker refuses to start while this is not empty."""
    root = root or sql_dir()
    conn = psycopg2.connect(**db.dsn())
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            if not cur.fetchone()[0]:
                return ["everything (the database was never migrated)"]
            cur.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in cur.fetchall()}
            cur.execute("SELECT file, checksum FROM schema_procedures")
            known = dict(cur.fetchall())
    finally:
        conn.close()
    out = [m.path.name for m in versioned_migrations(root) if m.version not in done]
    for path in sorted((root / "procedures").glob("*.sql")):
        if known.get(path.name) != hashlib.sha256(path.read_bytes()).hexdigest():
            out.append(f"procedures/{path.name}")
    return out
