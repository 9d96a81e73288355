"""Test helpers shared by every test layer: isolated settings, a bus client, a worker runner.

Each pytest run gets its own PostgreSQL database, its own RabbitMQ exchanges and queues and
its own Redis key prefix (all suffixed with a run id), so runs never collide, even when
several share one set of services.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pika
import psycopg2
import pytest
import redis
from pydantic import SecretStr

from inventory_worker.config import Settings, TokenSettings
from inventory_worker.contract import make_event

REPO = Path(__file__).resolve().parent.parent
CONFIG_FILE = REPO / "config" / "config.yaml"  # what workers started by the tests read

# The bearer token every test worker accepts with the role inventory:read: isolated_settings puts
# it in the settings, settings_env in every worker's environment (INVENTORY_AUTH__TOKENS='[]'
# in extra_env starts a worker without it).
TEST_TOKEN = "test-token-not-a-secret"
TEST_TOKEN_SETTINGS = TokenSettings(
    name="test",
    roles=["inventory:read"],
    sha256=hashlib.sha256(TEST_TOKEN.encode()).hexdigest(),
    rate_per_second=1_000_000,
    burst=1_000_000,
)


def promtool() -> str:
    """The path of Prometheus's promtool, which some tests run; a clear failure without it."""
    path = shutil.which("promtool")
    if not path:
        pytest.fail(
            "promtool not found: `make test` installs it where apt-get is available"
            " (Debian package prometheus); elsewhere install Prometheus's promtool"
        )
    return path


def uid(prefix: str = "P") -> str:
    """A product or order id unique to this test (tests share one database per run)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _ephemeral_low() -> int:
    """Where the range the kernel takes outgoing connections' local ports from begins."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default (macOS starts at 49152)


_handed_out: set[int] = set()
_port_rng = random.Random()  # its own: a test seeding `random` must not make runs pick alike


def free_port() -> int:
    """A port free now, for a server a test starts, below the ephemeral range: a port the kernel
    picked there (bind to 0) could be taken as the local port of any outgoing connection (to
    PostgreSQL, RabbitMQ, Redis) before the server binds it, which failed a CI run ("already
    in use"). Random, so that test runs side by side seldom pick the same one, and never one
    this process handed out before (its server may not be listening yet)."""
    low = _ephemeral_low()
    for port in _port_rng.sample(range(max(1024, low - 12_000), low), 200):
        if port in _handed_out:
            continue
        _handed_out.add(port)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # all taken (unlikely): what the kernel picks
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def isolated_settings(base: Settings, run_id: str) -> Settings:
    rmq = base.rabbitmq
    return base.model_copy(
        update={
            "database": base.database.model_copy(update={"dbname": f"inventory_test_{run_id}"}),
            "redis": base.redis.model_copy(update={"key_prefix": f"inventory-test:{run_id}:"}),
            "rabbitmq": rmq.model_copy(
                update={
                    "exchange": f"orders.{run_id}",
                    "queue": f"inventory.orders.{run_id}",
                    "events_exchange": f"inventory.events.{run_id}",
                    "dead_letter_exchange": f"inventory.dlx.{run_id}",
                    "dead_letter_queue": f"inventory.orders.dlq.{run_id}",
                }
            ),
            "http": base.http.model_copy(
                update={"host": "127.0.0.1", "port": free_port(), "management_port": free_port()}
            ),
            "logging": base.logging.model_copy(update={"format": "json"}),
            # Every test worker accepts TEST_TOKEN (see http_get), with no practical rate limit.
            "auth": base.auth.model_copy(update={"tokens": [TEST_TOKEN_SETTINGS]}),
        }
    )


