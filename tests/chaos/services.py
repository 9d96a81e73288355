"""PRIVATE PostgreSQL, Redis and RabbitMQ instances, owned by one test run, that may be killed.

The services on the default ports are shared with other test runs and must never be stopped;
the chaos suite therefore starts its own, on free ports below the ephemeral range (so a port
stays free across restarts), with their data and logs in one temporary directory:

  PostgreSQL  initdb + pg_ctl from /usr/lib/postgresql/*/bin (as user `postgres` when root)
  Redis       redis-server, no persistence
  RabbitMQ    its own node name, AMQP, distribution and epmd ports, mnesia and log dirs

`PrivateServices` starts all three (RabbitMQ, the slow one, in parallel with the others) and
`close()` stops everything it started, by process id, whatever happened in between.
"""

from __future__ import annotations

import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pika
import psycopg2
import redis
from pydantic import AnyUrl, SecretStr


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_taken: set[int] = set()


def pick_port() -> int:
    """A free port below the ephemeral range (32768+), so no client socket takes it meanwhile."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 32000)
        if port in _taken or port % 1000 in (672, 673):  # keep clear of other brokers' defaults
            continue
        if _port_free(port):
            _taken.add(port)
            return port
    raise RuntimeError("no free port found")


class GiveUp(Exception):
    """Raised by a wait_until check: waiting longer is pointless (the server exited, or the run stops)."""


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.1) -> float:
    """Polls check() until truthy; returns the seconds it took."""
    started = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - started < timeout:
        try:
            if check():
                return time.monotonic() - started
        except GiveUp:
            raise
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout}s (last error: {last!r})")


def _run(
    cmd: list[str],
    timeout: float = 120,
    check: bool = True,
    env: dict[str, str] | None = None,
    user: str | None = None,
) -> subprocess.CompletedProcess[str]:
    if user and os.geteuid() == 0:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check, env=env)


class PrivatePostgres:
    """`password`: the superuser `postgres` has it, and every connection must give it (scram-sha-256
    for local and TCP connections alike, no `trust`)."""

    def __init__(self, root: Path, password: str | None = None) -> None:
        self.password = password
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not bins:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
        self.bin = Path(bins[-1]).parent
        self.dir = root / "postgresql"
        self.data = self.dir / "data"
        self.port = pick_port()
        self.user = "postgres" if os.geteuid() == 0 else None  # initdb refuses to run as root
        self.started_seconds = 0.0

    def _ctl(self, *args: str, timeout: float = 60) -> None:
        _run([str(self.bin / "pg_ctl"), "-D", str(self.data), *args], timeout=timeout, user=self.user)

    def start(self) -> float:
        t0 = time.monotonic()
        if not self.data.exists():
            self.dir.mkdir(parents=True)
            if self.user:
                pw = pwd.getpwnam(self.user)
                os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            auth = ["-A", "trust"]
            if self.password is not None:
                pwfile = self.dir / "pwfile"
                pwfile.write_text(self.password + "\n")
                if self.user:
                    os.chown(pwfile, pw.pw_uid, pw.pw_gid)
                auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
            _run(
                [
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.data),
                    *auth,
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
                user=self.user,
            )
            # fsync=off is safe here: the suite kills processes, never the OS. Commits stay
            # synchronous: with synchronous_commit=off an immediate stop loses acknowledged ones.
            with open(self.data / "postgresql.conf", "a") as f:
                f.write(
                    f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.dir}'\nfsync = off\n"
                    "max_connections = 60\n"
                    "shared_buffers = 32MB\n"
                )
        self._ctl("-l", str(self.dir / "server.log"), "-w", "-t", "60", "start")
        self.started_seconds = time.monotonic() - t0
        return self.started_seconds

    def stop(self, mode: str = "fast") -> None:
        """mode `immediate` is a crash: no checkpoint, recovery at the next start."""
        if (self.data / "postmaster.pid").exists():
            self._ctl("-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast", down_seconds: float = 0.0) -> None:
        self.stop(mode)
        time.sleep(down_seconds)
        self.start()

    def terminate_worker_backends(self) -> int:
        """Cuts every connection of the worker (application_name inventory-worker...)."""
        conn = psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            dbname="postgres",
            connect_timeout=5,
            password=self.password,
        )
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name LIKE 'inventory-worker%' AND pid <> pg_backend_pid()"
                )
                return int(cur.fetchone()[0])
        finally:
            conn.close()

    def close(self) -> None:
        try:
            self.stop("immediate")
        except Exception:
            pidfile = self.data / "postmaster.pid"
            if pidfile.exists():
                try:
                    os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
                except (OSError, ValueError):
                    pass


class PrivateRedis:
    """`password`: started with --requirepass."""

    def __init__(self, root: Path, password: str | None = None) -> None:
        self.password = password
        self.dir = root / "redis"
        self.dir.mkdir(parents=True)
        self.port = pick_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_seconds = 0.0

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=5,
            socket_connect_timeout=5,
            password=self.password,
        )

    def start(self) -> float:
        t0 = time.monotonic()
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--protected-mode",
                "no",
                *(["--requirepass", self.password] if self.password is not None else []),
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        wait_until(lambda: self.client().ping(), 30, "redis")
        self.started_seconds = time.monotonic() - t0
        return self.started_seconds

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.proc = None

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def flush(self) -> None:
        self.client().flushall()

    def kill_clients(self) -> int:
        return int(self.client().execute_command("CLIENT", "KILL", "TYPE", "normal"))

    def close(self) -> None:
        self.stop()


class PrivateRabbitMQ:
    def __init__(self, root: Path) -> None:
        self.dir = root / "rabbitmq"
        self.dir.mkdir(parents=True)
        self.port, self.dist_port, self.epmd_port = pick_port(), pick_port(), pick_port()
        self.node = f"chaos{self.port}@localhost"
        (self.dir / "rabbitmq.conf").write_text("loopback_users = none\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(self.dir),  # the Erlang cookie lives here, for the server and the CLI
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_seconds = 0.0
        self.give_up = False  # set when the run stops while this node is starting

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def ctl(self, *args: str, timeout: float = 120) -> str:
        r = _run(
            ["/usr/lib/rabbitmq/bin/rabbitmqctl", "-q", "-n", self.node, *args],
            timeout=timeout,
            env=self.env,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def _amqp_ok(self) -> bool:
        params = pika.URLParameters(self.url)
        params.socket_timeout = 2
        params.connection_attempts = 1
        pika.BlockingConnection(params).close()
        return True

    def start(self) -> float:
        t0 = time.monotonic()
        log = open(self.dir / "server.out", "ab")
        self.proc = subprocess.Popen(
            ["/usr/lib/rabbitmq/bin/rabbitmq-server"],
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=self.dir,
        )
        log.close()

        def up() -> bool:
            if self.give_up:
                raise GiveUp("the run is stopping")
            if self.proc is not None and self.proc.poll() is not None:
                raise GiveUp(f"rabbitmq-server exited with {self.proc.returncode}; see {self.dir}")
            return self._amqp_ok()

        wait_until(up, 120, "rabbitmq", interval=0.3)
        self.started_seconds = time.monotonic() - t0
        return self.started_seconds

    def add_user(self, name: str, password: str) -> None:
        """A user with every permission on the default vhost."""
        self.ctl("add_user", name, password)
        self.ctl("set_permissions", "-p", "/", name, ".*", ".*", ".*")

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        wait_until(self._amqp_ok, 60, "rabbitmq app", interval=0.2)

    def restart_app(self, down_seconds: float = 0.0) -> None:
        self.stop_app()
        time.sleep(down_seconds)
        self.start_app()

    def restart_node(self) -> None:
        """A full restart of the Erlang node (stop, then start again)."""
        self.stop_node()
        self.start()

    def stop_node(self) -> None:
        try:
            self.ctl("stop", timeout=60)
        except Exception:
            pass
        if self.proc is not None:
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def close_all_connections(self) -> None:
        self.ctl("close_all_connections", "chaos: connections cut")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait(30)
        self.proc = None
        stop_epmd(self.epmd_port, self.env)


def stop_epmd(port: int, env: dict[str, str]) -> None:
    """Stops the private epmd on `port` (started by our node). It refuses to go while a dead
    node is still registered, so ask until it is gone."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        subprocess.run(
            ["epmd", "-port", str(port), "-kill"], capture_output=True, env=env, timeout=30, check=False
        )
        if _port_free(port):
            return
        time.sleep(0.3)


