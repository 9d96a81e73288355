"""The README's tables stay true: every configuration key with its default, every metric."""

from __future__ import annotations

import re

from pydantic import BaseModel, SecretStr

from inventory_worker.config import Settings

from ..support import REPO

README = (REPO / "README.md").read_text()


def _table(after_heading: str) -> list[list[str]]:
    section = README.split(after_heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("## ") and rows:
            break
        if line.startswith("| `"):
            rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def _shown(value: object) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return ""
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{value}`"


def test_every_config_key_is_documented_with_its_default():
    documented: dict[str, str] = {}
    for keys, defaults, _meaning in _table("## Configuration"):
        names = re.findall(r"`([^`]+)`", keys)
        section = names[0].split(".")[0]
        full = [names[0]] + [section + n for n in names[1:]]
        values = [d.strip() for d in defaults.split(", ")] if len(full) > 1 else [defaults.strip()]
        assert len(values) == len(full), keys
        documented.update(zip(full, values, strict=True))
    actual = {}
    for section, field in Settings.model_fields.items():
        model: type[BaseModel] = field.annotation
        for key, f in model.model_fields.items():
            actual[f"{section}.{key}"] = f.default
    assert set(documented) == set(actual)
    for key, default in actual.items():
        if default is not None:
            assert documented[key] == _shown(default), key


def test_every_metric_is_documented():
    from prometheus_client import REGISTRY

    from inventory_worker import metrics  # noqa: F401

    exported = {f.name for f in REGISTRY.collect() if f.name.startswith("inventory_")}
    rows = _table("### Metrics")
    documented = {re.sub(r"_total$", "", re.findall(r"`([^`]+)`", r[0])[0]) for r in rows}
    assert documented == exported