def settings_env(settings: Settings, only_changed: bool = False, **extra: Any) -> dict[str, str]:
    """The settings as INVENTORY_* variables, for a worker started as a subprocess.

    `only_changed`: only those that differ from their defaults, for another version's worker
    (the benchmark's --compare), which refuses variables of settings it does not know yet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    env["INVENTORY_CONFIG"] = str(CONFIG_FILE)
    data = settings.model_dump(mode="json")
    for section, model in settings:  # secrets are masked by model_dump: take their real values
        for key, value in model:
            if isinstance(value, SecretStr):
                data[section][key] = value.get_secret_value()
    tokens = data["auth"]["tokens"]
    if not any(
        t["name"] == TEST_TOKEN_SETTINGS.name for t in tokens
    ):  # settings not made by isolated_settings
        tokens.append(TEST_TOKEN_SETTINGS.model_dump(mode="json"))
    for section, values in data.items():
        fields = type(getattr(settings, section)).model_fields
        for key, value in values.items():
            if value is None:
                continue
            if only_changed and key in fields and not fields[key].is_required():
                default = fields[key].get_default(call_default_factory=True)
                if value == (default.get_secret_value() if isinstance(default, SecretStr) else default):
                    continue
            env[f"INVENTORY_{section.upper()}__{key.upper()}"] = (
                json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            )
    for key, value in extra.items():
        env[key] = str(value)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


# ---- waiting ------------------------------------------------------------------------------


def poll(
    predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Calls `predicate` until it returns something true (and returns that), or fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ---- RabbitMQ -----------------------------------------------------------------------------


class Bus:
    """Publishes input events and collects result events and dead letters, for one test."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.conn = pika.BlockingConnection(pika.URLParameters(str(settings.rabbitmq.url)))
        self.channel = self.conn.channel()
        self.channel.confirm_delivery()
        from inventory_worker.adapters.rabbitmq import declare_topology

        declare_topology(self.channel, settings.rabbitmq)
        result = self.channel.queue_declare("", exclusive=True, auto_delete=True)
        self.results_queue = result.method.queue
        self.channel.queue_bind(self.results_queue, settings.rabbitmq.events_exchange, routing_key="#")
        self.results: list[dict[str, Any]] = []
        self.result_props: list[Any] = []

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass

    def publish(self, type_: str, data: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
        body = make_event(type_, data, event_id=uuid.UUID(event_id) if event_id else None)
        self.publish_raw(json.dumps(body).encode(), routing_key=type_)
        return body

    def publish_raw(
        self, body: bytes, routing_key: str, properties: pika.BasicProperties | None = None
    ) -> None:
        self.channel.basic_publish(
            self.settings.rabbitmq.exchange,
            routing_key,
            body,
            properties=properties or pika.BasicProperties(delivery_mode=2, content_type="application/json"),
        )

    def drain(self, limit: int = 2000) -> None:
        """Takes what is queued, at most `limit` (so that a waiting predicate is checked even
        while results keep coming)."""
        for _ in range(limit):
            method, props, body = self.channel.basic_get(self.results_queue, auto_ack=True)
            if method is None:
                return
            self.results.append(json.loads(body))
            self.result_props.append(props)

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 15.0
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            if predicate(self.results):
                return self.results
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s; results so far: "
                    + json.dumps([(r["type"], r["data"]) for r in self.results])[:3000]
                )
            self.conn.sleep(0.05)

    def results_for(self, causation_id: str) -> list[dict[str, Any]]:
        self.drain()
        return [r for r in self.results if r["causation_id"] == causation_id]

    def wait_result(
        self, causation_id: str, type_: str | None = None, timeout: float = 15.0
    ) -> dict[str, Any]:
        def found(rs: list[dict[str, Any]]) -> bool:
            return any(
                r["causation_id"] == causation_id and (type_ is None or r["type"] == type_) for r in rs
            )

        rs = self.wait_for(found, timeout)
        return next(
            r for r in rs if r["causation_id"] == causation_id and (type_ is None or r["type"] == type_)
        )

    def dead_letters(self, requeue: bool = True) -> list[tuple[Any, bytes]]:
        """Every message now in the DLQ (left there unless requeue=False)."""
        out = []
        ch = self.conn.channel()
        try:
            while True:
                method, props, body = ch.basic_get(self.settings.rabbitmq.dead_letter_queue, auto_ack=False)
                if method is None:
                    break
                out.append((props, body))
            # closing the channel returns the unacked ones to the queue
        finally:
            if requeue:
                ch.close()
            else:
                ch.basic_ack(0, multiple=True)
                ch.close()
        return out


def with_own_queues(settings: Settings, tag: str) -> Settings:
    """The same settings with exchanges and queues of their own: a worker no other test feeds."""
    r = settings.rabbitmq
    names = ("exchange", "queue", "events_exchange", "dead_letter_exchange", "dead_letter_queue")
    return settings.model_copy(
        update={"rabbitmq": r.model_copy(update={k: f"{getattr(r, k)}.{tag}" for k in names})}
    )


