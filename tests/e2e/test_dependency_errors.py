"""A dependency that refuses the worker or cannot be reached: which one, where, and why.

At start, refused credentials stop the worker with exit 1 and one line naming the dependency,
its host:port and the reason; a closed port is waited for, each attempt logged with the same."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from ..support import REPO, free_port, settings_env

CLI = Path(sys.executable).with_name("inventory-worker")


def run_worker(settings: Any, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "run", "--processes", "1"],
        env=settings_env(settings, **env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_line(stderr: str) -> str:
    """The event of the worker's last log line (every line a JSON object), checking its fields."""
    lines = [json.loads(line) for line in stderr.strip().splitlines()]
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert last["level"] == "error" and last["event"].endswith(
        f"{last['dependency']} at {last['address']}: {last['reason']}"
    ), last
    return last["event"]


def test_a_wrong_rabbitmq_password_stops_the_worker_at_start(settings):
    r = run_worker(settings, INVENTORY_RABBITMQ__PASSWORD="not-the-password")
    assert r.returncode == 1, r.stderr[-2000:]
    host, port = settings.rabbitmq.url.host, settings.rabbitmq.url.port or 5672
    assert last_line(r.stderr) == (
        f"cannot start: RabbitMQ at {host}:{port}: authentication failed "
        "(ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. "
        "For details see the broker logfile.)"
    )
    assert "not-the-password" not in r.stderr


def test_a_wrong_redis_password_stops_the_worker_at_start(settings):
    r = run_worker(settings, INVENTORY_REDIS__USERNAME="nobody", INVENTORY_REDIS__PASSWORD="not-the-password")
    assert r.returncode == 1, r.stderr[-2000:]
    line = last_line(r.stderr)
    assert line.startswith(
        f"cannot start: Redis at {settings.redis.host}:{settings.redis.port}: authentication failed ("
    ), line
    assert "not-the-password" not in r.stderr


@pytest.fixture(scope="module")
def scram_postgres():
    """A private PostgreSQL where `worker` logs in with a password (the shared one trusts everyone)."""
    from tests.chaos.services import PrivatePostgres

    try:
        root = Path(tempfile.mkdtemp(prefix="inventory-scram-"))
        root.chmod(0o755)  # the postgres user must reach its data dir
        pg = PrivatePostgres(root)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        pg.start()
        conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SET password_encryption = 'scram-sha-256'")
            cur.execute("CREATE ROLE worker LOGIN PASSWORD 'the-right-one'")
        conn.close()
        hba = pg.data / "pg_hba.conf"
        hba.write_text("host all worker 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        pg._ctl("reload")
        time.sleep(0.5)
        yield pg
    finally:
        pg.close()
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def test_a_wrong_postgresql_password_stops_the_worker_at_start(settings, scram_postgres):
    r = run_worker(
        settings,
        INVENTORY_DATABASE__HOST="127.0.0.1",
        INVENTORY_DATABASE__PORT=str(scram_postgres.port),
        INVENTORY_DATABASE__USER="worker",
        INVENTORY_DATABASE__PASSWORD="not-the-password",
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert last_line(r.stderr) == (
        f"cannot start: PostgreSQL at 127.0.0.1:{scram_postgres.port}: "
        'authentication failed (password authentication failed for user "worker")'
    )
    assert "not-the-password" not in r.stderr


def test_a_closed_rabbitmq_port_is_waited_for_saying_where_and_why(settings):
    port = free_port()
    env = settings_env(settings, INVENTORY_RABBITMQ__URL=f"amqp://guest:guest@127.0.0.1:{port}/%2F")
    p = subprocess.Popen(
        [str(CLI), "run", "--processes", "1"], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    try:
        retries = []
        deadline = time.monotonic() + 30
        while len(retries) < 2:
            assert time.monotonic() < deadline and p.poll() is None, "the worker did not wait and retry"
            line = p.stderr.readline()
            event = json.loads(line)  # every line the worker writes is JSON
            if event["event"] == "cannot reach a dependency; retrying":
                retries.append(event)
        for event in retries:
            assert {k: event[k] for k in ("dependency", "address", "reason")} == {
                "dependency": "RabbitMQ",
                "address": f"127.0.0.1:{port}",
                "reason": "connection refused",
            }
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        p.stderr.close()


def test_a_command_names_the_unreachable_dependency_and_where(settings):
    port = free_port()
    r = subprocess.run(
        [str(CLI), "publish", "order.cancelled", "--data", '{"order_id": "o-1"}'],
        env=settings_env(settings, INVENTORY_RABBITMQ__URL=f"amqp://guest:guest@127.0.0.1:{port}/%2F"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, r.stdout) == (1, "")
    assert (
        r.stderr
        == f"inventory-worker: cannot reach a dependency: RabbitMQ at 127.0.0.1:{port}: connection refused\n"
    )
    r = subprocess.run(
        [str(CLI), "stock", "SKU-1"],
        env=settings_env(settings, INVENTORY_DATABASE__PORT=str(port)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stderr == (
        "inventory-worker: cannot reach a dependency: "
        f"PostgreSQL at {settings.database.host}:{port}: connection refused\n"
    )
