"""docker-compose.yml, checked statically: the compose specification's schema, mounts, wiring."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import ROOT
from tests.deploy.containers import compose_argv, image_config

COMPOSE = ROOT / "docker-compose.yml"
SCHEMA_PACKAGE = "docker-compose==1.29.2"  # its wheel ships the compose-spec JSON schema


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    """The compose specification's JSON schema, from the docker-compose wheel (installed --no-deps)."""
    try:
        path = Path(str(importlib.metadata.distribution("docker-compose").locate_file(
            "compose/config/compose_spec.json")))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        message = f"the compose-spec schema is not installed (pip install --no-deps {SCHEMA_PACKAGE})"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{message}; CI must install it")
        pytest.skip(f"{message}; skipped because CI is unset (under CI=true this fails)")
    return json.loads(path.read_text())


def test_matches_compose_spec_schema(compose, schema) -> None:
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors


def test_schema_rejects_a_broken_file(compose, schema) -> None:
    """The check has teeth: a misspelt key and a bad depends_on condition both fail it."""
    broken = copy.deepcopy(compose)
    broken["services"]["grafana"]["helthcheck"] = broken["services"]["grafana"].pop("healthcheck")
    broken["services"]["router"]["depends_on"]["leanserve-a"]["condition"] = "service_ready"
    errors = list(jsonschema.Draft201909Validator(schema).iter_errors(broken))
    assert len(errors) >= 2


def _bind_sources(service: dict[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source = volume.split(":")[0]
        else:
            source = volume.get("source", "") if volume.get("type", "bind") == "bind" else ""
        if source.startswith((".", "/")):
            sources.append(source)
    return sources


def test_every_mounted_path_exists(compose) -> None:
    seen = []
    for name, service in compose["services"].items():
        for source in _bind_sources(service):
            assert not source.startswith("/"), f"{name} mounts a host path {source}; use the repo"
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repo"
            seen.append(source)
        build = service.get("build")
        if build:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            assert context.is_dir()
            if isinstance(build, dict) and "dockerfile" in build:
                assert (context / build["dockerfile"]).is_file()
    assert seen, "no bind mounts found: the parser missed them"


def test_named_volumes_are_declared(compose) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source and not source.startswith((".", "/")):
                assert source in declared, f"{name} uses undeclared volume {source}"
    assert "model-cache" in declared


def test_profiles_and_gpu_reservations(compose) -> None:
    services = compose["services"]

    def gpus(service: dict[str, Any]) -> list[dict[str, Any]]:
        return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])

    assert services["leanserve"]["profiles"] == ["gpu"] and gpus(services["leanserve"])
    assert services["leanserve-cpu"]["profiles"] == ["cpu"] and not gpus(services["leanserve-cpu"])
    assert all("gpu" in d["capabilities"] for d in gpus(services["leanserve"]))
    for name in ("leanserve-a", "leanserve-b", "router"):
        assert services[name]["profiles"] == ["replicas"]
    # Monitoring runs whatever the profile.
    assert "profiles" not in services["prometheus"] and "profiles" not in services["grafana"]


def test_router_fronts_both_replicas(compose) -> None:
    router = compose["services"]["router"]
    argv = compose_argv(image_config(), router)
    assert argv[:2] == ["leanserve", "router"]
    replicas = [argv[i + 1] for i, a in enumerate(argv) if a == "--replica"]
    assert replicas == ["http://leanserve-a:8000", "http://leanserve-b:8000"]
    assert argv[argv.index("--policy") + 1] == "least-loaded"
    assert argv[argv.index("--port") + 1] == "8080" and "8080:8080" in router["ports"]


def test_healthchecks_and_depends_on_conditions(compose) -> None:
    services = compose["services"]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        for dep, cond in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep]
            # A dependency must be active whenever the dependant is (compose rejects it otherwise).
            dep_profiles = set(services[dep].get("profiles", []))
            own_profiles = set(service.get("profiles", []))
            if dep_profiles:
                assert own_profiles and own_profiles <= dep_profiles, f"{name} -> {dep}: profiles differ"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert "/health" in " ".join(services["leanserve"]["healthcheck"]["test"])


def test_prometheus_and_grafana_get_our_config(compose) -> None:
    prom_mounts = compose["services"]["prometheus"]["volumes"]
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom_mounts
    for rule_file in config["rule_files"]:  # relative to the config file inside the container too
        assert f"./deploy/prometheus/{rule_file}:/etc/prometheus/{rule_file}:ro" in prom_mounts
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    for name in compose["services"]:
        if name.startswith("leanserve"):
            assert f"{name}:8000" in targets, f"Prometheus does not scrape {name}"
    grafana = compose["services"]["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/leanserve.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in grafana
