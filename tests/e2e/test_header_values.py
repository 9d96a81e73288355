"""Header values that other AMQP clients send (Java, .NET and Go send floats as doubles) never
stop a consumer: each message is applied, or dead-lettered with a reason, and the messages
behind it are applied, by the same worker processes.

pika's decoder turned a double of 1e20 into an int it could not encode again (dead-lettering
raised struct.error and the process died), and raised on a timestamp beyond `datetime` in frame
decoding, breaking the connection at every delivery, until RabbitMQ's delivery limit.
The headers are written by hand (tests/support.py), as those clients write them.
"""

from __future__ import annotations

import json
import math
import struct
import time
import uuid

import pika
import pika.exceptions

from inventory_worker.contract import make_event

from ..support import (
    Bus,
    amqp_array,
    amqp_double,
    amqp_longstr,
    amqp_table,
    amqp_timestamp,
    content_header_props,
    delete_topology,
    figures,
    publish_with_raw_properties,
    uid,
    with_own_queues,
)

CASES = {
    "double_1e20": amqp_double(1e20),
    "double_nan": amqp_double(math.nan),
    "double_inf": amqp_double(math.inf),
    "double_minus_inf": amqp_double(-math.inf),
    "float_1e30": b"f" + struct.pack(">f", 1e30),
    "decimal": b"D" + struct.pack(">Bi", 2, 12345),
    "timestamp_2_63": amqp_timestamp(2**63 - 1),
    "nested": b"F"
    + amqp_table(
        [
            ("price", amqp_double(1e20)),
            (
                "when",
                amqp_array(
                    [amqp_timestamp(2**63 - 1), amqp_double(-1e300), b"D" + struct.pack(">Bi", 255, 7)]
                ),
            ),
        ]
    ),
    "nested_nan": amqp_array([b"F" + amqp_table([("x", amqp_double(math.nan))])]),
    "long_string": amqp_longstr(b"s" * 100_000),
    "long_string_not_utf8": amqp_longstr(b"\xff\xfe\x00"),
    "byte_array": amqp_longstr(b"\x00\x01\xff", b"x"),
    "unknown_field_type": b"?" + b"\x00" * 8,
}


def publish(r, channel, routing_key: str, body: bytes, case: str, field: bytes) -> None:
    table = amqp_table([("x-case", amqp_longstr(case.encode())), ("x-v", field)])
    publish_with_raw_properties(
        channel, r.exchange, routing_key, body, content_header_props(table, message_id=str(uuid.uuid4()))
    )


def test_no_header_value_stops_a_consumer(settings, start_worker):
    s = with_own_queues(settings, uid("hdr"))
    r = s.rabbitmq
    bus = Bus(s)
    try:
        worker = start_worker(processes=2, settings_override=s)
        children = set(worker.children())
        product = uid("HV")
        bus.wait_result(bus.publish("stock.adjusted", {"product_id": product, "on_hand": 1000})["id"])

        taken: dict[str, int] = {}  # case -> valid adjustments the broker took with that header
        orders = []
        for case, field in CASES.items():
            conn = pika.BlockingConnection(pika.URLParameters(str(r.url)))
            ch = conn.channel()
            try:
                # an invalid body, then a valid one, both with the header; then a plain valid order
                publish(r, ch, "order.placed", b'{"not": "an event"}', case, field)
                adjust = make_event("stock.adjusted", {"product_id": product, "delta": 1})
                publish(r, ch, "stock.adjusted", json.dumps(adjust).encode(), case, field)
                conn.process_data_events(time_limit=0.3)
                ch.queue_declare(r.queue, passive=True)  # a round trip: the broker read them
                taken[case] = 1
            except pika.exceptions.ConnectionClosedByBroker as exc:
                # RabbitMQ refuses some values (NaN, ±Inf, unknown types) from the publisher;
                # a broker that takes them delivers them to the worker, which then copes.
                assert exc.reply_code == 541, exc
            finally:
                if conn.is_open:
                    conn.close()
            orders.append(
                bus.publish(
                    "order.placed", {"order_id": uid("O"), "lines": [{"product_id": product, "quantity": 1}]}
                )
            )
        assert "double_1e20" in taken and "timestamp_2_63" in taken and "nested" in taken

        started = time.monotonic()
        for o in orders:  # the valid orders behind each of them are applied
            bus.wait_result(o["id"], "inventory.reserved", timeout=20)
        assert time.monotonic() - started < 15
        assert figures(s, product) == (1000 + len(taken), len(orders))  # the valid bodies were applied

        dead = bus.dead_letters()
        by_case = {}
        for props, body in dead:
            assert body == b'{"not": "an event"}'
            by_case[props.headers["x-case"]] = props
        assert set(by_case) == set(taken)  # every invalid one, once, with its reason
        for case, props in by_case.items():
            assert props.headers["x-inventory-error"].startswith("id: Field required"), case
        assert by_case["double_1e20"].headers["x-v"] == 1e20
        assert by_case["timestamp_2_63"].headers["x-v"] == 2**63 - 1
        assert by_case["byte_array"].headers["x-v"] == b"\x00\x01\xff"
        assert by_case["nested"].headers["x-v"]["price"] == 1e20

        assert set(worker.children()) == children  # no consumer process died
        worker.stop()
        log = worker.log_path.read_text()
        assert "process died" not in log and "consumer failed" not in log
    finally:
        bus.close()
        delete_topology(s)
