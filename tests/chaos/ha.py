"""PRIVATE replicated services for the HA proof (`make chaos-ha`), built from the engines' own
replication, as production runs them (docs/topology.md):

  PostgreSQL  a primary and a synchronous streaming standby (pg_basebackup -R,
              synchronous_standby_names), failed over as an orchestrator would: pg_ctl promote,
              then the old primary rewound (pg_rewind) and started again as the new standby
  Redis       a master, a replica and three Sentinels (quorum 2), which fail it over
  RabbitMQ    three nodes in one cluster (one Erlang cookie, one private epmd, a port, dist port
              and data directory each)

Everything runs on this machine, on free ports, with its data under one temporary folder;
close() stops every process by its id (tests/reaper.py sweeps whatever it misses).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg2
import redis
from pydantic import AnyUrl, SecretStr

from .services import (
    GiveUp,
    PrivatePostgres,
    PrivateRabbitMQ,
    _port_free,
    _run,
    pick_port,
    stop_epmd,
    wait_until,
)


def _kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """`pid` and its children (a postmaster and its backends: a crash, as of the machine)."""
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for p in [pid, *map(int, kids)]:
        try:
            os.kill(p, sig)
        except OSError:
            pass


# ---- PostgreSQL: primary + synchronous standby ----------------------------------------------


class PgNode(PrivatePostgres):
    def __init__(self, root: Path, name: str, extra_listen: str | None = None) -> None:
        super().__init__(root / name)
        self.name = name
        self.extra_listen = extra_listen

    def conf(self) -> str:
        listen = "127.0.0.1" + (f",{self.extra_listen}" if self.extra_listen else "")
        return (
            f"\nport = {self.port}\nlisten_addresses = '{listen}'\n"
            f"unix_socket_directories = '{self.dir}'\nfsync = off\nmax_connections = 80\n"
            "shared_buffers = 32MB\nwal_level = replica\nmax_wal_senders = 5\n"
            "wal_log_hints = on\nhot_standby = on\nwal_keep_size = 256MB\n"
            "synchronous_standby_names = '*'\nwal_receiver_status_interval = 1s\n"
        )

    def init_primary(self) -> None:
        self.dir.mkdir(parents=True)
        self._own(self.dir)
        _run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            user=self.user,
        )
        self._append_conf()

    def init_standby_of(self, primary: PgNode) -> None:
        self.dir.mkdir(parents=True)
        self._own(self.dir)
        _run(
            [
                str(self.bin / "pg_basebackup"),
                "-D",
                str(self.data),
                "-h",
                "127.0.0.1",
                "-p",
                str(primary.port),
                "-U",
                "postgres",
                "-X",
                "stream",
                "--no-sync",
            ],
            user=self.user,
        )
        self._append_conf()
        self.follow(primary)

    def follow(self, primary: PgNode) -> None:
        """standby.signal and primary_conninfo: the next start is as `primary`'s standby."""
        (self.data / "standby.signal").write_text("")
        with open(self.data / "postgresql.auto.conf", "a") as f:
            f.write(
                f"\nprimary_conninfo = 'host=127.0.0.1 port={primary.port} user=postgres "
                f"application_name={self.name}'\n"
            )
        self._own(self.data / "standby.signal")

    def _append_conf(self) -> None:
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(self.conf())
        if self.extra_listen:
            net = self.extra_listen.rsplit(".", 1)[0] + ".0/24"
            with open(self.data / "pg_hba.conf", "a") as f:
                f.write(f"\nhost all all {net} trust\n")

    def _own(self, path: Path) -> None:
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def start(self) -> float:
        t0 = time.monotonic()
        self._ctl("-l", str(self.dir / "server.log"), "-w", "-t", "60", "start")
        return time.monotonic() - t0

    def sql(self, query: str, args: Any = None) -> list[tuple[Any, ...]]:
        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", connect_timeout=3
        )
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(query, args)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def in_recovery(self) -> bool:
        return bool(self.sql("SELECT pg_is_in_recovery()")[0][0])

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def crash(self) -> None:
        """SIGKILL to the postmaster and every backend: the node is lost."""
        pid = self.postmaster_pid()
        if pid:
            # The postmaster leads its process group (pg_ctl starts it in a session of its own):
            # the group's SIGKILL takes every backend too, even one forked a moment ago.
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                _kill_tree(pid)
            wait_until(lambda: not _alive(pid) and _port_free(self.port), 30, f"{self.name} gone")
            # Its lock file stays, naming a pid that may linger as a zombie (this container's
            # init need not reap it), which the next postgres would take for a live server.
            (self.data / "postmaster.pid").unlink(missing_ok=True)
            (self.dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class PgPair:
    """Two nodes; `primary` and `standby` swap at each failover()."""

    def __init__(self, root: Path, extra_listen: str | None = None) -> None:
        self.primary = PgNode(root, "pg-a", extra_listen)
        self.standby = PgNode(root, "pg-b", extra_listen)
        self.nodes = (self.primary, self.standby)

    def start(self) -> None:
        self.primary.init_primary()
        # No standby yet: commits must not wait for one while the base backup is taken.
        with open(self.primary.data / "postgresql.auto.conf", "a") as f:
            f.write("\nsynchronous_standby_names = ''\n")
        self.primary.start()
        self.standby.init_standby_of(self.primary)
        self.standby.start()
        self.set_sync(self.primary, "*")
        wait_until(self.synchronous, 60, "the standby streaming synchronously")

    def set_sync(self, node: PgNode, names: str) -> None:
        node.sql("ALTER SYSTEM SET synchronous_standby_names = %s", (names,))
        node.sql("SELECT pg_reload_conf()")

    def synchronous(self) -> bool:
        rows = self.primary.sql("SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'")
        return any(r[0] in ("sync", "quorum") for r in rows)

    def hosts(self, address: str = "127.0.0.1") -> list[str]:
        return [f"{address}:{n.port}" for n in self.nodes]

    def failover(self) -> dict[str, float]:
        """The primary is lost (SIGKILL), the standby promoted, the old primary rewound and
        started as the new standby, synchronous again. Seconds of each step."""
        old, new = self.primary, self.standby
        t0 = time.monotonic()
        old.crash()
        t_crash = time.monotonic()
        new._ctl("promote", "-w", "-t", "60")
        # With no standby left, synchronous commits would wait for ever: an orchestrator
        # (Patroni's synchronous_mode) turns it off until a standby is back.
        self.set_sync(new, "")
        t_promoted = time.monotonic()
        self.primary, self.standby = new, old
        # The new timeline reaches the control file at the checkpoint that follows the
        # promotion; before it, pg_rewind would see no divergence and rewind nothing.
        new.sql("CHECKPOINT")
        # pg_rewind runs the crashed node's recovery first, then takes what diverged from `new`.
        r = _run(
            [
                str(old.bin / "pg_rewind"),
                "-D",
                str(old.data),
                f"--source-server=host=127.0.0.1 port={new.port} user=postgres dbname=postgres",
            ],
            user=old.user,
            timeout=300,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"pg_rewind failed: {r.stderr.strip()[-800:]}")
        # pg_rewind copied the source's configuration files too: this node's own settings again.
        with open(old.data / "postgresql.conf", "a") as f:
            f.write(old.conf())
        old.follow(new)
        old.start()
        self.set_sync(new, "*")
        wait_until(self.synchronous, 60, "the old primary streaming as the new standby")
        t_back = time.monotonic()
        return {
            "promoted_after": round(t_promoted - t0, 2),
            "crash": round(t_crash - t0, 2),
            "standby_back_after": round(t_back - t0, 2),
        }

    def close(self) -> None:
        for n in self.nodes:
            n.close()


# ---- Redis: master, replica, three sentinels -----------------------------------------------


class RedisProc:
    def __init__(self, root: Path, name: str, args: list[str], port: int | None = None) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = port or pick_port()
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, extra: list[str] | None = None) -> None:
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            ["redis-server", *self.args, *(extra or [])],
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=self.dir,
        )
        log.close()
        wait_until(lambda: self.client().ping(), 30, self.name)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=3, socket_connect_timeout=3)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    close = kill


