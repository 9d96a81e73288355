"""`inventory-worker`: migrate, run, publish, stock, locations, history, verify, prune, dlq, cache,
token."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from typing import Any

from inventory_worker.config import ConfigError, Settings, load_settings
from inventory_worker.contract import INPUT_TYPES

EXIT_USAGE = 2


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from inventory_worker.adapters.migrations import migrate

    applied = migrate(settings.database)
    if applied:
        for name in applied:
            print(f"applied {name}")
    else:
        print("database is up to date")
    return 0


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from inventory_worker.dependencies import check_at_start, describe
    from inventory_worker.logs import configure, get_logger
    from inventory_worker.supervisor import run

    configure(settings.logging, process="supervisor")
    log = get_logger(__name__)
    # From here on the worker writes log lines only (JSON lines for a collector), these too.
    try:
        todo = check_at_start(settings)
    except Exception as exc:
        failure = describe(exc, settings)
        if failure is None:
            raise
        log.error(f"cannot start: {failure}", **failure.fields())
        return 1
    if todo:
        log.error("cannot start: the database needs migrating first (inventory-worker migrate)", pending=todo)
        return 1
    return run(settings, processes=args.processes)


def _publish(settings: Settings, args: argparse.Namespace) -> int:
    from inventory_worker import bootstrap
    from inventory_worker.adapters import rabbitmq
    from inventory_worker.contract import InvalidMessage, make_event

    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        print(f"--data is not JSON: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        body = make_event(args.type, data, event_id=args.id)
    except InvalidMessage as exc:
        print(f"not a valid {args.type} event: {exc}", file=sys.stderr)
        return EXIT_USAGE
    conn = bootstrap.rabbitmq_connect(settings)()
    try:
        channel = conn.channel()
        rabbitmq.declare_topology(channel, settings.rabbitmq)
        rabbitmq.Publisher(channel, settings.rabbitmq).publish_input(body)
    finally:
        conn.close()
    print(json.dumps(body))
    return 0


def _stock(settings: Settings, args: argparse.Namespace) -> int:
    import re

    from inventory_worker import bootstrap
    from inventory_worker.contract import PRODUCT_ID_PATTERN

    if not re.fullmatch(PRODUCT_ID_PATTERN, args.product_id):
        print("invalid product id: 1 to 64 characters of letters, digits and ._:-", file=sys.stderr)
        return EXIT_USAGE
    from inventory_worker.adapters.redis_cache import encode_detail

    with closing(bootstrap.postgres(settings)) as store:
        detail = store.product_detail(args.product_id)
    if detail is None:
        print(f"unknown product: {args.product_id}", file=sys.stderr)
        return 1
    print(encode_detail(detail).decode())  # the document of GET /inventory/{id}/detail
    return 0


def _locations(settings: Settings, args: argparse.Namespace) -> int:
    from inventory_worker import bootstrap

    with closing(bootstrap.postgres(settings)) as store:
        for row in store.locations_and_channels():
            print(json.dumps(row))
    return 0


def _dlq(settings: Settings, args: argparse.Namespace) -> int:
    from inventory_worker.ops.dlq import DeadLetterQueue

    ids = set(getattr(args, "message_id", None) or [])

    def selected(m: object) -> bool:
        return not ids or getattr(m, "message_id", None) in ids

    dlq = DeadLetterQueue(settings.rabbitmq)
    try:
        if args.dlq_command == "list":
            for m in dlq.messages(args.limit):
                print(json.dumps(m.summary()))
            return 0
        if args.dlq_command == "replay":
            done = dlq.replay(selected, args.limit)
            for m in done:
                print(json.dumps({"replayed": m.message_id, "routing_key": m.routing_key}))
            print(
                f"replayed {len(done)} message(s) to exchange {settings.rabbitmq.exchange}", file=sys.stderr
            )
            return 0
        if not args.yes:
            print("purge deletes dead-lettered messages for good: add --yes", file=sys.stderr)
            return EXIT_USAGE
        count = len(dlq.drop(selected, args.limit)) if ids or args.limit else dlq.purge()
        print(f"purged {count} message(s) from {settings.rabbitmq.dead_letter_queue}", file=sys.stderr)
        return 0
    finally:
        dlq.close()


def _cache(settings: Settings, args: argparse.Namespace) -> int:
    from inventory_worker import bootstrap
    from inventory_worker.ops.cache_rebuild import rebuild

    with closing(bootstrap.postgres(settings)) as store, closing(bootstrap.redis_cache(settings)) as cache:
        report = rebuild(store, cache)
    print(json.dumps({"products": report.products, "written": report.written}))
    return 0


def _token_create(settings: Settings, args: argparse.Namespace) -> int:
    from inventory_worker.http.auth import checked_roles, new_token, token_config

    known = checked_roles(settings.auth)
    unknown = [r for r in args.role if r not in known]
    if unknown and not args.unchecked_role:
        print(
            f"inventory-worker: no route checks role {', '.join(map(repr, unknown))}, so it would grant "
            f"nothing; roles checked with this configuration: {', '.join(sorted(known))} (for /metrics, "
            "set auth.metrics_role first; --unchecked-role accepts it anyway)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    token = new_token()
    entry = token_config(args.name, args.role, token)
    print(f"New token for {args.name!r}, shown only this once; give it to the client and keep no copy:\n")
    print(f"  {token}\n")
    print("Add it to the configuration under auth.tokens (only its hash is stored):\n")
    print(f"  - {json.dumps(entry)}\n")
    print(
        "or set this environment variable, with or without a config file (it replaces the whole\n"
        "auth.tokens list, the file's entries included: put every token in it):\n"
    )
    print(f"  INVENTORY_AUTH__TOKENS='{json.dumps([entry])}'\n")
    print(
        "Then restart the worker, which reads tokens only when it starts: stop it (Ctrl-C or SIGTERM)\n"
        "and run `inventory-worker run` again, with the variable exported if you chose it\n"
        "(`systemctl restart inventory-worker` under systemd)."
    )
    return 0


def _history(settings: Settings, args: argparse.Namespace) -> int:
    import re

    from inventory_worker import bootstrap
    from inventory_worker.contract import PRODUCT_ID_PATTERN

    if not re.fullmatch(PRODUCT_ID_PATTERN, args.product_id):
        print("invalid product id: 1 to 64 characters of letters, digits and ._:-", file=sys.stderr)
        return EXIT_USAGE
    with closing(bootstrap.postgres(settings)) as store:
        if store.stock(args.product_id) is None:
            print(f"unknown product: {args.product_id}", file=sys.stderr)
            return 1
        rows = store.history(args.product_id, args.limit)
    if args.json:
        for r in rows:
            print(json.dumps(r, default=str))
        return 0
    # Each movement's change, then the figures the ledger gives right after it.
    print(
        f"{'id':>8}  {'occurred_at (UTC)':<26}  {'reason':<7}  {'on_hand±':>8}  {'reserved±':>9}"
        f"  {'on_hand':>9}  {'reserved':>9}  order / event / note"
    )
    for r in rows:
        ref = " ".join(str(x) for x in (r["order_id"], r["event_id"], r["note"]) if x is not None)
        when = r["occurred_at"].astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        print(
            f"{r['id']:>8}  {when:<26}  {r['reason']:<7}  {r['on_hand_delta']:>+8}  {r['reserved_delta']:>+9}"
            f"  {r['on_hand_after']:>9}  {r['reserved_after']:>9}  {ref}"
        )
    return 0


def _verify(settings: Settings, args: argparse.Namespace) -> int:
    from inventory_worker import bootstrap
    from inventory_worker.ops.audit import Audit

    with closing(bootstrap.postgres(settings)) as store, closing(bootstrap.redis_cache(settings)) as cache:
        mismatches, checked = Audit(store, cache).verify(settle_seconds=args.settle)
    for m in mismatches:
        print(m.as_json() if args.json else f"{m.product_id}: [{m.check}] {m.message}")
    print(
        f"verify: {checked['products']} products, {checked['cached']} cached entries checked; "
        f"{len(mismatches)} mismatch{'es' if len(mismatches) != 1 else ''}",
        file=sys.stderr,
    )
    if "cache_error" in checked:
        print(f"verify: the Redis cache was not checked: {checked['cache_error']}", file=sys.stderr)
        return 1
    return 1 if mismatches else 0


def _prune(settings: Settings, args: argparse.Namespace) -> int:
    from inventory_worker import bootstrap
    from inventory_worker.ops.prune import prune

    if args.events_days < 1:
        print("--events-days must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.outbox_days < 0:
        print("--outbox-days must not be negative", file=sys.stderr)
        return EXIT_USAGE
    with closing(bootstrap.postgres(settings)) as store:
        deleted = prune(store, args.outbox_days, args.events_days)
    print(json.dumps({"deleted": deleted}))
    return 0


def _describe_field(schema: dict[str, Any], schemas: dict[str, Any]) -> str:
    """A JSON Schema property in a few words: type and bounds."""
    schema = next((a for a in schema.get("anyOf", []) if a.get("type") != "null"), schema)
    if "$ref" in schema:
        model = schemas[schema["$ref"].rsplit("/", 1)[1]]
        return "{" + ", ".join(model["properties"]) + "}"
    kind = schema.get("type", "value")
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    if kind == "array":
        n = f"{schema.get('minItems', 0)}-{schema['maxItems']}" if "maxItems" in schema else "any number"
        return f"list of {n} {_describe_field(schema['items'], schemas)}"
    bounds = []
    if "minimum" in schema or "maximum" in schema:
        bounds.append(f"{schema.get('minimum', '')}..{schema.get('maximum', '')}")
    if "minLength" in schema or "maxLength" in schema:
        bounds.append(f"{schema.get('minLength', 0)}-{schema['maxLength']} characters")
    if "pattern" in schema:
        bounds.append(f"matching {schema['pattern']}")
    return " ".join([kind, *bounds])


def _data_help() -> str:
    """What each input type's data needs, from the message contract (as docs/asyncapi.yaml)."""
    from inventory_worker.asyncapi import INPUT_DESCRIPTIONS, document
    from inventory_worker.contract import DATA_MODELS

    schemas = document()["components"]["schemas"]
    out = ["what --data holds for each TYPE (from the message contract, docs/asyncapi.yaml):"]
    for type_, model in DATA_MODELS.items():
        schema = schemas[model.__name__]
        out.append(f"  {type_}: {INPUT_DESCRIPTIONS[type_]}")
        nested = []
        for name, prop in schema["properties"].items():
            need = "required" if name in schema.get("required", ()) else "optional"
            out.append(f"    {name:<24} {need}, {_describe_field(prop, schemas)}")
            ref = (prop.get("items") or {}).get("$ref")
            if ref:
                nested.append(schemas[ref.rsplit("/", 1)[1]])
        for sub in nested:
            for name, prop in sub["properties"].items():
                need = "required" if name in sub.get("required", ()) else "optional"
                out.append(f"      {sub['title'] + '.' + name:<34} {need}, {_describe_field(prop, schemas)}")
        if schema.get("description"):  # the rules the field list cannot show (exactly one of ...)
            out.append("    rules: " + " ".join(schema["description"].split()))
    return "\n".join(out)


