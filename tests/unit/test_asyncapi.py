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
        "docs/asyncapi.yaml has drifted from contract.py: run python -m inventory_worker.asyncapi --write")


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

    errors = [f"{list(e.path)}: {e.message[:200]}" for e in Draft7Validator(json.loads(SPEC_SCHEMA.read_text()))
              .iter_errors(doc)]
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
    return {"id": str(uuid.uuid4()), "type": type_, "occurred_at": "2026-01-01T00:00:00Z", "data": data, **extra}


INPUTS = [
    ("order.placed", {"order_id": "o-1", "lines": [{"product_id": "SKU-1", "quantity": 2}]}),
    ("order.placed", {"order_id": "o-1", "lines": [{"product_id": "SKU-1", "quantity": 2}], "reservation_ttl_seconds": 60}),
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
    good = _body("inventory.adjusted", {"product_id": "SKU-1", "on_hand": 3, "reserved": 1, "available": 2},
                 causation_id=str(uuid.uuid4()))
    validate_output(good)
    assert _validator(doc, "InventoryAdjusted").is_valid(good)
    bad = dict(good, data={"product_id": "SKU-1", "on_hand": 3})
    assert not _validator(doc, "InventoryAdjusted").is_valid(bad)
    wrong_type = dict(good, type="inventory.reserved")
    assert not _validator(doc, "InventoryAdjusted").is_valid(wrong_type)
