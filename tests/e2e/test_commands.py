"""The commands as a user runs them: `make run` on a clean state (README.md, Quick start), and the
CLI (docs/operations.md, CLI)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from inventory_worker.cli import main as cli_main

from ..support import (
    REPO,
    delete_redis_keys,
    delete_topology,
    drop_database,
    figures,
    free_port,
    http_get,
    pg,
    poll,
    settings_env,
    uid,
    with_own_queues,
)

CLI = Path(sys.executable).with_name("inventory-worker")


def cli(settings: Any, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), *args],
        env=settings_env(settings, **env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def fresh(settings: Any) -> Any:
    """A clean state: a database, queues, a Redis prefix and an HTTP port nobody used."""
    tag = uuid.uuid4().hex[:8]
    s = with_own_queues(settings, tag)
    return s.model_copy(
        update={
            "database": s.database.model_copy(update={"dbname": f"{settings.database.dbname}_{tag}"}),
            "redis": s.redis.model_copy(update={"key_prefix": f"{settings.redis.key_prefix}{tag}:"}),
            "http": s.http.model_copy(update={"port": free_port(), "management_port": free_port()}),
        }
    )


@pytest.fixture
def clean_state(settings):
    s = fresh(settings)
    yield s
    for cleanup in (delete_topology, delete_redis_keys, drop_database):
        try:
            cleanup(s)
        except Exception as exc:
            print(f"cleanup {cleanup.__name__} failed: {exc}")


def session_processes(sid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-s", str(sid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


# ==== make run ====================================================================================


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_starts_on_a_clean_state_gets_ready_and_stops_on_sigterm(clean_state, logs_dir):
    env = settings_env(clean_state, INVENTORY_WORKER__PROCESSES=1)
    for k in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # when the suite itself runs under make
        env.pop(k, None)
    log_path = logs_dir / f"make-run-{uuid.uuid4().hex[:6]}.log"
    with open(log_path, "wb") as log:
        make = subprocess.Popen(
            ["make", "run"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        base = f"http://127.0.0.1:{clean_state.http.port}"
        deadline = time.monotonic() + 90
        status = None
        while status != 200:
            assert make.poll() is None, (
                f"make run exited with {make.returncode}: {log_path.read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"not ready (last {status}): {log_path.read_text()[-3000:]}"
            try:
                status = http_get(base + "/readyz", timeout=3)[0]
            except OSError:
                pass
            time.sleep(0.2)
        assert "applied 001_schema.sql" in log_path.read_text()  # it migrated the new database
        # make waits for the worker it started; SIGTERM that worker as a service manager would
        (worker_pid,) = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-P", str(make.pid)], capture_output=True, text=True
            ).stdout.split()
        ]
        os.kill(worker_pid, signal.SIGTERM)
        assert make.wait(60) == 0
        deadline = time.monotonic() + 15
        while left := session_processes(make.pid):  # no child left behind
            assert time.monotonic() < deadline, f"processes left: {left}"
            time.sleep(0.2)
        text = log_path.read_text()
        assert '"worker stopped"' in text
        assert '"killed after the grace period"' not in text
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_installs_the_package_alone_and_make_test_the_test_extras(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)

    def dry_run(target: str) -> str:  # the commands make would run, none run
        r = subprocess.run(
            ["make", "-n", f"VENV={venv}", target],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("MAKE")},
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    run = dry_run("run")
    assert "pip install --quiet -e .\n" in run and "[test]" not in run
    assert "pip install --quiet -e '.[test]'" in dry_run("test")
    # once `make run` installed, `make test` still installs the extras (and the other way round)
    subprocess.run(["touch", str(venv / ".installed-run")], check=True)
    assert "[test]" in dry_run("test") and "pip install" not in dry_run("run")
    (venv / ".installed-run").unlink()
    subprocess.run(["touch", str(venv / ".installed-test")], check=True)
    assert "pip install --quiet -e .\n" in dry_run("run") and "pip install" not in dry_run("test")


# ==== the CLI =====================================================================================


def test_help_from_the_installed_command(settings):
    r = cli(settings, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: inventory-worker"), r.stderr


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    """The same CLI without a new interpreter, for checks that need no service."""
    try:
        code = cli_main(list(args))
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_for_every_command(capsys):
    for cmd in ("", "migrate", "run", "publish", "stock"):
        code, out, err = in_process(capsys, *cmd.split(), "--help")
        assert code == 0, err
        assert out.startswith(f"usage: inventory-worker {cmd}".rstrip()), (cmd, out)
    code, out, _ = in_process(capsys, "--help")
    assert all(cmd in out for cmd in ("migrate", "run", "publish", "stock"))
    assert "--processes" in in_process(capsys, "run", "--help")[1]
    publish = in_process(capsys, "publish", "--help")[1]
    assert "--data" in publish and "--id" in publish and "order.placed" in publish


def _commands(parser, path=()):
    """Every subcommand path, leaves and groups: ("dlq",), ("dlq", "list"), ..."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


