"""An asyncio Redis client for the HTTP hot path: one connection per event loop, auto-pipelined.

Every command issued while the event loop runs one pass (the requests in flight in this worker
process) is written to Redis in one write, and the replies are matched to their callers in
order. So the concurrent requests of a granian worker share round trips and system calls
instead of each waiting for its own, and no pool of connections is needed. hiredis parses the
replies (C), and the only per-command Python work is encoding the command and resolving a
future; redis.asyncio costs several times that per command (measured: README "Performance").

It speaks what the hot path needs: EVALSHA (falling back to EVAL when Redis has lost the script,
e.g. after a restart) and plain commands, with AUTH, SELECT and TLS from RedisSettings, like
redis-py's client (cache.make_client). Failures surface as redis-py's exceptions
(redis.ConnectionError, redis.TimeoutError, redis.ResponseError), so callers treat both clients
alike: a lost connection fails the commands in flight and the next command connects again (no
retries here: the API answers 503 or falls back to PostgreSQL, as with the blocking client).
A reply that takes longer than `socket_timeout_seconds` fails every command waiting on the
connection and closes it, as a socket timeout does in redis-py.

With `redis.sentinels`, each connection is made to the master the sentinels name at that
moment, and a READONLY reply (the server was demoted by a failover) drops the connection, as
redis-py's Sentinel client does.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
import time
from typing import Any

import hiredis
import redis

from inventory_worker.config import RedisSettings, reveal


def encode(args: tuple[bytes | str | int, ...]) -> bytes:
    """One command in RESP."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else (b"%d" % a if isinstance(a, int) else a.encode())
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self, client: AsyncRedis) -> None:
        self.client = client
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.last_progress = time.monotonic()
        # Commands of this loop pass, written together. Kept per connection: a command whose
        # connection died must never reach the next one (its reply would go to someone else).
        self.pending: list[bytes] = []
        self.flush_scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_progress = time.monotonic()
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                fut = self.waiters.popleft()
                if fut.done():  # its caller was cancelled: the reply is nobody's
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    if str(reply).startswith("READONLY"):
                        # The server was demoted to a replica (a Sentinel failover): this
                        # connection is done; the next command asks the sentinels again.
                        fut.set_exception(redis.ReadOnlyError(str(reply)))
                        self.fail(redis.ConnectionError("Redis is now a replica"))
                        return
                    fut.set_exception(redis.ResponseError(str(reply)))
                else:
                    fut.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage or an unasked reply: unusable
            self.fail(redis.ConnectionError(f"bad reply from Redis: {exc}"))

    def flush(self) -> None:
        self.flush_scheduled = False
        data, self.pending = b"".join(self.pending), []
        if self.transport is not None:
            self.transport.write(data)
        # else: the connection died since, and its waiters have failed

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(redis.ConnectionError("connection to Redis lost"))

    def fail(self, exc: Exception) -> None:
        if self.client._proto is self:
            self.client._proto = None
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()
            self.transport = None


