"""docs/configuration.md's reference is generated from config.py and says what the worker reads."""

from __future__ import annotations

import os
import re
import typing
from typing import Any, Literal

import pytest
from pydantic import SecretStr

from inventory_worker import config_reference
from inventory_worker.config import Settings, load_settings


def test_committed_reference_matches_the_models():
    assert config_reference.committed() == config_reference.render(), (
        "docs/configuration.md has drifted from config.py: run python -m inventory_worker.config_reference --write"
    )


def _documented() -> dict[str, tuple[str, str]]:
    """{dotted key: (environment variable, default cell)} from the committed reference."""
    rows = re.findall(
        r"(?m)^\| `(\w+\.\w+)` \| `(INVENTORY_\w+)` \| [^|]+ \| ([^|]+) \|", config_reference.committed()
    )
    return {key: (env, default.strip()) for key, env, default in rows}


def test_every_setting_is_documented_once_with_its_default():
    documented = _documented()
    actual = {
        f"{s}.{k}": f
        for s, sf in Settings.model_fields.items()
        for k, f in sf.annotation.model_fields.items()
    }
    assert sorted(documented) == sorted(actual)
    for key, field in actual.items():
        assert documented[key][1] == _shown(field.default), key


def _shown(default: Any) -> str:
    if isinstance(default, SecretStr):
        default = default.get_secret_value()
    if default is None:
        return "null"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    return "empty" if default == "" else f"`{default}`"


def _another_value(field: Any) -> tuple[str, Any] | None:
    """A valid value other than the default, as an environment variable's text and as parsed."""
    if typing.get_origin(field.annotation) is list and typing.get_args(field.annotation) == (str,):
        return '["doc-check:1"]', ["doc-check:1"]  # the lists of host:port
    kinds = [a for a in (typing.get_args(field.annotation) or (field.annotation,)) if a is not type(None)]
    kind = kinds[0]
    if typing.get_origin(kind) is Literal:
        other = next(v for v in typing.get_args(kind) if v != field.default)
        return other, other
    if kind is bool:
        return ("false", False) if field.default else ("true", True)
    if kind in (int, float):
        value = kind((field.default or 1) + 1)
        return str(value), value
    if kind in (str, SecretStr):
        return "doc-check", "doc-check"
    return None  # the URL and the token list: covered by test_config.py


def test_every_documented_environment_variable_sets_its_key(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no config/config.yaml here: defaults and the environment only
    for name in [n for n in os.environ if n.startswith("INVENTORY_")]:
        monkeypatch.delenv(name)
    checked = 0
    for key, (env, _default) in _documented().items():
        section, name = key.split(".")
        field = Settings.model_fields[section].annotation.model_fields[name]
        value = _another_value(field)
        if value is None:
            continue
        monkeypatch.setenv(env, value[0])
        got = getattr(getattr(load_settings(), section), name)
        monkeypatch.delenv(env)
        assert (got.get_secret_value() if isinstance(got, SecretStr) else got) == value[1], env
        checked += 1
    assert checked > 50


def test_every_setting_needs_a_description():
    from pydantic import BaseModel

    class Undocumented(BaseModel):
        level: int = 1

    with pytest.raises(ValueError, match="Undocumented.level has no description"):
        config_reference._rows(Undocumented)


def test_check_and_write(monkeypatch, tmp_path, capsys):
    doc = tmp_path / "configuration.md"
    text = config_reference.DOC_PATH.read_text()
    doc.write_text(text.replace("PostgreSQL host.", "The database host."))
    monkeypatch.setattr(config_reference, "DOC_PATH", doc)
    assert config_reference.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert config_reference.main(["--write"]) == 0
    assert doc.read_text() == text  # the prose around the reference is kept
    assert config_reference.main(["--check"]) == 0
