"""Composition root: the one module that builds adapters from the settings.

Everything else receives the adapters (and the few settings) it uses; whoever builds an
adapter closes it. Imports beyond the store and the cache are made where needed, so that a
command such as `stock` loads neither pika nor the metrics.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from inventory_worker.adapters.postgres import Store
from inventory_worker.adapters.redis_cache import StockCache
from inventory_worker.config import Settings

if TYPE_CHECKING:
    import pika

    from inventory_worker.adapters.redis_async import AsyncRedis
    from inventory_worker.heartbeats import ConsumerSlot
    from inventory_worker.http.api import ReadAPI
    from inventory_worker.worker.background import Maintenance
    from inventory_worker.worker.consumer import Consumer
    from inventory_worker.worker.ports import Stop


def postgres(settings: Settings) -> Store:
    """The PostgreSQL adapter; it connects on first use."""
    return Store(
        settings.database,
        settings.worker.default_reservation_ttl_seconds,
        {
            "backorder_fill_batch": settings.worker.backorder_fill_batch,
            "max_reservation_lifetime_seconds": settings.worker.max_reservation_lifetime_seconds,
        },
    )


def redis_cache(settings: Settings) -> StockCache:
    """The Redis stock cache; it connects on first use."""
    return StockCache(settings.redis)


def rabbitmq_connect(settings: Settings) -> Callable[[], pika.BlockingConnection]:
    """Opens a new RabbitMQ connection at each call."""
    from inventory_worker.adapters import rabbitmq

    return functools.partial(rabbitmq.connect, settings.rabbitmq)


def maintenance(settings: Settings, stop: threading.Event | Any, measure: bool = False) -> Maintenance:
    """A consumer process's background duties (maintenance.py), on adapters of their own."""
    from inventory_worker.worker.background import Maintenance, Schedule

    w = settings.worker
    schedule = Schedule(
        sweep_interval_seconds=w.sweep_interval_seconds,
        sweep_batch_size=w.sweep_batch_size,
        backorder_fill_batch=w.backorder_fill_batch,
        outbox_relay_interval_seconds=w.outbox_relay_interval_seconds,
        outbox_relay_min_age_seconds=w.outbox_relay_min_age_seconds,
        metrics_interval_seconds=w.metrics_interval_seconds,
    )
    return Maintenance(
        postgres(settings),
        redis_cache(settings),
        rabbitmq_connect(settings),
        settings.rabbitmq,
        schedule,
        stop,
        measure=measure,
    )


def consumer(settings: Settings, stop: Stop, slot: ConsumerSlot | None = None) -> Consumer:
    """A consumer process's loop on the real adapters (the unit tests give it in-memory fakes)."""
    from inventory_worker.adapters import rabbitmq
    from inventory_worker.dependencies import describe
    from inventory_worker.worker.cache_writer import CacheWriter
    from inventory_worker.worker.consumer import Consumer, ConsumerConfig
    from inventory_worker.worker.ports import AmqpChannel, AmqpConnection, ResultPublisher

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
        store=postgres(settings),
        cache=CacheWriter(redis_cache(settings)),
        connect=connect,
        open_publisher=open_publisher,
        declare_topology=declare_topology,
        open_channel=lambda conn: rabbitmq.InputChannel(conn.channel()),
        slot=slot,
        describe=lambda exc: describe(exc, settings),
    )


HTTP_STORES = 4  # PostgreSQL connections shared by an http process's threads (cache misses, /readyz)


def read_api(
    settings: Settings,
    extra_ready_checks: Mapping[str, Callable[[], None]] | None = None,
    liveness_checks: Mapping[str, Callable[[], None]] | None = None,
) -> ReadAPI:
    """The HTTP API on its adapters: a pool of stores, the cache, the rate limiter on the
    cache's Redis client, and the broker check of /readyz."""
    from inventory_worker.adapters import rabbitmq
    from inventory_worker.http.api import ReadAPI, StorePool
    from inventory_worker.http.ratelimit import RateLimiter

    cache = redis_cache(settings)
    return ReadAPI(
        settings.http,
        settings.auth,
        settings.rate_limit,
        cache=cache,
        stores=StorePool(postgres(settings) for _ in range(HTTP_STORES)),
        limiter=RateLimiter(cache.client, settings.redis.key_prefix),
        check_rabbitmq=functools.partial(rabbitmq.check_queue, settings.rabbitmq),
        extra_ready_checks=extra_ready_checks,
        liveness_checks=liveness_checks,
    )


def async_redis(settings: Settings) -> AsyncRedis:
    """The pipelined asyncio Redis client of a granian worker's event loop."""
    from inventory_worker.adapters.redis_async import AsyncRedis

    return AsyncRedis(settings.redis)
