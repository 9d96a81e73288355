"""`inventory-worker history` and `verify`, run as an operator runs them, on a private database."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from inventory_worker.adapters.redis_cache import StockCache

from ..private_stack import apply, private_settings
from ..support import REPO, free_port, pg, settings_env, uid


@pytest.fixture(scope="module")
def db(settings):
    with private_settings(settings, "audit") as s:
        yield s


def cli(s, *args):
    p = subprocess.run(
        [sys.executable, "-m", "inventory_worker", *args],
        env=settings_env(s),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return p.returncode, p.stdout, p.stderr


def _stock_with_history(s):
    """Two products with a few movements each, cached in Redis as the worker caches them."""
    a, b = uid("AUD"), uid("AUD")
    with pg(s) as cur:
        apply(cur, "stock.adjusted", {"product_id": a, "on_hand": 10})
        apply(cur, "stock.adjusted", {"product_id": b, "delta": 4})
        order = uid("o")
        apply(
            cur,
            "order.placed",
            {
                "order_id": order,
                "lines": [{"product_id": a, "quantity": 3}, {"product_id": b, "quantity": 1}],
            },
        )
        apply(cur, "order.completed", {"order_id": order})
        apply(cur, "order.placed", {"order_id": uid("o"), "lines": [{"product_id": a, "quantity": 2}]})
        cur.execute("SELECT product_figures(p) FROM products p")
        StockCache(s.redis).put_many([r[0] for r in cur.fetchall()])
    return a, b


def test_history_prints_movements_newest_first_with_running_figures(db):
    a, _ = _stock_with_history(db)
    rc, out, err = cli(db, "history", a, "--json")
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [
        (r["reason"], r["on_hand_delta"], r["reserved_delta"], r["on_hand_after"], r["reserved_after"])
        for r in rows
    ] == [
        ("reserve", 0, 2, 7, 2),
        ("commit", -3, -3, 7, 0),
        ("reserve", 0, 3, 10, 3),
        ("adjust", 10, 0, 10, 0),
    ]
    assert rows[0]["id"] > rows[1]["id"] and rows[0]["event_id"]
    rc, out, _ = cli(db, "history", a, "--limit", "2")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 3 and "reserve" in lines[1] and "commit" in lines[2]
    assert cli(db, "history", uid("NOPE"))[0] == 1
    assert cli(db, "history", "not a product id")[0] == 2


def test_verify_is_silent_on_a_clean_state_and_catches_corruption(db):
    a, b = _stock_with_history(db)
    rc, out, err = cli(db, "verify")
    assert (rc, out) == (0, ""), err
    assert "0 mismatches" in err

    cache = StockCache(db.redis)
    with pg(db) as cur:
        # A figure changed by hand, outside the ledger: both on_hand and reserved of `a`.
        cur.execute(
            "UPDATE products SET on_hand = on_hand + 5, reserved = reserved + 1 WHERE product_id = %s", (a,)
        )
        # A stale cache entry: `b` moves on in PostgreSQL, Redis keeps its older figures.
        stale = cache.client.get(cache.key(b))
        apply(cur, "stock.adjusted", {"product_id": b, "delta": 1})
    assert json.loads(cache.client.get(cache.key(b))) == json.loads(stale)
    orphan = uid("GONE")
    cache.client.set(
        cache.key(orphan), b'{"version":1,"product_id":"x","on_hand":1,"reserved":0,"available":1}'
    )
    try:
        rc, out, err = cli(db, "verify", "--settle", "0.2", "--json")
        assert rc == 1, err
        found = sorted(
            (m["product_id"], m["check"], m["detail"].get("figure"))
            for m in map(json.loads, out.splitlines())
        )
        assert found == sorted(
            [
                (a, "ledger", "on_hand"),
                (a, "ledger", "reserved"),
                (a, "reservations", "reserved"),
                (a, "cache", None),
                (b, "cache", None),
                (orphan, "cache", None),
            ]
        )
        rc, out, _ = cli(db, "verify", "--settle", "0")
        assert rc == 1
        assert f"{a}: [ledger] on_hand is 12 in products, but the ledger sums to 7" in out.splitlines()
        assert (
            f"{a}: [reservations] reserved is 3 in products, but active reservations hold 2"
            in out.splitlines()
        )
    finally:
        cache.client.delete(cache.key(orphan))
        with pg(db) as cur:
            cur.execute(
                "UPDATE products SET on_hand = on_hand - 5, reserved = reserved - 1 WHERE product_id = %s",
                (a,),
            )
            cur.execute("SELECT product_figures(p) FROM products p WHERE product_id IN (%s, %s)", (a, b))
            figures = [r[0] for r in cur.fetchall()]
        for f in figures:  # the versions moved on: put_many refreshes both entries
            cache.client.delete(cache.key(f["product_id"]))
        cache.put_many(figures)
    assert cli(db, "verify")[0] == 0


def test_verify_says_when_it_could_not_check_the_cache(db):
    unreachable = db.model_copy(update={"redis": db.redis.model_copy(update={"port": free_port()})})
    rc, out, err = cli(unreachable, "verify", "--settle", "0")
    assert rc == 1 and out == ""
    assert "the Redis cache was not checked" in err
