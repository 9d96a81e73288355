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
    reason = refused(
        placed(
            [
                {"product_id": "A", "quantity": 1},
                {"product_id": "B", "quantity": 1},
                {"product_id": "A", "quantity": 2},
            ]
        )
    )
    assert "data.lines" in reason and "A appears twice" in reason


def test_product_ids_differing_in_case_are_different_products():
    ev = parse_event(placed([{"product_id": "a", "quantity": 1}, {"product_id": "A", "quantity": 1}]))
    assert [line["product_id"] for line in ev.data["lines"]] == ["a", "A"]


@pytest.mark.parametrize(
    "ttl,ok", [(1, True), (31_536_000, True), (0, False), (31_536_001, False), (1.5, False), ("60", False)]
)
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


@pytest.mark.parametrize(
    "oid,ok",
    [
        ("o", True),
        ("x" * 200, True),
        ("order 7/ä", True),
        ("", False),
        ("x" * 201, False),
        (7, False),
        (None, False),
    ],
)
def test_order_id(oid, ok):
    for type_ in ("order.cancelled", "order.completed"):
        raw = body(type_, {"order_id": oid})
        if ok:
            assert parse_event(raw, type_).data == {"order_id": oid}
        else:
            assert "data.order_id" in refused(raw, type_)


# ---- stock.adjusted -----------------------------------------------------------------------------


def test_adjustment_needs_exactly_one_of_delta_and_on_hand():
    ok1 = parse_event(
        body("stock.adjusted", {"product_id": "A", "delta": -3, "reason": "broken", "low_stock_threshold": 2})
    )
    assert ok1.data == {"product_id": "A", "delta": -3, "reason": "broken", "low_stock_threshold": 2}
    assert parse_event(body("stock.adjusted", {"product_id": "A", "on_hand": 0})).data["on_hand"] == 0
    assert "exactly one" in refused(body("stock.adjusted", {"product_id": "A", "delta": 1, "on_hand": 1}))
    assert "exactly one" in refused(body("stock.adjusted", {"product_id": "A"}))
    assert "data.on_hand" in refused(body("stock.adjusted", {"product_id": "A", "on_hand": -1}))
    assert "data.delta" in refused(body("stock.adjusted", {"product_id": "A", "delta": 2.0}))
    assert "data.low_stock_threshold" in refused(
        body("stock.adjusted", {"product_id": "A", "delta": 1, "low_stock_threshold": -1})
    )


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
    ok = {
        "id": str(uuid.uuid4()),
        "type": "inventory.adjusted",
        "occurred_at": "2026-11-25T10:00:00Z",
        "causation_id": str(uuid.uuid4()),
        "data": {"product_id": "A", "on_hand": 1, "reserved": 0, "available": 1},
    }
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


@pytest.mark.parametrize(
    "raw,where",
    [
        (body("order.cancelled", {"order_id": "o\u00001"}), "data.order_id"),
        (body("order.completed", {"order_id": "\u0000"}), "data.order_id"),
        (placed([{"product_id": "A", "quantity": 1}], order_id="o\u0000"), "data.order_id"),
        (body("stock.adjusted", {"product_id": "A", "delta": 1, "reason": "count\u0000ed"}), "data.reason"),
    ],
)
def test_nul_in_free_text_is_refused_with_a_clear_reason(raw, where):
    assert refused(raw) == f"{where}: Value error, must not contain U+0000 (NUL)"


# ---- occurred_at: an RFC 3339 string with an offset, from 2000 up to 2100 -----------------------


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-25T10:00:00Z",
        "2026-11-25T10:00:00.123456+05:30",
        "2026-11-25 10:00:00-00:00",
        "2000-01-01T00:00:00Z",
        "2099-12-31T23:59:59.999999Z",
        "2026-11-25t10:00:00z",
    ],
)
def test_occurred_at_accepted(value):
    assert parse_event(body("order.cancelled", {"order_id": "o"}, occurred_at=value)).occurred_at.tzinfo


@pytest.mark.parametrize(
    "value,why",
    [
        (1764064800, "RFC 3339"),
        (1764064800.5, "RFC 3339"),
        (True, "RFC 3339"),
        ("1764064800", "RFC 3339"),
        ("2026-11-25", "RFC 3339"),
        ("2026-11-25T10:00:00+0200", "RFC 3339"),
        ("0001-01-01T00:00:00Z", "from 2000-01-01T00:00:00Z up to 2100-01-01T00:00:00Z"),
        ("9999-12-31T23:59:59Z", "from 2000-01-01T00:00:00Z up to 2100-01-01T00:00:00Z"),
        ("1999-12-31T23:59:59Z", "from 2000-01-01T00:00:00Z"),
        ("2000-01-01T00:30:00+01:00", "from 2000-01-01T00:00:00Z"),  # 1999-12-31T23:30Z
        ("2100-01-01T00:00:00Z", "up to 2100-01-01T00:00:00Z"),
    ],
)
def test_occurred_at_refused(value, why):
    reason = refused(body("order.cancelled", {"order_id": "o"}, occurred_at=value))
    assert reason.startswith("occurred_at: ") and why in reason


# ==== Part A: locations, channels, states (spec stock-across-locations.md, sections 2-4.1, 6) ====


def data(type_: str, d: dict[str, Any]) -> dict[str, Any]:
    return parse_event(body(type_, d), type_).data


def adjusted(**d: Any) -> bytes:
    return body("stock.adjusted", d)


# ---- today's messages mean the same ------------------------------------------------------------


@pytest.mark.parametrize(
    "type_,d",
    [
        ("stock.adjusted", {"product_id": "A", "delta": -3, "reason": "broken", "low_stock_threshold": 2}),
        ("stock.adjusted", {"product_id": "A", "on_hand": 0}),
        (
            "order.placed",
            {"order_id": "o", "lines": [{"product_id": "A", "quantity": 1}], "reservation_ttl_seconds": 9},
        ),
        ("order.cancelled", {"order_id": "o"}),
        ("order.completed", {"order_id": "o"}),
    ],
)
def test_todays_messages_reach_the_store_unchanged(type_, d):
    assert parse_event(body(type_, d), type_).for_store()["data"] == d


def test_todays_nulls_still_mean_absent():
    assert data(
        "stock.adjusted",
        {
            "product_id": "A",
            "delta": None,
            "on_hand": 5,
            "location_id": None,
            "incoming": None,
            "name": None,
            "reference": None,
        },
    ) == {"product_id": "A", "on_hand": 5}
    assert data(
        "order.placed",
        {
            "order_id": "o",
            "channel_id": None,
            "lines": [{"product_id": "A", "quantity": 1, "location_id": None}],
        },
    ) == {"order_id": "o", "lines": [{"product_id": "A", "quantity": 1}]}


