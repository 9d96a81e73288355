"""Configuration: defaults < YAML file < INVENTORY_* environment (`__` nests), a bad config
refused at start with a message naming the key, and never a secret in that message."""

from __future__ import annotations

from pathlib import Path

import pytest

from inventory_worker import cli
from inventory_worker.config import ConfigError, load_settings
from tests.support import REPO

SECRET = "s3cr3t-Pa55word-do-not-print"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No INVENTORY_* variable of the caller and no config/config.yaml in the working directory."""
    import os

    for key in list(os.environ):
        if key.startswith("INVENTORY_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as exc:
        load_settings(*args, **kwargs)
    return str(exc.value)


# ---- precedence -------------------------------------------------------------------------------


def test_defaults_work_on_this_machine_kind():
    s = load_settings()
    assert (s.database.host, s.database.port, s.database.user, s.database.dbname) == (
        "127.0.0.1", 5432, "postgres", "inventory")
    assert (s.redis.host, s.redis.port) == ("127.0.0.1", 6379)
    assert str(s.rabbitmq.url) == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert (s.rabbitmq.exchange, s.rabbitmq.queue) == ("orders", "inventory.orders")
    assert s.rabbitmq.dead_letter_queue == "inventory.orders.dlq"
    assert s.worker.default_reservation_ttl_seconds == 900
    assert s.http.port == 8080


def test_shipped_config_file_is_valid_and_points_at_the_local_services():
    s = load_settings(REPO / "config" / "config.yaml")
    defaults = load_settings()
    for section in ("database", "redis", "rabbitmq"):
        assert getattr(s, section) == getattr(defaults, section), section


def test_yaml_overrides_defaults_and_env_overrides_yaml(tmp_path, monkeypatch):
    path = write(tmp_path, "database:\n  host: db.yaml\n  port: 6000\n  dbname: from_yaml\n"
                           "worker:\n  batch_size: 7\n")
    s = load_settings(path)
    assert (s.database.host, s.database.port, s.database.dbname, s.worker.batch_size) == (
        "db.yaml", 6000, "from_yaml", 7)
    assert s.database.user == "postgres"  # untouched keys keep their defaults

    monkeypatch.setenv("INVENTORY_DATABASE__HOST", "db.env")
    monkeypatch.setenv("INVENTORY_WORKER__BATCH_SIZE", "9")
    monkeypatch.setenv("INVENTORY_REDIS__PORT", "6390")
    s = load_settings(path)
    # env wins key by key; the YAML's other keys in the same section survive
    assert (s.database.host, s.database.port, s.database.dbname) == ("db.env", 6000, "from_yaml")
    assert (s.worker.batch_size, s.redis.port) == (9, 6390)


def test_explicit_overrides_beat_everything(tmp_path, monkeypatch):
    path = write(tmp_path, "http:\n  port: 9000\n")
    monkeypatch.setenv("INVENTORY_HTTP__PORT", "9001")
    assert load_settings(path, http={"port": 9002}).http.port == 9002


def test_config_path_from_argument_then_env_then_default_file(tmp_path, monkeypatch):
    (tmp_path / "config").mkdir()
    write(tmp_path, "http:\n  port: 1001\n", "config/config.yaml")
    assert load_settings().http.port == 1001
    env_file = write(tmp_path, "http:\n  port: 1002\n", "env.yaml")
    monkeypatch.setenv("INVENTORY_CONFIG", str(env_file))
    assert load_settings().http.port == 1002
    arg_file = write(tmp_path, "http:\n  port: 1003\n", "arg.yaml")
    assert load_settings(arg_file).http.port == 1003


def test_missing_config_file_is_refused(tmp_path, monkeypatch):
    assert "config file not found" in refused(tmp_path / "nope.yaml")
    monkeypatch.setenv("INVENTORY_CONFIG", str(tmp_path / "also-nope.yaml"))
    assert "also-nope.yaml" in refused()


def test_env_values_are_taken_verbatim(monkeypatch):
    monkeypatch.setenv("INVENTORY_DATABASE__PASSWORD", 'p@ss:w/rd{1}"x')
    monkeypatch.setenv("INVENTORY_RABBITMQ__URL", "amqps://u:p@mq.internal:5671/vhost")
    s = load_settings()
    assert s.database.password.get_secret_value() == 'p@ss:w/rd{1}"x'
    assert s.database.dsn()["password"] == 'p@ss:w/rd{1}"x'
    assert (s.rabbitmq.url.scheme, s.rabbitmq.url.host, s.rabbitmq.url.port) == ("amqps", "mq.internal", 5671)


def test_empty_password_is_not_sent():
    assert "password" not in load_settings().database.dsn()


# ---- a bad config is refused, naming the key -------------------------------------------------------


@pytest.mark.parametrize(
    "env,key",
    [
        ({"INVENTORY_DATABASE__PORT": "five"}, "database.port"),
        ({"INVENTORY_DATABASE__PORT": "70000"}, "database.port"),
        ({"INVENTORY_REDIS__CACHE_TTL_SECONDS": "0"}, "redis.cache_ttl_seconds"),
        ({"INVENTORY_RABBITMQ__URL": "http://guest:guest@127.0.0.1/"}, "rabbitmq.url"),
        ({"INVENTORY_RABBITMQ__DELIVERY_LIMIT": "0"}, "rabbitmq.delivery_limit"),
        ({"INVENTORY_WORKER__PROCESSES": "0"}, "worker.processes"),
        ({"INVENTORY_WORKER__BATCH_SIZE": "many"}, "worker.batch_size"),
        ({"INVENTORY_HTTP__ENABLED": "maybe"}, "http.enabled"),
        ({"INVENTORY_LOGGING__LEVEL": "LOUD"}, "logging.level"),
        ({"INVENTORY_DATABASE__HOTS": "db.internal"}, "database.hots"),
    ],
)
def test_bad_env_value_names_the_key(monkeypatch, env, key):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    message = refused()
    assert f"{key}:" in message
    assert "INVENTORY_" in message  # says where to look


@pytest.mark.parametrize(
    "text,key",
    [
        ("database:\n  port: five\n", "database.port"),
        ("databse:\n  host: x\n", "databse"),
        ("database:\n  hots: db.internal\n", "database.hots"),  # a typo must not silently fall back
        ("worker:\n  batch_sise: 10\n", "worker.batch_sise"),
        ("redis: 6379\n", "redis"),
        ("http:\n  port: -1\n", "http.port"),
    ],
)
def test_bad_yaml_value_names_the_key(tmp_path, text, key):
    path = write(tmp_path, text)
    message = refused(path)
    assert f"{key}:" in message
    assert str(path) in message


def test_every_problem_is_listed_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("INVENTORY_REDIS__PORT", "x")
    message = refused(write(tmp_path, "database:\n  port: x\n"))
    assert "database.port:" in message and "redis.port:" in message


def test_yaml_syntax_error_is_refused(tmp_path):
    message = refused(write(tmp_path, "database: [unclosed\n"))
    assert "cannot read configuration" in message and "config.yaml" in message


def test_unparseable_env_section_names_the_source(monkeypatch):
    monkeypatch.setenv("INVENTORY_DATABASE", "{not json")
    message = refused()
    assert '"database"' in message and "INVENTORY_" in message
    assert "None" not in message


# ---- secrets never printed ------------------------------------------------------------------------


def test_password_not_in_message_when_another_key_is_bad(monkeypatch):
    monkeypatch.setenv("INVENTORY_DATABASE__PASSWORD", SECRET)
    monkeypatch.setenv("INVENTORY_REDIS__PASSWORD", SECRET)
    monkeypatch.setenv("INVENTORY_DATABASE__PORT", "not-a-port")
    assert SECRET not in refused()


@pytest.mark.parametrize(
    "text",
    [
        f"database:\n  password: {SECRET}\n  port: nope\n",
        f"database:\n  password: [{SECRET}]\n",  # the password itself malformed
        f'database:\n  password: "{SECRET}\n  port: 1\n',  # YAML syntax error on the password line
        f"database:\n  password: {SECRET}\n  passwrod: {SECRET}\n",  # a typo'd secret key
        f"redis:\n  password: {{{SECRET}: 1}}\n",
        f"rabbitmq:\n  url: http://guest:{SECRET}@mq/\n",  # wrong scheme, credentials in the URL
        f"rabbitmq:\n  url: amqp://guest:{SECRET}@mq:notaport/\n",
    ],
)
def test_password_not_in_message_from_yaml(tmp_path, text):
    message = refused(write(tmp_path, text))
    assert SECRET not in message
    assert SECRET[:8] not in message


def test_password_not_in_message_from_a_broken_env_section(monkeypatch):
    monkeypatch.setenv("INVENTORY_DATABASE", '{"password": "' + SECRET + '", ')
    assert SECRET not in refused()


def test_password_not_in_message_from_a_bad_url_in_env(monkeypatch):
    monkeypatch.setenv("INVENTORY_RABBITMQ__URL", f"amqp://guest:{SECRET}@mq:99999999/")
    message = refused()
    assert "rabbitmq.url" in message and SECRET not in message


def test_cli_refuses_bad_config_with_exit_2_and_no_secret(monkeypatch, capsys):
    monkeypatch.setenv("INVENTORY_DATABASE__PASSWORD", SECRET)
    monkeypatch.setenv("INVENTORY_WORKER__BATCH_SIZE", "0")
    assert cli.main(["stock", "SKU-1"]) == 2
    out = capsys.readouterr()
    assert "worker.batch_size" in out.err
    assert SECRET not in out.err + out.out
