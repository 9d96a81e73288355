"""PostgreSQL adapter: calls the stored procedures; holds no stock rules of its own.

Errors are sorted in two kinds, because the consumer treats them differently:
- TransientError: the connection dropped, a deadlock or serialization failure, the server
  restarting. The same work is retried (after reconnecting); nothing is lost.
- PermanentError: the database refuses this data (an argument check or a constraint). Retrying
  cannot help; the offending message is dead-lettered.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import orjson
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

from inventory_worker.config import DatabaseSettings
from inventory_worker.contract import Figures, Outcome, OutgoingMessage

# Leader election for the per-cluster singletons (expiry sweeper).
SWEEPER_LOCK_KEY = 0x1A7E_0002


class TransientError(Exception):
    """Retry the same work later; it may succeed."""


class PermanentError(Exception):
    """The data itself is refused; retrying cannot succeed."""


def one_row(cur: psycopg2.extensions.cursor) -> tuple[Any, ...]:
    """The row of a statement that always returns one (a function call, an aggregate)."""
    row = cur.fetchone()
    assert row is not None, "the statement returned no row"
    return row


# A server that cannot take writes: a standby (a demoted primary, or one that libpq reached
# before target_session_attrs could say), or one set read-only. Retrying on the same connection
# can never succeed; a new one finds the primary (DatabaseSettings.hosts).
READ_ONLY_SQLSTATES = frozenset(
    {
        "25006",  # read_only_sql_transaction: "cannot execute X in a read-only transaction"
        "57P03",  # cannot_connect_now: the server is starting up or in recovery
    }
)


def read_only_server(exc: psycopg2.Error) -> bool:
    """Whether the error says this server does not take writes (now), e.g. a standby."""
    if exc.pgcode in READ_ONLY_SQLSTATES:
        return True
    # Functions refused during recovery (pg_try_advisory_lock, ...) say so in their message
    # under a generic SQLSTATE (55000 object_not_in_prerequisite_state).
    return "recovery is in progress" in (exc.pgerror or str(exc))


def _classify(exc: psycopg2.Error) -> Exception:
    if isinstance(exc, (psycopg2.DataError, psycopg2.IntegrityError)):
        return PermanentError(f"{type(exc).__name__}: {exc.pgerror or exc}".strip())
    return TransientError(f"{type(exc).__name__}: {(exc.pgerror or str(exc)).strip()}")


class Store:
    def __init__(
        self,
        settings: DatabaseSettings,
        default_ttl_seconds: int = 900,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.default_ttl_seconds = default_ttl_seconds
        # Worker settings apply_events() passes on to the procedures (p_options); a key left
        # out takes the procedures' default (the setting's default).
        self.options = orjson.dumps(options or {}).decode()
        self._conn: psycopg2.extensions.connection | None = None
        self._leader_conn: psycopg2.extensions.connection | None = None  # holds the sweeper lock

    # -- connection -------------------------------------------------------------------------

    def connect(self) -> psycopg2.extensions.connection:
        if self._conn is None or self._conn.closed:
            try:
                conn = psycopg2.connect(**self.settings.dsn())
                # No implicit BEGIN: `transaction()` still opens one explicitly (psycopg2 >= 2.9
                # does so on autocommit connections too); `_statement()` needs none.
                conn.autocommit = True
                psycopg2.extras.register_default_jsonb(conn, loads=orjson.loads)
                psycopg2.extras.register_default_json(conn, loads=orjson.loads)
                self._conn = conn
            except psycopg2.Error as exc:
                raise TransientError(f"cannot connect to PostgreSQL: {str(exc).strip()}") from exc
        return self._conn

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None

    @contextmanager
    def transaction(self) -> Iterator[psycopg2.extensions.cursor]:
        """One transaction; errors come out as TransientError or PermanentError."""
        with self._cursor(in_transaction=True) as cur:
            yield cur

    @contextmanager
    def _statement(self) -> Iterator[psycopg2.extensions.cursor]:
        """A cursor for ONE execute() that is its own transaction, in one round trip.

        PostgreSQL runs the statements of one simple-query message (psycopg2 sends one per
        execute) as a single transaction and commits it before it answers: all of them or none,
        without the two extra round trips of BEGIN and COMMIT that `transaction()` pays.
        """
        with self._cursor(in_transaction=False) as cur:
            yield cur

    @contextmanager
    def _cursor(self, in_transaction: bool) -> Iterator[psycopg2.extensions.cursor]:
        """A cursor (inside BEGIN ... COMMIT/ROLLBACK if asked); psycopg2's errors come out
        sorted, and a connection that closed is dropped, to be made anew."""
        conn = self.connect()
        try:
            with conn if in_transaction else nullcontext(), conn.cursor() as cur:
                yield cur
        except psycopg2.Error as exc:
            if read_only_server(exc) and not conn.closed:
                # Never used again for writes: the next connect asks libpq for a primary.
                conn.close()
            if conn.closed:
                self._conn = None
            raise _classify(exc) from exc
        except BaseException:
            if conn.closed:
                self._conn = None
            raise

    # -- events -----------------------------------------------------------------------------

    def apply_batch(
        self, events: Sequence[dict[str, Any]], mark_published: Sequence[int] = ()
    ) -> list[Outcome]:
        """Applies the events (each {"id", "type", "data"}) in one transaction, in order.

        `mark_published` lets the caller fold the previous batch's confirmed outbox ids into
        this same commit instead of paying for a transaction of their own.
        """
        with self._statement() as cur:
            # One round trip and one transaction: both statements in one message (the result
            # is the last one's).
            cur.execute(
                ("SELECT mark_published(%s); " if mark_published else "")
                + "SELECT apply_events(%s::jsonb, %s, %s::jsonb)",
                ((list(mark_published),) if mark_published else ())
                + (orjson.dumps(list(events)).decode(), self.default_ttl_seconds, self.options),
            )
            results = one_row(cur)[0]
        return [Outcome.from_json(r) for r in results]

    def mark_published(self, outbox_ids: Sequence[int]) -> None:
        if not outbox_ids:
            return
        with self.transaction() as cur:
            cur.execute("SELECT mark_published(%s)", (list(outbox_ids),))

    def note_delivery_attempts(self, event_ids: Sequence[str]) -> dict[str, int]:
        """Counts one more attempt to apply each (redelivered) message; committed at once."""
        with self.transaction() as cur:
            cur.execute(
                "SELECT event_id, attempts FROM note_delivery_attempts(%s::uuid[])", (list(event_ids),)
            )
            return {str(r[0]): int(r[1]) for r in cur.fetchall()}

    def forget_delivery_attempts(self, event_ids: Sequence[str]) -> None:
        with self.transaction() as cur:
            cur.execute("SELECT forget_delivery_attempts(%s::uuid[])", (list(event_ids),))

    @contextmanager
    def claim_unpublished(self, min_age_seconds: float, limit: int) -> Iterator[list[OutgoingMessage]]:
        """Outbox rows left unpublished, locked (other relays skip them) until the block ends.

        The block publishes them; if it returns normally they are marked published, if it
        raises they are released for the next try.
        """
        with self.transaction() as cur:
            cur.execute(
                "SELECT id, message_id, routing_key, body"
                "  FROM claim_unpublished(make_interval(secs => %s), %s)",
                (min_age_seconds, limit),
            )
            rows = [OutgoingMessage(r[0], str(r[1]), r[2], r[3]) for r in cur.fetchall()]
            yield rows
            if rows:
                cur.execute("SELECT mark_published(%s)", ([m.outbox_id for m in rows],))

    def expire_reservations(self, limit: int) -> tuple[int, int, list[OutgoingMessage], list[Figures]]:
        """One sweep batch: (expired, candidates seen, messages, figures after)."""
        with self.transaction() as cur:
            cur.execute("SELECT expire_reservations(%s)", (limit,))
            r = one_row(cur)[0]
        return (
            int(r["expired"]),
            int(r["candidates"]),
            [OutgoingMessage.from_json(m) for m in r["messages"]],
            list(r["products"]),
        )

    def recache_locations(self, limit: int) -> tuple[int, bool, list[OutgoingMessage], list[Figures]]:
        """One re-cache batch after a location flip: (products, more due, messages, figures after)."""
        with self.transaction() as cur:
            cur.execute("SELECT recache_locations(%s)", (limit,))
            r = one_row(cur)[0]
        return (
            int(r["count"]),
            bool(r["more"]),
            [OutgoingMessage.from_json(m) for m in r["messages"]],
            list(r["products"]),
        )

    def fill_backorders(
        self, products: int, per_product: int, after: str = ""
    ) -> tuple[int, list[OutgoingMessage], list[Figures], str]:
        """The sweeper's backorder fill pass (fill_backorder_pass() in sql/procedures/backorders.sql)
        over products after `after`, wrapping round: (orders filled, messages, figures after,
        the cursor to pass as `after` next time)."""
        with self.transaction() as cur:
            cur.execute("SELECT fill_backorder_pass(%s, %s, %s)", (products, per_product, after))
            r = one_row(cur)[0]
        return (
            int(r["filled"]),
            [OutgoingMessage.from_json(m) for m in r["messages"]],
            list(r["products"]),
            str(r["cursor"]),
        )

    # -- leadership -------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """Whether this store's session holds the sweeper lock (taken by `try_lead`)."""
        conn = self._conn
        return conn is not None and not conn.closed and conn is self._leader_conn

    def try_lead(self) -> bool:
        """Takes the sweeper's session advisory lock unless another session holds it.

        The lock lives as long as this store's connection: a connection that drops (and is
        made anew) no longer leads, and must take the lock again.
        """
        if self.is_leader:
            return True
        with self.transaction() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (SWEEPER_LOCK_KEY,))
            got: bool = one_row(cur)[0]
            if got:
                # Session settings, kept after commit: operators (and tests) find the holder in
                # pg_stat_activity; if its host vanishes without closing the socket, the server
                # drops the session, and with it the lock, after about 5 + 2 * 3 seconds.
                cur.execute(
                    "SELECT set_config('application_name', %s, false),"
                    "       set_config('tcp_keepalives_idle', '5', false),"
                    "       set_config('tcp_keepalives_interval', '2', false),"
                    "       set_config('tcp_keepalives_count', '3', false),"
                    "       set_config('tcp_user_timeout', '10000', false)",
                    (f"inventory-worker sweeper {socket.gethostname()} pid={os.getpid()}"[:63],),
                )
        if got:
            self._leader_conn = self._conn
        return got

    # -- operator tools ---------------------------------------------------------------------

    def history(self, product_id: str, limit: int) -> list[dict[str, Any]]:
        """The product's movements, newest first, with the ledger's figures after each."""
        with self.transaction() as cur:
            cur.execute("SELECT * FROM stock_history(%s, %s)", (product_id, limit))
            assert cur.description is not None  # a SELECT has columns
            names = [c.name for c in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def mismatches(self) -> list[tuple[str, str, int, int, str]]:
        """(product_id, figure, recorded, expected, source) of every figure that its ledger
        (source "ledger") or its active reservations ("reservations") do not explain."""
        with self.transaction() as cur:
            cur.execute("SELECT product_id, figure, recorded, expected, source FROM stock_mismatches()")
            return [(r[0], r[1], r[2], r[3], r[4]) for r in cur.fetchall()]

    def product_count(self) -> int:
        with self.transaction() as cur:
            cur.execute("SELECT count(*) FROM products")
            return int(one_row(cur)[0])

    def figures_page(self, after: str, limit: int) -> list[Figures]:
        """The figures of up to `limit` products whose id sorts after `after`, in id order."""
        with self.transaction() as cur:
            cur.execute(
                "SELECT product_figures(p) FROM products p"
                "  WHERE product_id > %s ORDER BY product_id LIMIT %s",
                (after, limit),
            )
            return [r[0] for r in cur.fetchall()]

    def prune_batch(self, outbox_age_seconds: float, events_age_seconds: float, limit: int) -> dict[str, int]:
        """One housekeeping transaction: deletes at most `limit` published outbox rows and
        `limit` idempotency keys older than the ages; returns how many of each."""
        with self.transaction() as cur:
            cur.execute(
                "SELECT prune_housekeeping(make_interval(secs => %s), make_interval(secs => %s), %s)",
                (outbox_age_seconds, events_age_seconds, limit),
            )
            done = one_row(cur)[0]
        return {"outbox": int(done["outbox"]), "processed_events": int(done["processed_events"])}

    # -- reads ------------------------------------------------------------------------------

    def stock(self, product_id: str) -> Figures | None:
        with self.transaction() as cur:
            cur.execute("SELECT product_figures(p) FROM products p WHERE product_id = %s", (product_id,))
            row = cur.fetchone()
        return row[0] if row else None

    def product_detail(self, product_id: str) -> dict[str, Any] | None:
        """The detail document of GET /inventory/{id}/detail without its `channel` part
        (product_detail() in sql/procedures/stock.sql); None for an unknown product."""
        with self._statement() as cur:
            cur.execute("SELECT product_detail(%s)", (product_id,))
            detail: dict[str, Any] | None = one_row(cur)[0]
        return detail

    def channel(self, channel_id: str) -> dict[str, Any] | None:
        """A channel's configuration {channel_id, strategy, locations (null: the default rule)};
        None for an unknown channel."""
        with self._statement() as cur:
            cur.execute(
                "SELECT channel_id, strategy, locations FROM channels WHERE channel_id = %s", (channel_id,)
            )
            row = cur.fetchone()
        return {"channel_id": row[0], "strategy": row[1], "locations": row[2]} if row else None

    def locations_and_channels(self) -> list[dict[str, Any]]:
        """Every location (by priority, location_id) then every channel (by channel_id)."""
        with self.transaction() as cur:
            cur.execute(
                "SELECT location_id, name, priority, active, fulfils_orders FROM locations"
                " ORDER BY priority, location_id"
            )
            out: list[dict[str, Any]] = [
                {
                    "kind": "location",
                    "location_id": r[0],
                    "name": r[1],
                    "priority": r[2],
                    "active": r[3],
                    "fulfils_orders": r[4],
                }
                for r in cur.fetchall()
            ]
            cur.execute("SELECT channel_id, strategy, locations FROM channels ORDER BY channel_id")
            out += [
                {"kind": "channel", "channel_id": r[0], "strategy": r[1], "locations": r[2]}
                for r in cur.fetchall()
            ]
        return out

    def figures(self, product_ids: Sequence[str]) -> list[Figures]:
        with self.transaction() as cur:
            cur.execute(
                "SELECT product_figures(p) FROM products p WHERE product_id = ANY(%s)", (list(product_ids),)
            )
            return [r[0] for r in cur.fetchall()]

    def operational_figures(self) -> dict[str, float]:
        """Cluster-wide figures for the gauges; each walks a small partial index (live orders:
        orders_live_expiry, which holds the NULL deadlines too; products_backordered)."""
        with self.transaction() as cur:
            cur.execute(
                "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)"
                "  FROM outbox WHERE published_at IS NULL"
            )
            backlog, oldest = one_row(cur)
            cur.execute(
                "SELECT count(*), count(*) FILTER (WHERE expires_at IS NULL)"
                "  FROM orders WHERE status = 'reserved'"
            )
            reservations, until_fulfilled = one_row(cur)
            cur.execute("SELECT coalesce(sum(backordered), 0) FROM products WHERE backordered > 0")
            (backordered,) = one_row(cur)
        return {
            "outbox_backlog": int(backlog),
            "outbox_oldest_age_seconds": float(oldest),
            "active_reservations": int(reservations),
            "holds_until_fulfilled": int(until_fulfilled),
            "backordered_units": int(backordered),
        }

    def ping(self) -> None:
        with self.transaction() as cur:
            cur.execute("SELECT 1")
