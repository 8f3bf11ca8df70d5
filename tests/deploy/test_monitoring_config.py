"""Prometheus config and alert rules (promtool), Grafana provisioning and dashboard structure."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.deploy.conftest import ROOT

PROM = ROOT / "deploy/prometheus"
GRAFANA = ROOT / "deploy/grafana"
INSTALL = "apt-get install -y --no-install-recommends prometheus"


def promtool(require_tool, *args: str) -> subprocess.CompletedProcess[str]:
    binary = require_tool("promtool", INSTALL)
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False, cwd=PROM)


def test_promtool_checks_config_and_rules(require_tool) -> None:
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        proc = promtool(require_tool, *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_unit_tests_pass(require_tool) -> None:
    """alerts_test.yml: each alert fires on its symptom and stays quiet on a healthy server."""
    proc = promtool(require_tool, "test", "rules", "alerts_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alerts_cover_the_required_symptoms() -> None:
    rules = {r["alert"]: r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert "vllm:time_to_first_token_seconds_bucket" in rules["LeanserveTTFTHigh"]["expr"]
    assert "vllm:num_requests_waiting" in rules["LeanserveQueueGrowing"]["expr"]
    assert "vllm:kv_cache_usage_perc" in rules["LeanserveKVCacheNearFull"]["expr"]
    assert "vllm:num_preemptions_total" in rules["LeanservePreemptionStorm"]["expr"]
    for rule in rules.values():
        assert rule.get("for") and rule["labels"]["severity"] and rule["annotations"]["summary"]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards/leanserve.json").read_text())


def test_dashboard_uses_the_provisioned_datasource(dashboard) -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    uid = datasources["datasources"][0]["uid"]
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"  # the compose service
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])


def test_dashboard_layout_is_valid(dashboard) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0
        for target in panel.get("targets", []):
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_dashboard_has_the_required_panels(dashboard) -> None:
    exprs = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in dashboard["panels"]}
    wanted = {
        "Request rate": "vllm:request_success_total",
        "Running / waiting requests": "vllm:num_requests_waiting",
        "KV cache usage": "vllm:kv_cache_usage_perc",
        "Time to first token": "vllm:time_to_first_token_seconds_bucket",
        "Inter-token latency": "vllm:inter_token_latency_seconds_bucket",
        "End-to-end latency": "vllm:e2e_request_latency_seconds_bucket",
        "Tokens/s": "vllm:generation_tokens_total",
        "Batch size (sequences per step)": "leanserve_batch_size_bucket",
        "GPU utilisation": "leanserve_gpu_utilization_ratio",
        "Cost per 1K requests / 1M tokens": "leanserve_cost_per_1k_requests_usd",
    }
    for title, metric in wanted.items():
        assert metric in exprs.get(title, ""), f"panel {title!r} missing or not querying {metric}"
    for title in ("Time to first token", "Inter-token latency", "End-to-end latency"):
        assert "histogram_quantile(0.5" in exprs[title] and "histogram_quantile(0.95" in exprs[title]


def test_dashboard_provider_points_at_the_mount() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/leanserve.yml").read_text())
    assert provider["apiVersion"] == 1 and provider["providers"][0]["type"] == "file"
