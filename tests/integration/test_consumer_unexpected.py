"""An unexpected exception while handling one message (a bug, data nobody foresaw) dead-letters
that message with the exception as the reason; the consumer goes on with the messages behind
it. Before, the exception left _handle() and the process died, so the message and every
prefetched one went to the next consumer, to the same end, until RabbitMQ's delivery limit."""

from __future__ import annotations

import json
import threading

from inventory_worker import bootstrap
from inventory_worker.adapters.postgres import Store
from inventory_worker.worker import consumer as consumer_module

from ..support import Bus, delete_topology, figures, uid, with_own_queues


def test_an_unexpected_error_dead_letters_only_its_message(settings, monkeypatch):
    s = with_own_queues(settings, uid("unexpected"))
    real_parse, real_apply = consumer_module.parse_event, Store.apply_batch

    def parse(body, *args):  # a bug in parsing, for one message
        if b"parse-bug" in body:
            raise RuntimeError("parse bug")
        return real_parse(body, *args)

    def apply(self, events, mark_published=()):  # a bug in applying, for one event
        if any(e["data"].get("order_id", "").startswith("apply-bug") for e in events):
            raise KeyError("apply bug")
        return real_apply(self, events, mark_published)

    monkeypatch.setattr(consumer_module, "parse_event", parse)
    monkeypatch.setattr(Store, "apply_batch", apply)
    bus = Bus(s)
    stop = threading.Event()
    c = bootstrap.consumer(s, stop)
    thread = threading.Thread(target=c.run, daemon=True)
    thread.start()
    try:
        product = uid("UX")
        bus.wait_result(bus.publish("stock.adjusted", {"product_id": product, "on_hand": 10})["id"])
        line = [{"product_id": product, "quantity": 1}]
        sent = [
            bus.publish("order.placed", {"order_id": uid(prefix), "lines": line})
            for prefix in ("ok-a", "parse-bug", "ok-b", "apply-bug", "ok-c")
        ]
        for ev in sent:
            if ev["data"]["order_id"].startswith("ok"):
                bus.wait_result(ev["id"], "inventory.reserved")
        assert figures(s, product) == (10, 3)
        reasons = {}
        for _ in range(50):
            reasons = {
                json.loads(body)["id"]: props.headers["x-inventory-error"]
                for props, body in bus.dead_letters()
            }
            if len(reasons) == 2:
                break
            bus.conn.sleep(0.1)
        assert reasons == {
            sent[1]["id"]: "unexpected error: RuntimeError('parse bug')",
            sent[3]["id"]: "unexpected error: KeyError('apply bug')",
        }
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(30)
        bus.close()
        delete_topology(s)
