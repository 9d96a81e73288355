"""A worker whose PostgreSQL, Redis and RabbitMQ all need passwords, serving stock over HTTP under
granian: private instances (tests/chaos/services.py) with a scram-only PostgreSQL, a Redis with
requirepass and a RabbitMQ user whose password the worker reads from INVENTORY_RABBITMQ__PASSWORD_FILE.

granian's worker processes get the settings from the http process: once as JSON with every
secret masked ("**********"), which no test caught while the shared services took any password."""

from __future__ import annotations

import json
import time

import psycopg2
import pytest
import redis
from pydantic import AnyUrl

from inventory_worker.adapters.migrations import migrate

from ..chaos.services import PrivateServices
from ..support import Bus, WorkerProcess, free_port, http_get, uid

PG_PASSWORD = "pg-scram-Pa55-not-logged"
REDIS_PASSWORD = "redis-Pa55-not-logged"
RABBIT_PASSWORD = "rabbit-Pa55-not-logged"


@pytest.fixture
def guarded(settings, tmp_path):
    """Settings pointed at private services that refuse anyone without the password."""
    svc = PrivateServices(pg_password=PG_PASSWORD, redis_password=REDIS_PASSWORD)
    try:
        svc.start()
        svc.rabbitmq.add_user("inventory", RABBIT_PASSWORD)
        s = svc.settings(settings)
        s = s.model_copy(
            update={
                "rabbitmq": s.rabbitmq.model_copy(
                    update={"url": AnyUrl(f"amqp://inventory@127.0.0.1:{svc.rabbitmq.port}/%2F")}
                ),
                "http": s.http.model_copy(update={"server": "granian", "port": free_port()}),
            }
        )
        migrate(s.database)
        yield s, svc
    finally:
        svc.close()


def test_a_worker_whose_services_all_need_passwords_serves_stock_under_granian(guarded, tmp_path):
    s, svc = guarded
    # the instances do refuse a client without the password
    with pytest.raises(psycopg2.OperationalError, match="password"):
        psycopg2.connect(
            host="127.0.0.1", port=svc.postgres.port, user="postgres", dbname="postgres", connect_timeout=5
        ).close()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=svc.redis.port, socket_timeout=5).ping()

    secret_file = tmp_path / "rabbitmq-password"
    secret_file.write_text(RABBIT_PASSWORD + "\n")
    w = WorkerProcess(
        s,
        processes=1,
        log_path=tmp_path / "worker.log",
        extra_env={"INVENTORY_RABBITMQ__PASSWORD_FILE": str(secret_file)},
    ).start(wait_ready=False)
    try:
        deadline = time.monotonic() + 30
        while True:  # both listeners' /readyz: PostgreSQL, Redis and RabbitMQ all reachable
            got = [
                http_get(url + "/readyz", token=None, timeout=3)[::2]
                for url in (w.base_url, w.management_url)
                if _listening(url)
            ]
            if len(got) == 2 and all(status == 200 for status, _ in got):
                break
            assert w.proc.poll() is None, w.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"not ready: {got}"
            time.sleep(0.2)

        sku = uid("SKU")
        client = s.model_copy(
            update={
                "rabbitmq": s.rabbitmq.model_copy(
                    update={
                        "url": AnyUrl(f"amqp://inventory:{RABBIT_PASSWORD}@127.0.0.1:{svc.rabbitmq.port}/%2F")
                    }
                )
            }
        )
        bus = Bus(client)
        try:
            bus.wait_result(bus.publish("stock.adjusted", {"product_id": sku, "delta": 7})["id"])
        finally:
            bus.close()
        for _ in range(2):  # a miss (PostgreSQL, then Redis refilled), then a hit (Redis)
            status, _, body = http_get(f"{w.base_url}/inventory/{sku}")
            assert status == 200, body
            assert json.loads(body)["on_hand"] == 7
    finally:
        assert w.stop() == 0
    log = w.log_path.read_text()
    assert "http listening" in log
    for secret in (PG_PASSWORD, REDIS_PASSWORD, RABBIT_PASSWORD):
        assert secret not in log


def _listening(url: str) -> bool:
    try:
        http_get(url + "/healthz", token=None, timeout=2)
        return True
    except OSError:
        return False