def delete_topology(settings: Settings) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(str(settings.rabbitmq.url)))
    try:
        ch = conn.channel()
        r = settings.rabbitmq
        for q in (r.queue, r.dead_letter_queue):
            ch.queue_delete(q)
        for x in (r.exchange, r.events_exchange, r.dead_letter_exchange):
            ch.exchange_delete(x)
    finally:
        conn.close()


# ---- PostgreSQL and Redis -----------------------------------------------------------------


def drop_database(settings: Settings) -> None:
    conn = psycopg2.connect(**settings.database.dsn(dbname="postgres"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{settings.database.dbname}" WITH (FORCE)')
    finally:
        conn.close()


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis(**settings.redis.client_kwargs())


def delete_redis_keys(settings: Settings) -> None:
    client = redis_client(settings)
    keys = list(client.scan_iter(match=settings.redis.key_prefix + "*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])


@contextmanager
def pg(settings: Settings) -> Iterator[Any]:
    conn = psycopg2.connect(**settings.database.dsn())
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def wait_for_lock_waiter(settings: Settings, my_pid: int, timeout: float = 20.0) -> None:
    """Until another session waits for a lock that session `my_pid` holds (the worker, on ours;
    not any waiter: other tests' workers share this database)."""

    def waiting() -> bool:
        with pg(settings) as watch:
            watch.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND %s = ANY(pg_blocking_pids(pid))",
                (my_pid,),
            )
            return watch.fetchone()[0] > 0

    poll(waiting, timeout, 0.05, "the worker to wait for the locked product")


def figures(settings: Settings, product_id: str) -> tuple[int, int] | None:
    with pg(settings) as cur:
        cur.execute("SELECT on_hand, reserved FROM products WHERE product_id = %s", (product_id,))
        row = cur.fetchone()
    return (row[0], row[1]) if row else None


# ---- the worker as a real process ---------------------------------------------------------


def config_of(code: Path) -> Path:
    """Another version's own config file (a key this checkout's file adds would stop it), or
    this checkout's if that version has none."""
    own = code / "config" / "config.yaml"
    return own if own.exists() else CONFIG_FILE


class WorkerProcess:
    """`inventory-worker run` in a subprocess, configured only through the environment."""

    def __init__(
        self,
        settings: Settings,
        processes: int = 2,
        extra_env: dict[str, str] | None = None,
        log_path: Path | None = None,
        own_management_port: bool = True,
        code: Path | None = None,
    ) -> None:
        if own_management_port and settings.http.management_port is not None:
            # Workers started from one run's settings would all share its management port.
            settings = settings.model_copy(
                update={"http": settings.http.model_copy(update={"management_port": free_port()})}
            )
        self.settings = settings
        self.processes = processes
        self.env = settings_env(settings, only_changed=code is not None, **(extra_env or {}))
        # Another version's inventory_worker/ and sql/ (the benchmark's --compare): run from its
        # folder, which `python -m` puts first on the path, and on PYTHONPATH for its children.
        self.code = code
        if code is not None:
            self.env["PYTHONPATH"] = str(code)
            self.env["INVENTORY_CONFIG"] = str(config_of(code))
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self.metrics_dir: Path | None = None

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> WorkerProcess:
        # The metrics folder is ours, not the supervisor's own: a SIGKILLed supervisor cannot
        # remove its own, and the suite and the chaos run SIGKILL some (beside the log, if any).
        if self.metrics_dir is None:
            self.metrics_dir = Path(
                tempfile.mkdtemp(
                    prefix="inventory-metrics-", dir=self.log_path.parent if self.log_path else None
                )
            )
        self.env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        self._log_file = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inventory_worker", "run", "--processes", str(self.processes)],
            env=self.env,
            cwd=self.code or REPO,
            stdout=self._log_file,
            stderr=self._log_file,
            start_new_session=True,
        )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.http.port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.http.management_port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early with {self.proc.returncode}; log: {self.log_path}")
            try:
                with urllib.request.urlopen(self.base_url + "/readyz", timeout=2) as r:
                    if r.status == 200 and self._consumers_attached():
                        return
            except Exception:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout}s; log: {self.log_path}")

    def _consumers_attached(self) -> bool:
        conn = pika.BlockingConnection(pika.URLParameters(str(self.settings.rabbitmq.url)))
        try:
            q = conn.channel().queue_declare(self.settings.rabbitmq.queue, passive=True)
            return q.method.consumer_count >= self.processes
        finally:
            conn.close()

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self, timeout: float = 40.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.remove_files()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL to the whole process group: the supervisor and every child."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.remove_files()

    def remove_files(self) -> None:
        """Closes the log and removes the metrics folder (once the supervisor is gone)."""
        if self._log_file not in (None, subprocess.DEVNULL):
            self._log_file.close()
            self._log_file = None
        if self.metrics_dir is not None and self.proc is not None and self.proc.poll() is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None


# ---- HTTP ---------------------------------------------------------------------------------


def http_get(
    url: str,
    token: str | None = TEST_TOKEN,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, Any, bytes]:
    """One request; returns (status, headers, body) for every status, errors included.

    The headers are looked up case-insensitively, as HTTP has it (granian sends them lowercase).
    """
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


# ---- header tables as other AMQP clients write them (Java, .NET, Go), which pika cannot ------------


def amqp_shortstr(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return bytes((len(raw),)) + raw


def amqp_table(entries: list[tuple[str, bytes]]) -> bytes:
    """An AMQP field table (length-prefixed) from (name, encoded field value) pairs."""
    body = b"".join(amqp_shortstr(k) + v for k, v in entries)
    return struct.pack(">I", len(body)) + body


def amqp_double(x: float) -> bytes:
    return b"d" + struct.pack(">d", x)


def amqp_timestamp(seconds: int) -> bytes:
    return b"T" + struct.pack(">Q", seconds)


def amqp_longstr(raw: bytes, kind: bytes = b"S") -> bytes:  # kind b"x": a byte array
    return kind + struct.pack(">I", len(raw)) + raw


def amqp_array(values: list[bytes]) -> bytes:
    body = b"".join(values)
    return b"A" + struct.pack(">I", len(body)) + body


def content_header_props(headers_table: bytes, message_id: str | None = None) -> bytes:
    """A Basic content header's property flags and values: headers, delivery mode 2 [, message id]."""
    flags = (1 << 13) | (1 << 12) | ((1 << 7) if message_id is not None else 0)
    return (
        struct.pack(">H", flags)
        + headers_table
        + b"\x02"
        + (amqp_shortstr(message_id) if message_id is not None else b"")
    )


def publish_with_raw_properties(
    channel: Any, exchange: str, routing_key: str, body: bytes, properties: bytes
) -> None:
    """Writes a Basic.Publish whose content header carries `properties` as given (flags and
    values, e.g. content_header_props()) on a pika BlockingChannel, as another client would."""
    impl = channel._impl
    n = impl.channel_number
    method = struct.pack(">HHH", 60, 40, 0) + amqp_shortstr(exchange) + amqp_shortstr(routing_key) + b"\x00"
    header = struct.pack(">HHQ", 60, 0, len(body)) + properties
    impl.connection._output_marshaled_frames(
        [
            b"".join(
                (
                    struct.pack(">BHI", 1, n, len(method)),
                    method,
                    b"\xce",
                    struct.pack(">BHI", 2, n, len(header)),
                    header,
                    b"\xce",
                    struct.pack(">BHI", 3, n, len(body)),
                    body,
                    b"\xce",
                )
            )
        ]
    )


# ---- what a stopped run left behind -------------------------------------------------------


class RunOutput:
    """A program's output lines as they come, each with its monotonic arrival time."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        import threading

        self.proc = proc
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, needle: str, timeout: float) -> str:
        """The first line containing `needle`; fails if the program ends or time runs out first."""
        deadline = time.monotonic() + timeout
        while True:
            for _, line in list(self.lines):
                if needle in line:
                    return line
            assert self.proc.poll() is None or self._thread.is_alive(), (
                f"exited with {self.proc.returncode} before printing {needle!r}:\n{self.text()[-4000:]}"
            )
            assert time.monotonic() < deadline, f"no {needle!r} after {timeout}s:\n{self.text()[-4000:]}"
            time.sleep(0.2)

    def finish(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._thread.join(5)
        return rc


def leftover_processes(tag_var: str, tag: str, paths: tuple[str, ...] = ()) -> list[str]:
    """Live processes (zombies aside) with `tag_var=tag` in their environment, or whose command
    line or working directory is under one of `paths`: what a stopped run left behind."""
    marker = f"{tag_var}={tag}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    env = f.read().split(b"\0")
                cwd = os.readlink(f"/proc/{name}/cwd")
            except OSError:
                env, cwd = [], ""
        except (OSError, IndexError):
            continue
        if marker in env or any(p in cmd or cwd.startswith(p) for p in paths):
            found.append(f"{name} {cmd[:200]}")
    return found