class AsyncRedis:
    """Commands from one event loop (granian runs one per worker process)."""

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.timeout = settings.socket_timeout_seconds
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._scripts: dict[bytes, bytes] = {}  # sha1 -> script, for EVAL after NOSCRIPT

    # -- commands --------------------------------------------------------------------------

    async def execute(self, *args: bytes | str | int) -> Any:
        return await self.send(encode(args))

    async def send(self, command: bytes) -> Any:
        """One command, already encoded; its reply (an error reply raises redis.ResponseError)."""
        proto = self._proto
        if proto is None:
            proto = await self._connect()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not proto.waiters:
            proto.last_progress = time.monotonic()
        proto.waiters.append(fut)
        proto.pending.append(command)
        if not proto.flush_scheduled:
            proto.flush_scheduled = True
            loop.call_soon(proto.flush)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout / 4, self._check_timeout)
        return await fut

    def script_sha(self, script: str) -> bytes:
        sha = hashlib.sha1(script.encode()).hexdigest().encode()
        self._scripts[sha] = script.encode()
        return sha

    async def evalsha(
        self, sha: bytes, keys: tuple[bytes | str, ...], args: tuple[bytes | str | int, ...]
    ) -> Any:
        """EVALSHA of a script registered with script_sha(); EVAL when Redis does not have it."""
        try:
            return await self.send(encode((b"EVALSHA", sha, len(keys), *keys, *args)))
        except redis.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await self.send(encode((b"EVAL", self._scripts[sha], len(keys), *keys, *args)))

    def close(self) -> None:
        if self._proto is not None:
            self._proto.fail(redis.ConnectionError("client closed"))

    # -- connection ------------------------------------------------------------------------

    def _check_timeout(self) -> None:
        self._watchdog = None
        proto = self._proto
        if proto is None or not proto.waiters:
            return
        if time.monotonic() - proto.last_progress > self.timeout:
            proto.fail(redis.TimeoutError(f"no reply from Redis within {self.timeout:g}s"))
            return
        self._watchdog = asyncio.get_running_loop().call_later(self.timeout / 4, self._check_timeout)

    async def _connect(self) -> _Protocol:
        # Requests arriving while a connection is being made wait for that one.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _master_address(self) -> tuple[str, int]:
        """The master's address from the first sentinel that knows it (as redis-py's Sentinel
        asks them in turn); every (re)connect asks again, so a failover is followed."""
        s = self.settings
        errors = []
        for host, port in s.sentinel_addresses():
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        host, port, ssl=self._ssl_context(), server_hostname=host if s.ssl else None
                    ),
                    s.socket_timeout_seconds,
                )
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                errors.append(f"{host}:{port}: {exc!r}")
                continue
            try:
                commands: list[tuple[bytes | str, ...]] = [
                    (b"SENTINEL", b"get-master-addr-by-name", s.sentinel_service)
                ]
                if password := reveal(s.sentinel_password):
                    commands.insert(0, (b"AUTH", password))
                writer.write(b"".join(encode(c) for c in commands))
                parser, replies = hiredis.Reader(), list[Any]()
                while len(replies) < len(commands):
                    data = await asyncio.wait_for(reader.read(4096), s.socket_timeout_seconds)
                    if not data:
                        raise ConnectionError("closed by the sentinel")
                    parser.feed(data)
                    while (reply := parser.gets()) is not False:
                        replies.append(reply)
                answer = replies[-1]
                if isinstance(answer, list) and len(answer) == 2:
                    return answer[0].decode(), int(answer[1])
                errors.append(f"{host}:{port}: no master {s.sentinel_service!r} ({answer!r})")
            except (OSError, TimeoutError, hiredis.ProtocolError) as exc:
                errors.append(f"{host}:{port}: {exc!r}")
            finally:
                writer.close()
        raise redis.ConnectionError(
            f"no sentinel named the master of {s.sentinel_service!r}: " + "; ".join(errors)
        )

    async def _open(self) -> _Protocol:
        s = self.settings
        loop = asyncio.get_running_loop()
        host, port = await self._master_address() if s.sentinels else (s.host, s.port)
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Protocol(self),
                    host,
                    port,
                    ssl=self._ssl_context(),
                    server_hostname=host if s.ssl else None,
                ),
                s.socket_timeout_seconds,
            )
        except (OSError, ssl.SSLError) as exc:
            raise redis.ConnectionError(f"cannot connect to Redis: {exc}") from exc
        except TimeoutError as exc:  # asyncio.wait_for raises the builtin (3.11)
            raise redis.TimeoutError("timed out connecting to Redis") from exc
        if proto.transport is None:  # lost already
            raise redis.ConnectionError("connection to Redis lost")
        hello = []
        if password := reveal(s.password):
            hello.append(encode((b"AUTH", s.username, password) if s.username else (b"AUTH", password)))
        if s.db:
            hello.append(encode((b"SELECT", s.db)))
        self._proto = proto
        try:
            for command in hello:
                await self.send(command)
        except redis.RedisError as exc:  # as redis-py: a refused AUTH is a connection error
            proto.fail(redis.ConnectionError("Redis refused the connection's AUTH or SELECT"))
            raise redis.AuthenticationError(str(exc)) from exc
        return proto

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not s.ssl:
            return None
        ctx = ssl.create_default_context(cafile=s.ssl_ca_certs)
        ctx.check_hostname = s.ssl_check_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
        if s.ssl_certfile:
            ctx.load_cert_chain(s.ssl_certfile, s.ssl_keyfile)
        return ctx