class RedisSentinels:
    SERVICE = "inventory"

    def __init__(self, root: Path, extra_listen: str | None = None) -> None:
        root = root / "redis"
        bind = "127.0.0.1" + (f" {extra_listen}" if extra_listen else "")
        # The address the sentinels announce: one every worker reaches, the partitioned one too.
        self.address = extra_listen or "127.0.0.1"
        common = ["--bind", *bind.split(), "--save", "", "--appendonly", "no", "--protected-mode", "no"]
        a, b = pick_port(), pick_port()
        self.servers = [
            RedisProc(root, "redis-a", ["--port", str(a), *common], a),
            RedisProc(root, "redis-b", ["--port", str(b), *common, "--replicaof", self.address, str(a)], b),
        ]
        self.sentinels: list[RedisProc] = []
        for i in range(3):
            port = pick_port()
            conf = root / f"sentinel-{i}" / "sentinel.conf"
            conf.parent.mkdir(parents=True)
            conf.write_text(
                f"port {port}\nbind {bind}\nprotected-mode no\ndir {conf.parent}\n"
                f"sentinel monitor {self.SERVICE} {self.address} {a} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                f"sentinel failover-timeout {self.SERVICE} 10000\n"
                f"sentinel parallel-syncs {self.SERVICE} 1\n"
            )
            self.sentinels.append(RedisProc(root, f"sentinel-{i}", [str(conf), "--sentinel"], port))

    def start(self) -> None:
        for s in self.servers:
            s.start()
        wait_until(
            lambda: self.servers[1].client().info("replication")["master_link_status"] == "up",
            30,
            "the Redis replica in sync",
        )
        for s in self.sentinels:
            s.start()
        wait_until(
            lambda: all(
                int(s.client().sentinel_master(self.SERVICE)["num-other-sentinels"]) == 2
                for s in self.sentinels
            ),
            30,
            "the sentinels seeing each other",
        )

    def master_port(self) -> int:
        host, port = (
            self.sentinels[0].client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
        )
        return int(port)

    def replicated(self) -> bool:
        """The master the sentinels name has the other server as a replica, in sync."""
        port = self.master_port()
        replica = next(s for s in self.servers if s.port != port).client().info("replication")
        return (
            replica["role"] == "slave"
            and int(replica["master_port"]) == port
            and replica["master_link_status"] == "up"
        )

    def addresses(self, address: str = "127.0.0.1") -> list[str]:
        return [f"{address}:{s.port}" for s in self.sentinels]

    def kill_master(self) -> dict[str, float]:
        """SIGKILL of the master; the sentinels promote the replica; the old master comes back
        (empty: no persistence) and the sentinels make it a replica of the new one."""
        t0 = time.monotonic()
        old_port = self.master_port()
        old = next(s for s in self.servers if s.port == old_port)
        old.kill()
        wait_until(lambda: self.master_port() != old_port, 60, "the sentinels' failover", interval=0.2)
        t_promoted = time.monotonic()
        new_port = self.master_port()
        old.start(["--replicaof", self.address, str(new_port)])
        # Replicated again, whichever is master by then: on a slow machine the sentinels (1 s
        # down-after) may judge the new master down too and promote the old one, just back and
        # empty, which then never reports a link to a master (seen once in CI).
        wait_until(self.replicated, 60, "the old master back, the pair replicated again")
        return {
            "promoted_after": round(t_promoted - t0, 2),
            "replica_back_after": round(time.monotonic() - t0, 2),
        }

    def close(self) -> None:
        for s in (*self.sentinels, *self.servers):
            s.close()


