"""The stored procedures check their own arguments: malformed data handed straight to
apply_event (past the Python contract) is refused and leaves stock, ledger and idempotency
table untouched."""

from __future__ import annotations

import json
import re
import uuid

import psycopg2
import psycopg2.errors
import pytest

from ..support import pg, uid


@pytest.fixture(scope="module")
def sku(settings) -> str:
    p = uid("SKU")
    with pg(settings) as cur:
        cur.execute(
            "SELECT apply_event(%s, 'stock.adjusted', %s::jsonb)",
            (str(uuid.uuid4()), json.dumps({"product_id": p, "delta": 10})),
        )
    return p


def state(settings, product_id: str) -> tuple:
    with pg(settings) as cur:
        cur.execute(
            "SELECT on_hand, reserved, low_stock_threshold, version FROM products WHERE product_id = %s",
            (product_id,),
        )
        row = cur.fetchone()
        cur.execute("SELECT count(*) FROM stock_movements WHERE product_id = %s", (product_id,))
        return row, cur.fetchone()[0]


BAD = [
    ("order.placed", lambda p: {"order_id": "o", "lines": [{"product_id": p, "quantity": "5"}]}),
    ("order.placed", lambda p: {"order_id": "o", "lines": [{"product_id": p, "quantity": 2.5}]}),
    ("order.placed", lambda p: {"order_id": "o", "lines": [{"product_id": p, "quantity": 0}]}),
    ("order.placed", lambda p: {"order_id": "o", "lines": [{"product_id": p, "quantity": 1000001}]}),
    ("order.placed", lambda p: {"order_id": "o", "lines": [{"product_id": p, "quantity": 1, "price": 3}]}),
    ("order.placed", lambda p: {"order_id": "o", "lines": [{"product_id": p, "quantity": 1}] * 2}),
    ("order.placed", lambda p: {"order_id": "o", "lines": []}),
    (
        "order.placed",
        lambda p: {
            "order_id": "o",
            "lines": [{"product_id": p, "quantity": 1}]
            + [{"product_id": f"x{i}", "quantity": 1} for i in range(100)],
        },
    ),
    ("order.placed", lambda p: {"order_id": 7, "lines": [{"product_id": p, "quantity": 1}]}),
    ("order.placed", lambda p: {"order_id": "", "lines": [{"product_id": p, "quantity": 1}]}),
    ("order.placed", lambda p: {"order_id": "o" * 201, "lines": [{"product_id": p, "quantity": 1}]}),
    (
        "order.placed",
        lambda p: {
            "order_id": "o",
            "lines": [{"product_id": p, "quantity": 1}],
            "reservation_ttl_seconds": -1,
        },
    ),
    ("order.placed", lambda p: {"order_id": "o", "lines": [{"product_id": p + "'; --", "quantity": 1}]}),
    ("order.placed", lambda p: {"order_id": "o", "lines": {"product_id": p, "quantity": 1}}),
    ("order.cancelled", lambda p: {"order_id": ["o"]}),
    ("order.completed", lambda p: {"order_id": "o", "extra": 1}),
    ("stock.adjusted", lambda p: {"product_id": p, "delta": "5"}),
    ("stock.adjusted", lambda p: {"product_id": p, "delta": 1e3}),
    ("stock.adjusted", lambda p: {"product_id": p, "delta": 10**10}),
    ("stock.adjusted", lambda p: {"product_id": p, "on_hand": -1}),
    ("stock.adjusted", lambda p: {"product_id": p, "delta": 1, "on_hand": 5}),
    ("stock.adjusted", lambda p: {"product_id": p}),
    ("stock.adjusted", lambda p: {"product_id": p, "delta": 1, "reason": "r" * 501}),
    ("stock.adjusted", lambda p: {"product_id": p, "delta": 1, "low_stock_threshold": -3}),
    ("stock.adjusted", lambda p: {"product_id": p, "delta": 1, "note": "x"}),
    ("stock.adjusted", lambda p: {"product_id": [p], "delta": 1}),
    ("reservation.extended", lambda p: {"order_id": "o"}),
    ("reservation.extended", lambda p: {"order_id": "o", "extend_by_seconds": 60, "until_fulfilled": True}),
    ("reservation.extended", lambda p: {"order_id": "o", "extend_by_seconds": 0}),
    ("reservation.extended", lambda p: {"order_id": "o", "extend_by_seconds": "60"}),
    ("reservation.extended", lambda p: {"order_id": "o", "until_fulfilled": False}),
    ("reservation.extended", lambda p: {"order_id": "o", "until_fulfilled": 1}),
    ("reservation.extended", lambda p: {"order_id": "", "until_fulfilled": True}),
    ("reservation.extended", lambda p: {"order_id": "o", "until_fulfilled": True, "note": 1}),
    ("order.fulfilled", lambda p: {"order_id": "o", "lines": [{"product_id": p, "quantity": 1}]}),
    (
        "order.fulfilled",
        lambda p: {"order_id": "o", "fulfilment_id": "", "lines": [{"product_id": p, "quantity": 1}]},
    ),
    ("order.fulfilled", lambda p: {"order_id": "o", "fulfilment_id": "f", "lines": []}),
    (
        "order.fulfilled",
        lambda p: {"order_id": "o", "fulfilment_id": "f", "lines": [{"product_id": p, "quantity": 0}]},
    ),
    (
        "order.fulfilled",
        lambda p: {
            "order_id": "o",
            "fulfilment_id": "f",
            "lines": [{"product_id": p, "quantity": 1, "location_id": "a b"}],
        },
    ),
    (
        "order.fulfilled",
        lambda p: {"order_id": "o", "fulfilment_id": "f", "lines": [{"product_id": p, "quantity": 1}] * 2},
    ),
    (
        "order.fulfilled",
        lambda p: {
            "order_id": "o",
            "fulfilment_id": "f",
            "x": 1,
            "lines": [{"product_id": p, "quantity": 1}],
        },
    ),
    ("order.cancelled", lambda p: {"order_id": "o", "lines": []}),
    ("order.cancelled", lambda p: {"order_id": "o", "lines": [{"product_id": p, "quantity": 0}]}),
    ("order.cancelled", lambda p: {"order_id": "o", "lines": [{"product_id": p, "quantity": 1}] * 2}),
    (
        "order.cancelled",
        lambda p: {"order_id": "o", "lines": [{"product_id": p, "quantity": 1, "location_id": "s"}]},
    ),
    ("order.cancelled", lambda p: {"order_id": "o", "lines": [{"product_id": p, "quantity": 1}], "x": 1}),
    (
        "order.returned",
        lambda p: {"order_id": "o", "lines": [{"product_id": p, "quantity": 1, "condition": "sellable"}]},
    ),
    (
        "order.returned",
        lambda p: {"order_id": "o", "return_id": "r", "lines": [{"product_id": p, "quantity": 1}]},
    ),
    (
        "order.returned",
        lambda p: {
            "order_id": "o",
            "return_id": "r",
            "lines": [{"product_id": p, "quantity": 1, "condition": "lost"}],
        },
    ),
    (
        "order.returned",
        lambda p: {
            "order_id": "o",
            "return_id": "r",
            "lines": [{"product_id": p, "quantity": 1, "condition": "sellable"}] * 2,
        },
    ),
    ("order.returned", lambda p: {"order_id": "o", "return_id": "r", "lines": []}),
    # the lines of a partial cancel and of a transfer (json_product_lines)
    ("order.cancelled", lambda p: {"order_id": "o", "lines": []}),
    ("order.cancelled", lambda p: {"order_id": "o", "lines": {"product_id": p, "quantity": 1}}),
    ("order.cancelled", lambda p: {"order_id": "o", "lines": [{"product_id": p, "quantity": 1}] * 2}),
    ("order.cancelled", lambda p: {"order_id": "o", "lines": [{"product_id": p, "quantity": 1000001}]}),
    ("order.cancelled", lambda p: {"order_id": "o", "lines": [{"product_id": p, "quantity": 1, "x": 1}]}),
    (
        "order.cancelled",
        lambda p: {"order_id": "o", "lines": [{"product_id": f"{p}-{i}", "quantity": 1} for i in range(101)]},
    ),
    ("order.cancelled", lambda p: {"order_id": "o", "lines": [7]}),
    (
        "stock.transferred",
        lambda p: {
            "transfer_id": "t",
            "from_location_id": "a",
            "to_location_id": "b",
            "lines": [{"product_id": p, "quantity": 1000000001}],
        },
    ),
    (
        "stock.transferred",
        lambda p: {
            "transfer_id": "t",
            "from_location_id": "a",
            "to_location_id": "b",
            "lines": [{"product_id": p, "quantity": 1}] * 2,
        },
    ),
    (
        "stock.transferred",
        lambda p: {"transfer_id": "t", "from_location_id": "a", "to_location_id": "b", "lines": "none"},
    ),
    ("stock.dropped", lambda p: {"product_id": p, "delta": 1}),
    (None, lambda p: {"product_id": p, "delta": 1}),
]