# ---- stock.adjusted, extended ------------------------------------------------------------------


@pytest.mark.parametrize(
    "d",
    [
        {"product_id": "A", "location_id": "store-1", "delta": 5},
        {"product_id": "A", "incoming": 0},
        {"product_id": "A", "incoming": 1_000_000_000_000, "change_from": 3, "reference": "PO-7"},
        {"product_id": "A", "delta": -2, "name": "incoming", "change_from": 0},
        {"product_id": "A", "delta": 2, "name": "on_hand"},
        {"product_id": "A", "on_hand": 7, "change_from": 1_000_000_000_000, "reference": ""},
        {"items": [{"product_id": "A", "delta": 1}]},
        {
            "items": [
                {"product_id": "A", "delta": 1},
                {"product_id": "A", "incoming": 4},
                {
                    "product_id": "A",
                    "location_id": "s",
                    "on_hand": 2,
                    "change_from": 1,
                    "reason": "count",
                    "reference": "C-1",
                    "low_stock_threshold": 3,
                },
            ],
            "atomic": False,
        },
        {"items": [{"product_id": f"P{i}", "delta": 1} for i in range(1000)], "atomic": True},
    ],
)
def test_adjustment_extensions_accepted(d):
    assert data("stock.adjusted", d) == d


@pytest.mark.parametrize(
    "d,why",
    [
        ({"product_id": "A", "delta": 1, "incoming": 1}, "exactly one of 'delta', 'on_hand' and 'incoming'"),
        ({"product_id": "A", "on_hand": 1, "incoming": 1}, "exactly one of"),
        ({"product_id": "A", "name": "on_hand"}, "exactly one of"),
        ({"product_id": "A", "on_hand": 1, "name": "on_hand"}, "'name' is only allowed with 'delta'"),
        ({"product_id": "A", "incoming": 1, "name": "incoming"}, "'name' is only allowed with 'delta'"),
        (
            {"product_id": "A", "delta": 1, "name": "damaged"},
            "data.name: Input should be 'on_hand' or 'incoming'",
        ),
        ({"product_id": "A", "incoming": -1}, "data.incoming"),
        ({"product_id": "A", "incoming": 10**12 + 1}, "data.incoming"),
        ({"product_id": "A", "incoming": 1.0}, "data.incoming"),
        ({"product_id": "A", "delta": 1, "change_from": -1}, "data.change_from"),
        ({"product_id": "A", "delta": 1, "change_from": "3"}, "data.change_from"),
        ({"product_id": "A", "delta": 1, "reference": "x" * 501}, "data.reference"),
        ({"product_id": "A", "delta": 1, "location_id": "store 1"}, "data.location_id"),
        ({"product_id": "A", "delta": 1, "location_id": ""}, "data.location_id"),
        ({"product_id": "A", "delta": 1, "atomic": True}, "'atomic' is only allowed with 'items'"),
        ({"delta": 1}, "'product_id' is required (or 'items')"),
        ({}, "'product_id' is required (or 'items')"),
        (
            {"items": [{"product_id": "A", "delta": 1}], "product_id": "A"},
            "'items' excludes the fields of a single adjustment: product_id",
        ),
        (
            {"items": [{"product_id": "A", "delta": 1}], "reason": None, "location_id": "s"},
            "'items' excludes the fields of a single adjustment: location_id, reason",
        ),
        ({"items": []}, "data.items"),
        ({"items": [{"product_id": f"P{i}", "delta": 1} for i in range(1001)]}, "data.items"),
        ({"items": None}, "data.items"),
        ({"items": [{"product_id": "A", "delta": 1}], "atomic": None}, "data.atomic"),
        ({"items": [{"product_id": "A", "delta": 1}], "atomic": "yes"}, "data.atomic"),
        ({"items": [{"product_id": "A", "delta": 1}], "atomic": 1}, "data.atomic"),
        ({"items": [{"product_id": "A"}]}, "data.items.0: Value error, exactly one of"),
        (
            {"items": [{"product_id": "A", "on_hand": 1, "name": "on_hand"}]},
            "data.items.0: Value error, 'name'",
        ),
        ({"items": [{"product_id": "A", "delta": 1, "items": []}]}, "data.items.0.items: Extra inputs"),
        ({"items": [{"product_id": "A", "delta": 1, "atomic": True}]}, "data.items.0.atomic: Extra inputs"),
        (
            {"items": [{"product_id": "A", "delta": 1}, {"product_id": "A", "on_hand": 1}]},
            "(A, default, on_hand) appears twice in items",
        ),
        (
            {
                "items": [
                    {"product_id": "A", "incoming": 1},
                    {"product_id": "A", "delta": 1, "name": "incoming"},
                ]
            },
            "(A, default, incoming) appears twice",
        ),
        (
            {
                "items": [
                    {"product_id": "A", "delta": 1},
                    {"product_id": "A", "location_id": "default", "delta": 1},
                ]
            },
            "(A, default, on_hand) appears twice",
        ),
        (
            {"items": [{"product_id": "A", "delta": 1, "reference": "x\u0000"}]},
            "data.items.0.reference: Value error, must not contain U+0000",
        ),
    ],
)
def test_adjustment_extensions_refused(d, why):
    assert why in refused(adjusted(**d))


def test_same_product_at_two_locations_or_two_quantities_in_one_bulk():
    items = [
        {"product_id": "A", "delta": 1},
        {"product_id": "A", "location_id": "s", "delta": 1},
        {"product_id": "A", "delta": 1, "name": "incoming"},
    ]
    assert data("stock.adjusted", {"items": items})["items"] == items


# ---- order.placed, extended --------------------------------------------------------------------


@pytest.mark.parametrize("allow", [True, False])
def test_order_may_forbid_or_allow_backorders(allow):
    d = {"order_id": "o", "lines": [{"product_id": "A", "quantity": 2}], "allow_backorder": allow}
    assert data("order.placed", d) == d


def test_order_with_channel_and_pinned_lines():
    d = {
        "order_id": "o",
        "channel_id": "web",
        "lines": [
            {"product_id": "A", "quantity": 2, "location_id": "s-1"},
            {"product_id": "B", "quantity": 1},
        ],
    }
    assert data("order.placed", d) == d


