"""Result events are published with pipelined confirms: only what the broker confirmed counts."""

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pika
import pytest

from inventory_worker.adapters import rabbitmq
from inventory_worker.contract import OutgoingMessage


def _messages(n: int, start: int = 1) -> list[OutgoingMessage]:
    out = []
    for i in range(start, start + n):
        mid = str(uuid.uuid4())
        out.append(
            OutgoingMessage(
                i,
                mid,
                "inventory.adjusted",
                {"id": mid, "type": "inventory.adjusted", "seq": i, "causation_id": None},
            )
        )
    return out


def _queue(ch, settings, **arguments) -> str:
    q = ch.queue_declare("", exclusive=True, auto_delete=True, arguments=arguments or None).method.queue
    ch.queue_bind(q, settings.rabbitmq.events_exchange, routing_key="inventory.adjusted")
    return q


@contextmanager
def _publisher(settings) -> Iterator[tuple[Any, rabbitmq.Publisher]]:
    """A channel (topology declared) and a Publisher on one connection, closed at the end."""
    conn = rabbitmq.connect(settings.rabbitmq)
    try:
        ch = conn.channel()
        rabbitmq.declare_topology(ch, settings.rabbitmq)
        yield ch, rabbitmq.Publisher(conn.channel(), settings.rabbitmq)
    finally:
        conn.close()


def _received(ch, q: str) -> list[int]:
    """The `seq` of every message in q, in arrival order."""
    got = []
    while (r := ch.basic_get(q, auto_ack=True))[0] is not None:
        got.append(json.loads(r[2])["seq"])
    return got


def test_a_batch_is_confirmed_as_a_whole_and_arrives_in_order(settings):
    with _publisher(settings) as (ch, pub):
        q = _queue(ch, settings)
        first, second = _messages(300), _messages(50, start=301)
        assert pub.publish_results(first) == [m.outbox_id for m in first]
        assert pub.publish_results(second) == [m.outbox_id for m in second]
        assert _received(ch, q) == list(range(1, 351))


def test_results_sent_without_waiting_are_confirmed_later_in_order(settings):
    """send_results returns before the confirms; they are collected later, none lost, in order;
    past max_in_flight unconfirmed messages it waits for the broker."""
    with _publisher(settings) as (ch, pub):
        q = _queue(ch, settings)
        first, second = _messages(300), _messages(200, start=301)
        pub.send_results(first)
        pub.send_results(second, max_in_flight=100)
        confirmed = pub.take_confirmed()
        assert len(confirmed) >= 400  # it waited until at most 100 were unconfirmed
        pub.drain()
        assert confirmed + pub.take_confirmed() == list(range(1, 501))
        assert pub.take_confirmed() == [] and pub.take_refused() == 0
        assert _received(ch, q) == list(range(1, 501))


def test_nacked_results_are_left_out(settings):
    """A queue that refuses more than 3 messages makes the broker nack the rest."""
    with _publisher(settings) as (ch, pub):
        _queue(ch, settings, **{"x-max-length": 3, "x-overflow": "reject-publish"})
        assert pub.publish_results(_messages(8)) == [1, 2, 3]
        with pytest.raises(rabbitmq.NotConfirmed):
            pub.publish_all(_messages(2, start=9))


def test_dead_letters_still_wait_for_their_own_confirm(settings):
    import uuid

    from ..support import delete_topology, with_own_queues

    settings = with_own_queues(settings, uuid.uuid4().hex[:8])  # a DLQ no other test writes to
    try:
        with _publisher(settings) as (ch, pub):
            pub.publish_results(_messages(20))  # interleaved with the pipelined channel
            pub.dead_letter(b"not json", pika.BasicProperties(message_id="m-1"), "order.placed", "bad body")
            method, props, body = ch.basic_get(settings.rabbitmq.dead_letter_queue, auto_ack=True)
            assert body == b"not json" and props.headers["x-inventory-error"] == "bad body"
    finally:
        delete_topology(settings)