@pytest.mark.parametrize("type_,make", BAD, ids=[f"{t}-{i}" for i, (t, _) in enumerate(BAD)])
def test_malformed_data_is_refused_and_changes_nothing(settings, sku, type_, make):
    before = state(settings, sku)
    event_id = str(uuid.uuid4())
    with pytest.raises(psycopg2.errors.InvalidParameterValue, match="invalid event"):
        with pg(settings) as cur:
            cur.execute("SELECT apply_event(%s, %s, %s::jsonb)", (event_id, type_, json.dumps(make(sku))))
    assert state(settings, sku) == before
    with pg(settings) as cur:
        cur.execute("SELECT count(*) FROM processed_events WHERE event_id = %s", (event_id,))
        assert cur.fetchone()[0] == 0  # a corrected message with the same id can still be applied


def test_non_object_data_is_refused(settings):
    with pytest.raises(psycopg2.errors.InvalidParameterValue):
        with pg(settings) as cur:
            cur.execute("SELECT apply_event(%s, 'order.cancelled', '[1]'::jsonb)", (str(uuid.uuid4()),))


def test_the_checks_let_every_valid_form_through(settings, sku):
    order = uid("O")
    with pg(settings) as cur:
        for type_, data in [
            (
                "stock.adjusted",
                {"product_id": sku, "on_hand": 12, "reason": "count", "low_stock_threshold": 2},
            ),
            (
                "order.placed",
                {
                    "order_id": order,
                    "lines": [{"product_id": sku, "quantity": 3}],
                    "reservation_ttl_seconds": 60,
                },
            ),
            ("order.completed", {"order_id": order}),
            ("order.cancelled", {"order_id": uid("O")}),
        ]:
            cur.execute(
                "SELECT apply_event(%s, %s, %s::jsonb)->>'outcome'",
                (str(uuid.uuid4()), type_, json.dumps(data)),
            )
            assert cur.fetchone()[0] in ("adjusted", "reserved", "committed", "cancel_recorded")
    assert state(settings, sku)[0][:2] == (9, 0)