@pytest.mark.parametrize(
    "extra,line,where",
    [
        ({"channel_id": "web shop"}, {}, "data.channel_id"),
        ({"channel_id": ""}, {}, "data.channel_id"),
        ({"channel_id": 7}, {}, "data.channel_id"),
        ({}, {"location_id": "a/b"}, "data.lines.0.location_id"),
        ({}, {"location_id": "x" * 65}, "data.lines.0.location_id"),
        ({"allow_backorder": "no"}, {}, "data.allow_backorder"),
        ({"allow_backorder": 0}, {}, "data.allow_backorder"),
        ({"allow_backorder": None}, {}, "data.allow_backorder"),
    ],
)
def test_order_extensions_refused(extra, line, where):
    assert where in refused(placed([{"product_id": "A", "quantity": 1, **line}], **extra))


def test_a_product_pinned_at_two_locations_is_still_twice_in_the_order():
    reason = refused(
        placed(
            [
                {"product_id": "A", "quantity": 1, "location_id": "s"},
                {"product_id": "A", "quantity": 1, "location_id": "t"},
            ]
        )
    )
    assert "A appears twice in one order" in reason


# ---- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "type_,d",
    [
        ("location.configured", {"location_id": "store-1"}),
        (
            "location.configured",
            {
                "location_id": "store-1",
                "name": "Berlin ä",
                "priority": -1_000_000,
                "active": False,
                "fulfils_orders": True,
            },
        ),
        ("location.configured", {"location_id": "default", "priority": 1_000_000, "name": ""}),
        (
            "channel.configured",
            {"channel_id": "web", "locations": ["b", "a"], "strategy": "fewest_locations"},
        ),
        ("channel.configured", {"channel_id": "web", "strategy": "priority"}),
        ("channel.configured", {"channel_id": "web", "locations": [f"L{i}" for i in range(100)]}),
        ("channel.configured", {"channel_id": "default", "strategy": "most_available"}),
        ("channel.configured", {"channel_id": "pos", "strategy": "single_location"}),
        ("product.configured", {"product_id": "A"}),
        (
            "product.configured",
            {
                "product_id": "A",
                "tracked": False,
                "low_stock_threshold": 1_000_000_000,
                "max_per_order": 1_000_000,
                "safety_stock": [
                    {"location_id": "default", "quantity": 0},
                    {"location_id": "s", "quantity": 1_000_000_000},
                ],
            },
        ),
        ("product.configured", {"product_id": "A", "backorder": {"mode": "deny"}}),
        (
            "product.configured",
            {
                "product_id": "A",
                "backorder": {"mode": "allow", "limit": 0, "until": "2026-12-31T00:00:00+02:00"},
            },
        ),
        (
            "product.configured",
            {"product_id": "A", "backorder": {"mode": "incoming", "limit": 1_000_000_000}},
        ),
    ],
)
def test_configuration_accepted(type_, d):
    assert data(type_, d) == d


@pytest.mark.parametrize(
    "type_,d,kept",
    [
        ("location.configured", {"location_id": "s", "name": None}, {"location_id": "s", "name": None}),
        (
            "channel.configured",
            {"channel_id": "web", "locations": None},
            {"channel_id": "web", "locations": None},
        ),
        (
            "channel.configured",
            {"channel_id": "default", "locations": None},
            {"channel_id": "default", "locations": None},
        ),
        (
            "product.configured",
            {"product_id": "A", "max_per_order": None},
            {"product_id": "A", "max_per_order": None},
        ),
    ],
)
def test_a_null_that_unsets_a_configuration_field_reaches_the_store(type_, d, kept):
    assert parse_event(body(type_, d), type_).for_store()["data"] == kept


@pytest.mark.parametrize(
    "type_,d,why",
    [
        ("location.configured", {}, "data.location_id: Field required"),
        ("location.configured", {"location_id": "s t"}, "data.location_id"),
        ("location.configured", {"location_id": "s", "name": "x" * 201}, "data.name"),
        (
            "location.configured",
            {"location_id": "s", "name": "a\u0000"},
            "data.name: Value error, must not contain U+0000",
        ),
        ("location.configured", {"location_id": "s", "priority": 1_000_001}, "data.priority"),
        ("location.configured", {"location_id": "s", "priority": -1_000_001}, "data.priority"),
        ("location.configured", {"location_id": "s", "priority": 1.5}, "data.priority"),
        ("location.configured", {"location_id": "s", "priority": None}, "data.priority"),
        ("location.configured", {"location_id": "s", "active": "true"}, "data.active"),
        ("location.configured", {"location_id": "s", "active": 1}, "data.active"),
        ("location.configured", {"location_id": "s", "active": None}, "data.active"),
        ("location.configured", {"location_id": "s", "fulfils_orders": 0}, "data.fulfils_orders"),
        ("location.configured", {"location_id": "s", "address": "x"}, "data.address: Extra inputs"),
        ("channel.configured", {"channel_id": "web", "locations": []}, "data.locations"),
        (
            "channel.configured",
            {"channel_id": "web", "locations": [f"L{i}" for i in range(101)]},
            "data.locations",
        ),
        (
            "channel.configured",
            {"channel_id": "web", "locations": ["a", "b", "a"]},
            "location a appears twice",
        ),
        ("channel.configured", {"channel_id": "web", "locations": ["a b"]}, "data.locations.0"),
        ("channel.configured", {"channel_id": "web", "strategy": "nearest"}, "data.strategy"),
        ("channel.configured", {"channel_id": "web", "strategy": None}, "data.strategy"),
        (
            "channel.configured",
            {"channel_id": "default", "locations": ["a"]},
            "channel default takes no 'locations'",
        ),
        ("channel.configured", {"channel_id": "x" * 65}, "data.channel_id"),
        ("product.configured", {"product_id": "A", "tracked": "no"}, "data.tracked"),
        ("product.configured", {"product_id": "A", "tracked": None}, "data.tracked"),
        (
            "product.configured",
            {"product_id": "A", "low_stock_threshold": 1_000_000_001},
            "data.low_stock_threshold",
        ),
        ("product.configured", {"product_id": "A", "max_per_order": 0}, "data.max_per_order"),
        ("product.configured", {"product_id": "A", "max_per_order": 1_000_001}, "data.max_per_order"),
        ("product.configured", {"product_id": "A", "safety_stock": []}, "data.safety_stock"),
        (
            "product.configured",
            {
                "product_id": "A",
                "safety_stock": [{"location_id": f"L{i}", "quantity": 1} for i in range(101)],
            },
            "data.safety_stock",
        ),
        (
            "product.configured",
            {"product_id": "A", "safety_stock": [{"location_id": "s", "quantity": -1}]},
            "data.safety_stock.0.quantity",
        ),
        (
            "product.configured",
            {"product_id": "A", "safety_stock": [{"location_id": "s", "quantity": 10**9 + 1}]},
            "data.safety_stock.0.quantity",
        ),
        (
            "product.configured",
            {"product_id": "A", "safety_stock": [{"quantity": 1}]},
            "data.safety_stock.0.location_id: Field required",
        ),
        (
            "product.configured",
            {
                "product_id": "A",
                "safety_stock": [{"location_id": "s", "quantity": 1}, {"location_id": "s", "quantity": 2}],
            },
            "location s appears twice in safety_stock",
        ),
        (
            "product.configured",
            {"product_id": "A", "backorder": {"mode": "sometimes"}},
            "data.backorder.mode",
        ),
        ("product.configured", {"product_id": "A", "backorder": {"limit": 3}}, "data.backorder.mode"),
        ("product.configured", {"product_id": "A", "backorder": None}, "data.backorder"),
        (
            "product.configured",
            {"product_id": "A", "backorder": {"mode": "allow", "limit": -1}},
            "data.backorder.limit",
        ),
        (
            "product.configured",
            {"product_id": "A", "backorder": {"mode": "allow", "limit": 10**9 + 1}},
            "data.backorder.limit",
        ),
        (
            "product.configured",
            {"product_id": "A", "backorder": {"mode": "allow", "until": "2026-12-31T00:00:00"}},
            "data.backorder.until",
        ),
        (
            "product.configured",
            {"product_id": "A", "backorder": {"mode": "allow", "until": "2026-13-01T00:00:00Z"}},
            "data.backorder.until",
        ),
        (
            "product.configured",
            {"product_id": "A", "backorder": {"mode": "allow", "until": 1767139200}},
            "data.backorder.until",
        ),
        (
            "product.configured",
            {"product_id": "A", "backorder": {"mode": "allow", "after": 1}},
            "data.backorder.after: Extra inputs",
        ),
    ],
)
def test_configuration_refused(type_, d, why):
    assert why in refused(body(type_, d), type_)


