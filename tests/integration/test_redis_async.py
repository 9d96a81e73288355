"""The pipelined asyncio Redis client of the HTTP hot path (adapters/redis_async.py), against real Redis:
concurrent commands on one connection each get their own reply, the rate-limit script stays
exact under concurrency and agrees with the blocking client's, a script Redis does not have is
sent whole, and a dead or silent server fails the commands in flight (then the next connects)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import redis

from inventory_worker.adapters.redis_async import AsyncRedis
from inventory_worker.adapters.redis_cache import make_client
from inventory_worker.http.ratelimit import Limit, RateLimiter

from ..support import free_port, uid


def test_concurrent_commands_share_one_connection_and_get_their_own_replies(settings):
    prefix = settings.redis.key_prefix + uid("ar") + ":"
    blocking = make_client(settings.redis)
    for i in range(300):
        blocking.set(f"{prefix}{i}", f"value-{i}", ex=60)

    async def main():
        client = AsyncRedis(settings.redis)
        got = await asyncio.gather(*(client.execute(b"GET", f"{prefix}{i}") for i in range(300)))
        connections = 1 if client._proto is not None else 0
        client.close()
        return got, connections

    got, connections = asyncio.run(main())
    assert got == [f"value-{i}".encode() for i in range(300)]
    assert connections == 1


def test_the_rate_limit_is_exact_under_concurrency_and_shared_with_the_blocking_client(settings):
    prefix = settings.redis.key_prefix + uid("ar") + ":"
    limit = Limit("token", "shared", 0.001, 25)  # one request per 1000 s
    blocking = RateLimiter(make_client(settings.redis), prefix)
    # 5 taken through the blocking face (the stdlib server's path) ...
    assert all(blocking.check_and_get(limit, None)[0].allowed for _ in range(5))

    async def main():  # ... then 200 at once from two event-loop clients (two granian workers)
        workers = [
            (RateLimiter(make_client(settings.redis), prefix), AsyncRedis(settings.redis)) for _ in range(2)
        ]
        replies = await asyncio.gather(
            *(workers[i % 2][0].acheck_and_get(limit, None, workers[i % 2][1]) for i in range(200))
        )
        for _, c in workers:
            c.close()
        return [d for d, _ in replies]

    decisions = asyncio.run(main())
    assert sum(d.allowed for d in decisions) == 20  # the burst of 25, less the 5 taken before
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(20))
    assert all(d.retry_after_seconds > 900 for d in decisions if not d.allowed)


def test_an_admitted_request_reads_its_figures_in_the_same_call_a_refused_one_reads_nothing(settings):
    prefix = settings.redis.key_prefix + uid("ar") + ":"
    blocking = make_client(settings.redis)
    blocking.set(f"{prefix}stock:P-1", b'{"version":1}', ex=60)
    limiter = RateLimiter(blocking, prefix)
    limit = Limit("token", "t", 0.01, 1)  # one per 100 s, burst 1

    async def main():
        client = AsyncRedis(settings.redis)
        first = await limiter.acheck_and_get(limit, f"{prefix}stock:P-1", client)
        second = await limiter.acheck_and_get(limit, f"{prefix}stock:P-1", client)
        client.close()
        return first, second

    (first, value), (second, refused_value) = asyncio.run(main())
    assert first.allowed and value == b'{"version":1}'
    assert not second.allowed and refused_value is None
    # the blocking face is the same script on the same bucket: refused too, nothing read
    decision, value = limiter.check_and_get(limit, f"{prefix}stock:P-1")
    assert not decision.allowed and value is None
    decision, value = limiter.check_and_get(limit._replace(identity="other"), f"{prefix}stock:missing")
    assert decision.allowed and value is None


def test_a_script_redis_does_not_have_is_sent_whole_then_by_its_hash(settings):
    script = f"-- {uid('never-loaded')}\nreturn ARGV[1]"  # unique: Redis cannot have it yet

    async def main():
        client = AsyncRedis(settings.redis)
        sha = client.script_sha(script)
        first = await client.evalsha(sha, (), (b"a",))
        second = await client.evalsha(sha, (), (b"b",))
        client.close()
        return sha, first, second

    sha, first, second = asyncio.run(main())
    assert (first, second) == (b"a", b"b")
    assert make_client(settings.redis).script_exists(sha.decode()) == [True]  # EVAL loaded it


def test_an_error_reply_raises_and_leaves_the_connection_usable(settings):
    async def main():
        client = AsyncRedis(settings.redis)
        with pytest.raises(redis.ResponseError):
            await client.execute(b"NO-SUCH-COMMAND")
        pong = await client.execute(b"PING")
        client.close()
        return pong

    assert asyncio.run(main()) == b"PONG"


def test_selects_the_configured_database(settings):
    key = settings.redis.key_prefix + uid("db1")
    other = settings.redis.model_copy(update={"db": 1})
    make_client(other).set(key, b"in-db-1", ex=60)

    async def main():
        a, b = AsyncRedis(other), AsyncRedis(settings.redis)
        got = await a.execute(b"GET", key), await b.execute(b"GET", key)
        a.close()
        b.close()
        return got

    assert asyncio.run(main()) == (b"in-db-1", None)


def test_nothing_listening_fails_fast(settings):
    down = settings.redis.model_copy(update={"port": free_port()})

    async def main():
        client = AsyncRedis(down)
        with pytest.raises(redis.ConnectionError):
            await client.execute(b"PING")

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 1


def test_a_silent_server_times_out_every_waiting_command_then_the_next_connects_again(settings):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []

    def accept():  # accepts and never answers; the second connection gets real replies
        while len(accepted) < 2:
            conn, _ = listener.accept()
            accepted.append(conn)
            if len(accepted) == 2:
                conn.recv(65536)
                conn.sendall(b"+PONG\r\n")

    threading.Thread(target=accept, daemon=True).start()
    silent = settings.redis.model_copy(
        update={"port": listener.getsockname()[1], "socket_timeout_seconds": 0.4}
    )

    async def main():
        client = AsyncRedis(silent)
        started = time.monotonic()
        results = await asyncio.gather(*(client.execute(b"PING") for _ in range(5)), return_exceptions=True)
        waited = time.monotonic() - started
        again = await client.execute(b"PING")
        client.close()
        return results, waited, again

    results, waited, again = asyncio.run(main())
    listener.close()
    assert all(isinstance(r, redis.TimeoutError) for r in results)
    assert 0.4 <= waited < 2
    assert again == b"PONG" and len(accepted) == 2