def test_the_consumer_marks_only_confirmed_results_published(settings):
    """Nacked results stay unpublished in the outbox (for the relay); confirmed ones are marked."""
    import threading

    from inventory_worker import bootstrap
    from inventory_worker.adapters.postgres import Store

    from ..support import pg, uid

    s = settings.model_copy(
        update={
            "rabbitmq": settings.rabbitmq.model_copy(
                update={"events_exchange": settings.rabbitmq.events_exchange + "." + uid("x")}
            )
        }
    )
    store = Store(s.database)
    [out] = store.apply_batch(
        [{"id": str(uuid.uuid4()), "type": "stock.adjusted", "data": {"product_id": uid("SKU"), "delta": 5}}]
    )
    store.close()
    ids = [m.outbox_id for m in out.messages]
    conn = rabbitmq.connect(s.rabbitmq)
    consumer = bootstrap.consumer(s, threading.Event())
    try:
        ch = conn.channel()
        rabbitmq.declare_topology(ch, s.rabbitmq)
        full = ch.queue_declare(
            "", exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        ch.queue_bind(full.method.queue, s.rabbitmq.events_exchange, routing_key="#")
        pub = rabbitmq.Publisher(conn.channel(), s.rabbitmq)

        def published() -> list:
            with pg(s) as cur:
                cur.execute("SELECT published_at FROM outbox WHERE id = ANY(%s) ORDER BY id", (ids,))
                return [r[0] for r in cur.fetchall()]

        def publish_and_settle() -> None:
            consumer._publish(pub, out.messages)  # sent; confirms come while the loop goes on
            pub.drain()  # (the consumer's loop runs the I/O; here we wait for them)
            consumer._collect_confirms(pub)
            consumer._flush_marks(final=True)  # as on the way out: not waiting

        publish_and_settle()  # every one nacked
        assert published() == [None] * len(ids)

        ch.queue_delete(full.method.queue)
        publish_and_settle()  # now confirmed
        assert all(p is not None for p in published())
    finally:
        consumer.store.close()
        try:
            conn.channel().exchange_delete(s.rabbitmq.events_exchange)
        finally:
            conn.close()


def test_a_batch_goes_out_in_few_sends_and_arrives_intact(settings, monkeypatch):
    """pika writes every frame with its own send(); amqp_framing joins what is queued. A batch
    of 300 results (900 frames, one body larger than a frame, so split) takes a few sends, and
    every body arrives whole, in order."""
    from pika.adapters.utils import io_services_utils

    from inventory_worker.adapters import amqp_framing

    assert amqp_framing.coalesce_writes()  # installed on import of amqp; idempotent
    sends: list[int] = []
    real_send = io_services_utils._AsyncTransportBase._sigint_safe_send

    def counting_send(sock, data):
        sends.append(len(data))
        return real_send(sock, data)

    with _publisher(settings) as (ch, pub):
        q = _queue(ch, settings)
        messages = _messages(300)
        messages[7].body["padding"] = "x" * 300_000  # > frame_max (128 KiB): several body frames
        monkeypatch.setattr(
            io_services_utils._AsyncTransportBase, "_sigint_safe_send", staticmethod(counting_send)
        )
        pub.send_results(messages)
        pub.drain()
        monkeypatch.undo()
        assert pub.take_confirmed() == list(range(1, 301))
        assert 0 < len(sends) <= 10, sends  # without joining: 900+ sends
        got = []
        while (r := ch.basic_get(q, auto_ack=True))[0] is not None:
            got.append(json.loads(r[2]))
        assert [b["seq"] for b in got] == list(range(1, 301))
        assert got[7]["padding"] == "x" * 300_000 and "padding" not in got[8]


def test_a_batch_ack_is_queued_and_goes_out_with_its_results(settings, monkeypatch):
    """InputChannel.basic_ack writes nothing by itself; the results' send carries it, in the
    same send(). The broker then has the inputs acked: after the connection closes, none comes
    back to the queue."""
    from pika.adapters.utils import io_services_utils

    sends: list[bytes] = []
    real_send = io_services_utils._AsyncTransportBase._sigint_safe_send

    def counting_send(sock, data):
        sends.append(bytes(data))
        return real_send(sock, data)

    admin = rabbitmq.connect(settings.rabbitmq)
    inputs = admin.channel().queue_declare("", auto_delete=False).method.queue
    try:
        with _publisher(settings) as (ch, pub):
            results = _queue(ch, settings)
            pub.send_results(_messages(1))  # as after a consumer's first batch: its results channel is open
            for i in range(5):
                ch.basic_publish("", inputs, json.dumps({"n": i}).encode())
            consuming = rabbitmq.InputChannel(ch.connection.channel())
            tags: list[int] = []
            consuming.basic_qos(prefetch_count=10)  # the BlockingChannel's own methods pass through
            consuming.basic_consume(inputs, lambda _c, m, _p, _b: tags.append(m.delivery_tag))
            while len(tags) < 5:
                ch.connection.process_data_events(time_limit=0.1)
            monkeypatch.setattr(
                io_services_utils._AsyncTransportBase, "_sigint_safe_send", staticmethod(counting_send)
            )
            consuming.basic_ack(tags[-1], multiple=True)
            assert sends == []  # queued, not written
            pub.send_results(_messages(3, start=2))
            monkeypatch.undo()
            assert len(sends) == 1, [len(s) for s in sends]  # the ack and three publishes
            ack = pika.frame.Method(consuming.channel_number, pika.spec.Basic.Ack(tags[-1], multiple=True))
            assert sends[0].startswith(ack.marshal())
            pub.drain()
            assert pub.take_confirmed() == [1, 2, 3, 4]
            assert _received(ch, results) == [1, 2, 3, 4]
        # The connection is closed: unacked inputs would be back in the queue now.
        assert admin.channel().queue_declare(inputs, passive=True).method.message_count == 0
    finally:
        admin.channel().queue_delete(inputs)
        admin.close()