# ---- stock.moved -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src,dst",
    [
        (s, t)
        for s in ("sellable", "damaged", "quality_control")
        for t in ("sellable", "damaged", "quality_control", "disposed")
        if s != t
    ],
)
def test_moves_between_different_states_accepted(src, dst):
    d = {"product_id": "A", "quantity": 1_000_000_000, "from": src, "to": dst}
    assert data("stock.moved", d) == d


def test_move_with_every_field():
    d = {
        "product_id": "A",
        "location_id": "s",
        "quantity": 1,
        "from": "sellable",
        "to": "damaged",
        "reason": "dropped",
        "reference": "RMA-1",
    }
    assert data("stock.moved", d) == d


@pytest.mark.parametrize(
    "d,why",
    [
        ({"from": "damaged", "to": "damaged"}, "'from' and 'to' must differ"),
        ({"from": "sellable", "to": "sellable"}, "'from' and 'to' must differ"),
        ({"from": "disposed", "to": "sellable"}, "data.from"),
        ({"from": "sellable", "to": "lost"}, "data.to"),
        ({"to": "damaged", "from": None}, "data.from"),
        ({"from_": "sellable", "to": "damaged"}, "data.from: Field required"),
        ({"from": "sellable", "to": "damaged", "quantity": 0}, "data.quantity"),
        ({"from": "sellable", "to": "damaged", "quantity": 1_000_000_001}, "data.quantity"),
        ({"from": "sellable", "to": "damaged", "location_id": "a b"}, "data.location_id"),
        (
            {"from": "sellable", "to": "damaged", "reason": "\u0000"},
            "data.reason: Value error, must not contain",
        ),
        (
            {"from": "sellable", "to": "damaged", "reference": "r\u0000"},
            "data.reference: Value error, must not",
        ),
    ],
)
def test_move_refused(d, why):
    assert why in refused(body("stock.moved", {"product_id": "A", "quantity": 1, **d}), "stock.moved")


# ---- stock.transferred -------------------------------------------------------------------------


def test_transfer_accepted():
    d = {
        "transfer_id": "T 1/ä",
        "from_location_id": "a",
        "to_location_id": "b",
        "in_transit": True,
        "lines": [{"product_id": f"P{i}", "quantity": 1_000_000_000} for i in range(1000)],
        "reason": "rebalance",
        "reference": "TR-1",
    }
    assert data("stock.transferred", d) == d


@pytest.mark.parametrize(
    "d,why",
    [
        ({"to_location_id": "a"}, "'from_location_id' and 'to_location_id' must differ"),
        ({"transfer_id": ""}, "data.transfer_id"),
        ({"transfer_id": "x" * 201}, "data.transfer_id"),
        ({"transfer_id": "t\u0000"}, "data.transfer_id: Value error, must not contain U+0000"),
        ({"lines": []}, "data.lines"),
        ({"lines": [{"product_id": f"P{i}", "quantity": 1} for i in range(1001)]}, "data.lines"),
        (
            {"lines": [{"product_id": "A", "quantity": 1}, {"product_id": "A", "quantity": 2}]},
            "product A appears twice in one transfer",
        ),
        ({"lines": [{"product_id": "A", "quantity": 0}]}, "data.lines.0.quantity"),
        (
            {"lines": [{"product_id": "A", "quantity": 1, "location_id": "c"}]},
            "data.lines.0.location_id: Extra",
        ),
        ({"in_transit": "yes"}, "data.in_transit"),
        ({"from_location_id": "a/b"}, "data.from_location_id"),
    ],
)
def test_transfer_refused(d, why):
    base = {
        "transfer_id": "t",
        "from_location_id": "a",
        "to_location_id": "b",
        "lines": [{"product_id": "A", "quantity": 1}],
    }
    assert why in refused(body("stock.transferred", {**base, **d}), "stock.transferred")


# ---- stock.received ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "d",
    [
        {"product_id": "A", "quantity": 1},
        {
            "product_id": "A",
            "location_id": "s",
            "quantity": 1_000_000_000,
            "reason": "PO",
            "reference": "PO-1",
        },
        {
            "items": [
                {"product_id": "A", "quantity": 1},
                {"product_id": "A", "location_id": "s", "quantity": 2},
            ],
            "atomic": False,
        },
    ],
)
def test_receipt_accepted(d):
    assert data("stock.received", d) == d


