"""The worker's Redis client over real TLS: a private redis-server with a certificate signed by
a CA made here. With the CA configured the cache and the rate limiter work; without it, or
without TLS, nothing is served (503), never unlimited."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from inventory_worker.adapters.redis_cache import StockCache
from inventory_worker.config import RedisSettings
from inventory_worker.http.ratelimit import Limit, RateLimiter, RateLimitUnavailable

from ..support import free_port, uid

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    d = tmp_path_factory.mktemp("redis-tls")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=inventory-test-ca",
        cwd=d,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
        cwd=d,
    )
    (d / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "ext",
        cwd=d,
    )
    port = free_port()
    settings = RedisSettings(
        host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(d / "ca.pem"), key_prefix=f"tls:{uid()}:"
    )
    yield from _private_redis(
        [
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.pem",
            "--tls-auth-clients",
            "no",
        ],
        settings,
        cwd=d,
    )


def _private_redis(args: list[str], settings: RedisSettings, cwd: Path | None = None):
    """A redis-server of this module's own with `args`, until the fixture ends; yields
    `settings` once the cache's client gets an answer."""
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                StockCache(settings).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"the private redis-server ({' '.join(args)}) did not start")
                time.sleep(0.1)
        yield settings
    finally:
        proc.terminate()
        proc.wait(10)


def test_cache_and_rate_limiter_work_over_verified_tls(tls_redis):
    cache = StockCache(tls_redis)
    assert (
        cache.put_many([{"product_id": "P-1", "version": 1, "on_hand": 3, "reserved": 1, "available": 2}])
        == 1
    )
    assert cache.client.get(cache.key("P-1")).startswith(b'{"version":1')
    limiter = RateLimiter(cache.client, tls_redis.key_prefix)
    assert [limiter.check_and_get(Limit("token", "t", 0.01, 2), None)[0].allowed for _ in range(3)] == [
        True,
        True,
        False,
    ]


def test_an_untrusted_certificate_or_plain_text_is_refused(tls_redis):
    untrusted = tls_redis.model_copy(update={"ssl_ca_certs": None})  # system CAs: did not sign it
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        StockCache(untrusted).ping()
    limiter = RateLimiter(StockCache(untrusted).client, "x:")
    with pytest.raises(RateLimitUnavailable):
        limiter.check_and_get(Limit("token", "t", 1, 1), None)
    with pytest.raises(redis.ConnectionError):
        StockCache(tls_redis.model_copy(update={"ssl": False})).ping()


# ---- the HTTP hot path's asyncio client (adapters/redis_async.py): the same TLS and credentials ----------


def _async(settings: RedisSettings, *commands: tuple) -> list:
    import asyncio

    from inventory_worker.adapters.redis_async import AsyncRedis

    async def main():
        client = AsyncRedis(settings)
        try:
            return [await client.execute(*c) for c in commands]
        finally:
            client.close()

    return asyncio.run(main())


def test_the_async_client_works_over_verified_tls_and_refuses_an_untrusted_certificate(tls_redis):
    StockCache(tls_redis).client.set(tls_redis.key_prefix + "k", b"v")
    assert _async(tls_redis, (b"GET", tls_redis.key_prefix + "k")) == [b"v"]
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        _async(tls_redis.model_copy(update={"ssl_ca_certs": None}), (b"PING",))
    with pytest.raises(redis.ConnectionError):  # plain text to a TLS port
        _async(tls_redis.model_copy(update={"ssl": False}), (b"PING",))


@pytest.fixture(scope="module")
def password_redis():
    port = free_port()
    settings = RedisSettings(host="127.0.0.1", port=port, password="s3cret-pass", db=2)
    yield from _private_redis(["--port", str(port), "--requirepass", "s3cret-pass"], settings)


def test_the_async_client_authenticates_and_selects_its_database(password_redis):
    StockCache(password_redis).client.set("k", b"in-db-2")
    assert _async(password_redis, (b"GET", "k")) == [b"in-db-2"]
    assert _async(password_redis.model_copy(update={"username": "default"}), (b"GET", "k")) == [b"in-db-2"]
    with pytest.raises(redis.ConnectionError):
        _async(password_redis.model_copy(update={"password": "wrong"}), (b"PING",))
    with pytest.raises(redis.ConnectionError, match="NOAUTH"):  # no password: SELECT refused at connect
        _async(password_redis.model_copy(update={"password": ""}), (b"GET", "k"))
    with pytest.raises(redis.ResponseError, match="NOAUTH"):  # db 0 needs no SELECT: the command is refused
        _async(password_redis.model_copy(update={"password": "", "db": 0}), (b"GET", "k"))
