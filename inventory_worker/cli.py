"""`inventory-worker`: migrate, run, publish, stock, history, verify, prune, dlq, cache, token."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections.abc import Callable, Sequence
from contextlib import closing

from .config import ConfigError, Settings, load_settings

EXIT_USAGE = 2


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from .migrations import migrate

    applied = migrate(settings.database)
    if applied:
        for name in applied:
            print(f"applied {name}")
    else:
        print("database is up to date")
    return 0


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from .logs import configure
    from .migrations import pending
    from .supervisor import run

    configure(settings.logging, process="supervisor")
    todo = pending(settings.database)
    if todo:
        print("the database needs migrating first (inventory-worker migrate): " + ", ".join(todo),
              file=sys.stderr)
        return 1
    return run(settings, processes=args.processes)


def _publish(settings: Settings, args: argparse.Namespace) -> int:
    from . import amqp, bootstrap
    from .contract import InvalidMessage, make_event

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
        amqp.declare_topology(channel, settings.rabbitmq)
        amqp.Publisher(channel, settings.rabbitmq).publish_input(body)
    finally:
        conn.close()
    print(json.dumps(body))
    return 0


def _stock(settings: Settings, args: argparse.Namespace) -> int:
    import re

    from . import bootstrap
    from .contract import PRODUCT_ID_PATTERN

    if not re.fullmatch(PRODUCT_ID_PATTERN, args.product_id):
        print("invalid product id: 1 to 64 characters of letters, digits and ._:-", file=sys.stderr)
        return EXIT_USAGE
    with closing(bootstrap.postgres(settings)) as store:
        figures = store.stock(args.product_id)
    if figures is None:
        print(f"unknown product: {args.product_id}", file=sys.stderr)
        return 1
    print(json.dumps(figures))
    return 0


def _dlq(settings: Settings, args: argparse.Namespace) -> int:
    from .dlq import DeadLetterQueue

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
            print(f"replayed {len(done)} message(s) to exchange {settings.rabbitmq.exchange}", file=sys.stderr)
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
    from . import bootstrap
    from .cache_rebuild import rebuild

    with closing(bootstrap.postgres(settings)) as store, closing(bootstrap.redis_cache(settings)) as cache:
        report = rebuild(store, cache)
    print(json.dumps({"products": report.products, "written": report.written}))
    return 0


def _token_create(settings: Settings, args: argparse.Namespace) -> int:
    from .auth import new_token, token_config

    token = new_token()
    entry = token_config(args.name, args.role, token)
    print(f"New token for {args.name!r}, shown only this once; give it to the client and keep no copy:\n")
    print(f"  {token}\n")
    print("Add it to the configuration under auth.tokens (only its hash is stored):\n")
    print(f"  - {json.dumps(entry)}\n")
    print("or, with no config file, in the environment (this variable holds the whole list):\n")
    print(f"  INVENTORY_AUTH__TOKENS='{json.dumps([entry])}'")
    return 0


def _history(settings: Settings, args: argparse.Namespace) -> int:
    import re

    from . import bootstrap
    from .contract import PRODUCT_ID_PATTERN

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
    print(f"{'id':>8}  {'occurred_at (UTC)':<26}  {'reason':<7}  {'on_hand±':>8}  {'reserved±':>9}"
          f"  {'on_hand':>9}  {'reserved':>9}  order / event / note")
    for r in rows:
        ref = " ".join(str(x) for x in (r["order_id"], r["event_id"], r["note"]) if x is not None)
        when = r["occurred_at"].astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        print(f"{r['id']:>8}  {when:<26}  {r['reason']:<7}  {r['on_hand_delta']:>+8}  {r['reserved_delta']:>+9}"
              f"  {r['on_hand_after']:>9}  {r['reserved_after']:>9}  {ref}")
    return 0


def _verify(settings: Settings, args: argparse.Namespace) -> int:
    from . import bootstrap
    from .audit import Audit

    with closing(bootstrap.postgres(settings)) as store, closing(bootstrap.redis_cache(settings)) as cache:
        mismatches, checked = Audit(store, cache).verify(settle_seconds=args.settle)
    for m in mismatches:
        print(m.as_json() if args.json else f"{m.product_id}: [{m.check}] {m.message}")
    print(f"verify: {checked['products']} products, {checked['cached']} cached entries checked; "
          f"{len(mismatches)} mismatch{'es' if len(mismatches) != 1 else ''}", file=sys.stderr)
    if "cache_error" in checked:
        print(f"verify: the Redis cache was not checked: {checked['cache_error']}", file=sys.stderr)
        return 1
    return 1 if mismatches else 0


def _prune(settings: Settings, args: argparse.Namespace) -> int:
    from . import bootstrap
    from .housekeeping import prune

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

    p = sub.add_parser("migrate", help="create the database if missing and apply sql/ migrations")
    p.set_defaults(func=_migrate)

    p = sub.add_parser("run", help="run the worker until SIGTERM/SIGINT")
    p.add_argument("--processes", type=int, metavar="N",
                   help="consumer processes (default: worker.processes, else the number of CPUs)")
    p.set_defaults(func=_run)

    p = sub.add_parser("publish", help="publish one input event through the message contract")
    p.add_argument("type", choices=["order.placed", "order.cancelled", "order.completed", "stock.adjusted"])
    p.add_argument("--data", required=True, metavar="JSON", help='the event\'s data, e.g. \'{"order_id": "o-1"}\'')
    p.add_argument("--id", metavar="UUID", help="the idempotency key (default: a new UUID)")
    p.set_defaults(func=_publish)

    p = sub.add_parser("stock", help="print a product's figures from PostgreSQL")
    p.add_argument("product_id")
    p.set_defaults(func=_stock)

    p = sub.add_parser("dlq", help="inspect, replay or purge dead-lettered messages")
    dsub = p.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    for name, text in (("list", "print each dead-lettered message as a JSON line (left in place)"),
                       ("replay", "publish them again to the input exchange, with their routing key"),
                       ("purge", "delete them")):
        d = dsub.add_parser(name, help=text)
        d.add_argument("--limit", type=int, metavar="N", help="at most N messages")
        if name != "list":
            d.add_argument("--message-id", action="append", metavar="ID",
                           help="only the message with this AMQP message id (repeatable)")
        if name == "purge":
            d.add_argument("--yes", action="store_true", help="really delete")
    p.set_defaults(func=_dlq)

    p = sub.add_parser("cache", help="the Redis stock cache")
    csub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    csub.add_parser("rebuild", help="refill Redis from PostgreSQL (version-checked, safe while running)")
    p.set_defaults(func=_cache)
    p = sub.add_parser("token", help="manage API tokens for the HTTP endpoint")
    token_sub = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = token_sub.add_parser("create", help="print a new random token once, and the config entry to add")
    t.add_argument("name", help="who the token is for (letters, digits and ._-), shown in logs")
    t.add_argument("--role", action="append", required=True, metavar="ROLE",
                   help="a role of the token (repeatable): inventory:read for GET /inventory/..., "
                   "or the role set as auth.metrics_role")
    t.set_defaults(func=_token_create)

    p = sub.add_parser("history", help="print a product's stock movements (the ledger), newest first")
    p.add_argument("product_id")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="at most N movements (default 50)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_history)

    p = sub.add_parser("verify", help="check every figure against the ledger, the reservations and "
                       "the Redis cache; exit 1 on any mismatch")
    p.add_argument("--settle", type=float, default=1.0, metavar="SECONDS",
                   help="re-check a cache difference after this long before reporting it (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per mismatch")
    p.set_defaults(func=_verify)

    p = sub.add_parser("prune", help="delete published outbox rows and old idempotency keys, in short batches")
    p.add_argument("--outbox-days", type=float, default=7, metavar="DAYS",
                   help="published outbox rows older than this (default 7)")
    p.add_argument("--events-days", type=float, default=30, metavar="DAYS",
                   help="idempotency keys older than this, at least 1 (default 30): keep them longer than "
                   "any message can be redelivered or replayed, or it applies again")
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
        from .config import TokenSettings

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

        from .store import TransientError

        if isinstance(exc, (TransientError, psycopg2.OperationalError, pika.exceptions.AMQPError, OSError)):
            print(f"inventory-worker: cannot reach a dependency: {str(exc).strip() or type(exc).__name__}",
                  file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
