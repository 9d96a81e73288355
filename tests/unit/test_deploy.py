"""deploy/: the systemd unit verifies, the Kubernetes manifests validate offline against their
schemas, the Grafana dashboard names only metrics the worker exports, the examples name only
real configuration keys."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft202012Validator

from inventory_worker.config import Settings, load_settings

from ..support import REPO, promtool

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "inventory-worker.service"


# ---- systemd ------------------------------------------------------------------------------


def _unit() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, v = line.split("=", 1)
            keys.setdefault(k, []).append(v)
    return keys


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path):
    # verify also checks that ExecStart exists: point it at this checkout's installed command.
    unit = tmp_path / UNIT.name
    unit.write_text(
        UNIT.read_text().replace(
            "/opt/inventory-worker/bin/inventory-worker",
            str(Path(sys.executable).parent / "inventory-worker"),
        )
    )
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    # Unknown keys or bad values are printed (exit status 0): any line about our file fails.
    complaints = [x for x in (r.stdout + r.stderr).splitlines() if UNIT.name in x]
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr


def test_systemd_unit_is_notify_hardened_and_outlasts_the_grace_period():
    keys = _unit()
    assert keys["Type"] == ["notify"] and keys["NotifyAccess"] == ["main"] and "WatchdogSec" in keys
    for hardening in (
        "DynamicUser",
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "RestrictSUIDSGID",
        "LockPersonality",
    ):
        assert keys[hardening] == ["yes"], hardening
    assert keys["ProtectSystem"] == ["strict"]
    assert keys["CapabilityBoundingSet"] == [""]
    grace = Settings().worker.shutdown_grace_seconds
    assert float(keys["TimeoutStopSec"][0]) > grace
    assert keys["KillMode"] == ["mixed"]  # SIGTERM to the supervisor, which stops its children


def _env_keys(text: str) -> list[str]:
    return [line.split("=", 1)[0] for line in text.splitlines() if line.startswith("INVENTORY_")]


def _is_setting(key: str) -> bool:
    section, _, name = key.removeprefix("INVENTORY_").lower().partition("__")
    return section in Settings.model_fields and name in Settings.model_fields[section].annotation.model_fields


def test_environment_examples_name_real_settings():
    env_example = (DEPLOY / "systemd" / "inventory-worker.env.example").read_text()
    unit_env = "\n".join(v for v in _unit().get("Environment", []))
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())["stringData"]
    keys = _env_keys(env_example) + _env_keys(unit_env) + list(secret)
    assert keys
    assert [k for k in keys if k != "INVENTORY_CONFIG" and not _is_setting(k)] == []


# ---- Kubernetes ---------------------------------------------------------------------------

# The CRDs are not in the Kubernetes schemas. These are written here from the upstream CRDs'
# openAPIV3Schema (prometheus-operator monitoring.coreos.com/v1 ServiceMonitor, KEDA
# keda.sh/v1alpha1 ScaledObject), restricted to the fields we use and refusing any other, so a
# typo fails; they are not the complete upstream schemas.
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {},
            "kind": {},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": _LABEL_SELECTOR,
                    "jobLabel": {"type": "string"},
                    "namespaceSelector": {"type": "object"},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "honorLabels": {"type": "boolean"},
                            },
                        },
                    },
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {},
            "kind": {},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "interval": _DURATION,
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": ["string", "integer"]},
                                            "for": _DURATION,
                                            "labels": {
                                                "type": "object",
                                                "additionalProperties": {"type": "string"},
                                            },
                                            "annotations": {
                                                "type": "object",
                                                "additionalProperties": {"type": "string"},
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {},
            "kind": {},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string"},
                            "kind": {"type": "string"},
                            "apiVersion": {"type": "string"},
                            "envSourceContainerName": {"type": "string"},
                        },
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "idleReplicaCount": {"type": "integer", "minimum": 0},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "additionalProperties": False,
                            "properties": {
                                "type": {"type": "string"},
                                "name": {"type": "string"},
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                                "authenticationRef": {"type": "object", "required": ["name"]},
                            },
                        },
                    },
                },
            },
        },
    },
}
# KEDA's rabbitmq scaler: the metadata keys it reads (anything else is a typo it would ignore).
RABBITMQ_TRIGGER_KEYS = {
    "host",
    "hostFromEnv",
    "protocol",
    "queueName",
    "mode",
    "value",
    "activationValue",
    "vhostName",
    "useRegex",
    "excludeUnacknowledged",
    "unsafeSsl",
    "timeout",
}


def _manifests() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def test_every_manifest_validates():
    version = kubernetes_validate.latest_version()
    seen = set()
    for path, doc in _manifests():
        key = (doc["apiVersion"], doc["kind"])
        seen.add(doc["kind"])
        if key in CRD_SCHEMAS:
            errors = [e.message for e in Draft202012Validator(CRD_SCHEMAS[key]).iter_errors(doc)]
            assert not errors, f"{path.name}: {errors}"
        else:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.name}: {exc.message} at {list(exc.path)}")
    assert seen == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "ServiceMonitor",
        "PodDisruptionBudget",
        "ScaledObject",
        "PrometheusRule",
    }


def test_kustomization_ties_every_manifest_but_the_secret_example():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(k["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == present


def _by_kind() -> dict[str, dict]:
    return {doc["kind"]: doc for _, doc in _manifests()}


def test_deployment_probes_security_and_grace(tmp_path):
    docs = _by_kind()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The probes use the management port, where the public port's clients cannot crowd them out.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert worker[probe]["httpGet"]["port"] == "management"
    assert pod["securityContext"]["runAsNonRoot"] is True
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    # With a read-only root, the metrics folder and /tmp must be writable volumes.
    env = {e["name"]: e.get("value") for e in worker["env"]}
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[env["PROMETHEUS_MULTIPROC_DIR"]]]
    assert "emptyDir" in volumes[mounts["/tmp"]]
    # The ConfigMap's file is a valid configuration, and the pod outlives its shutdown grace.
    cfg = tmp_path / "config.yaml"
    cfg.write_text(docs["ConfigMap"]["data"]["config.yaml"])
    settings = load_settings(cfg)
    assert env["INVENTORY_CONFIG"] == "/etc/inventory-worker/config.yaml"
    assert pod["terminationGracePeriodSeconds"] > settings.worker.shutdown_grace_seconds
    port = next(p for p in worker["ports"] if p["name"] == "http")["containerPort"]
    assert port == settings.http.port
    management = next(p for p in worker["ports"] if p["name"] == "management")["containerPort"]
    assert management == settings.http.management_port
    svc = {p["name"]: p for p in docs["Service"]["spec"]["ports"]}
    assert svc["management"]["targetPort"] == "management"
    assert docs["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "management"
    exposed = re.search(r"^EXPOSE (.+)$", (REPO / "Dockerfile").read_text(), re.M).group(1).split()
    assert {str(port), str(management)} <= set(exposed)


def test_keda_scales_the_deployment_on_the_configured_queue(tmp_path):
    docs = _by_kind()
    so = docs["ScaledObject"]["spec"]
    assert so["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    (trigger,) = so["triggers"]
    assert trigger["type"] == "rabbitmq" and set(trigger["metadata"]) <= RABBITMQ_TRIGGER_KEYS
    cfg = tmp_path / "config.yaml"
    cfg.write_text(docs["ConfigMap"]["data"]["config.yaml"])
    assert trigger["metadata"]["queueName"] == load_settings(cfg).rabbitmq.queue
    assert trigger["metadata"]["hostFromEnv"] in docs["Secret"]["stringData"]
    assert so["minReplicaCount"] >= 2  # the PodDisruptionBudget then keeps one running
    sm = docs["ServiceMonitor"]["spec"]["endpoints"][0]
    svc_ports = {p["name"] for p in docs["Service"]["spec"]["ports"]}
    assert sm["port"] in svc_ports and sm["path"] == "/metrics"


def test_alert_rules_pass_promtool_and_name_exported_metrics(tmp_path):
    spec = _by_kind()["PrometheusRule"]["spec"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": spec["groups"]}))
    r = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    exprs = [rule["expr"] for g in spec["groups"] for rule in g["rules"]]
    assert _unknown_metrics(exprs) == set()


# ---- Grafana ------------------------------------------------------------------------------


def _exported_metric_names() -> set[str]:
    from prometheus_client import REGISTRY

    from inventory_worker import metrics  # noqa: F401  (registers the worker's metrics)

    names = set()
    for family in REGISTRY.collect():
        for s in family.samples:
            names.add(s.name)
        names.add(family.name)
    return {n for n in names if n.startswith("inventory_")}


def _unknown_metrics(exprs: list[str]) -> set[str]:
    used = {m for e in exprs for m in re.findall(r"\binventory_[a-z_]+\b", e)}
    exported = _exported_metric_names()
    # Labelled counters only show samples once used: compare families, with their suffixes.
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in exported}
    return {
        m for m in used if m not in exported and re.sub(r"_(total|bucket|sum|count)$", "", m) not in families
    }


def test_dashboard_uses_only_exported_metrics_and_covers_the_essentials():
    dash = json.loads((DEPLOY / "grafana" / "inventory-worker.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\binventory_[a-z_]+\b", e)}
    unknown = _unknown_metrics(exprs)
    assert not unknown, f"dashboard names metrics the worker does not export: {unknown}"
    for essential in (
        "inventory_events_total",
        "inventory_event_processing_seconds_bucket",
        "inventory_outbox_backlog_messages",
        "inventory_dead_letter_queue_messages",
        "inventory_reservations_active",
        "inventory_http_requests_total",
    ):
        assert essential in used
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