def _add(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    epilog: str = "",
    description: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand whose --help says what it does and shows examples (kept as written)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=description or help[0].upper() + help[1:] + ".",
        epilog=epilog.strip("\n") or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inventory-worker",
        description="Keeps an online shop's stock right: consumes order events from RabbitMQ, "
        "applies them to PostgreSQL exactly once in effect, publishes the results.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="YAML config file (default: $INVENTORY_CONFIG, else config/config.yaml if present); "
        "INVENTORY_* environment variables override it",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _add(
        sub,
        "migrate",
        "create the database if missing and apply sql/ migrations",
        """
Applies, in order, the migrations in sql/ not yet recorded in the database (each in a transaction),
and prints each one applied, or "database is up to date". Safe to run again, and while workers run.

examples:
  inventory-worker migrate
  inventory-worker --config /etc/inventory-worker/config.yaml migrate
""",
    )
    p.set_defaults(func=_migrate)

    p = _add(
        sub,
        "run",
        "run the worker until SIGTERM/SIGINT",
        """
Starts the consumer processes and the HTTP endpoint, and restarts any that dies. Refuses to start
while migrations are pending, or when a dependency refuses its credentials; waits and retries
while one cannot be reached. Logs one JSON line per event to stderr.

examples:
  inventory-worker run
  inventory-worker run --processes 4
  INVENTORY_HTTP__PORT=9090 inventory-worker run
""",
    )
    p.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="consumer processes (default: worker.processes, else the number of CPUs)",
    )
    p.set_defaults(func=_run)

    p = _add(
        sub,
        "publish",
        "publish one input event through the message contract",
        _data_help()
        + """

It prints the event it published (with its id and occurred_at) as one JSON line.

examples:
  inventory-worker publish stock.adjusted --data '{"product_id": "SKU-1", "delta": 10}'
  inventory-worker publish stock.adjusted --data '{"product_id": "SKU-1", "on_hand": 25}'
  inventory-worker publish order.placed \\
      --data '{"order_id": "o-1", "lines": [{"product_id": "SKU-1", "quantity": 3}]}'
  inventory-worker publish order.completed --data '{"order_id": "o-1"}'
  inventory-worker publish location.configured --data '{"location_id": "store-1", "priority": 1}'
  inventory-worker publish stock.adjusted --data '{"product_id": "SKU-1", "location_id": "store-1", "delta": 5}'
  inventory-worker publish stock.moved \\
      --data '{"product_id": "SKU-1", "quantity": 1, "from": "sellable", "to": "damaged"}'
""",
    )
    p.add_argument("type", metavar="TYPE", choices=list(INPUT_TYPES), help="one of " + ", ".join(INPUT_TYPES))
    p.add_argument("--data", required=True, metavar="JSON", help="the event's data (see below)")
    p.add_argument(
        "--id",
        metavar="UUID",
        help="the idempotency key (default: a new UUID); publishing again with the same id changes nothing",
    )
    p.set_defaults(func=_publish)

    p = _add(
        sub,
        "stock",
        "print a product's stock (per location, states, policy) from PostgreSQL",
        """
Prints one JSON object, the document of GET /inventory/{id}/detail: the product's version, totals
(on_hand, reserved, available, damaged, quality_control, incoming), policy, and its level at each
location, by (priority, location_id). Exit status 1 for an unknown product.

example:
  inventory-worker stock SKU-1
""",
    )
    p.add_argument("product_id", metavar="PRODUCT_ID")
    p.set_defaults(func=_stock)

    p = _add(
        sub,
        "locations",
        "list the locations and the channels from PostgreSQL",
        """
Prints one JSON line per location ({"kind": "location", location_id, name, priority, active,
fulfils_orders}, by priority then id), then one per channel ({"kind": "channel", channel_id,
strategy, locations}: locations null means every active, order-fulfilling location).

example:
  inventory-worker locations
""",
    )
    p.set_defaults(func=_locations)

    p = _add(
        sub,
        "dlq",
        "inspect, replay or purge dead-lettered messages",
        """
examples:
  inventory-worker dlq list --limit 10
  inventory-worker dlq replay --message-id 3f1c...
  inventory-worker dlq purge --yes
""",
    )
    dsub = p.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    for name, text, example in (
        ("list", "print each dead-lettered message as a JSON line (left in place)", "dlq list --limit 10"),
        (
            "replay",
            "publish them again to the input exchange, with their routing key",
            "dlq replay --message-id ID",
        ),
        ("purge", "delete them", "dlq purge --yes --message-id ID"),
    ):
        d = _add(dsub, name, text, f"example:\n  inventory-worker {example}\n")
        d.add_argument("--limit", type=int, metavar="N", help="at most N messages")
        if name != "list":
            d.add_argument(
                "--message-id",
                action="append",
                metavar="ID",
                help="only the message with this AMQP message id (repeatable)",
            )
        if name == "purge":
            d.add_argument("--yes", action="store_true", help="really delete")
    p.set_defaults(func=_dlq)

    p = _add(
        sub,
        "cache",
        "the Redis stock cache",
        """
example:
  inventory-worker cache rebuild
""",
    )
    csub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    _add(
        csub,
        "rebuild",
        "refill Redis from PostgreSQL (version-checked, safe while running)",
        """
Prints {"products": N, "written": M}: entries already newer in Redis are left alone.

example:
  inventory-worker cache rebuild
""",
    )
    p.set_defaults(func=_cache)
    p = _add(
        sub,
        "token",
        "manage API tokens for the HTTP endpoint",
        """
example:
  inventory-worker token create shop-frontend --role inventory:read
""",
    )
    token_sub = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = _add(
        token_sub,
        "create",
        "print a new random token once, and the config entry to add",
        """
Only the token's SHA-256 goes into the configuration (auth.tokens, or INVENTORY_AUTH__TOKENS); the
worker reads it when it starts. A role no route checks is refused (--unchecked-role to insist).

examples:
  inventory-worker token create shop-frontend --role inventory:read
  INVENTORY_AUTH__METRICS_ROLE=metrics:read inventory-worker token create prometheus --role metrics:read
""",
    )
    t.add_argument(
        "name", metavar="NAME", help="who the token is for (letters, digits and ._-), shown in logs"
    )
    t.add_argument(
        "--role",
        action="append",
        required=True,
        metavar="ROLE",
        help="a role of the token (repeatable): inventory:read for GET /inventory/..., "
        "or the role set as auth.metrics_role",
    )
    t.add_argument(
        "--unchecked-role",
        action="store_true",
        help="accept a role no route checks with the current configuration",
    )
    t.set_defaults(func=_token_create)

    p = _add(
        sub,
        "history",
        "print a product's stock movements (the ledger), newest first",
        """
Each movement's change and the figures right after it, with the order, event id or note behind it.

examples:
  inventory-worker history SKU-1
  inventory-worker history SKU-1 --limit 500 --json
""",
    )
    p.add_argument("product_id", metavar="PRODUCT_ID")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="at most N movements (default 50)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_history)

    p = _add(
        sub,
        "verify",
        "check every figure against the ledger, the reservations and the Redis cache; exit 1 on any mismatch",
        """
Prints each mismatch and a summary line on stderr. Read-only; safe while the worker runs.

examples:
  inventory-worker verify
  inventory-worker verify --json --settle 5
""",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="re-check a cache difference after this long before reporting it (default 1)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per mismatch")
    p.set_defaults(func=_verify)

    p = _add(
        sub,
        "prune",
        "delete published outbox rows and old idempotency keys, in short batches",
        """
Prints {"deleted": {...}} with the rows deleted per table. Safe while the worker runs (a cron job).

examples:
  inventory-worker prune
  inventory-worker prune --outbox-days 1 --events-days 14
""",
    )
    p.add_argument(
        "--outbox-days",
        type=float,
        default=7,
        metavar="DAYS",
        help="published outbox rows older than this (default 7)",
    )
    p.add_argument(
        "--events-days",
        type=float,
        default=30,
        metavar="DAYS",
        help="idempotency keys older than this, at least 1 (default 30): keep them longer than "
        "any message can be redelivered or replayed, or it applies again",
    )
    p.set_defaults(func=_prune)
    return parser


