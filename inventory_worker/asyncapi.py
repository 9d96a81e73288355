"""Generates docs/asyncapi.yaml (AsyncAPI 3.0) from the pydantic models in contract.py.

    python -m inventory_worker.asyncapi            # print the document
    python -m inventory_worker.asyncapi --write    # rewrite docs/asyncapi.yaml
    python -m inventory_worker.asyncapi --check    # exit 1 if the committed file has drifted

The payload schemas are the models' own JSON Schemas; the envelopes take their fields from
`Envelope` / `OutputEnvelope` with `type` pinned per message. Rules that live in validators
are mirrored in the models' JSON Schemas (json_schema_extra: exactly one of, excluded fields,
from != to) where JSON Schema can say them; the rest ("a product at most once per order",
"from_location_id differs from to_location_id") are stated in the models' descriptions.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from inventory_worker import __version__
from inventory_worker.config import RabbitMQSettings
from inventory_worker.contract import (
    DATA_MODELS,
    INPUT_TYPES,
    OUTPUT_MODELS,
    OUTPUT_TYPES,
    Envelope,
    OutputEnvelope,
)

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.yaml"
REF = "#/components/schemas/{model}"

INPUT_DESCRIPTIONS = {
    "order.placed": "Reserve every line of the order (shortfalls backordered where the products' policy "
    "allows), or none.",
    "order.cancelled": "Release the order's reservation (remembered if it comes before order.placed), or, "
    "with lines, those units only.",
    "order.completed": "Commit the reservation: on_hand and reserved both fall by the quantities.",
    "stock.adjusted": "Change on_hand (or incoming) by a delta or set it to a count, at a location; creates "
    "the product if new.",
    "location.configured": "Create a location or change its name, priority, active or fulfils_orders.",
    "channel.configured": "Create a channel or change its locations (in preference order) or strategy.",
    "product.configured": "Create a product (all figures 0) if missing, then set its policy fields.",
    "stock.moved": "Move units between quantity states (sellable, damaged, quality_control, disposed).",
    "stock.transferred": "Move units between two locations (or put them in transit), all lines or none.",
    "stock.received": "Incoming units arrived: on_hand rises, incoming falls; creates the product if new.",
    "reservation.extended": "Move a live reservation's deadline later (capped), or hold it until fulfilled.",
    "order.fulfilled": "A shipment: some reserved units leave, all lines or none; the last one commits the order.",
    "order.returned": "Fulfilled units come back, in a condition (sellable, damaged, quality_control, disposed).",
}
OUTPUT_DESCRIPTIONS = {
    "inventory.reserved": "Every line of the order is reserved until expires_at.",
    "inventory.rejected": "Nothing was reserved (or committed), and why.",
    "inventory.released": "A cancelled order's reservation was released.",
    "inventory.committed": "An order's stock left the warehouse.",
    "inventory.expired": "A reservation passed its deadline and was released; causation_id is the order.placed id.",
    "inventory.adjusted": "on_hand changed; the product's figures after the change.",
    "inventory.adjustment_rejected": "An adjustment, move, transfer or receipt that would break a stock rule "
    "changed nothing.",
    "inventory.low_stock": "available fell from above the product's threshold to at or below it.",
    "inventory.configured": "A location, channel or product configuration was applied: the whole of it.",
    "inventory.configuration_rejected": "A configuration change named something unknown or not allowed now.",
    "inventory.allocated": "Where a placed order is held, when not every line is held whole at default.",
    "inventory.moved": "Units moved between states, between locations, or were received.",
    "inventory.back_in_stock": "available rose from 0 to above 0.",
    "inventory.backorder_filled": "Backordered units of an open order were reserved (oldest order first); "
    "causation_id is the stock change's id, or the order.placed id when the "
    "sweeper filled it.",
    "inventory.reservation_extended": "A reservation's deadline moved (expires_at null: held until fulfilled).",
    "inventory.fulfilled": "Units of an order left, from these locations; what stays open.",
    "inventory.returned": "Units of an order came back, to these locations, in these conditions.",
}


def _name(routing_key: str) -> str:
    """order.placed -> OrderPlaced, inventory.adjustment_rejected -> InventoryAdjustmentRejected."""
    return "".join(part.capitalize() for part in routing_key.replace(".", "_").split("_"))


def _envelope(base: dict[str, Any], routing_key: str, data_model: str) -> dict[str, Any]:
    schema = copy.deepcopy(base)
    schema.pop("title", None)
    schema["properties"]["type"] = {
        "type": "string",
        "const": routing_key,
        "description": "equals the routing key",
    }
    schema["properties"]["data"] = {"$ref": REF.format(model=data_model)}
    return schema


def document(rabbitmq: RabbitMQSettings | None = None) -> dict[str, Any]:
    r = rabbitmq or RabbitMQSettings()
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (m, "validation") for m in (*DATA_MODELS.values(), *OUTPUT_MODELS.values())
    ]
    _, defs = models_json_schema(models, ref_template=REF)
    schemas: dict[str, Any] = dict(sorted(defs.get("$defs", {}).items()))
    in_env = Envelope.model_json_schema(mode="validation")
    out_env = OutputEnvelope.model_json_schema(mode="validation")

    amqp_exchange = {
        "orders": {"name": r.exchange, "type": "topic", "durable": True, "autoDelete": False, "vhost": "/"},
        "events": {
            "name": r.events_exchange,
            "type": "topic",
            "durable": True,
            "autoDelete": False,
            "vhost": "/",
        },
    }
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for direction, types, exchange, env, data_models, descriptions in (
        ("in", INPUT_TYPES, "orders", in_env, DATA_MODELS, INPUT_DESCRIPTIONS),
        ("out", OUTPUT_TYPES, "events", out_env, OUTPUT_MODELS, OUTPUT_DESCRIPTIONS),
    ):
        for key in types:
            name = _name(key)
            schemas[f"{name}Message"] = _envelope(env, key, data_models[key].__name__)
            messages[name] = {
                "name": key,
                "title": key,
                "summary": descriptions[key],
                "contentType": "application/json",
                "payload": {"$ref": REF.format(model=f"{name}Message")},
                "bindings": {"amqp": {"messageType": key, "bindingVersion": "0.3.0"}},
            }
            channel_id = f"{exchange}.{key}"
            channels[channel_id] = {
                "address": key,
                "title": f"{amqp_exchange[exchange]['name']} exchange, routing key {key}",
                "messages": {name: {"$ref": f"#/components/messages/{name}"}},
                "bindings": {
                    "amqp": {
                        "is": "routingKey",
                        "exchange": amqp_exchange[exchange],
                        "bindingVersion": "0.3.0",
                    }
                },
            }
            op: dict[str, Any] = {
                "action": "receive" if direction == "in" else "send",
                "channel": {"$ref": f"#/channels/{channel_id}"},
                "messages": [{"$ref": f"#/channels/{channel_id}/messages/{name}"}],
            }
            if direction == "in":
                op["summary"] = f"The worker consumes {key} from queue {r.queue}."
                op["bindings"] = {"amqp": {"ack": True, "bindingVersion": "0.3.0"}}
            else:
                op["summary"] = f"The worker publishes {key}, persistent, with publisher confirms."
                op["bindings"] = {"amqp": {"deliveryMode": 2, "mandatory": False, "bindingVersion": "0.3.0"}}
            operations[("consume" if direction == "in" else "publish") + name] = op

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "inventory-worker",
            "version": __version__,
            "description": (
                "Order events in, inventory events out. Generated from inventory_worker/contract.py by "
                "`python -m inventory_worker.asyncapi --write`; do not edit by hand.\n\n"
                f"Input: exchange `{r.exchange}` (topic); the worker's quorum queue `{r.queue}` is bound to "
                "every input routing key, which must equal the body's `type`. A body that breaks this "
                f"contract goes to `{r.dead_letter_queue}` with the reason in header `x-inventory-error`. "
                "The input `id` is the idempotency key.\n\n"
                f"Output: exchange `{r.events_exchange}` (topic), routing key = `type`; AMQP `message_id` "
                "= `id`. A result may be delivered more than once: deduplicate by `id`."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "Your RabbitMQ (rabbitmq.url in the worker's configuration).",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


class _Dumper(yaml.SafeDumper):
    """No anchors and aliases (repeated bindings are written out); multi-line text as blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    return yaml.dump(document(), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inventory_worker.asyncapi", description=__doc__.split("\n")[0]
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"rewrite {DOC_PATH.name}")
    group.add_argument("--check", action="store_true", help="exit 1 if the committed file differs")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(text)
        return 0
    if args.check:
        if not DOC_PATH.is_file() or DOC_PATH.read_text() != text:
            print(f"{DOC_PATH} is out of date: python -m inventory_worker.asyncapi --write", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