class PrivateServices:
    """The three services, started for one test run and removed by close()."""

    def __init__(self, pg_password: str | None = None, redis_password: str | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="inventory-chaos-"))
        os.chmod(self.root, 0o755)  # the postgres user must reach its data dir
        self.postgres = PrivatePostgres(self.root, pg_password)
        self.redis = PrivateRedis(self.root, redis_password)
        self.rabbitmq = PrivateRabbitMQ(self.root)
        self.start_seconds: dict[str, float] = {}

    def start(self) -> PrivateServices:
        t0 = time.monotonic()
        errors: list[BaseException] = []

        def start_rabbit() -> None:
            try:
                self.start_seconds["rabbitmq"] = self.rabbitmq.start()
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=start_rabbit)
        t.start()
        try:
            self.start_seconds["postgresql"] = self.postgres.start()
            self.start_seconds["redis"] = self.redis.start()
            t.join()
        except BaseException:  # an error or an interruption: RabbitMQ's start stops waiting too
            self.rabbitmq.give_up = True
            t.join()
            raise
        if errors:
            raise errors[0]
        self.start_seconds["total"] = time.monotonic() - t0
        return self

    def settings(self, base: Any) -> Any:
        """`base` (Settings) pointed at the private instances."""
        return base.model_copy(
            update={
                "database": base.database.model_copy(
                    update={
                        "host": "127.0.0.1",
                        "port": self.postgres.port,
                        "user": "postgres",
                        "password": SecretStr(self.postgres.password or ""),
                    }
                ),
                "redis": base.redis.model_copy(
                    update={
                        "host": "127.0.0.1",
                        "port": self.redis.port,
                        "password": SecretStr(self.redis.password or ""),
                    }
                ),
                "rabbitmq": base.rabbitmq.model_copy(update={"url": AnyUrl(self.rabbitmq.url)}),
            }
        )

    def describe(self) -> str:
        return (
            f"PostgreSQL :{self.postgres.port}, Redis :{self.redis.port}, RabbitMQ :{self.rabbitmq.port}"
            f" (node {self.rabbitmq.node}, epmd :{self.rabbitmq.epmd_port}), data in {self.root}"
        )

    def close(self, keep: bool = False) -> bool:
        """Stops every instance; removes the data folder unless `keep` (or INVENTORY_TEST_KEEP).
        Whether the folder is still there."""
        self.rabbitmq.give_up = True
        for svc in (self.rabbitmq, self.redis, self.postgres):
            try:
                svc.close()
            except Exception as exc:  # clean up the others whatever happens
                print(f"closing {type(svc).__name__} failed: {exc}")
        if keep or os.environ.get("INVENTORY_TEST_KEEP"):
            return True
        shutil.rmtree(self.root, ignore_errors=True)
        return self.root.exists()
