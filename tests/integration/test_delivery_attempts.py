"""The worker, not RabbitMQ, decides when a redelivered message is poison.

RabbitMQ counts a delivery each time a connection drops with the message unacked, so its
x-delivery-limit is only a high backstop. The worker counts, in PostgreSQL, the times it
started applying a redelivered message; past `rabbitmq.delivery_limit` it dead-letters it.
"""

from __future__ import annotations

import json
import uuid

import pika

from ..support import Bus, delete_topology, figures, pg, uid


def _return_unacked(settings, count: int) -> None:
    """Takes `count` messages without acking and drops the connection: they come back redelivered."""
    conn = pika.BlockingConnection(pika.URLParameters(str(settings.rabbitmq.url)))
    ch = conn.channel()
    for _ in range(count):
        method, _, _ = ch.basic_get(settings.rabbitmq.queue, auto_ack=False)
        assert method is not None
    conn.close()


def test_redelivered_message_past_the_attempt_limit_is_dead_lettered(settings, start_worker):
    run = uuid.uuid4().hex[:8]
    r = settings.rabbitmq
    own = settings.model_copy(
        update={
            "rabbitmq": r.model_copy(
                update={
                    "queue": f"{r.queue}.att{run}",
                    "dead_letter_queue": f"{r.dead_letter_queue}.att{run}",
                    "dead_letter_exchange": f"{r.dead_letter_exchange}.att{run}",
                    "exchange": f"{r.exchange}.att{run}",
                }
            )
        }
    )
    bus = Bus(own)
    try:
        poison_sku, fine_sku = uid("ATT"), uid("ATT")
        poison = bus.publish("stock.adjusted", {"product_id": poison_sku, "delta": 5})
        fine = bus.publish("stock.adjusted", {"product_id": fine_sku, "delta": 7})
        _return_unacked(own, 2)
        with pg(own) as cur:  # as if applying it had already been cut short `limit` times
            cur.execute(
                "INSERT INTO delivery_attempts (event_id, attempts) VALUES (%s, %s)",
                (poison["id"], own.rabbitmq.delivery_limit),
            )
        start_worker(processes=1, settings_override=own)
        bus.wait_result(fine["id"], "inventory.adjusted")
        assert figures(own, fine_sku) == (7, 0), "a redelivered message under the limit is applied"
        letters = []
        for _ in range(100):
            letters = bus.dead_letters()
            if letters:
                break
            bus.conn.sleep(0.1)
        assert [json.loads(body)["id"] for _, body in letters] == [poison["id"]]
        assert "interrupted" in letters[0][0].headers["x-inventory-error"]
        assert figures(own, poison_sku) is None, "the dead-lettered message changed nothing"
        with pg(own) as cur:
            cur.execute(
                "SELECT count(*) FROM delivery_attempts WHERE event_id = ANY(%s::uuid[])",
                ([poison["id"], fine["id"]],),
            )
            assert cur.fetchone()[0] == 0, "counts are forgotten once a message is settled"
    finally:
        bus.close()
        delete_topology(own)