@pytest.mark.parametrize(
    "d,why",
    [
        ({"product_id": "A"}, "'product_id' and 'quantity' are required (or 'items')"),
        ({"quantity": 1}, "'product_id' and 'quantity' are required"),
        ({"product_id": "A", "quantity": 0}, "data.quantity"),
        ({"product_id": "A", "quantity": 1, "atomic": True}, "'atomic' is only allowed with 'items'"),
        (
            {"items": [{"product_id": "A", "quantity": 1}], "quantity": 1},
            "'items' excludes the fields of a single receipt: quantity",
        ),
        (
            {
                "items": [
                    {"product_id": "A", "quantity": 1},
                    {"product_id": "A", "location_id": "default", "quantity": 1},
                ]
            },
            "(A, default) appears twice in items",
        ),
        ({"items": [{"product_id": "A"}]}, "data.items.0.quantity: Field required"),
        ({"items": []}, "data.items"),
        ({"items": [{"product_id": f"P{i}", "quantity": 1} for i in range(1001)]}, "data.items"),
    ],
)
def test_receipt_refused(d, why):
    assert why in refused(body("stock.received", d), "stock.received")


# ---- reservation.extended ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "d",
    [
        {"order_id": "o", "extend_by_seconds": 1},
        {"order_id": "o", "extend_by_seconds": 31_536_000},
        {"order_id": "o", "until_fulfilled": True},
    ],
)
def test_extension_accepted(d):
    assert data("reservation.extended", d) == d


@pytest.mark.parametrize(
    "d,why",
    [
        ({"order_id": "o"}, "exactly one of 'extend_by_seconds' and 'until_fulfilled'"),
        ({"order_id": "o", "extend_by_seconds": 5, "until_fulfilled": True}, "exactly one of"),
        ({"order_id": "o", "extend_by_seconds": 0}, "data.extend_by_seconds"),
        ({"order_id": "o", "extend_by_seconds": 31_536_001}, "data.extend_by_seconds"),
        ({"order_id": "o", "extend_by_seconds": "5"}, "data.extend_by_seconds"),
        ({"order_id": "o", "until_fulfilled": False}, "data.until_fulfilled"),
        ({"order_id": "o", "until_fulfilled": 1}, "data.until_fulfilled"),
        ({"order_id": "", "until_fulfilled": True}, "data.order_id"),
        ({"order_id": "o", "until_fulfilled": True, "note": "x"}, "data.note"),
    ],
)
def test_extension_refused(d, why):
    assert why in refused(body("reservation.extended", d), "reservation.extended")


# ---- order.fulfilled ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "d",
    [
        {"order_id": "o", "fulfilment_id": "f", "lines": [{"product_id": "A", "quantity": 1}]},
        {
            "order_id": "o",
            "fulfilment_id": "f" * 200,
            "lines": [
                {"product_id": "A", "quantity": 1},
                {"product_id": "A", "quantity": 2, "location_id": "s"},
                {"product_id": "A", "quantity": 3, "location_id": "t"},
            ],
        },
    ],
)
def test_fulfilment_accepted(d):
    assert data("order.fulfilled", d) == d


@pytest.mark.parametrize(
    "d,why",
    [
        ({"order_id": "o", "lines": [{"product_id": "A", "quantity": 1}]}, "data.fulfilment_id"),
        (
            {"order_id": "o", "fulfilment_id": "", "lines": [{"product_id": "A", "quantity": 1}]},
            "data.fulfilment_id",
        ),
        (
            {"order_id": "o", "fulfilment_id": "f" * 201, "lines": [{"product_id": "A", "quantity": 1}]},
            "data.fulfilment_id",
        ),
        ({"order_id": "o", "fulfilment_id": "f", "lines": []}, "data.lines"),
        (
            {"order_id": "o", "fulfilment_id": "f", "lines": [{"product_id": "A", "quantity": 0}]},
            "data.lines.0.quantity",
        ),
        (
            {
                "order_id": "o",
                "fulfilment_id": "f",
                "lines": [{"product_id": "A", "quantity": 1, "location_id": "a b"}],
            },
            "data.lines.0.location_id",
        ),
        (
            {
                "order_id": "o",
                "fulfilment_id": "f",
                "lines": [{"product_id": "A", "quantity": 1}, {"product_id": "A", "quantity": 2}],
            },
            "appears twice",
        ),
        (
            {
                "order_id": "o",
                "fulfilment_id": "f",
                "lines": [
                    {"product_id": "A", "quantity": 1, "location_id": "s"},
                    {"product_id": "A", "quantity": 2, "location_id": "s"},
                ],
            },
            "appears twice",
        ),
    ],
)
def test_fulfilment_refused(d, why):
    assert why in refused(body("order.fulfilled", d), "order.fulfilled")


# ---- order.cancelled with lines ----------------------------------------------------------------


def test_partial_cancel_accepted_and_a_plain_cancel_unchanged():
    d = {"order_id": "o", "lines": [{"product_id": "A", "quantity": 1}, {"product_id": "B", "quantity": 2}]}
    assert data("order.cancelled", d) == d
    assert data("order.cancelled", {"order_id": "o"}) == {"order_id": "o"}


@pytest.mark.parametrize(
    "d,why",
    [
        ({"order_id": "o", "lines": []}, "data.lines"),
        ({"order_id": "o", "lines": None}, "data.lines"),
        ({"order_id": "o", "lines": [{"product_id": "A", "quantity": 0}]}, "data.lines.0.quantity"),
        (
            {"order_id": "o", "lines": [{"product_id": "A", "quantity": 1, "location_id": "s"}]},
            "data.lines.0.location_id",
        ),
        (
            {
                "order_id": "o",
                "lines": [{"product_id": "A", "quantity": 1}, {"product_id": "A", "quantity": 2}],
            },
            "appears twice",
        ),
    ],
)
def test_partial_cancel_refused(d, why):
    assert why in refused(body("order.cancelled", d), "order.cancelled")


# ---- order.returned ----------------------------------------------------------------------------


def test_return_accepted():
    d = {
        "order_id": "o",
        "return_id": "r",
        "lines": [
            {"product_id": "A", "quantity": 2, "condition": "sellable"},
            {"product_id": "A", "quantity": 1, "condition": "damaged"},
            {"product_id": "A", "quantity": 1, "condition": "damaged", "location_id": "store"},
            {"product_id": "B", "quantity": 1, "condition": "quality_control"},
            {"product_id": "C", "quantity": 1, "condition": "disposed"},
        ],
    }
    assert data("order.returned", d) == d