Command = Callable[[Settings, argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "limit", None) is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if getattr(args, "processes", None) is not None and args.processes < 1:
        parser.error("--processes must be at least 1")
    if getattr(args, "func", None) is _token_create:
        from inventory_worker.config import TokenSettings

        if not re.fullmatch(TokenSettings.model_fields["name"].metadata[0].pattern, args.name):
            parser.error("token NAME must be 1 to 64 letters, digits and ._-")
    if getattr(args, "id", None) is not None:
        import uuid

        try:
            args.id = uuid.UUID(args.id)
        except ValueError:
            parser.error("--id must be a UUID")
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"inventory-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    func: Command = args.func
    try:
        return func(settings, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clean one-line error for operators; --debug-like detail in logs
        import pika.exceptions
        import psycopg2

        from inventory_worker.adapters.postgres import TransientError
        from inventory_worker.dependencies import describe

        failure = describe(exc, settings)
        if failure is not None and failure.permanent:  # one line naming where and why
            print(f"inventory-worker: {failure}", file=sys.stderr)
            return 1
        if failure is not None:
            print(f"inventory-worker: cannot reach a dependency: {failure}", file=sys.stderr)
            return 1
        if isinstance(exc, (TransientError, psycopg2.OperationalError, pika.exceptions.AMQPError, OSError)):
            print(
                f"inventory-worker: cannot reach a dependency: {str(exc).strip() or type(exc).__name__}",
                file=sys.stderr,
            )
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
