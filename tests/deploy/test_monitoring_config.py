"""Prometheus config and alert rules (promtool), Grafana provisioning and dashboard structure."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import ROOT
from tests.deploy.containers import k8s_by_kind

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
        "Cost per 1K requests / 1M tokens": "leanserve_cost_usd_total",
    }
    for title, metric in wanted.items():
        assert metric in exprs.get(title, ""), f"panel {title!r} missing or not querying {metric}"
    for title in ("Time to first token", "Inter-token latency", "End-to-end latency"):
        assert "histogram_quantile(0.5" in exprs[title] and "histogram_quantile(0.95" in exprs[title]


def test_dashboard_provider_points_at_the_mount() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/leanserve.yml").read_text())
    assert provider["apiVersion"] == 1 and provider["providers"][0]["type"] == "file"


# ---- fleet aggregation and cost ------------------------------------------------------------------

# Per-replica ratios: averaging or summing them across replicas gives neither the fleet's ratio nor a
# number at all once one replica's is NaN (the cost gauges are NaN while a replica finishes nothing).
RATIO_METRIC = re.compile(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*(?:_per_1k_\w*|_per_1m_\w*|_ratio|_perc)\b")
AGGREGATION = re.compile(r"\b(sum|avg)\s*(?:(by|without)\s*\(([^)]*)\))?\s*\(")
PER_REPLICA = {"instance", "pod"}


def _balanced(expr: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[i], 0)
        if depth == 0:
            return i
    raise AssertionError(f"unbalanced parentheses: {expr}")


def cross_replica_ratio_aggregations(expr: str) -> list[str]:
    """The `sum`/`avg` calls in ``expr`` that fold a ratio gauge over replicas (not kept by instance)."""
    found = []
    for m in AGGREGATION.finditer(expr):
        end = _balanced(expr, m.end() - 1)
        argument = expr[m.end():end]
        clause, labels = m.group(2), m.group(3)
        after = re.match(r"\s*(by|without)\s*\(([^)]*)\)", expr[end + 1:])
        if after:
            clause, labels = after.groups()
        grouped = {label.strip() for label in (labels or "").split(",")}
        per_replica = clause == "by" and grouped & PER_REPLICA
        if RATIO_METRIC.search(argument) and not per_replica:
            found.append(expr[m.start():end + 1])
    return found


def deployed_expressions() -> dict[str, str]:
    """Every PromQL expression shipped: dashboard panels, alert rules, KEDA triggers."""
    exprs = {}
    dashboard = json.loads((GRAFANA / "dashboards/leanserve.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs[f"dashboard {panel['title']!r} {target['refId']}"] = target["expr"]
    for group in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            exprs[f"rule {rule.get('alert') or rule.get('record')}"] = rule["expr"]
    for name, so in k8s_by_kind("ScaledObject").items():
        for trigger in so["spec"]["triggers"]:
            if trigger["type"] == "prometheus":
                exprs[f"ScaledObject {name} {trigger['name']}"] = trigger["metadata"]["query"]
    return exprs


def test_no_expression_folds_per_replica_ratios_across_replicas() -> None:
    bad = {where: hits for where, expr in deployed_expressions().items()
           if (hits := cross_replica_ratio_aggregations(expr))}
    assert not bad, bad


def test_ratio_check_has_teeth() -> None:
    check = cross_replica_ratio_aggregations
    assert check('avg(leanserve_cost_per_1k_requests_usd{model_name=~"$model"})')
    assert check("sum without (gpu) (leanserve_gpu_utilization_ratio)")
    assert check("avg(max by (instance) (vllm:kv_cache_usage_perc))")  # per replica, then folded
    assert not check("avg by (instance) (leanserve_engine_idle_ratio)")
    assert not check("max by (instance) (vllm:kv_cache_usage_perc)")
    assert not check("sum(rate(leanserve_cost_usd_total[5m])) / sum(rate(vllm:request_success_total[5m]))")


def exported_metric_names() -> set[str]:
    """Sample names leanserve exports, read from the code that declares each family."""
    declared = re.compile(r"(_gauge|_counter|_histogram|GaugeMetricFamily|CounterMetricFamily|"
                          r"HistogramMetricFamily|Gauge|Counter|Histogram)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"")
    names = set()
    sources = [*(ROOT / "src/leanserve/metrics").glob("*.py"), *(ROOT / "src/leanserve/router").glob("*.py")]
    for source in sources:
        for kind, name in declared.findall(Path(source).read_text()):
            if "ounter" in kind:
                names.add(name.removesuffix("_total") + "_total")
            elif "istogram" in kind:
                names |= {name + s for s in ("_bucket", "_sum", "_count")}
            else:
                names.add(name)
    return names


def test_every_queried_leanserve_metric_is_exported() -> None:
    exported = exported_metric_names()
    assert {"leanserve_cost_usd_total", "vllm:request_success_total"} <= exported, "the scan is broken"
    missing = {where: name for where, expr in deployed_expressions().items()
               for name in re.findall(r"\b(?:vllm:|leanserve_)[a-zA-Z0-9_:]*", expr) if name not in exported}
    assert not missing, missing


COST_PANEL = "Cost per 1K requests / 1M tokens"


def _promql_test(exprs: list[tuple[str, str, list[dict]]]) -> str:
    """A promtool unit test over two replicas: `a` busy, `b` idle (its per-replica gauges NaN)."""
    nan = " ".join(["NaN"] * 21)
    series = {
        # 3.6 $/h each: 0.001 $/s, 0.06 $ a minute.
        'leanserve_cost_usd_total{instance="a:8000",model_name="m"}': "0+0.06x20",
        'leanserve_cost_usd_total{instance="b:8000",model_name="m"}': "0+0.06x20",
        # a: 1 request/s and 100 tokens/s for 10 minutes, then nothing; b: nothing.
        'vllm:request_success_total{instance="a:8000",model_name="m",finished_reason="stop"}': "0+60x10 600x10",
        'vllm:request_success_total{instance="b:8000",model_name="m",finished_reason="stop"}': "0x20",
        'vllm:generation_tokens_total{instance="a:8000",model_name="m"}': "0+6000x10 60000x10",
        'vllm:generation_tokens_total{instance="b:8000",model_name="m"}': "0x20",
        'leanserve_cost_per_1k_requests_usd{instance="a:8000",model_name="m"}': "1x20",
        'leanserve_cost_per_1k_requests_usd{instance="b:8000",model_name="m"}': nan,
        'leanserve_cost_per_1m_output_tokens_usd{instance="a:8000",model_name="m"}': "10x20",
        'leanserve_cost_per_1m_output_tokens_usd{instance="b:8000",model_name="m"}': nan,
    }
    cases = [{"expr": expr, "eval_time": at, "exp_samples": samples} for expr, at, samples in exprs]
    return yaml.safe_dump({
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": [{"series": k, "values": v} for k, v in series.items()],
                   "promql_expr_test": cases}],
    }, sort_keys=False)


def _as_prometheus_sees_it(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m").replace('"$model"', '".*"')


def _run_promtool(require_tool, tmp_path: Path, exprs) -> subprocess.CompletedProcess[str]:
    binary = require_tool("promtool", INSTALL)
    (tmp_path / "cost_test.yml").write_text(_promql_test(exprs))
    return subprocess.run([binary, "test", "rules", "cost_test.yml"], capture_output=True, text=True,
                          timeout=60, check=False, cwd=tmp_path)


def test_fleet_cost_is_a_number_with_an_idle_replica(require_tool, tmp_path, dashboard) -> None:
    """Both replicas cost 0.002 $/s together; a serves 1 request/s, 100 tokens/s; b serves nothing."""
    (panel,) = [p for p in dashboard["panels"] if p["title"] == COST_PANEL]
    per_1k, per_1m = (_as_prometheus_sees_it(t["expr"]) for t in panel["targets"])
    stats = {p["title"]: _as_prometheus_sees_it(p["targets"][0]["expr"]) for p in dashboard["panels"]
             if p.get("targets")}
    assert stats["Cost / 1K requests"] == per_1k and stats["Cost / 1M output tokens"] == per_1m
    proc = _run_promtool(require_tool, tmp_path, [
        (per_1k, "8m", [{"labels": "{}", "value": 2.0}]),  # 0.002 $/s / 1 req/s x 1000
        (per_1m, "8m", [{"labels": "{}", "value": 20.0}]),  # 0.002 $/s / 100 tok/s x 1e6
        # The whole fleet idle: no figure rather than +Inf.
        (per_1k, "18m", []),
        (per_1m, "18m", []),
    ])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_averaging_the_per_replica_gauges_gives_nan(require_tool, tmp_path) -> None:
    """What the dashboard used to plot: one idle replica turns the fleet figure into NaN."""
    old = _as_prometheus_sees_it('avg(leanserve_cost_per_1k_requests_usd{model_name=~"$model"})')
    proc = _run_promtool(require_tool, tmp_path, [(old, "8m", [{"labels": "{}", "value": 1.0}])])
    assert proc.returncode != 0 and "NaN" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
