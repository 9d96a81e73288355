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
        "127.0.0.1",
        5432,
        "postgres",
        "inventory",
    )
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
    path = write(
        tmp_path, "database:\n  host: db.yaml\n  port: 6000\n  dbname: from_yaml\nworker:\n  batch_size: 7\n"
    )
    s = load_settings(path)
    assert (s.database.host, s.database.port, s.database.dbname, s.worker.batch_size) == (
        "db.yaml",
        6000,
        "from_yaml",
        7,
    )
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


# ---- typos: an unknown key stops the worker, in every section, the file and the environment ----

TOKEN = "  tokens:\n  - {name: a, roles: [inventory:read], sha256: '" + "a" * 64 + "', %s: 3}\n"


@pytest.mark.parametrize(
    "text,key",
    [
        ("databse:\n  host: x\n", "databse"),
        ("database:\n  hots: x\n", "database.hots"),
        ("redis:\n  key_prefx: x\n", "redis.key_prefx"),
        ("rabbitmq:\n  exchang: x\n", "rabbitmq.exchang"),
        ("worker:\n  batch_sise: 10\n", "worker.batch_sise"),
        ("http:\n  prot: 1\n", "http.prot"),
        ("auth:\n  metric_role: metrics:read\n", "auth.metric_role"),
        ("auth:\n" + TOKEN % "burts", "auth.tokens.0.burts"),
        ("rate_limit:\n  rate_per_secnd: 5\n", "rate_limit.rate_per_secnd"),
        ("logging:\n  levle: DEBUG\n", "logging.levle"),
    ],
)
def test_unknown_yaml_key_is_refused_in_every_section(tmp_path, text, key):
    message = refused(write(tmp_path, text))
    assert f"{key}: Extra inputs are not permitted" in message


@pytest.mark.parametrize(
    "name,hint",
    [
        ("INVENTORY_DATABSE__HOST", "INVENTORY_DATABASE__HOST"),
        ("INVENTORY_DATABASE__HOTS", "INVENTORY_DATABASE__HOSTS"),  # (or HOST: either is a fair hint)
        ("INVENTORY_DATABASE__DBNAM", "INVENTORY_DATABASE__DBNAME"),
        ("INVENTORY_REDIS__KEY_PREFX", "INVENTORY_REDIS__KEY_PREFIX"),
        ("INVENTORY_RABBITMQ__PASWORD_FILE", "INVENTORY_RABBITMQ__PASSWORD_FILE"),
        ("INVENTORY_WORKER__BATCH_SISE", "INVENTORY_WORKER__BATCH_SIZE"),
        ("INVENTORY_HTTP__PROT", "INVENTORY_HTTP__PORT"),
        ("INVENTORY_AUTH__METRIC_ROLE", "INVENTORY_AUTH__METRICS_ROLE"),
        ("INVENTORY_RATE_LIMIT__RATE_PER_SECND", "INVENTORY_RATE_LIMIT__RATE_PER_SECOND"),
        ("INVENTORY_LOGGING__LEVLE", "INVENTORY_LOGGING__LEVEL"),
        ("INVENTORY_CONFG", "INVENTORY_CONFIG"),
        ("INVENTORY_FOO__BAR", None),
    ],
)
def test_unknown_environment_variable_is_refused_with_the_likely_name(monkeypatch, name, hint):
    monkeypatch.setenv(name, "1")
    message = refused()
    assert f"unknown environment variable {name}" in message and "\n" not in message
    if hint:
        assert f"did you mean {hint}?" in message
    else:
        assert "did you mean" not in message


@pytest.mark.parametrize(
    "env",
    [
        {"INVENTORY_DATABASE": '{"host": "h"}', "INVENTORY_AUTH__TOKENS": "[]"},
        {"INVENTORY_RATE_LIMIT__BURST": "5", "INVENTORY_HTTP__THREADS": "3"},
        # Not settings, but read by the project (the config path, sql/, the tests, the fuzzers).
        {
            "INVENTORY_SQL_DIR": "/x",
            "INVENTORY_DOCS_DIR": "/x",
            "INVENTORY_TEST_RUN_ID": "r",
            "INVENTORY_TEST_KEEP": "1",
            "INVENTORY_FUZZ_SEED": "1",
            "INVENTORY_HTTP_SETTINGS_JSON": "{}",
            "INVENTORY_HTTP_HEALTH_SHM": "x",
        },
    ],
)
def test_known_environment_variables_are_accepted(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    load_settings()


def test_password_file_variable_is_recognised(monkeypatch, tmp_path):
    (tmp_path / "pw").write_text("pw\n")
    monkeypatch.setenv("INVENTORY_DATABASE__PASSWORD_FILE", str(tmp_path / "pw"))
    assert load_settings().database.password.get_secret_value() == "pw"


def test_cli_refuses_an_unknown_variable_with_exit_2_and_one_line(monkeypatch, capsys):
    monkeypatch.setenv("INVENTORY_DATABSE__HOST", "db")
    assert cli.main(["stock", "SKU-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "INVENTORY_DATABSE__HOST" in err and "INVENTORY_DATABASE__HOST" in err


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
