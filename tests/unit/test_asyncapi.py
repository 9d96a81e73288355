"""docs/asyncapi.yaml is generated from contract.py and agrees with what the worker accepts."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import yaml
from jsonschema import Draft202012Validator

from inventory_worker import asyncapi
from inventory_worker.contract import INPUT_TYPES, OUTPUT_TYPES, InvalidMessage, parse_event, validate_output

from ..support import REPO

# The official AsyncAPI 3.0.0 JSON Schema, from the npm package @asyncapi/specs (make test
# fetches it; see the Makefile).
SPEC_SCHEMA = REPO / ".cache/asyncapi-specs/node_modules/@asyncapi/specs/schemas/3.0.0-without-$id.json"


def test_committed_document_matches_the_models():
    assert asyncapi.DOC_PATH.read_text() == asyncapi.render(), (
        "docs/asyncapi.yaml has drifted from contract.py: run python -m inventory_worker.asyncapi --write"
    )


@pytest.fixture(scope="module")
def doc():
    return yaml.safe_load(asyncapi.DOC_PATH.read_text())


def _validator(doc, message: str) -> Draft202012Validator:
    ref = doc["components"]["messages"][message]["payload"]["$ref"]
    return Draft202012Validator({"$ref": ref, "components": doc["components"]})


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_document_is_valid_asyncapi_3(doc):
    if not SPEC_SCHEMA.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{SPEC_SCHEMA} is missing: run `make asyncapi-specs` (needs npm)")
        pytest.skip("the AsyncAPI JSON Schema is not fetched: `make asyncapi-specs` (needs npm)")
    from jsonschema import Draft7Validator

    errors = [
        f"{list(e.path)}: {e.message[:200]}"
        for e in Draft7Validator(json.loads(SPEC_SCHEMA.read_text())).iter_errors(doc)
    ]
    assert errors == []


def test_every_message_has_a_channel_and_operation_and_every_ref_resolves(doc):
    assert doc["asyncapi"].startswith("3.")
    names = {m["name"] for m in doc["components"]["messages"].values()}
    assert names == set(INPUT_TYPES) | set(OUTPUT_TYPES)
    assert {c["address"] for c in doc["channels"].values()} == names
    actions = sorted(op["action"] for op in doc["operations"].values())
    assert actions.count("receive") == len(INPUT_TYPES) and actions.count("send") == len(OUTPUT_TYPES)
    for ref in set(_refs(doc)):
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]  # KeyError: a dangling $ref


def _body(type_, data, **extra):
    return {
        "id": str(uuid.uuid4()),
        "type": type_,
        "occurred_at": "2026-01-01T00:00:00Z",
        "data": data,
        **extra,
    }


INPUTS = [
    ("order.placed", {"order_id": "o-1", "lines": [{"product_id": "SKU-1", "quantity": 2}]}),
    (
        "order.placed",
        {"order_id": "o-1", "lines": [{"product_id": "SKU-1", "quantity": 2}], "reservation_ttl_seconds": 60},
    ),
    ("order.placed", {"order_id": "o-1", "lines": []}),
    ("order.placed", {"order_id": "o-1", "lines": [{"product_id": "SKU 1", "quantity": 2}]}),
    ("order.placed", {"order_id": "o-1", "lines": [{"product_id": "SKU-1", "quantity": 0}]}),
    ("order.placed", {"order_id": "o-1", "lines": [{"product_id": "SKU-1", "quantity": "2"}]}),
    ("order.placed", {"order_id": "", "lines": [{"product_id": "SKU-1", "quantity": 1}]}),
    ("order.cancelled", {"order_id": "o-1"}),
    ("order.cancelled", {"order_id": "o-1", "extra": 1}),
    ("order.cancelled", {"order_id": "o-\u00001"}),
    ("order.completed", {"order_id": "o-1"}),
    ("order.completed", {}),
    ("stock.adjusted", {"product_id": "SKU-1", "delta": 5}),
    ("stock.adjusted", {"product_id": "SKU-1", "on_hand": 5, "reason": "count", "low_stock_threshold": 2}),
    ("stock.adjusted", {"product_id": "SKU-1", "delta": None, "on_hand": 5}),
    ("stock.adjusted", {"product_id": "SKU-1", "delta": 5, "on_hand": 5}),
    ("stock.adjusted", {"product_id": "SKU-1"}),
    ("stock.adjusted", {"product_id": "SKU-1", "on_hand": -1}),
    ("stock.adjusted", {"product_id": "SKU-1", "on_hand": 1, "reason": "\u0000"}),
    # Part A (stock across locations): the rules the validators hold, mirrored in the schemas
    (
        "stock.adjusted",
        {"product_id": "SKU-1", "location_id": "s-1", "incoming": 5, "change_from": 2, "reference": "PO"},
    ),
    ("stock.adjusted", {"product_id": "SKU-1", "delta": 5, "name": "incoming"}),
    ("stock.adjusted", {"product_id": "SKU-1", "delta": 5, "name": None}),
    ("stock.adjusted", {"product_id": "SKU-1", "on_hand": 5, "name": "on_hand"}),
    ("stock.adjusted", {"product_id": "SKU-1", "on_hand": 5, "incoming": 1}),
    ("stock.adjusted", {"product_id": "SKU-1", "delta": 5, "name": "damaged"}),
    ("stock.adjusted", {"product_id": "SKU-1", "delta": 5, "atomic": True}),
    ("stock.adjusted", {"delta": 5}),
    (
        "stock.adjusted",
        {"items": [{"product_id": "A", "delta": 1}, {"product_id": "B", "incoming": 1}], "atomic": False},
    ),
    ("stock.adjusted", {"items": [{"product_id": "A", "delta": 1}], "product_id": "A"}),
    ("stock.adjusted", {"items": [{"product_id": "A", "delta": 1}], "reason": None}),
    ("stock.adjusted", {"items": [{"product_id": "A", "delta": 1}], "atomic": None}),
    ("stock.adjusted", {"items": [{"product_id": "A"}]}),
    ("stock.adjusted", {"items": [{"product_id": "A", "on_hand": 1, "name": "on_hand"}]}),
    ("stock.adjusted", {"items": []}),
    (
        "order.placed",
        {
            "order_id": "o-1",
            "channel_id": "web",
            "lines": [{"product_id": "A", "quantity": 1, "location_id": "s"}],
        },
    ),
    ("order.placed", {"order_id": "o-1", "channel_id": "w b", "lines": [{"product_id": "A", "quantity": 1}]}),
    (
        "order.placed",
        {"order_id": "o-1", "lines": [{"product_id": "A", "quantity": 1}], "allow_backorder": False},
    ),
    (
        "location.configured",
        {"location_id": "s-1", "name": None, "priority": -5, "active": False, "fulfils_orders": True},
    ),
    ("location.configured", {"location_id": "s-1", "priority": None}),
    ("location.configured", {"location_id": "s-1", "active": 1}),
    ("channel.configured", {"channel_id": "web", "locations": ["a", "b"], "strategy": "most_available"}),
    ("channel.configured", {"channel_id": "web", "locations": None}),
    ("channel.configured", {"channel_id": "default", "locations": None, "strategy": "fewest_locations"}),
    ("channel.configured", {"channel_id": "default", "locations": ["a"]}),
    ("channel.configured", {"channel_id": "web", "strategy": "nearest"}),
    ("channel.configured", {"channel_id": "web", "locations": []}),
    (
        "product.configured",
        {
            "product_id": "A",
            "tracked": False,
            "low_stock_threshold": 1,
            "max_per_order": None,
            "safety_stock": [{"location_id": "s", "quantity": 0}],
        },
    ),
    ("product.configured", {"product_id": "A", "max_per_order": 0}),
    ("product.configured", {"product_id": "A", "tracked": None}),
    ("product.configured", {"product_id": "A", "backorder": {"mode": "allow"}}),
    (
        "stock.moved",
        {"product_id": "A", "quantity": 1, "from": "sellable", "to": "disposed", "location_id": "s"},
    ),
    ("stock.moved", {"product_id": "A", "quantity": 1, "from": "damaged", "to": "damaged"}),
    ("stock.moved", {"product_id": "A", "quantity": 1, "from": "disposed", "to": "sellable"}),
    ("stock.moved", {"product_id": "A", "quantity": 0, "from": "sellable", "to": "damaged"}),
    (
        "stock.transferred",
        {
            "transfer_id": "t",
            "from_location_id": "a",
            "to_location_id": "b",
            "in_transit": True,
            "lines": [{"product_id": "A", "quantity": 1}],
        },
    ),
    ("stock.transferred", {"transfer_id": "t", "from_location_id": "a", "to_location_id": "b", "lines": []}),
    ("stock.received", {"product_id": "A", "quantity": 1, "location_id": "s", "reference": "PO-1"}),
    ("stock.received", {"items": [{"product_id": "A", "quantity": 1}], "atomic": True}),
    ("stock.received", {"product_id": "A"}),
    ("stock.received", {"product_id": "A", "quantity": 1, "atomic": False}),
    ("stock.received", {"items": [{"product_id": "A", "quantity": 1}], "location_id": "s"}),
    ("reservation.extended", {"order_id": "o", "extend_by_seconds": 60}),
    ("reservation.extended", {"order_id": "o", "until_fulfilled": True}),
    ("reservation.extended", {"order_id": "o", "until_fulfilled": False}),
    ("reservation.extended", {"order_id": "o"}),
    (
        "order.fulfilled",
        {
            "order_id": "o",
            "fulfilment_id": "f",
            "lines": [{"product_id": "A", "quantity": 1, "location_id": "s"}],
        },
    ),
    ("order.fulfilled", {"order_id": "o", "fulfilment_id": "f", "lines": []}),
    ("order.cancelled", {"order_id": "o", "lines": [{"product_id": "A", "quantity": 1}]}),
    ("order.cancelled", {"order_id": "o", "lines": []}),
    (
        "order.returned",
        {
            "order_id": "o",
            "return_id": "r",
            "lines": [{"product_id": "A", "quantity": 1, "condition": "damaged", "location_id": "s"}],
        },
    ),
    ("order.returned", {"order_id": "o", "return_id": "r", "lines": [{"product_id": "A", "quantity": 1}]}),
    (
        "order.returned",
        {
            "order_id": "o",
            "return_id": "r",
            "lines": [{"product_id": "A", "quantity": 1, "condition": "lost"}],
        },
    ),
    ("order.fulfilled", {"order_id": "o", "lines": [{"product_id": "A", "quantity": 1}]}),
    ("reservation.extended", {"order_id": "o", "extend_by_seconds": 60, "until_fulfilled": True}),
]


@pytest.mark.parametrize("type_,data", INPUTS)
def test_schema_accepts_exactly_what_the_worker_accepts(doc, type_, data):
    body = _body(type_, data)
    try:
        parse_event(json.dumps(body).encode(), type_)
        worker_accepts = True
    except InvalidMessage:
        worker_accepts = False
    message = asyncapi._name(type_)
    assert _validator(doc, message).is_valid(body) == worker_accepts


def test_output_schema_matches_validate_output(doc):
    good = _body(
        "inventory.adjusted",
        {"product_id": "SKU-1", "on_hand": 3, "reserved": 1, "available": 2},
        causation_id=str(uuid.uuid4()),
    )
    validate_output(good)
    assert _validator(doc, "InventoryAdjusted").is_valid(good)
    bad = dict(good, data={"product_id": "SKU-1", "on_hand": 3})
    assert not _validator(doc, "InventoryAdjusted").is_valid(bad)
    wrong_type = dict(good, type="inventory.reserved")
    assert not _validator(doc, "InventoryAdjusted").is_valid(wrong_type)


def test_output_schemas_accept_what_validate_output_accepts(doc):
    from .test_contract import GOOD_OUTPUTS

    for type_, data in GOOD_OUTPUTS:
        body = _body(type_, data, causation_id=str(uuid.uuid4()))
        validate_output(body)
        assert _validator(doc, asyncapi._name(type_)).is_valid(body), (type_, data)