def test_products_and_orders_with_history_cannot_be_deleted(settings):
    """No foreign keys on the per-event tables (they cost a check per row); triggers keep a
    product with ledger rows, and an order with lines, from being deleted from under them."""
    p, o = uid("SKU"), uid("O")
    with pg(settings) as cur:
        cur.execute(
            "SELECT apply_event(%s, 'stock.adjusted', %s::jsonb)",
            (str(uuid.uuid4()), json.dumps({"product_id": p, "delta": 3})),
        )
        cur.execute(
            "SELECT apply_event(%s, 'order.placed', %s::jsonb)->>'outcome'",
            (str(uuid.uuid4()), json.dumps({"order_id": o, "lines": [{"product_id": p, "quantity": 1}]})),
        )
        assert cur.fetchone()[0] == "reserved"
    for table, key, value in (("products", "product_id", p), ("orders", "order_id", o)):
        with pytest.raises(psycopg2.errors.ForeignKeyViolation):
            with pg(settings) as cur:
                cur.execute(f"DELETE FROM {table} WHERE {key} = %s", (value,))
    with pg(settings) as cur:  # still there, and a product without history can go
        cur.execute("SELECT count(*) FROM products WHERE product_id = %s", (p,))
        assert cur.fetchone()[0] == 1
        cur.execute("INSERT INTO products (product_id) VALUES (%s)", (bare := uid("SKU"),))
        cur.execute("DELETE FROM products WHERE product_id = %s", (bare,))
        assert cur.rowcount == 1


# Ids and integers at the rules' edges. The checks are written without bounded regex
# repetitions (checks.sql, migration 095: ten times cheaper); they must accept and refuse
# exactly what the rules as written in the contract, with {1,64} and {1,19}, do.
IDS = ["", "a", "a" * 64, "a" * 65, "A-z.0_9:x", "a b", "é", "a\n", "\na", "a$", "a" * 63 + "é", "-", None]
NUMBERS = ["1", "-5", "0", "1.0", "1e3", "2.5", "9" * 19, "9" * 20, "-" + "9" * 19, '"5"', "true", "null"]


def test_id_and_integer_checks_match_the_contract_rules(settings):
    with pg(settings) as cur:
        for x in IDS:
            cur.execute("SELECT valid_product_id(%s), %s ~ '^[A-Za-z0-9._:-]{1,64}$'", (x, x))
            assert cur.fetchone() in ((True, True), (False, False), (None, None)), x
        for n in NUMBERS:
            cur.execute(
                "SELECT json_int_between(%s::jsonb, -1e30, 1e30),"
                " coalesce(jsonb_typeof(%s::jsonb) = 'number' AND %s::jsonb::text ~ '^-?[0-9]{1,19}$', false)",
                (n, n, n),
            )
            got, rule = cur.fetchone()
            assert got == rule, n


@pytest.mark.parametrize(
    "table, column", [("products", "product_id"), ("locations", "location_id"), ("channels", "channel_id")]
)
def test_tables_refuse_the_ids_the_rule_refuses(settings, table, column):
    for x in IDS[:-1]:
        ok = re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", x) is not None
        try:
            with pg(settings) as cur:
                cur.execute(f"INSERT INTO {table} ({column}) VALUES (%s)", (x,))
                cur.execute(f"DELETE FROM {table} WHERE {column} = %s", (x,))
        except psycopg2.errors.CheckViolation:
            assert not ok, x
        else:
            assert ok, x