# ---- RabbitMQ: a three-node cluster --------------------------------------------------------


class RabbitNode(PrivateRabbitMQ):
    def __init__(
        self, root: Path, name: str, epmd_port: int, cookie: str, extra_listen: str | None = None
    ) -> None:
        super().__init__(root / name)
        self.epmd_port = epmd_port
        self.node = f"{name}@localhost"
        listeners = f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
        if extra_listen:
            listeners += f"listeners.tcp.2 = {extra_listen}:{self.port}\n"
        (self.dir / "rabbitmq.conf").write_text(
            "loopback_users = none\n" + listeners + "cluster_partition_handling = pause_minority\n"
        )
        self.env.update({"RABBITMQ_NODENAME": self.node, "ERL_EPMD_PORT": str(epmd_port)})
        self.env.pop("RABBITMQ_NODE_IP_ADDRESS", None)
        self.env.pop("RABBITMQ_NODE_PORT", None)
        cookie_file = self.dir / ".erlang.cookie"
        cookie_file.write_text(cookie)
        os.chmod(cookie_file, 0o400)


class RabbitCluster:
    def __init__(self, root: Path, size: int = 3, extra_listen: str | None = None) -> None:
        self.epmd_port = pick_port()
        cookie = secrets.token_hex(16)
        tag = secrets.token_hex(3)
        self.nodes = [
            RabbitNode(root / "rabbitmq", f"ha{tag}n{i}", self.epmd_port, cookie, extra_listen)
            for i in range(size)
        ]
        self.env = self.nodes[0].env

    def start(self) -> None:
        errors: list[BaseException] = []

        def boot(n: RabbitNode) -> None:
            try:
                n.start()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=boot, args=(n,)) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        first = self.nodes[0]
        for n in self.nodes[1:]:
            n.ctl("stop_app")
            n.ctl("join_cluster", first.node)
            n.start_app()
        wait_until(lambda: all(m.node in first.ctl("cluster_status") for m in self.nodes), 60, "cluster")

    def addresses(self, address: str = "127.0.0.1") -> list[str]:
        return [f"{address}:{n.port}" for n in self.nodes]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def queue_leader(self, queue: str) -> RabbitNode:
        """The node leading the quorum queue now."""
        for n in self.nodes:
            if n.proc is None or n.proc.poll() is not None:
                continue
            try:
                out = n.ctl("list_queues", "--no-table-headers", "name", "leader", timeout=30)
            except Exception:
                continue
            for line in out.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == queue:
                    return next(m for m in self.nodes if m.node == parts[1])
        raise RuntimeError(f"no leader found for {queue}")

    def any_node(self) -> RabbitNode:
        return next(n for n in self.nodes if n.proc is not None and n.proc.poll() is None)

    def members(self, queue: str) -> list[str]:
        out = self.any_node().ctl("list_queues", "--formatter", "json", "name", "members")
        import json

        for q in json.loads(out):
            if q["name"] == queue:
                return list(q["members"])
        return []

    def kill(self, node: RabbitNode) -> None:
        """SIGKILL of the node's Erlang VM (and its process group)."""
        if node.proc is not None and node.proc.poll() is None:
            os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(30)
        node.proc = None

    def restart(self, node: RabbitNode) -> None:
        node.start()
        wait_until(
            lambda: (
                node.node
                in self.any_node().ctl("cluster_status", "--formatter", "json").split('"running_nodes"', 1)[1]
            ),
            60,
            "the node back in the cluster",
        )

    def pause(self, node: RabbitNode, seconds: float) -> None:
        """SIGSTOP of every process of the node for `seconds`, then SIGCONT: a hung node."""
        assert node.proc is not None
        pgid = node.proc.pid
        os.killpg(pgid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.killpg(pgid, signal.SIGCONT)

    def close(self) -> None:
        for n in self.nodes:
            n.give_up = True
            if n.proc is not None and n.proc.poll() is None:
                try:
                    os.killpg(n.proc.pid, signal.SIGCONT)
                    os.killpg(n.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                n.proc.wait(30)
            n.proc = None
        stop_epmd(self.epmd_port, self.env)


# ---- a network partition ------------------------------------------------------------------


class Partition:
    """A network namespace joined to this host by a veth pair with addresses in a private /30:
    a worker started in it (`prefix()` before its command) reaches the services at `host_ip`;
    cut() takes its end of the link down (its packets go nowhere, new connections fail),
    join() brings it back. close() deletes the namespace and the pair."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.ns, self.host_dev, self.ns_dev = f"iwha-{tag}", f"iwh{tag}a", f"iwh{tag}b"
        used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
        rng = secrets.SystemRandom()
        while True:
            net = f"10.213.{rng.randrange(256)}.{rng.randrange(64) * 4}"
            if net.rsplit(".", 1)[0] + "." not in used:
                break
        base = net.rsplit(".", 1)
        self.host_ip, self.ns_ip = f"{base[0]}.{int(base[1]) + 1}", f"{base[0]}.{int(base[1]) + 2}"
        self.created = False

    def _ip(self, *args: str, ns: bool = False) -> None:
        cmd = ["ip", "netns", "exec", self.ns, "ip", *args] if ns else ["ip", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")

    def create(self) -> Partition:
        self._ip("netns", "add", self.ns)
        self.created = True
        self._ip("link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
        self._ip("link", "set", self.ns_dev, "netns", self.ns)
        self._ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_dev)
        self._ip("link", "set", self.host_dev, "up")
        self._ip("addr", "add", f"{self.ns_ip}/30", "dev", self.ns_dev, ns=True)
        self._ip("link", "set", self.ns_dev, "up", ns=True)
        self._ip("link", "set", "lo", "up", ns=True)
        return self

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def cut(self) -> None:
        self._ip("link", "set", self.ns_dev, "down", ns=True)

    def join(self) -> None:
        self._ip("link", "set", self.ns_dev, "up", ns=True)

    def close(self) -> None:
        if not self.created:
            return
        # Whatever still runs in the namespace (a worker the run could not stop) goes first.
        pids = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        subprocess.run(["ip", "link", "del", self.host_dev], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)
        self.created = False


# ---- all three ------------------------------------------------------------------------------


class HAServices:
    """The replicated services of one run; close() stops everything it started."""

    def __init__(self, partition: bool = True, rabbit: bool = True) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="inventory-chaos-ha-"))
        os.chmod(self.root, 0o755)
        # The namespace comes first: the services listen on its host-side address too.
        self.partition = Partition() if partition else None
        if self.partition is not None:
            try:
                self.partition.create()
            except BaseException:
                self.partition.close()  # what was made of it
                shutil.rmtree(self.root, ignore_errors=True)
                raise
        extra_listen = self.partition.host_ip if self.partition else None
        self.postgres = PgPair(self.root, extra_listen)
        self.redis = RedisSentinels(self.root, extra_listen)
        self.rabbitmq = RabbitCluster(self.root, extra_listen=extra_listen) if rabbit else None
        self.start_seconds: dict[str, float] = {}

    def start(self) -> HAServices:
        t0 = time.monotonic()
        errors: list[BaseException] = []

        def start_rabbit() -> None:
            try:
                assert self.rabbitmq is not None
                self.rabbitmq.start()
                self.start_seconds["rabbitmq"] = round(time.monotonic() - t0, 1)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=start_rabbit) if self.rabbitmq else None
        if t:
            t.start()
        try:
            self.postgres.start()
            self.start_seconds["postgresql"] = round(time.monotonic() - t0, 1)
            self.redis.start()
            self.start_seconds["redis"] = round(time.monotonic() - t0, 1)
            if t:
                t.join()
        except BaseException:
            if self.rabbitmq:
                for n in self.rabbitmq.nodes:
                    n.give_up = True
            if t:
                t.join()
            raise
        if errors:
            raise errors[0]
        self.start_seconds["total"] = round(time.monotonic() - t0, 1)
        return self

    def settings(self, base: Any, address: str = "127.0.0.1") -> Any:
        """`base` pointed at every node, in the multi-node forms the worker takes."""
        update: dict[str, Any] = {
            "database": base.database.model_copy(
                update={"hosts": self.postgres.hosts(address), "user": "postgres", "password": SecretStr("")}
            ),
            "redis": base.redis.model_copy(
                update={
                    "sentinels": self.redis.addresses(address),
                    "sentinel_service": RedisSentinels.SERVICE,
                    "host": "127.0.0.1",
                    "port": self.redis.servers[0].port,
                }
            ),
        }
        if self.rabbitmq:
            update["rabbitmq"] = base.rabbitmq.model_copy(
                update={
                    "url": AnyUrl(self.rabbitmq.url.replace("127.0.0.1", address)),
                    "addresses": self.rabbitmq.addresses(address),
                }
            )
        return base.model_copy(update=update)

    def close(self, keep: bool = False) -> bool:
        for svc in (self.rabbitmq, self.redis, self.postgres, self.partition):
            if svc is None:
                continue
            try:
                svc.close()
            except Exception as exc:
                print(f"closing {type(svc).__name__} failed: {exc}")
        if keep or os.environ.get("INVENTORY_TEST_KEEP"):
            return True
        shutil.rmtree(self.root, ignore_errors=True)
        return self.root.exists()


__all__ = ["HAServices", "PgPair", "RedisSentinels", "RabbitCluster", "Partition", "GiveUp"]
