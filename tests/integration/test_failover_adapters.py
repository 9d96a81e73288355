"""The adapters in a replicated topology, against the real services: a PostgreSQL connection
whose server stops taking writes is dropped (and the sweeper's lock taken again on the next
one), libpq's multi-host form skips a server that is down, the RabbitMQ adapter moves on from
a node that is down, and the quorum queue is declared with its placement arguments."""

from __future__ import annotations

import uuid

import pika
import pytest

from inventory_worker.adapters import rabbitmq
from inventory_worker.adapters.postgres import Store, TransientError

from ..private_stack import private_settings
from ..support import free_port, uid


def test_a_connection_to_a_server_that_refuses_writes_is_dropped_not_reused(settings):
    # A database of its own: the run's shared workers hold the sweeper lock in the shared one.
    with private_settings(settings, "readonly") as s:
        _refuses_writes(s)


def _refuses_writes(settings) -> None:
    store = Store(settings.database)
    try:
        assert store.try_lead()
        first = store.connect()
        with first.cursor() as cur:  # as after a demotion: the server takes no more writes
            cur.execute("SET default_transaction_read_only = on")
        event = str(uuid.uuid4())
        with pytest.raises(TransientError, match="read-only"):
            store.note_delivery_attempts([event])
        assert first.closed and not store.is_leader
        # The next write goes through a new connection (to the primary), where it succeeds,
        # and the sweeper's lock (released with the old session) is taken again.
        assert store.note_delivery_attempts([event]) == {event: 1}
        assert store.connect() is not first
        assert store.try_lead() and store.is_leader
    finally:
        store.close()


def test_libpq_multi_host_skips_a_server_that_is_down(settings):
    db = settings.database
    dead = free_port()
    s = db.model_copy(update={"hosts": [f"127.0.0.1:{dead}", f"{db.host}:{db.port}"]})
    store = Store(s)
    try:
        store.ping()
        assert store.connect().info.port == db.port
    finally:
        store.close()


def test_the_connection_moves_on_from_a_node_that_is_down(settings):
    url = settings.rabbitmq.url
    dead = free_port()
    for order in (
        [f"127.0.0.1:{dead}", f"{url.host}:{url.port or 5672}"],
        [f"{url.host}:{url.port or 5672}", f"127.0.0.1:{dead}"],
    ):
        s = settings.rabbitmq.model_copy(update={"addresses": order})
        conn = rabbitmq.connect(s)
        try:
            assert conn.is_open and conn._impl.params.port == (url.port or 5672)
        finally:
            conn.close()


def test_the_queues_are_declared_with_their_placement_arguments(settings):
    tag = uid("hq")
    s = settings.rabbitmq.model_copy(
        update={
            "queue": f"{settings.rabbitmq.queue}.{tag}",
            "dead_letter_queue": f"{settings.rabbitmq.dead_letter_queue}.{tag}",
            "quorum_initial_group_size": 1,
            "queue_leader_locator": "balanced",
        }
    )
    conn = rabbitmq.connect(s)
    try:
        ch = conn.channel()
        rabbitmq.declare_topology(ch, s)
        rabbitmq.declare_topology(ch, s)  # declared again (every start does): the same arguments
        # A declaration with other placement arguments is refused: RabbitMQ compares them.
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="inequivalent arg"):
            conn.channel().queue_declare(s.queue, durable=True, arguments={"x-queue-type": "quorum"})
    finally:
        ch = conn.channel()
        ch.queue_delete(s.queue)
        ch.queue_delete(s.dead_letter_queue)
        conn.close()
