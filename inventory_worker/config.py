"""Settings: defaults < config/config.yaml < environment (INVENTORY_*, `__` for nesting).

The YAML path comes from `--config`, else INVENTORY_CONFIG, else config/config.yaml if it
exists. A bad value is refused at start with the key's dotted name in the message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AnyUrl, BaseModel, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

DEFAULT_CONFIG_PATH = Path("config/config.yaml")


class DatabaseSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(5432, ge=1, le=65535)
    user: str = "postgres"
    password: str = ""
    dbname: str = "inventory"
    connect_timeout_seconds: int = Field(5, ge=1)

    def dsn(self, dbname: str | None = None) -> dict[str, Any]:
        """Keyword arguments for psycopg2.connect; the password is never put in a string."""
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": dbname or self.dbname,
            "connect_timeout": self.connect_timeout_seconds,
            "application_name": "inventory-worker",
        }
        if self.password:
            kwargs["password"] = self.password
        return kwargs


class RedisSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(6379, ge=1, le=65535)
    db: int = Field(0, ge=0)
    password: str = ""
    key_prefix: str = "inventory:"
    cache_ttl_seconds: int = Field(3600, ge=1)
    socket_timeout_seconds: float = Field(2.0, gt=0)


class RabbitMQSettings(BaseModel):
    url: AnyUrl = AnyUrl("amqp://guest:guest@127.0.0.1:5672/%2F")
    exchange: str = "orders"
    queue: str = "inventory.orders"
    events_exchange: str = "inventory.events"
    dead_letter_exchange: str = "inventory.dlx"
    dead_letter_queue: str = "inventory.orders.dlq"
    # A message whose application was cut short this many times (it keeps crashing workers) is
    # dead-lettered by the worker, which counts attempts in PostgreSQL.
    delivery_limit: int = Field(5, ge=1)
    # RabbitMQ's x-delivery-limit, a backstop only: the broker also counts every return after a
    # lost connection, so a low value dead-letters valid events when the broker flaps.
    broker_delivery_limit: int = Field(100, ge=1)
    heartbeat_seconds: int = Field(30, ge=0)

    @field_validator("url")
    @classmethod
    def _amqp_scheme(cls, v: AnyUrl) -> AnyUrl:
        if v.scheme not in ("amqp", "amqps"):
            raise ValueError("must be an amqp:// or amqps:// URL")
        return v


class WorkerSettings(BaseModel):
    # None: one consumer process per CPU.
    processes: int | None = Field(None, ge=1, le=256)
    # Up to this many messages are applied in one PostgreSQL transaction and acked together.
    batch_size: int = Field(100, ge=1, le=10_000)
    # How long a partial batch waits for more messages before it is applied anyway.
    batch_max_wait_ms: int = Field(5, ge=0, le=10_000)
    default_reservation_ttl_seconds: int = Field(900, ge=1, le=31_536_000)
    max_message_bytes: int = Field(1_048_576, ge=1)
    # Outbox rows left unpublished this long (their process died) are published by any live one.
    outbox_relay_min_age_seconds: float = Field(5.0, ge=0)
    outbox_relay_interval_seconds: float = Field(1.0, gt=0)
    sweep_interval_seconds: float = Field(1.0, gt=0)
    sweep_batch_size: int = Field(500, ge=1, le=100_000)
    shutdown_grace_seconds: float = Field(25.0, gt=0)


class HTTPSettings(BaseModel):
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)


class LoggingSettings(BaseModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # auto: JSON lines, or human-readable console output when stderr is a terminal.
    format: Literal["auto", "json", "console"] = "auto"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INVENTORY_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    database: DatabaseSettings = DatabaseSettings()
    redis: RedisSettings = RedisSettings()
    rabbitmq: RabbitMQSettings = RabbitMQSettings()
    worker: WorkerSettings = WorkerSettings()
    http: HTTPSettings = HTTPSettings()
    logging: LoggingSettings = LoggingSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _yaml_path
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the offending keys."""


_yaml_path: Path | None = None


def load_settings(config_path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    global _yaml_path
    path = config_path or os.environ.get("INVENTORY_CONFIG")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
    elif DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    _yaml_path = path
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            problems.append(f"{key}: {err['msg']}")
        where = f" (from {path} and INVENTORY_* environment)" if path else " (from INVENTORY_* environment)"
        raise ConfigError("invalid configuration" + where + ":\n  " + "\n  ".join(problems)) from None
    except Exception as exc:  # YAML syntax errors and the like
        raise ConfigError(f"cannot read configuration {path}: {exc}") from None
    finally:
        _yaml_path = None
