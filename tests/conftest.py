"""Fixtures: real PostgreSQL, Redis and RabbitMQ, isolated per test run.

Where the services come from, in this order:
  1. the INVENTORY_* environment (or config/config.yaml), e.g. INVENTORY_DATABASE__HOST;
  2. otherwise the defaults, the services on localhost;
  3. any that does not answer is started with testcontainers, where a Docker engine runs
     (pip install -e '.[containers]');
  4. else the run stops at once with a message saying what to start.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inventory_worker.adapters.migrations import migrate
from inventory_worker.config import Settings, load_settings

from . import reaper
from .support import (
    REPO,
    Bus,
    WorkerProcess,
    delete_redis_keys,
    delete_topology,
    drop_database,
    free_port,
    isolated_settings,
    with_own_queues,
)

RUN_ID = os.environ.get("INVENTORY_TEST_RUN_ID") or uuid.uuid4().hex[:10]


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.5):
            return True
    except OSError:
        return False


def _start_containers(base: Settings, missing: list[str], stack: list[Any]) -> Settings:
    """Starts the missing services in containers (contributors' laptops with Docker)."""
    try:
        import docker  # noqa: F401  (comes with testcontainers)
        from testcontainers.core.container import DockerContainer  # noqa: F401

        docker.from_env().ping()
    except Exception:
        what = ", ".join(missing)
        pytest.exit(
            f"cannot reach {what} and no Docker engine is available to start them.\n"
            "Start the services (PostgreSQL on 127.0.0.1:5432, Redis on 127.0.0.1:6379, RabbitMQ on "
            "127.0.0.1:5672 with guest/guest), or point the tests at yours with INVENTORY_DATABASE__HOST, "
            "INVENTORY_REDIS__HOST, INVENTORY_RABBITMQ__URL, ... (see docs/configuration.md).",
            returncode=3,
        )
    update: dict[str, Any] = {}
    if "PostgreSQL" in missing:
        from testcontainers.postgres import PostgresContainer

        c = PostgresContainer("postgres:16-alpine", username="postgres", password="postgres").start()
        stack.append(c)
        update["database"] = base.database.model_copy(
            update={
                "host": c.get_container_host_ip(),
                "port": int(c.get_exposed_port(5432)),
                "password": "postgres",
            }
        )
    if "Redis" in missing:
        from testcontainers.redis import RedisContainer

        c = RedisContainer("redis:7-alpine").start()
        stack.append(c)
        update["redis"] = base.redis.model_copy(
            update={"host": c.get_container_host_ip(), "port": int(c.get_exposed_port(6379))}
        )
    if "RabbitMQ" in missing:
        from testcontainers.rabbitmq import RabbitMqContainer

        c = RabbitMqContainer("rabbitmq:3.13-alpine").start()
        stack.append(c)
        update["rabbitmq"] = base.rabbitmq.model_copy(
            update={"url": f"amqp://guest:guest@{c.get_container_host_ip()}:{c.get_exposed_port(5672)}/%2F"}
        )
    return base.model_copy(update=update)


@pytest.fixture(scope="session")
def base_settings() -> Iterator[Settings]:
    os.chdir(REPO)
    base = load_settings()
    url = base.rabbitmq.url
    checks = {
        "PostgreSQL": (base.database.host, base.database.port),
        "Redis": (base.redis.host, base.redis.port),
        "RabbitMQ": (url.host or "127.0.0.1", url.port or 5672),
    }
    missing = [name for name, (h, p) in checks.items() if not _reachable(h, p)]
    stack: list[Any] = []
    if missing:
        base = _start_containers(base, missing, stack)
    yield base
    for c in stack:
        c.stop()


@pytest.fixture(scope="session")
def settings(base_settings: Settings) -> Iterator[Settings]:
    """Settings isolated to this run: own database, queues, exchanges and Redis prefix."""
    s = isolated_settings(base_settings, RUN_ID)
    migrate(s.database)
    yield s
    if os.environ.get("INVENTORY_TEST_KEEP"):
        return
    for cleanup in (delete_topology, delete_redis_keys, drop_database):
        try:
            cleanup(s)
        except Exception as exc:  # never hide the test results behind a cleanup failure
            print(f"cleanup {cleanup.__name__} failed: {exc}")


@pytest.fixture
def bus(settings: Settings) -> Iterator[Bus]:
    b = Bus(settings)
    yield b
    b.close()


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-logs")


@pytest.fixture(scope="session")
def worker(settings: Settings, logs_dir: Path) -> Iterator[WorkerProcess]:
    """One worker (2 consumer processes) shared by the end-to-end tests of this run."""
    w = WorkerProcess(settings, processes=2, log_path=logs_dir / "worker.log").start()
    yield w
    w.stop()


HTTP_SERVERS = ("stdlib", "granian")


@pytest.fixture(scope="session")
def other_server_worker(settings: Settings, logs_dir: Path) -> Iterator[WorkerProcess]:
    """A worker served by the HTTP server the shared `worker` does not use (1 consumer process).

    Same database and Redis, so it serves the figures the shared worker writes; queues of its own,
    so it takes none of the shared worker's messages.
    """
    other = next(x for x in HTTP_SERVERS if x != settings.http.server)
    s = with_own_queues(settings, other)
    s = s.model_copy(update={"http": s.http.model_copy(update={"server": other, "port": free_port()})})
    w = WorkerProcess(s, processes=1, log_path=logs_dir / f"worker-{other}.log").start()
    yield w
    w.stop()
    delete_topology(s)


@pytest.fixture(params=HTTP_SERVERS)
def served(request: pytest.FixtureRequest, settings: Settings) -> WorkerProcess:
    """The endpoint as each HTTP server serves it: tests taking it run once per `http.server`."""
    same = request.param == settings.http.server
    return request.getfixturevalue("worker" if same else "other_server_worker")


@pytest.fixture
def start_worker(settings: Settings, logs_dir: Path) -> Iterator[Any]:
    """Starts extra workers for one test (with settings overrides); stops them afterwards."""
    started: list[WorkerProcess] = []

    def _start(
        processes: int = 2,
        wait_ready: bool = True,
        settings_override: Settings | None = None,
        **extra_env: str,
    ) -> WorkerProcess:
        s = settings_override or settings
        s = s.model_copy(update={"http": s.http.model_copy(update={"port": free_port()})})
        w = WorkerProcess(
            s,
            processes=processes,
            extra_env=extra_env,
            log_path=logs_dir / f"worker-{uuid.uuid4().hex[:6]}.log",
        )
        started.append(w)
        return w.start(wait_ready=wait_ready)

    yield _start
    for w in started:
        w.stop()


def pytest_configure(config: pytest.Config) -> None:
    # Stopped from outside (a CI time limit, `timeout`, SIGTERM), the suite still ends every
    # process and private instance it started: SIGTERM and SIGHUP become KeyboardInterrupt, on
    # which pytest tears every fixture down, and what a teardown missed (a daemonized postmaster,
    # epmd) is killed at exit by its environment marker (tests/reaper.py).
    reaper.install(keyboard_interrupt=True)
