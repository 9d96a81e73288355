"""Which dependency failed, where, and why: for the one-line errors and the retry logs.

A refused password is permanent (retrying cannot help: at start the worker exits); a refused
connection or a timeout is not (it waits and retries). Reasons never hold a password: neither
libpq, pika nor redis-py put one in their messages.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika.exceptions
import psycopg2
import redis
import tenacity

from inventory_worker.config import Settings
from inventory_worker.logs import get_logger

log = get_logger(__name__)

# libpq's messages for credentials the server refused (the role unknown counts: same remedy).
_PG_AUTH = re.compile(
    r"password authentication failed|authentication failed|no password supplied|"
    r"role \"[^\"]*\" does not exist|pg_hba\.conf rejects"
)


@dataclass(frozen=True)
class Failure:
    dependency: str  # PostgreSQL, RabbitMQ, Redis
    address: str  # host:port
    reason: str  # "authentication failed (...)", "connection refused", "timed out", or the error
    permanent: bool  # the credentials were refused

    def __str__(self) -> str:
        return f"{self.dependency} at {self.address}: {self.reason}"

    def fields(self) -> dict[str, str]:
        return {"dependency": self.dependency, "address": self.address, "reason": self.reason}


def _network_reason(text: str) -> str | None:
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if "timed out" in low or "timeout" in low:
        return "timed out"
    if "name or service not known" in low or "nodename nor servname" in low or "name resolution" in low:
        return "unknown host name"
    if "no route to host" in low or "network is unreachable" in low:
        return "host unreachable"
    return None


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return chain


def rabbitmq_address(settings: Settings) -> str:
    return settings.rabbitmq.where


def describe(exc: BaseException, settings: Settings) -> Failure | None:
    """The failure an exception of psycopg2, pika or redis-py means; None for any other."""
    for e in _cause_chain(exc):
        if isinstance(e, psycopg2.OperationalError):
            text = str(e).strip()
            where = settings.database.where
            # libpq: 'connection to server at "h", port p failed: FATAL:  the reason'
            first = text.splitlines()[0] if text else ""
            detail = re.sub(r"^connection to server .*? failed: (FATAL:\s+)?", "", first)
            if _PG_AUTH.search(text):
                return Failure("PostgreSQL", where, f"authentication failed ({detail})", True)
            if re.search(r"database \"[^\"]*\" does not exist", text):  # waiting would not create it
                return Failure("PostgreSQL", where, f"{detail} (inventory-worker migrate creates it)", True)
            return Failure("PostgreSQL", where, _network_reason(text) or detail or type(e).__name__, False)
        if isinstance(e, pika.exceptions.AMQPError):
            where = rabbitmq_address(settings)
            if isinstance(
                e,
                (
                    pika.exceptions.ProbableAuthenticationError,
                    pika.exceptions.AuthenticationError,
                    pika.exceptions.ProbableAccessDeniedError,
                ),
            ):
                m = re.search(r"(ACCESS_REFUSED|NOT_ALLOWED)[^'\"]*", str(e))
                why = m.group(0) if m else type(e).__name__
                return Failure("RabbitMQ", where, f"authentication failed ({why})", True)
            # pika's message is in its args, often another exception (whose str() may be empty)
            text = " ".join(str(a) or repr(a) for a in e.args) or type(e).__name__
            return Failure("RabbitMQ", where, _network_reason(text) or text, False)
        if isinstance(e, redis.RedisError):
            where = settings.redis.where
            if isinstance(e, redis.AuthenticationError) or re.match(r"(WRONGPASS|NOAUTH)", str(e)):
                return Failure("Redis", where, f"authentication failed ({str(e).strip()})", True)
            text = str(e)
            return Failure("Redis", where, _network_reason(text) or text or type(e).__name__, False)
    return None


def _rabbitmq(settings: Settings) -> None:
    from inventory_worker.adapters import rabbitmq

    rabbitmq.connect(settings.rabbitmq).close()


def _postgresql_pending(settings: Settings) -> list[str]:
    from inventory_worker.adapters.migrations import pending

    return pending(settings.database)


def _redis(settings: Settings) -> None:
    from inventory_worker.adapters.redis_cache import make_client

    client = make_client(settings.redis)
    try:
        client.ping()
    finally:
        client.close()


def _until_reachable(settings: Settings, check: Callable[[Settings], Any]) -> Any:
    """check(settings), retried with backoff while the dependency cannot be reached (each failed
    attempt logged with where and why); any other error, refused credentials included, raised."""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        failure = describe(state.outcome.exception(), settings)  # type: ignore[union-attr, arg-type]
        log.warning(
            "cannot reach a dependency; retrying",
            **failure.fields(),  # type: ignore[union-attr]
            attempt=state.attempt_number,
            wait_seconds=round(state.next_action.sleep, 2) if state.next_action else None,
        )

    def transient(exc: BaseException) -> bool:
        failure = describe(exc, settings)
        return failure is not None and not failure.permanent

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(transient),
        wait=tenacity.wait_exponential(multiplier=0.5, max=10.0) + tenacity.wait_random(0, 0.25),
        stop=tenacity.stop_never,
        before_sleep=before_sleep,
        reraise=True,
    )(check, settings)


def check_at_start(settings: Settings) -> list[str]:
    """Before the worker starts: waits for PostgreSQL and RabbitMQ to be reachable, and raises
    if one of them, or Redis, refuses the credentials. Redis out of reach is only logged: the
    worker runs without its cache until it is back. Returns the migrations still pending."""
    todo: list[str] = _until_reachable(settings, _postgresql_pending)
    _until_reachable(settings, _rabbitmq)
    try:
        _redis(settings)
    except redis.RedisError as exc:
        failure = describe(exc, settings)
        if failure is None or failure.permanent:
            raise
        log.warning("cannot reach a dependency; starting without it", **failure.fields())
    return todo
