"""Property-based: thousands of random and near-valid messages (bodies, headers, content
types, routing keys) through RabbitMQ to a running worker. Every one ends in the DLQ with a
reason (or, for the valid controls, applied); the worker never crashes or stalls; the bad ones
leave stock untouched. INVENTORY_FUZZ_MESSAGES sets how many (`make fuzz` sends more)."""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from typing import Any

import pika
from hypothesis import HealthCheck, Phase, assume, given, seed
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from inventory_worker.contract import INPUT_TYPES, InvalidMessage, parse_event

from ..support import Bus, delete_topology, figures, uid

MAX_BYTES = 4096  # the test worker's worker.max_message_bytes
FUZZ_ID = "x-fuzz-id"

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_any = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=12,
)
header_values = st.one_of(st.text(max_size=40), st.integers(-(2**63), 2**63 - 1), st.booleans(), st.none())
headers = st.dictionaries(
    st.text(min_size=1, max_size=20).filter(lambda k: k != FUZZ_ID), header_values, max_size=5
)
content_types = st.one_of(
    st.sampled_from(
        ["application/json", "text/plain", "", "application/json; charset=utf-7", "application/x-msgpack"]
    ),
    st.text(max_size=40),
)


def valid_data(type_: str, products: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    order_id = st.text(min_size=1, max_size=30)
    if type_ == "order.placed":
        line = st.fixed_dictionaries(
            {"product_id": st.sampled_from(products), "quantity": st.integers(1, 1_000_000)}
        )
        return st.fixed_dictionaries(
            {
                "order_id": order_id,
                "lines": st.lists(line, min_size=1, max_size=3, unique_by=lambda x: x["product_id"]),
            }
        )
    if type_ == "stock.adjusted":
        return st.fixed_dictionaries({"product_id": st.sampled_from(products)}) | st.just(None)
    return st.fixed_dictionaries({"order_id": order_id})


@st.composite
def near_valid(draw, products: list[str]) -> tuple[bytes, str]:
    """A contract-valid event for our products with one thing broken."""
    type_ = draw(st.sampled_from(INPUT_TYPES))
    data = draw(valid_data(type_, products)) or {
        "product_id": draw(st.sampled_from(products)),
        "delta": draw(st.integers(-5, 5)),
    }
    if type_ == "stock.adjusted" and "delta" not in data:
        data["delta"] = draw(st.integers(-5, 5))
    body: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "type": type_,
        "occurred_at": "2026-01-01T00:00:00Z",
        "data": data,
    }
    routing_key = type_
    kind = draw(
        st.sampled_from(
            [
                "drop",
                "retype",
                "extra",
                "data_field",
                "data_extra",
                "routing",
                "truncate",
                "non_utf8",
                "deep",
                "oversize",
                "lines",
            ]
        )
    )
    if kind == "drop":
        del body[draw(st.sampled_from(sorted(body)))]
    elif kind == "retype":
        body[draw(st.sampled_from(sorted(body)))] = draw(json_any)
    elif kind == "extra":
        body[draw(st.text(max_size=10).filter(lambda k: k not in body))] = draw(json_any)
    elif kind == "data_field":
        data[draw(st.sampled_from(sorted(data)))] = draw(json_any)
    elif kind == "data_extra":
        data[draw(st.text(max_size=10).filter(lambda k: k not in data))] = draw(json_any)
    elif kind == "routing":
        routing_key = draw(st.sampled_from([t for t in INPUT_TYPES if t != type_]))
    elif kind == "lines":
        body["type"] = routing_key = "order.placed"
        body["data"] = {
            "order_id": "o",
            "lines": draw(
                st.one_of(
                    st.just([]),
                    st.just([{"product_id": products[0], "quantity": 1}] * 2),
                    st.lists(
                        st.fixed_dictionaries({"product_id": st.text(max_size=70), "quantity": json_any}),
                        min_size=1,
                        max_size=3,
                    ),
                )
            ),
        }
    raw = json.dumps(body).encode()
    if kind == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif kind == "non_utf8":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00"])) + raw[at:]
    elif kind == "deep":  # nesting past the parser's recursion limit, or past the size limit
        depth = draw(st.sampled_from([1000, MAX_BYTES // 2, 100_000]))
        raw = b"[" * depth + b"]" * depth
    elif kind == "oversize":  # a valid event, padded past the limit: refused unparsed
        raw = json.dumps(body, indent=draw(st.integers(MAX_BYTES // 4, MAX_BYTES))).encode()
        assume(len(raw) > MAX_BYTES)
    return raw, routing_key


def random_message() -> st.SearchStrategy[tuple[bytes, str]]:
    oversize = st.tuples(
        st.binary(min_size=1, max_size=32), st.integers(1, 64)
    ).map(  # cheaper than 4 KiB draws
        lambda t: (t[0] * (MAX_BYTES // len(t[0]) + 2))[: MAX_BYTES + t[1]]
    )
    body = st.one_of(st.binary(max_size=300), json_any.map(lambda v: json.dumps(v).encode()), oversize)
    return st.tuples(body, st.sampled_from(INPUT_TYPES))


def test_random_and_near_valid_messages_end_in_the_dlq_and_change_nothing(settings, start_worker):
    run = uid("fuzz")
    r = settings.rabbitmq
    s = settings.model_copy(
        update={
            "rabbitmq": r.model_copy(
                update={
                    k: f"{getattr(r, k)}.{run}"
                    for k in (
                        "exchange",
                        "queue",
                        "events_exchange",
                        "dead_letter_exchange",
                        "dead_letter_queue",
                    )
                }
            ),
            "worker": settings.worker.model_copy(update={"max_message_bytes": MAX_BYTES}),
        }
    )
    bus = Bus(s)
    try:
        worker = start_worker(processes=2, settings_override=s)
        children = set(worker.children())
        products = [uid("FZ") for _ in range(3)]
        for p in products:
            bus.wait_result(bus.publish("stock.adjusted", {"product_id": p, "delta": 100})["id"])
        order = bus.publish(
            "order.placed", {"order_id": uid("O"), "lines": [{"product_id": products[0], "quantity": 7}]}
        )
        bus.wait_result(order["id"], "inventory.reserved")
        before = {p: figures(s, p) for p in products}
        control = uid("CTRL")
        sent: dict[str, bytes] = {}
        controls: list[str] = []

        fuzz_seed = int(os.environ.get("INVENTORY_FUZZ_SEED") or random.randrange(2**32))
        print(f"fuzz seed: {fuzz_seed} (INVENTORY_FUZZ_SEED={fuzz_seed} repeats this run)")

        @seed(fuzz_seed)
        @hsettings(
            max_examples=int(os.environ.get("INVENTORY_FUZZ_MESSAGES", "2000")),
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(
            msg=st.one_of(near_valid(products), random_message()),
            hdrs=headers,
            ctype=content_types,
            message_id=st.none() | st.text(max_size=50),
        )
        def publish(msg: tuple[bytes, str], hdrs: dict[str, Any], ctype: str, message_id: str | None) -> None:
            body, routing_key = msg
            try:
                parse_event(body, routing_key, MAX_BYTES)
                assume(False)  # valid by chance: not a bad message (rare)
            except InvalidMessage:
                pass
            fuzz_id = str(len(sent))
            props = pika.BasicProperties(
                content_type=ctype, headers={**hdrs, FUZZ_ID: fuzz_id}, message_id=message_id, delivery_mode=2
            )
            fast.basic_publish(s.rabbitmq.exchange, routing_key, body, properties=props)
            sent[fuzz_id] = body
            if len(sent) % 100 == 0:  # valid traffic keeps flowing through the same workers
                controls.append(bus.publish("stock.adjusted", {"product_id": control, "delta": 1})["id"])

        fast = bus.conn.channel()  # no publisher confirms: thousands in seconds; the DLQ count checks arrival
        publish()
        assert len(sent) >= 100

        # every bad message reaches the DLQ, with a reason
        deadline = time.monotonic() + 60 + 0.05 * len(sent)
        ch = bus.conn.channel()
        while ch.queue_declare(s.rabbitmq.dead_letter_queue, passive=True).method.message_count < len(sent):
            assert time.monotonic() < deadline, "not every bad message reached the DLQ"
            bus.conn.sleep(0.2)
        dead: dict[str, tuple[Any, bytes]] = {}
        while True:
            method, props, body = ch.basic_get(s.rabbitmq.dead_letter_queue, auto_ack=True)
            if method is None:
                break
            dead[str(props.headers[FUZZ_ID])] = (props, body)
        assert set(dead) == set(sent)
        for fuzz_id, (props, body) in dead.items():
            assert body == sent[fuzz_id]  # the body as it was sent
            reason = props.headers["x-inventory-error"]
            assert reason
            if len(body) > MAX_BYTES:
                assert reason.startswith(f"body of {len(body)} bytes exceeds the limit")  # never parsed
        assert ch.queue_declare(s.rabbitmq.queue, passive=True).method.message_count == 0
        ch.close()

        # the valid ones were applied, the bad ones changed nothing, the worker still answers at once
        for c in controls:
            bus.wait_result(c, "inventory.adjusted")
        assert {p: figures(s, p) for p in products} == before
        if controls:
            assert figures(s, control) == (len(controls), 0)
        last = bus.publish("stock.adjusted", {"product_id": products[1], "delta": 1})
        bus.wait_result(last["id"], "inventory.adjusted", timeout=10)
        assert figures(s, products[1]) == (before[products[1]][0] + 1, before[products[1]][1])
        assert set(worker.children()) == children  # no process died and was restarted
        worker.stop()
        assert "process died" not in worker.log_path.read_text()
    finally:
        bus.close()
        delete_topology(s)