def test_every_subcommand_has_a_description_and_examples(capsys):
    from inventory_worker.cli import build_parser

    commands = list(_commands(build_parser()))
    assert len(commands) >= 15
    for path, _ in commands:
        code, out, err = in_process(capsys, *path, "--help")
        assert code == 0, err
        usage, description = out.split("\n\n")[:2]
        assert description.strip() and not description.startswith(("options:", "positional")), (path, out)
        assert "\nexample" in out and f"inventory-worker {' '.join(path)}" in out.split("\nexample")[1], (
            path,
            out,
        )


def test_publish_help_lists_what_each_type_needs_from_the_contract(capsys):
    from inventory_worker.contract import DATA_MODELS

    out = in_process(capsys, "publish", "--help")[1]
    for type_, model in DATA_MODELS.items():
        block = re.split(r"\n(?!    )", out.split(f"\n  {type_}: ")[1])[0]  # up to the next type
        lines = {ln.split()[0]: ln for ln in block.splitlines()[1:] if ln.startswith("    ") and ln.split()}
        for name, field in model.model_fields.items():
            assert ("required," if field.is_required() else "optional,") in lines[name], (type_, name, block)
    assert "exactly one of: delta, on_hand" in out
    assert "quantity" in out and "1..1000000" in out and "1-100" in out  # the bounds the models set


def test_migrate_creates_the_database_and_is_idempotent(clean_state):
    first = cli(clean_state, "migrate")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"applied {p.name}" for p in sorted((REPO / "sql" / "migrations").glob("*.sql"))
    ] + [f"applied procedures/{p.name}" for p in sorted((REPO / "sql" / "procedures").glob("*.sql"))]
    second = cli(clean_state, "migrate")
    assert (second.returncode, second.stdout.strip()) == (0, "database is up to date")
    with pg(clean_state) as cur:
        cur.execute("SELECT count(*) FROM products")
        assert cur.fetchone() == (0,)


def test_publish_then_stock_shows_the_figures(worker, settings):
    pid, order = uid(), uid("O")
    adj = cli(settings, "publish", "stock.adjusted", "--data", json.dumps({"product_id": pid, "delta": 12}))
    assert adj.returncode == 0, adj.stderr
    sent = json.loads(adj.stdout)
    assert (sent["type"], sent["data"]) == ("stock.adjusted", {"product_id": pid, "delta": 12})
    event_id = str(uuid.uuid4())
    placed = cli(
        settings,
        "publish",
        "order.placed",
        "--id",
        event_id,
        "--data",
        json.dumps({"order_id": order, "lines": [{"product_id": pid, "quantity": 5}]}),
    )
    assert placed.returncode == 0, placed.stderr
    assert json.loads(placed.stdout)["id"] == event_id
    deadline = time.monotonic() + 20
    while figures(settings, pid) != (12, 5):
        assert time.monotonic() < deadline, figures(settings, pid)
        time.sleep(0.1)
    shown = cli(settings, "stock", pid)
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)  # one JSON object: the detail view (spec 8), the figures' keys too
    assert {k: detail[k] for k in ("product_id", "on_hand", "reserved", "available", "version")} == {
        "product_id": pid,
        "on_hand": 12,
        "reserved": 5,
        "available": 7,
        "version": 2,
    }
    assert detail["locations"] == [
        {
            "location_id": "default",
            "priority": 0,
            "active": True,
            "fulfils_orders": True,
            "on_hand": 12,
            "reserved": 5,
            "available": 7,
            "damaged": 0,
            "quality_control": 0,
            "incoming": 0,
            "safety_stock": 0,
        }
    ]
    assert shown.stdout.startswith('{"version":2,"product_id":')


