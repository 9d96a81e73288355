"""What the consumer needs from the outside systems, as the methods it calls.

The adapters fit these (postgres.Store, redis_cache.StockCache, pika's BlockingConnection and
channels, rabbitmq.Publisher); so do the in-memory fakes the unit tests drive the batch logic
with (tests/unit/fakes.py). bootstrap.consumer() puts the real ones together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from inventory_worker.contract import Figures, Outcome, OutgoingMessage


class EventStore(Protocol):
    """PostgreSQL: applies events (raising TransientError or PermanentError), keeps the outbox
    and the delivery-attempt counts, reads figures."""

    def apply_batch(
        self, events: Sequence[dict[str, Any]], mark_published: Sequence[int] = ()
    ) -> list[Outcome]: ...

    def mark_published(self, outbox_ids: Sequence[int]) -> None: ...

    def note_delivery_attempts(self, event_ids: Sequence[str]) -> dict[str, int]: ...

    def forget_delivery_attempts(self, event_ids: Sequence[str]) -> None: ...

    def figures(self, product_ids: Sequence[str]) -> list[Figures]: ...

    def close(self) -> None: ...


class FiguresCache(Protocol):
    """Redis: version-checked writes of figures."""

    def put_many(self, figures: Iterable[Figures]) -> int: ...


class AmqpChannel(Protocol):
    """The consuming channel (rabbitmq.InputChannel: pika's BlockingChannel, whose acks go out
    with the connection's next write)."""

    def basic_qos(self, *, prefetch_count: int) -> Any: ...

    def basic_consume(
        self,
        queue: str,
        on_message_callback: Callable[[Any, Any, Any, bytes], None],
        arguments: dict[str, Any] | None = None,
    ) -> Any: ...

    def basic_cancel(self, consumer_tag: Any) -> Any: ...

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> Any: ...


class AmqpConnection(Protocol):
    """One connection to the broker (pika's BlockingConnection): runs its I/O when asked."""

    def channel(self) -> Any: ...

    def process_data_events(self, time_limit: float | None = 0) -> Any: ...

    def sleep(self, duration: float) -> Any: ...

    def close(self) -> Any: ...


class ResultPublisher(Protocol):
    """Result events with pipelined confirms, and dead letters (rabbitmq.Publisher)."""

    def send_results(self, messages: Sequence[OutgoingMessage], max_in_flight: int | None = None) -> None: ...

    def drain(self, timeout: float | None = None) -> None: ...

    def take_confirmed(self) -> list[int]: ...

    def take_refused(self) -> int: ...

    def dead_letter(self, body: bytes, properties: Any, routing_key: str, reason: str) -> None: ...


class Stop(Protocol):
    """threading.Event, or the supervisor child's stop event."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...
