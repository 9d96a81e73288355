"""Settings for a replicated topology (docs/topology.md): several PostgreSQL hosts in libpq's
multi-host form, the nodes of a RabbitMQ cluster, Redis Sentinel; today's single-address
settings keep meaning what they meant."""

from __future__ import annotations

import os

import pytest
from pydantic import SecretStr

from inventory_worker.adapters import rabbitmq
from inventory_worker.adapters.redis_cache import make_client
from inventory_worker.config import ConfigError, load_settings
from inventory_worker.dependencies import describe


@pytest.fixture
def env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("INVENTORY_"):
            monkeypatch.delenv(k)
    return monkeypatch


def test_single_addresses_are_unchanged(env):
    s = load_settings()
    dsn = s.database.dsn()
    assert (dsn["host"], dsn["port"]) == ("127.0.0.1", 5432) and "target_session_attrs" not in dsn
    params = rabbitmq.cluster_parameters(s.rabbitmq)
    assert [(p.host, p.port) for p in params] == [("127.0.0.1", 5672)]
    assert rabbitmq.quorum_arguments(s.rabbitmq) == {"x-queue-type": "quorum"}


def test_database_hosts_give_libpq_multi_host_read_write(env):
    env.setenv("INVENTORY_DATABASE__HOSTS", '["pg-a:5433", "pg-b", "[::1]:6000"]')
    dsn = load_settings().database.dsn()
    assert dsn["host"] == "pg-a,pg-b,::1"
    assert dsn["port"] == "5433,5432,6000"
    assert dsn["target_session_attrs"] == "read-write"


def test_rabbitmq_addresses_one_parameter_set_per_node_with_the_urls_credentials(env):
    env.setenv("INVENTORY_RABBITMQ__URL", "amqp://app@mq/prod")
    env.setenv("INVENTORY_RABBITMQ__PASSWORD", "s3cret")
    env.setenv("INVENTORY_RABBITMQ__ADDRESSES", '["mq-0:5672", "mq-1:5673", "mq-2"]')
    params = rabbitmq.cluster_parameters(load_settings().rabbitmq)
    assert [(p.host, p.port) for p in params] == [("mq-0", 5672), ("mq-1", 5673), ("mq-2", 5672)]
    for p in params:
        assert (p.credentials.username, p.credentials.password, p.virtual_host) == ("app", "s3cret", "prod")
        assert p.connection_attempts == 1 and p.heartbeat == 30


def test_amqps_nodes_each_check_their_own_name(env):
    env.setenv("INVENTORY_RABBITMQ__URL", "amqps://app:pw@mq/")
    env.setenv("INVENTORY_RABBITMQ__ADDRESSES", '["mq-0", "mq-1"]')
    params = rabbitmq.cluster_parameters(load_settings().rabbitmq)
    assert [(p.port, p.ssl_options.server_hostname) for p in params] == [(5671, "mq-0"), (5671, "mq-1")]


def test_quorum_placement_arguments_only_when_set(env):
    env.setenv("INVENTORY_RABBITMQ__QUORUM_INITIAL_GROUP_SIZE", "3")
    env.setenv("INVENTORY_RABBITMQ__QUEUE_LEADER_LOCATOR", "balanced")
    args = rabbitmq.quorum_arguments(load_settings().rabbitmq)
    assert args == {
        "x-queue-type": "quorum",
        "x-quorum-initial-group-size": 3,
        "x-queue-leader-locator": "balanced",
    }


@pytest.mark.parametrize(
    "var, value, key",
    [
        ("INVENTORY_DATABASE__HOSTS", '["pg-a:notaport"]', "database.hosts"),
        ("INVENTORY_RABBITMQ__ADDRESSES", '["mq:0"]', "rabbitmq.addresses"),
        ("INVENTORY_REDIS__SENTINELS", '[":26379"]', "redis.sentinels"),
    ],
)
def test_a_bad_address_is_refused_naming_the_key(env, var, value, key):
    env.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert key in str(err.value)


def test_sentinel_client_asks_the_sentinels_for_the_master(env):
    env.setenv("INVENTORY_REDIS__SENTINELS", '["s-0:26379", "s-1:26380"]')
    env.setenv("INVENTORY_REDIS__SENTINEL_SERVICE", "cache")
    env.setenv("INVENTORY_REDIS__PASSWORD", "pw")
    s = load_settings()
    client = make_client(s.redis)
    pool = client.connection_pool
    assert pool.service_name == "cache" and pool.is_master
    sentinels = pool.sentinel_manager.sentinels
    assert [
        (c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs["port"])
        for c in sentinels
    ] == [("s-0", 26379), ("s-1", 26380)]
    assert pool.connection_kwargs["password"] == "pw"
    assert sentinels[0].connection_pool.connection_kwargs.get("password") is None  # sentinels: their own


def test_failures_name_every_address(env):
    import psycopg2
    import redis

    env.setenv("INVENTORY_DATABASE__HOSTS", '["pg-a:5432", "pg-b:5432"]')
    env.setenv("INVENTORY_REDIS__SENTINELS", '["s-0:26379"]')
    s = load_settings()
    assert describe(psycopg2.OperationalError("timeout expired"), s).address == "pg-a:5432,pg-b:5432"
    assert describe(redis.ConnectionError("x"), s).address == "sentinel mymaster via s-0:26379"
    s = s.model_copy(
        update={"redis": s.redis.model_copy(update={"sentinel_password": SecretStr("sentinel-pw-123")})}
    )
    assert "sentinel-pw-123" not in repr(s.redis)
