"""The input contract (docs/contract.md, "Input"): what parse_event accepts and refuses.

A refused body is dead-lettered by the worker with the InvalidMessage text as its reason, so
the reasons are asserted too: an operator reads them in the x-inventory-error header.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from inventory_worker.contract import InvalidMessage, make_event, parse_event, validate_output


def body(type_: str, data_: Any, **envelope: Any) -> bytes:
    doc = {"id": str(uuid.uuid4()), "type": type_, "occurred_at": "2026-11-25T10:00:00.123Z", "data": data_}
    doc.update(envelope)
    return json.dumps(doc).encode()


def placed(lines: Any, **extra: Any) -> bytes:
    return body("order.placed", {"order_id": "o-1", "lines": lines, **extra})


def refused(raw: bytes, routing_key: str | None = None, max_bytes: int | None = None) -> str:
    with pytest.raises(InvalidMessage) as exc:
        parse_event(raw, routing_key, max_bytes)
    return str(exc.value)


# ---- product id -----------------------------------------------------------------------------


@pytest.mark.parametrize("pid", ["A", "SKU-1", "a.b:c_d-E9", "x" * 64, "0", "..", "-:_."])
def test_product_id_accepted(pid):
    ev = parse_event(body("stock.adjusted", {"product_id": pid, "delta": 1}), "stock.adjusted")
    assert ev.data == {"product_id": pid, "delta": 1}
    ev = parse_event(placed([{"product_id": pid, "quantity": 1}]))
    assert ev.data["lines"] == [{"product_id": pid, "quantity": 1}]


@pytest.mark.parametrize(
    "pid",
    ["", "x" * 65, "SKU 1", "SKU/1", "SKU\n", "\nSKU", "ÄPFEL", "SKU%2F", "a*b", "SKU\u00001", 12, None],
)
def test_product_id_refused(pid):
    assert "data.product_id" in refused(body("stock.adjusted", {"product_id": pid, "delta": 1}))
    assert "data.lines.0.product_id" in refused(placed([{"product_id": pid, "quantity": 1}]))


# ---- quantity: a JSON integer from 1 to 1,000,000 ----------------------------------------------


@pytest.mark.parametrize("q", [1, 2, 999_999, 1_000_000])
def test_quantity_in_range(q):
    assert parse_event(placed([{"product_id": "A", "quantity": q}])).data["lines"][0]["quantity"] == q


@pytest.mark.parametrize("q", [0, -1, 1_000_001, 10**12])
def test_quantity_out_of_range(q):
    assert "data.lines.0.quantity" in refused(placed([{"product_id": "A", "quantity": q}]))


@pytest.mark.parametrize("q", [1.0, 1.5, "1", True, None, [1], {"n": 1}])
def test_quantity_must_be_a_json_integer(q):
    assert "data.lines.0.quantity" in refused(placed([{"product_id": "A", "quantity": q}]))


def test_quantity_written_as_exponent_is_a_float_and_refused():
    raw = placed([{"product_id": "A", "quantity": 1}]).replace(b'"quantity": 1', b'"quantity": 1e3')
    assert b"1e3" in raw
    assert "data.lines.0.quantity" in refused(raw)


# ---- lines --------------------------------------------------------------------------------------


def test_one_to_a_hundred_lines():
    lines = [{"product_id": f"P{i}", "quantity": 1} for i in range(100)]
    assert len(parse_event(placed(lines)).data["lines"]) == 100
    assert "data.lines" in refused(placed(lines + [{"product_id": "P100", "quantity": 1}]))
    assert "data.lines" in refused(placed([]))
    assert "data.lines" in refused(body("order.placed", {"order_id": "o-1"}))
    assert "data.lines" in refused(placed({"product_id": "A", "quantity": 1}))


def test_lines_keep_their_order():
    lines = [{"product_id": p, "quantity": i + 1} for i, p in enumerate(["C", "A", "B"])]
    assert parse_event(placed(lines)).data["lines"] == lines


def test_same_product_twice_in_one_order():
    reason = refused(placed([{"product_id": "A", "quantity": 1}, {"product_id": "B", "quantity": 1},
                             {"product_id": "A", "quantity": 2}]))
    assert "data.lines" in reason and "A appears twice" in reason


def test_product_ids_differing_in_case_are_different_products():
    ev = parse_event(placed([{"product_id": "a", "quantity": 1}, {"product_id": "A", "quantity": 1}]))
    assert [line["product_id"] for line in ev.data["lines"]] == ["a", "A"]


@pytest.mark.parametrize("ttl,ok", [(1, True), (31_536_000, True), (0, False), (31_536_001, False),
                                    (1.5, False), ("60", False)])
def test_reservation_ttl(ttl, ok):
    raw = placed([{"product_id": "A", "quantity": 1}], reservation_ttl_seconds=ttl)
    if ok:
        assert parse_event(raw).data["reservation_ttl_seconds"] == ttl
    else:
        assert "data.reservation_ttl_seconds" in refused(raw)


def test_optional_fields_left_out_are_not_sent_to_the_store_as_null():
    ev = parse_event(placed([{"product_id": "A", "quantity": 1}], reservation_ttl_seconds=None))
    assert ev.for_store()["data"] == {"order_id": "o-1", "lines": [{"product_id": "A", "quantity": 1}]}


# ---- order id -------------------------------------------------------------------------------------


@pytest.mark.parametrize("oid,ok", [("o", True), ("x" * 200, True), ("order 7/ä", True), ("", False),
                                    ("x" * 201, False), (7, False), (None, False)])
def test_order_id(oid, ok):
    for type_ in ("order.cancelled", "order.completed"):
        raw = body(type_, {"order_id": oid})
        if ok:
            assert parse_event(raw, type_).data == {"order_id": oid}
        else:
            assert "data.order_id" in refused(raw, type_)


# ---- stock.adjusted -----------------------------------------------------------------------------


def test_adjustment_needs_exactly_one_of_delta_and_on_hand():
    ok1 = parse_event(body("stock.adjusted", {"product_id": "A", "delta": -3, "reason": "broken",
                                              "low_stock_threshold": 2}))
    assert ok1.data == {"product_id": "A", "delta": -3, "reason": "broken", "low_stock_threshold": 2}
    assert parse_event(body("stock.adjusted", {"product_id": "A", "on_hand": 0})).data["on_hand"] == 0
    assert "exactly one" in refused(body("stock.adjusted", {"product_id": "A", "delta": 1, "on_hand": 1}))
    assert "exactly one" in refused(body("stock.adjusted", {"product_id": "A"}))
    assert "data.on_hand" in refused(body("stock.adjusted", {"product_id": "A", "on_hand": -1}))
    assert "data.delta" in refused(body("stock.adjusted", {"product_id": "A", "delta": 2.0}))
    assert "data.low_stock_threshold" in refused(
        body("stock.adjusted", {"product_id": "A", "delta": 1, "low_stock_threshold": -1}))


# ---- unknown fields, envelope --------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,where",
    [
        (body("stock.adjusted", {"product_id": "A", "delta": 1}, priority=1), "priority"),
        (body("stock.adjusted", {"product_id": "A", "delta": 1, "warehouse": "W1"}), "data.warehouse"),
        (placed([{"product_id": "A", "quantity": 1, "price": 3}]), "data.lines.0.price"),
        (body("order.cancelled", {"order_id": "o", "why": "x"}), "data.why"),
    ],
)
def test_unknown_fields_are_refused(raw, where):
    reason = refused(raw)
    assert where in reason and "Extra inputs are not permitted" in reason


@pytest.mark.parametrize(
    "change,where",
    [
        ({"id": "not-a-uuid"}, "id"),
        ({"id": None}, "id"),
        ({"type": "order.shipped"}, "type"),
        ({"occurred_at": "yesterday"}, "occurred_at"),
        ({"occurred_at": "2026-11-25T10:00:00"}, "occurred_at"),  # RFC 3339 needs the offset
        ({"data": ["order_id"]}, "data"),
    ],
)
def test_envelope_is_checked(change, where):
    assert refused(body("order.cancelled", {"order_id": "o"}, **change)).startswith(where)


def test_envelope_fields_are_required():
    for missing in ("id", "type", "occurred_at", "data"):
        doc = json.loads(body("order.cancelled", {"order_id": "o"}))
        del doc[missing]
        assert missing in refused(json.dumps(doc).encode())


def test_occurred_at_with_any_offset_is_accepted():
    ev = parse_event(body("order.cancelled", {"order_id": "o"}, occurred_at="2026-11-25T12:00:00+02:00"))
    assert ev.occurred_at.utcoffset().total_seconds() == 7200


# ---- routing key, size, not JSON ----------------------------------------------------------------


def test_routing_key_must_match_type():
    raw = body("order.cancelled", {"order_id": "o"})
    assert parse_event(raw, "order.cancelled").type == "order.cancelled"
    reason = refused(raw, "order.completed")
    assert "does not match routing key" in reason and "order.completed" in reason
    assert "does not match" in refused(raw, "")


def test_oversized_body_is_refused_before_parsing():
    raw = body("stock.adjusted", {"product_id": "A", "delta": 1})
    assert parse_event(raw, max_bytes=len(raw)).data["delta"] == 1
    reason = refused(raw, max_bytes=len(raw) - 1)
    assert f"{len(raw)} bytes exceeds the limit of {len(raw) - 1}" in reason
    assert "exceeds the limit" in refused(b"\xff" * 100, max_bytes=10)  # size before JSON


@pytest.mark.parametrize(
    "raw,why",
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b'{"id": NaN}', "not JSON"),  # RFC 8259 has no NaN or Infinity (the json module took them)
        (b'{"data": {"quantity": Infinity}}', "not JSON"),
        (b"[]", "not a JSON object"),
        (b'"order.placed"', "not a JSON object"),
        (b"null", "not a JSON object"),
        (b"42", "not a JSON object"),
    ],
)
def test_not_json_or_not_an_object(raw, why):
    assert why in refused(raw)


def test_id_is_normalised_for_the_store():
    raw = body("order.cancelled", {"order_id": "o"}, id="A1B2C3D4-0000-4000-8000-0000000000AA")
    assert parse_event(raw).for_store()["id"] == "a1b2c3d4-0000-4000-8000-0000000000aa"


# ---- make_event (the publish command) ------------------------------------------------------------


def test_make_event_refuses_what_the_worker_would_dead_letter():
    good = make_event("order.placed", {"order_id": "o", "lines": [{"product_id": "A", "quantity": 2}]})
    assert parse_event(json.dumps(good).encode(), "order.placed").data["lines"][0]["quantity"] == 2
    with pytest.raises(InvalidMessage):
        make_event("order.placed", {"order_id": "o", "lines": [{"product_id": "A", "quantity": 0}]})


# ---- output contract ------------------------------------------------------------------------------


def test_validate_output_checks_envelope_and_data():
    ok = {"id": str(uuid.uuid4()), "type": "inventory.adjusted", "occurred_at": "2026-11-25T10:00:00Z",
          "causation_id": str(uuid.uuid4()),
          "data": {"product_id": "A", "on_hand": 1, "reserved": 0, "available": 1}}
    validate_output(ok)
    for bad in (
        {**ok, "causation_id": None},
        {**ok, "type": "inventory.unknown"},
        {**ok, "data": {**ok["data"], "extra": 1}},
        {**ok, "data": {"product_id": "A", "on_hand": 1}},
    ):
        with pytest.raises(ValidationError):
            validate_output(bad)


# ---- U+0000: PostgreSQL text cannot hold it, so the contract refuses it with a reason --------------


@pytest.mark.parametrize("raw,where", [
    (body("order.cancelled", {"order_id": "o\u00001"}), "data.order_id"),
    (body("order.completed", {"order_id": "\u0000"}), "data.order_id"),
    (placed([{"product_id": "A", "quantity": 1}], order_id="o\u0000"), "data.order_id"),
    (body("stock.adjusted", {"product_id": "A", "delta": 1, "reason": "count\u0000ed"}), "data.reason"),
])
def test_nul_in_free_text_is_refused_with_a_clear_reason(raw, where):
    assert refused(raw) == f"{where}: Value error, must not contain U+0000 (NUL)"


# ---- occurred_at: an RFC 3339 string with an offset, from 2000 up to 2100 -----------------------


@pytest.mark.parametrize("value", [
    "2026-11-25T10:00:00Z", "2026-11-25T10:00:00.123456+05:30", "2026-11-25 10:00:00-00:00",
    "2000-01-01T00:00:00Z", "2099-12-31T23:59:59.999999Z", "2026-11-25t10:00:00z",
])
def test_occurred_at_accepted(value):
    assert parse_event(body("order.cancelled", {"order_id": "o"}, occurred_at=value)).occurred_at.tzinfo


@pytest.mark.parametrize("value,why", [
    (1764064800, "RFC 3339"), (1764064800.5, "RFC 3339"), (True, "RFC 3339"),
    ("1764064800", "RFC 3339"), ("2026-11-25", "RFC 3339"), ("2026-11-25T10:00:00+0200", "RFC 3339"),
    ("0001-01-01T00:00:00Z", "from 2000-01-01T00:00:00Z up to 2100-01-01T00:00:00Z"),
    ("9999-12-31T23:59:59Z", "from 2000-01-01T00:00:00Z up to 2100-01-01T00:00:00Z"),
    ("1999-12-31T23:59:59Z", "from 2000-01-01T00:00:00Z"),
    ("2000-01-01T00:30:00+01:00", "from 2000-01-01T00:00:00Z"),  # 1999-12-31T23:30Z
    ("2100-01-01T00:00:00Z", "up to 2100-01-01T00:00:00Z"),
])
def test_occurred_at_refused(value, why):
    reason = refused(body("order.cancelled", {"order_id": "o"}, occurred_at=value))
    assert reason.startswith("occurred_at: ") and why in reason
