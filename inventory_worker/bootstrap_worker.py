"""Puts a consumer process together from the settings: the one place that picks the real
adapters for it (the unit tests give worker.consumer.Consumer in-memory fakes instead).

To be folded into bootstrap.py, beside the other composition functions.
"""

from __future__ import annotations

from inventory_worker.adapters import rabbitmq
from inventory_worker.adapters.postgres import Store
from inventory_worker.adapters.redis_cache import StockCache
from inventory_worker.config import Settings
from inventory_worker.dependencies import describe
from inventory_worker.heartbeats import ConsumerSlot
from inventory_worker.worker.cache_writer import CacheWriter
from inventory_worker.worker.consumer import Consumer, ConsumerConfig
from inventory_worker.worker.ports import AmqpChannel, AmqpConnection, ResultPublisher, Stop


def consumer(settings: Settings, stop: Stop, slot: ConsumerSlot | None = None) -> Consumer:
    amqp = settings.rabbitmq

    def connect() -> AmqpConnection:
        return rabbitmq.connect(amqp)  # type: ignore[no-any-return]  # pika has no type hints

    def open_publisher(conn: AmqpConnection) -> ResultPublisher:
        return rabbitmq.Publisher(conn.channel(), amqp)

    def declare_topology(channel: AmqpChannel) -> None:
        rabbitmq.declare_topology(channel, amqp)

    return Consumer(
        ConsumerConfig.from_settings(settings),
        stop,
        store=Store(settings.database, settings.worker.default_reservation_ttl_seconds),
        cache=CacheWriter(StockCache(settings.redis)),
        connect=connect,
        open_publisher=open_publisher,
        declare_topology=declare_topology,
        slot=slot,
        describe=lambda exc: describe(exc, settings),
    )