def test_locations_lists_locations_then_channels(worker, settings):
    loc, web = uid("store"), uid("web")
    for type_, data in (
        ("location.configured", {"location_id": loc, "priority": -1000000, "active": False}),
        ("channel.configured", {"channel_id": web, "locations": [loc, "default"]}),
    ):
        assert cli(settings, "publish", type_, "--data", json.dumps(data)).returncode == 0

    def listed() -> list[dict[str, Any]] | None:
        r = cli(settings, "locations")
        assert r.returncode == 0, r.stderr
        rows = [json.loads(line) for line in r.stdout.splitlines()]
        return rows if any(x.get("channel_id") == web for x in rows) else None

    rows = poll(listed, what="the channel listed")
    kinds = [x["kind"] for x in rows]
    assert kinds == sorted(kinds, key=["location", "channel"].index)  # locations first
    assert rows[0] == {
        "kind": "location",
        "location_id": loc,
        "name": None,
        "priority": -1000000,
        "active": False,
        "fulfils_orders": True,
    }  # the lowest priority possible: first
    assert {
        "kind": "location",
        "location_id": "default",
        "name": None,
        "priority": 0,
        "active": True,
        "fulfils_orders": True,
    } in rows
    assert {
        "kind": "channel",
        "channel_id": web,
        "strategy": "priority",
        "locations": [loc, "default"],
    } in rows
    assert [x["locations"] for x in rows if x.get("channel_id") == "default"] == [None]


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["publish", "order.placed", "--data", '{"order_id": "o", "lines": []}'],
            "not a valid order.placed event: data.lines",
        ),
        (
            [
                "publish",
                "order.placed",
                "--data",
                '{"order_id": "o", "lines": [{"product_id": "A", "quantity": 0}]}',
            ],
            "data.lines.0.quantity",
        ),
        (
            ["publish", "stock.adjusted", "--data", '{"product_id": "A", "delta": 1, "colour": "red"}'],
            "data.colour",
        ),
        (["publish", "stock.adjusted", "--data", "{not json"], "--data is not JSON"),
        (["publish", "order.cancelled", "--data", '{"order_id": "o"}', "--id", "42"], "--id must be a UUID"),
        (["publish", "order.shipped", "--data", "{}"], "invalid choice"),
        (["stock", "bad id"], "invalid product id"),
    ],
)
def test_invalid_input_exits_2_with_a_clear_message(capsys, args, message):
    code, out, err = in_process(capsys, *args)
    assert (code, out) == (2, ""), err
    assert message in err


def test_invalid_data_from_the_installed_command(settings):
    r = cli(settings, "publish", "order.placed", "--data", '{"order_id": "o", "lines": []}')
    assert (r.returncode, r.stdout) == (2, "")
    assert "not a valid order.placed event: data.lines: List should have at least 1 item" in r.stderr


def test_stock_of_an_unknown_product_exits_1(settings):
    pid = uid("NONE")
    r = cli(settings, "stock", pid)
    assert (r.returncode, r.stdout) == (1, "")
    assert f"unknown product: {pid}" in r.stderr


def test_unreachable_dependency_exits_1_without_a_traceback(settings):
    r = cli(settings, "stock", "SKU-1", INVENTORY_DATABASE__PORT=str(free_port()))
    assert r.returncode == 1
    assert "cannot reach a dependency" in r.stderr and "Traceback" not in r.stderr
