"""What the worker says about a failed connection: the dependency, host:port and the reason."""

from __future__ import annotations

import pika.exceptions
import psycopg2
import redis

from inventory_worker.config import load_settings
from inventory_worker.dependencies import describe


def test_connection_losses_after_start_name_the_dependency_and_the_reason(monkeypatch):
    monkeypatch.setenv("INVENTORY_RABBITMQ__URL", "amqp://u:p@mq.internal:5673/%2F")
    s = load_settings()
    lost = describe(pika.exceptions.ConnectionClosedByBroker(320, "CONNECTION_FORCED - broker forced"), s)
    assert (str(lost), lost.permanent) == (
        "RabbitMQ at mq.internal:5673: 320 CONNECTION_FORCED - broker forced",
        False,
    )
    assert (
        describe(pika.exceptions.StreamLostError("Transport indicated EOF"), s).reason
        == "Transport indicated EOF"
    )
    refused = pika.exceptions.AMQPConnectionError(ConnectionRefusedError(111, "Connection refused"))
    assert describe(refused, s).reason == "connection refused"
    assert describe(redis.TimeoutError("Timeout connecting to server"), s).fields() == {
        "dependency": "Redis",
        "address": "127.0.0.1:6379",
        "reason": "timed out",
    }
    pg = psycopg2.OperationalError('connection to server at "127.0.0.1", port 5432 failed: timeout expired\n')
    assert str(describe(pg, s)) == "PostgreSQL at 127.0.0.1:5432: timed out"
    assert describe(ValueError("x"), s) is None