@pytest.mark.parametrize(
    "d,why",
    [
        (
            {"order_id": "o", "lines": [{"product_id": "A", "quantity": 1, "condition": "sellable"}]},
            "data.return_id",
        ),
        (
            {"order_id": "o", "return_id": "r", "lines": [{"product_id": "A", "quantity": 1}]},
            "data.lines.0.condition",
        ),
        (
            {
                "order_id": "o",
                "return_id": "r",
                "lines": [{"product_id": "A", "quantity": 1, "condition": "broken"}],
            },
            "data.lines.0.condition",
        ),
        ({"order_id": "o", "return_id": "r", "lines": []}, "data.lines"),
        (
            {
                "order_id": "o",
                "return_id": "r",
                "lines": [
                    {"product_id": "A", "quantity": 1, "condition": "sellable"},
                    {"product_id": "A", "quantity": 2, "condition": "sellable"},
                ],
            },
            "appears twice",
        ),
    ],
)
def test_return_refused(d, why):
    assert why in refused(body("order.returned", d), "order.returned")


# ---- types, routing keys, the publish command ---------------------------------------------------


def test_new_types_are_input_types_and_need_their_routing_key():
    from inventory_worker.contract import INPUT_TYPES

    assert set(INPUT_TYPES) >= {
        "location.configured",
        "channel.configured",
        "product.configured",
        "stock.moved",
        "stock.transferred",
        "stock.received",
    }
    raw = body("location.configured", {"location_id": "s"})
    assert parse_event(raw, "location.configured").type == "location.configured"
    assert "does not match routing key 'stock.adjusted'" in refused(raw, "stock.adjusted")
    assert "type" in refused(body("order.reallocated", {"order_id": "o"}))  # not an input type


def test_make_event_for_a_new_type():
    ev = make_event("stock.moved", {"product_id": "A", "quantity": 1, "from": "sellable", "to": "damaged"})
    assert parse_event(json.dumps(ev).encode(), "stock.moved").data["from"] == "sellable"
    with pytest.raises(InvalidMessage):
        make_event("stock.moved", {"product_id": "A", "quantity": 1, "from": "damaged", "to": "damaged"})


# ---- output: what the worker may publish -----------------------------------------------------------


def out(type_: str, d: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "type": type_,
        "occurred_at": "2026-11-25T10:00:00Z",
        "causation_id": str(uuid.uuid4()),
        "data": d,
    }


FIG = {
    "on_hand": 5,
    "reserved": 1,
    "available": 2,
    "damaged": 1,
    "quality_control": 0,
    "incoming": 3,
    "safety_stock": 1,
}
GOOD_OUTPUTS = [
    ("inventory.adjusted", {"product_id": "A", "on_hand": 1, "reserved": 0, "available": 1}),
    (
        "inventory.adjusted",
        {"product_id": "A", "on_hand": 9, "reserved": 1, "available": 8, "location_id": "s", "location": FIG},
    ),
    (
        "inventory.adjusted",
        {
            "product_id": "A",
            "on_hand": 9,
            "reserved": 1,
            "available": 8,
            "location_id": "default",
            "index": 0,
            "location": FIG,
        },
    ),
    (
        "inventory.adjustment_rejected",
        {"product_id": "A", "reason": "below_reserved", "on_hand": 1, "reserved": 1, "requested": 0},
    ),
    (
        "inventory.adjustment_rejected",
        {"product_id": "A", "reason": "stale", "on_hand": 1, "reserved": 0, "requested": 5, "current": 1},
    ),
    (
        "inventory.adjustment_rejected",
        {
            "product_id": "A",
            "reason": "batch_rejected",
            "on_hand": 1,
            "reserved": 0,
            "requested": 5,
            "location_id": "default",
            "index": 999,
            "name": "on_hand",
        },
    ),
    (
        "inventory.adjustment_rejected",
        {
            "product_id": "A",
            "reason": "stale",
            "on_hand": 1,
            "reserved": 0,
            "requested": 5,
            "location_id": "s",
            "index": 3,
            "name": "incoming",
            "current": 0,
        },
    ),
    *[
        (
            "inventory.adjustment_rejected",
            {"product_id": "A", "reason": r, "on_hand": 0, "reserved": 0, "requested": 1, "location_id": "s"},
        )
        for r in ("unknown_location", "unknown_product", "negative_incoming", "insufficient_quantity")
    ],
    *[
        (
            "inventory.rejected",
            {
                "order_id": "o",
                "reason": r,
                "shortages": [{"product_id": "A", "requested": 3, "available": 0}],
            },
        )
        for r in ("unknown_channel", "location_unavailable", "quantity_limit", "insufficient_stock")
    ],
    (
        "inventory.configured",
        {
            "kind": "location",
            "location_id": "s",
            "name": None,
            "priority": 0,
            "active": True,
            "fulfils_orders": True,
        },
    ),
    (
        "inventory.configured",
        {"kind": "channel", "channel_id": "default", "locations": None, "strategy": "priority"},
    ),
    (
        "inventory.configured",
        {"kind": "channel", "channel_id": "web", "locations": ["b", "a"], "strategy": "single_location"},
    ),
    (
        "inventory.configured",
        {
            "kind": "product",
            "product_id": "A",
            "tracked": True,
            "low_stock_threshold": 0,
            "max_per_order": None,
            "backorder": {"mode": "deny", "limit": None, "until": None},
            "safety_stock": [],
        },
    ),
    (
        "inventory.configured",
        {
            "kind": "product",
            "product_id": "A",
            "tracked": False,
            "low_stock_threshold": 4,
            "max_per_order": 5,
            "backorder": {"mode": "allow", "limit": 10, "until": "2026-12-31T00:00:00Z"},
            "safety_stock": [{"location_id": "s", "quantity": 2}],
        },
    ),
    ("inventory.rejected", {"order_id": "o", "reason": "backorder_pending", "shortages": []}),
    (
        "inventory.backorder_filled",
        {
            "order_id": "o",
            "lines": [{"product_id": "A", "location_id": "s", "quantity": 2}],
            "backordered_remaining": [{"product_id": "A", "quantity": 1}],
        },
    ),
    (
        "inventory.backorder_filled",
        {
            "order_id": "o",
            "lines": [{"product_id": "A", "location_id": "s", "quantity": 2}],
            "backordered_remaining": [],
        },
    ),
    (
        "inventory.configuration_rejected",
        {
            "kind": "channel",
            "id": "web",
            "reason": "unknown_location",
            "detail": "location x is not configured",
        },
    ),
    (
        "inventory.configuration_rejected",
        {"kind": "product", "id": "A", "reason": "has_open_reservations", "detail": "3 units are reserved"},
    ),
    (
        "inventory.allocated",
        {
            "order_id": "o",
            "channel_id": "default",
            "lines": [
                {
                    "product_id": "A",
                    "quantity": 7,
                    "tracked": True,
                    "backordered": 0,
                    "allocations": [{"location_id": "a", "quantity": 5}, {"location_id": "b", "quantity": 2}],
                },
                {"product_id": "B", "quantity": 3, "tracked": False, "allocations": [], "backordered": 0},
            ],
        },
    ),
    (
        "inventory.moved",
        {
            "kind": "state",
            "product_id": "A",
            "location_id": "default",
            "quantity": 1,
            "from": "sellable",
            "to": "disposed",
            "reason": None,
            "reference": None,
            "location": FIG,
        },
    ),
    (
        "inventory.moved",
        {
            "kind": "transfer",
            "transfer_id": "t",
            "from_location_id": "a",
            "to_location_id": "b",
            "in_transit": True,
            "lines": [{"product_id": "A", "quantity": 2}],
        },
    ),
    (
        "inventory.moved",
        {
            "kind": "receipt",
            "product_id": "A",
            "location_id": "s",
            "quantity": 5,
            "unexpected": 2,
            "reference": "PO-1",
            "location": FIG,
        },
    ),
    (
        "inventory.moved",
        {
            "kind": "receipt",
            "product_id": "A",
            "location_id": "s",
            "quantity": 5,
            "unexpected": 0,
            "reference": None,
            "location": FIG,
            "index": 0,
        },
    ),
    ("inventory.back_in_stock", {"product_id": "A", "available": 1}),
    (
        "inventory.reservation_extended",
        {
            "order_id": "o",
            "expires_at": "2026-11-25T10:00:00Z",
            "previous_expires_at": "2026-11-25T09:00:00Z",
        },
    ),
    (
        "inventory.reservation_extended",
        {"order_id": "o", "expires_at": None, "previous_expires_at": "2026-11-25T09:00:00Z"},
    ),
    ("inventory.rejected", {"order_id": "o", "reason": "extension_limit", "shortages": []}),
    (
        "inventory.fulfilled",
        {
            "order_id": "o",
            "fulfilment_id": "f",
            "lines": [
                {"product_id": "A", "location_id": "a", "quantity": 3},
                {"product_id": "U", "location_id": None, "quantity": 1},
            ],
            "open": [{"product_id": "A", "reserved": 2, "backordered": 0}],
        },
    ),
    (
        "inventory.fulfilled",
        {
            "order_id": "o",
            "fulfilment_id": "f",
            "open": [],
            "lines": [{"product_id": "A", "location_id": "a", "quantity": 3}],
        },
    ),
    (
        "inventory.rejected",
        {
            "order_id": "o",
            "reason": "exceeds_reserved",
            "shortages": [{"product_id": "A", "requested": 3, "available": 2}],
        },
    ),
    ("inventory.rejected", {"order_id": "o", "reason": "backorder_pending", "shortages": []}),
    (
        "inventory.returned",
        {
            "order_id": "o",
            "return_id": "r",
            "lines": [
                {"product_id": "A", "location_id": "a", "quantity": 2, "condition": "sellable"},
                {"product_id": "U", "location_id": None, "quantity": 1, "condition": "disposed"},
            ],
        },
    ),
    (
        "inventory.rejected",
        {
            "order_id": "o",
            "reason": "exceeds_fulfilled",
            "shortages": [{"product_id": "A", "requested": 3, "available": 2}],
        },
    ),
    (
        "inventory.rejected",
        {
            "order_id": "o",
            "reason": "exceeds_open_quantity",
            "shortages": [{"product_id": "A", "requested": 3, "available": 2}],
        },
    ),
]


@pytest.mark.parametrize("type_,d", GOOD_OUTPUTS)
def test_output_accepted(type_, d):
    validate_output(out(type_, d))


BAD_OUTPUTS = [
    (
        "inventory.adjusted",
        {"product_id": "A", "on_hand": 1, "reserved": 0, "available": 1, "location_id": "s"},
    ),
    ("inventory.adjusted", {"product_id": "A", "on_hand": 1, "reserved": 0, "available": 1, "location": FIG}),
    ("inventory.adjusted", {"product_id": "A", "on_hand": 1, "reserved": 0, "available": 1, "index": 0}),
    (
        "inventory.adjusted",
        {"product_id": "A", "on_hand": 1, "reserved": 0, "available": 1, "location_id": None},
    ),
    (
        "inventory.adjusted",
        {
            "product_id": "A",
            "on_hand": 1,
            "reserved": 0,
            "available": 1,
            "location_id": "s",
            "location": {**FIG, "backordered": 0},
        },
    ),
    (
        "inventory.adjusted",
        {
            "product_id": "A",
            "on_hand": 1,
            "reserved": 0,
            "available": 1,
            "location_id": "s",
            "location": {k: v for k, v in FIG.items() if k != "safety_stock"},
        },
    ),
    (
        "inventory.adjustment_rejected",
        {"product_id": "A", "reason": "stale", "on_hand": 1, "reserved": 0, "requested": 5},
    ),
    (
        "inventory.adjustment_rejected",
        {
            "product_id": "A",
            "reason": "below_reserved",
            "on_hand": 1,
            "reserved": 1,
            "requested": 0,
            "current": 1,
        },
    ),
    (
        "inventory.adjustment_rejected",
        {
            "product_id": "A",
            "reason": "batch_rejected",
            "on_hand": 1,
            "reserved": 0,
            "requested": 5,
            "index": 0,
        },
    ),
    (
        "inventory.adjustment_rejected",
        {"product_id": "A", "reason": "too_big", "on_hand": 1, "reserved": 0, "requested": 5},
    ),
    (
        "inventory.adjustment_rejected",
        {
            "product_id": "A",
            "reason": "unknown_location",
            "on_hand": 1,
            "reserved": 0,
            "requested": 5,
            "name": "damaged",
        },
    ),
    ("inventory.rejected", {"order_id": "o", "reason": "too_late", "shortages": []}),
    (
        "inventory.configured",
        {"kind": "location", "location_id": "s", "priority": 0, "active": True, "fulfils_orders": True},
    ),  # unset name: null, not missing
    (
        "inventory.configured",
        {
            "kind": "channel",
            "location_id": "s",
            "name": None,
            "priority": 0,
            "active": True,
            "fulfils_orders": True,
        },
    ),
    (
        "inventory.configured",
        {"kind": "channel", "channel_id": "web", "locations": [], "strategy": "nearest"},
    ),
    (
        "inventory.configured",
        {
            "kind": "product",
            "product_id": "A",
            "tracked": True,
            "low_stock_threshold": 0,
            "max_per_order": 0,
            "safety_stock": [],
        },
    ),
    (
        "inventory.configured",
        {
            "kind": "product",
            "product_id": "A",
            "tracked": True,
            "low_stock_threshold": 0,
            "max_per_order": None,
            "safety_stock": [],
            "backorder": None,
        },
    ),
    (
        "inventory.configured",
        {
            "kind": "product",
            "product_id": "A",
            "tracked": True,
            "low_stock_threshold": 0,
            "max_per_order": None,
            "safety_stock": [],
        },
    ),  # backorder: always there
    ("inventory.backorder_filled", {"order_id": "o", "lines": [], "backordered_remaining": []}),
    (
        "inventory.backorder_filled",
        {
            "order_id": "o",
            "lines": [{"product_id": "A", "location_id": "s", "quantity": 0}],
            "backordered_remaining": [],
        },
    ),
    (
        "inventory.configuration_rejected",
        {"kind": "channel", "id": "web", "reason": "has_open_reservations", "detail": "x"},
    ),
    (
        "inventory.configuration_rejected",
        {"kind": "location", "id": "s", "reason": "unknown_location", "detail": "x"},
    ),
    ("inventory.configuration_rejected", {"kind": "product", "id": "A", "reason": "unknown_location"}),
    (
        "inventory.allocated",
        {
            "order_id": "o",
            "channel_id": "default",
            "lines": [
                {
                    "product_id": "A",
                    "quantity": 7,
                    "tracked": True,
                    "backordered": 0,
                    "allocations": [{"location_id": "a", "quantity": 5}],
                }
            ],
        },
    ),
    (
        "inventory.allocated",
        {
            "order_id": "o",
            "channel_id": "default",
            "lines": [
                {
                    "product_id": "A",
                    "quantity": 2,
                    "tracked": False,
                    "backordered": 0,
                    "allocations": [{"location_id": "a", "quantity": 2}],
                }
            ],
        },
    ),
    (
        "inventory.allocated",
        {
            "order_id": "o",
            "channel_id": "default",
            "lines": [
                {
                    "product_id": "A",
                    "quantity": 2,
                    "tracked": True,
                    "backordered": 0,
                    "allocations": [{"location_id": "a", "quantity": 1}, {"location_id": "a", "quantity": 1}],
                }
            ],
        },
    ),
    (
        "inventory.allocated",
        {
            "order_id": "o",
            "channel_id": None,
            "lines": [
                {
                    "product_id": "A",
                    "quantity": 1,
                    "tracked": True,
                    "backordered": 0,
                    "allocations": [{"location_id": "a", "quantity": 1}],
                }
            ],
        },
    ),
    (
        "inventory.allocated",
        {
            "order_id": "o",
            "channel_id": "default",
            "lines": [
                {
                    "product_id": "A",
                    "quantity": 1,
                    "tracked": True,
                    "allocations": [{"location_id": "a", "quantity": 1}],
                }
            ],
        },
    ),
    (
        "inventory.moved",
        {
            "kind": "state",
            "product_id": "A",
            "location_id": "default",
            "quantity": 1,
            "from": "disposed",
            "to": "sellable",
            "reason": None,
            "reference": None,
            "location": FIG,
        },
    ),
    (
        "inventory.moved",
        {
            "kind": "state",
            "product_id": "A",
            "location_id": "default",
            "quantity": 1,
            "from_": "sellable",
            "to": "damaged",
            "reason": None,
            "reference": None,
            "location": FIG,
        },
    ),
    (
        "inventory.moved",
        {
            "kind": "transfer",
            "transfer_id": "t",
            "from_location_id": "a",
            "to_location_id": "b",
            "lines": [{"product_id": "A", "quantity": 2}],
        },
    ),
    (
        "inventory.moved",
        {
            "kind": "receipt",
            "product_id": "A",
            "location_id": "s",
            "quantity": 5,
            "unexpected": 6,
            "reference": None,
            "location": FIG,
        },
    ),
    (
        "inventory.moved",
        {
            "kind": "receipt",
            "product_id": "A",
            "location_id": "s",
            "quantity": 5,
            "unexpected": True,
            "reference": None,
            "location": FIG,
        },
    ),
    (
        "inventory.moved",
        {
            "kind": "receipt",
            "product_id": "A",
            "location_id": "s",
            "quantity": 5,
            "unexpected": 1.0,
            "reference": None,
            "location": FIG,
        },
    ),
    ("inventory.moved", {"kind": "shipment", "product_id": "A", "location_id": "s", "quantity": 5}),
    ("inventory.back_in_stock", {"product_id": "A", "available": 0}),
    ("inventory.back_in_stock", {"product_id": "A", "available": 1, "threshold": 0}),
    ("inventory.reservation_extended", {"order_id": "o", "expires_at": None}),
    ("inventory.reservation_extended", {"order_id": "o", "expires_at": None, "previous_expires_at": None}),
    ("inventory.fulfilled", {"order_id": "o", "fulfilment_id": "f", "lines": [], "open": []}),
    ("inventory.returned", {"order_id": "o", "return_id": "r", "lines": []}),
    (
        "inventory.returned",
        {
            "order_id": "o",
            "return_id": "r",
            "lines": [{"product_id": "A", "location_id": "a", "quantity": 2, "condition": "broken"}],
        },
    ),
    (
        "inventory.fulfilled",
        {
            "order_id": "o",
            "fulfilment_id": "f",
            "open": [],
            "lines": [{"product_id": "A", "location_id": "a", "quantity": 0}],
        },
    ),
    (
        "inventory.fulfilled",
        {
            "order_id": "o",
            "fulfilment_id": "f",
            "lines": [{"product_id": "A", "location_id": "a", "quantity": 1}],
            "open": [{"product_id": "A", "reserved": -1, "backordered": 0}],
        },
    ),
]


@pytest.mark.parametrize("type_,d", BAD_OUTPUTS)
def test_output_refused(type_, d):
    with pytest.raises(ValidationError):
        validate_output(out(type_, d))
